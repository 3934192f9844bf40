"""The agent's local socket: only the service user, one agent per hospital, approve/skip.

Real Unix-domain sockets in a temporary state folder and the real ``Agent`` answering them;
no server is needed for what is tested here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from blockbuster import BlockBuster

from securefl import config
from securefl.client.agent import control
from securefl.client.agent.service import Agent
from securefl.client.hospital import Hospital
from securefl.errors import AgentRunningError, AgentUnavailableError


def _agent(state: Path, lines: list[str]) -> Agent:
    settings = config.ClientSettings(cert=Path("h.pem"), key=Path("h.key"), ca=Path("ca.pem"),
                                     state_dir=state)
    return Agent(Hospital(settings, None), say=lines.append)


@pytest.mark.parametrize("deep", [False, True], ids=["short-path", "deep-state-folder"])
def test_the_socket_is_the_service_users_only_and_removed_on_close(tmp_path: Path,
                                                                   deep: bool) -> None:
    """Also in a state folder deeper than a Unix socket's address can name (about a
    hundred bytes): the agent died at start with "AF_UNIX path too long" there."""
    if deep:
        tmp_path = tmp_path / ("hospital-state-folder-" * 6) / "state"
        tmp_path.mkdir(parents=True)
        assert len(str(tmp_path / "agent.sock")) > 110
        # Its own address, as the kernel would take it, does not fit:
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.bind(str(tmp_path / "agent.sock"))

    async def scenario() -> None:
        lock = control.AgentLock(tmp_path)
        lock.acquire()
        server = control.ControlServer(tmp_path, _agent(tmp_path, []).handle)
        await server.start()
        mode = stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode)
        assert mode == 0o600, oct(mode)
        assert stat.S_ISSOCK(os.stat(tmp_path / "agent.sock").st_mode)
        # The app asks from its event loop: no blocking call there, deep folder or not.
        busted = BlockBuster(scanned_modules=["securefl"])
        busted.activate()
        try:
            status = await control.call(tmp_path, "status")
        finally:
            busted.deactivate()
        assert status["ok"] and status["state"] == "connecting"
        assert status["participation"] == "approve" and status["pid"] == os.getpid()
        assert await asyncio.to_thread(control.running, tmp_path)
        await server.close()
        lock.release()
        assert not (tmp_path / "agent.sock").exists()
        assert not control.running(tmp_path)
        with pytest.raises(AgentUnavailableError, match="no agent is running"):
            await control.call(tmp_path, "status")

    asyncio.run(scenario())


def test_a_second_agent_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    first = control.AgentLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(AgentRunningError) as caught:
            control.AgentLock(tmp_path).acquire()
        assert f"another agent (pid {os.getpid()}) is already running" in caught.value.message
    finally:
        first.release()
    again = control.AgentLock(tmp_path)
    again.acquire()  # free once the first let go
    again.release()


def test_a_stale_socket_left_by_a_killed_agent_is_removed(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.sock"))  # a socket file nobody listens on
    stale.close()
    assert (tmp_path / "agent.sock").exists() and not control.running(tmp_path)

    async def scenario() -> None:
        lock = control.AgentLock(tmp_path)
        lock.acquire()
        assert not (tmp_path / "agent.sock").exists()
        server = control.ControlServer(tmp_path, _agent(tmp_path, []).handle)
        await server.start()
        assert (await control.call(tmp_path, "status"))["ok"]
        await server.close()
        lock.release()

    asyncio.run(scenario())


def test_bad_requests_get_one_sentence(tmp_path: Path) -> None:
    async def scenario() -> list[dict]:
        server = control.ControlServer(tmp_path, _agent(tmp_path, []).handle)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "agent.sock"))
            answers = []
            for line in (b"not json\n", b'{"op": "format-disk"}\n', b'{"op": "approve"}\n',
                         b'{"op": "skip", "schedule_round": 3}\n'):
                writer.write(line)
                await writer.drain()
                import json

                answers.append(json.loads(await reader.readline()))
            writer.close()
            return answers
        finally:
            await server.close()

    garbage, unknown, no_round, nothing_pending = asyncio.run(scenario())
    assert not garbage["ok"] and "op one of status, approve, skip, history, stop" in \
        garbage["error"]
    assert not unknown["ok"] and "not a request this agent knows" in unknown["error"]
    assert not no_round["ok"] and "approve needs schedule_round" in no_round["error"]
    assert not nothing_pending["ok"]
    assert "no round is waiting for approval (round 3 is not pending)" in \
        nothing_pending["error"]


@pytest.mark.parametrize("decision", ["approve", "skip"])
def test_a_pending_round_waits_for_approve_or_skip_over_the_socket(
        tmp_path: Path, decision: str) -> None:
    lines: list[str] = []
    agent = _agent(tmp_path, lines)

    async def scenario() -> tuple[str, dict, dict, dict]:
        server = control.ControlServer(tmp_path, agent.handle)
        await server.start()
        try:
            deadline = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
            fields = {"schedule_round": 7, "base_version": 3, "opened": "", "deadline": deadline}
            waiting = asyncio.create_task(agent._approval(fields, datetime.fromisoformat(
                deadline)))
            while agent.state != "pending-approval":
                await asyncio.sleep(0.01)
            status = await control.call(tmp_path, "status")
            wrong = await control.call(tmp_path, decision, schedule_round=6)
            await asyncio.sleep(0.1)
            assert not waiting.done()  # the wrong round decided nothing
            right = await asyncio.to_thread(control.call_sync, tmp_path, decision,
                                            schedule_round=7)
            return await asyncio.wait_for(waiting, 10), status, wrong, right
        finally:
            await server.close()

    result, status, wrong, right = asyncio.run(scenario())
    assert result == decision
    assert status["state"] == "pending-approval"
    assert status["pending"]["schedule_round"] == 7 and status["pending"]["base_version"] == 3
    assert not wrong["ok"] and "round 6 is not the pending one (round 7 is)" in wrong["error"]
    assert right == {"ok": True, "schedule_round": 7, "decision": decision}
    assert agent.pending is None
    assert any("round 7 on version 3 waits for a person's approval" in line for line in lines)
    assert any(f"round 7: {'approved' if decision == 'approve' else 'skipped'}" in line
               for line in lines)


def test_no_decision_before_the_deadline_lets_the_round_go(tmp_path: Path) -> None:
    agent = _agent(tmp_path, [])

    async def scenario() -> str:
        deadline = datetime.now(UTC) + timedelta(seconds=0.3)
        fields = {"schedule_round": 2, "base_version": 0, "opened": "",
                  "deadline": deadline.isoformat()}
        return await asyncio.wait_for(agent._approval(fields, deadline), 10)

    assert asyncio.run(scenario()) == "nobody approved it before its training deadline"
