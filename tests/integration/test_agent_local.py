"""The agent as a process on the hospital's machine, before any server answers it.

``securefl client --config hospital.toml agent`` is started as the service would start it;
no server listens on the kit's port, so the agent keeps retrying (with backoff, one line
per attempt) while its local socket serves.  Checked: the socket is the service user's
only, the CLI refuses to train/get/send while the agent runs and talks to it instead, a
second agent is refused, SIGTERM stops it cleanly, and after SIGKILL the next agent starts
over the stale socket.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from securefl import config
from securefl.cli import EXIT_CODES
from securefl.errors import AgentRunningError, AgentUnavailableError, ServerUnreachableError

from .conftest import Federation
from .test_restart import free_port


def _kit(fed: Federation) -> tuple[Path, Path]:
    """Hospital a's kit, pointed at a port where nothing listens."""
    toml = fed.certs.kit("a") / "hospital.toml"
    data = config.read_toml(toml)
    data.update(host="127.0.0.1", port=free_port())
    data["agent"] = {"participation": "auto"}
    config.write_toml(toml, data)
    return toml, config.load(toml, config.ClientSettings).state_dir


def securefl(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "securefl", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _start(toml: Path, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "securefl", "client", "--config", str(toml),
                             "agent"], stdout=out, stderr=subprocess.STDOUT)


def _wait(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_while_an_agent_runs_the_cli_talks_to_it_and_never_trains_or_sends(
        fed: Federation) -> None:
    toml, state = _kit(fed)
    log = fed.tmp / "agent.log"
    agent = _start(toml, log)
    try:
        sock = state / "agent.sock"
        _wait("the agent's socket", sock.exists)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        _wait("a retried connection", lambda: "connection attempt 2 failed" in log.read_text())
        said = log.read_text()
        assert "agent: started for a (participation auto)" in said
        assert "cannot reach the securefl server" in said and "next attempt in" in said

        status = securefl("client", "--config", toml, "agent-status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("agent: connecting")
        assert "participation: auto" in status.stdout
        raw = json.loads(securefl("client", "--config", toml, "agent-status", "--json").stdout)
        assert raw["state"] == "connecting" and raw["pid"] == agent.pid

        for action in ("train", "get", "send"):
            refused = securefl("client", "--config", toml, action)
            assert refused.returncode == EXIT_CODES[AgentRunningError] == 14, refused.stderr
            assert f"the hospital's agent is running and owns its model and rounds, so " \
                   f"`{action}` was not run" in refused.stderr
            assert refused.stderr.count("\n") == 1  # one sentence
        assert not (state / "local.json").exists() and not (state / "send.json").exists()

        nothing = securefl("client", "--config", toml, "approve")
        assert nothing.returncode == 4 and "no round is waiting for approval" in nothing.stderr

        second = securefl("client", "--config", toml, "agent")
        assert second.returncode == 14
        assert f"another agent (pid {agent.pid}) is already running" in second.stderr

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log.read_text()
        said = log.read_text()
        assert "agent: SIGTERM received: stopping" in said and said.rstrip().endswith(
            "agent: stopped")
        assert not sock.exists()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    # No agent: the CLI works as before (here: the server is not there) ...
    got = securefl("client", "--config", toml, "get")
    assert got.returncode == EXIT_CODES[ServerUnreachableError], got.stderr
    gone = securefl("client", "--config", toml, "agent-status")
    assert gone.returncode == EXIT_CODES[AgentUnavailableError] == 15
    assert "no agent is running for this hospital" in gone.stderr


def test_after_sigkill_the_next_agent_starts_over_the_stale_socket(fed: Federation) -> None:
    toml, state = _kit(fed)
    first = _start(toml, fed.tmp / "agent1.log")
    try:
        _wait("the first agent's socket", (state / "agent.sock").exists)
        first.kill()
        first.wait()
        assert (state / "agent.sock").exists()  # left behind
        second = _start(toml, fed.tmp / "agent2.log")
        try:
            _wait("the second agent", lambda: securefl(
                "client", "--config", toml, "agent-status").returncode == 0)
            stop = securefl("client", "--config", toml, "agent-stop")
            assert stop.returncode == 0 and "the agent is stopping" in stop.stdout
            assert second.wait(timeout=30) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    finally:
        if first.poll() is None:
            first.kill()
