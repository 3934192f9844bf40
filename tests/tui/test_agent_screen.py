"""The hospital app with an agent running: it shows the agent, refuses to train or send
itself, and approves or skips the pending round over the agent's real local socket.

The agent is the real ``Agent`` answering on its real socket in the test's event loop (its
pending round is the one its approval step holds); snapshots show fixed statuses.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from securefl.client.agent import control
from securefl.client.agent.service import Agent
from securefl.client.hospital import Hospital
from securefl.tui.hospital.agent import AgentScreen
from securefl.tui.hospital.app import HospitalApp
from securefl.tui.hospital.dashboard import DashboardScreen
from securefl.tui.hospital.train import TrainScreen
from tests.tui.conftest import Fed, notifications_kept, until

PENDING = {"schedule_round": 12, "base_version": 11, "opened": "2026-11-28T22:00:00+00:00",
           "deadline": "2026-11-29T00:00:00+00:00",
           "scans": {"train": {"glioma": 14, "meningioma": 16, "notumor": 25, "pituitary": 1},
                     "validation": {"glioma": 3, "meningioma": 3, "notumor": 5,
                                    "pituitary": 1}}}
RECENT = [{"schedule_round": 9, "base_version": 9, "outcome": "published", "version": 10,
           "balanced_accuracy": 0.612, "reason": None},
          {"schedule_round": 10, "base_version": 10, "outcome": "failed", "version": None,
           "balanced_accuracy": None, "reason": "training-error"},
          {"schedule_round": 11, "base_version": 10, "outcome": "published", "version": 11,
           "balanced_accuracy": 0.655, "reason": None}]
STATUSES = {
    "pending": {"ok": True, "state": "pending-approval", "participation": "approve",
                "window": "22:00-06:00", "progress": None, "pending": PENDING,
                "detail": "round 12 on version 11 waits for a person's approval (app, or "
                "`approve`/`skip`)", "recent": RECENT},
    "training": {"ok": True, "state": "training", "participation": "auto", "window": None,
                 "progress": 0.4, "pending": None, "recent": RECENT,
                 "detail": "round 12: training, epoch 2/5"},
}


@pytest.mark.parametrize("which", list(STATUSES))
def test_agent_screen(snap_compare, fed: Fed, which: str) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def show(pilot) -> None:
        while not isinstance(pilot.app.screen, DashboardScreen):
            await pilot.pause(0.02)
        # The app polls for an agent every few seconds and shows what it hears ("none")
        # on this screen: stopped, and any poll in flight finished, before the fixed status
        # is shown (a loaded machine let a late poll overwrite it in the snapshot).
        pilot.app._agent_timer.stop()
        await pilot.app.workers.wait_for_complete()
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(pilot.app.screen, AgentScreen)
        pilot.app.screen.show(STATUSES[which])
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


def test_with_an_agent_running_the_app_shows_it_refuses_to_train_and_approves(
        fed: Fed) -> None:
    hospital = Hospital.from_file(fed.hospital_tomls[0])
    lines: list[str] = []
    agent = Agent(hospital, say=lines.append)

    async def scenario() -> str:
        lock = control.AgentLock(hospital.state_dir)
        lock.acquire()
        server = control.ControlServer(hospital.state_dir, agent.handle)
        await server.start()
        deadline = datetime.now(UTC) + timedelta(minutes=10)
        waiting = asyncio.create_task(agent._approval(
            {"schedule_round": 3, "base_version": 2, "opened": "",
             "deadline": deadline.isoformat()}, deadline))
        try:
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
            said = notifications_kept(app)
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
                await until(pilot, lambda: app.agent_status is not None
                            and app.agent_status.get("pending") is not None)
                assert any("Round 3 waits for your approval" in m for m in said), said
                await pilot.press("t")  # the app does not train while the agent runs
                await until(pilot, lambda: isinstance(app.screen, AgentScreen))
                assert not any(isinstance(s, TrainScreen) for s in app.screen_stack)
                assert any("so the app does not train itself" in m for m in said), said
                table = app.screen.query_one("#scans")
                total = table.get_row_at(table.row_count - 1)  # counted from the kit's scans
                assert total[0] == "total" and int(total[1]) + int(total[2]) == 70
                await pilot.press("a")
                decision = await asyncio.wait_for(waiting, 20)
                await until(pilot, lambda: any("Round 3 approved" in m for m in said))
                return decision
        finally:
            waiting.cancel()
            await server.close()
            lock.release()

    assert asyncio.run(scenario()) == "approve"
    assert any("round 3: approved over the local socket" in line for line in lines)


def test_without_an_agent_the_app_trains_as_before(fed: Fed) -> None:
    async def scenario() -> None:
        app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, TrainScreen))
            assert app.agent_status is None

    asyncio.run(scenario())


def test_the_agents_sentences_are_shown_as_written_brackets_included(fed: Fed) -> None:
    """The agent quotes settings and reason codes in brackets; read as markup they vanished
    ("today ( max_rounds_per_day)"), so a person could not tell which setting declined."""
    said = ("not taking part in round 6: this agent already took part in 2 round(s) today "
            "([agent] max_rounds_per_day) [daily-limit]")
    status = {**STATUSES["training"], "state": "waiting", "progress": None, "detail": said}

    async def scenario() -> None:
        app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            await pilot.press("a")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, AgentScreen)
            screen.show(status)
            await pilot.pause()
            shown = str(screen.query_one("#detail").render())
            assert "([agent] max_rounds_per_day) [daily-limit]" in shown, shown

    asyncio.run(scenario())
