"""Pilot test of the administrator's app with the server's schedule on (issue 17): a real
server in auto mode, a real hospital session, the app's keys for open, pause, resume and
abort -- and what the server then does."""

from __future__ import annotations

import asyncio

from textual.widgets import Static

from securefl import config
from securefl.client.session import HospitalSession
from securefl.protocol import messages as wm
from securefl.tui.admin.app import AdminApp
from securefl.tui.common import ConfirmScreen
from tests.tui.conftest import Fed, running, until


def text(app: AdminApp, selector: str) -> str:
    return str(app.dashboard.query_one(selector, Static).render())


def test_open_pause_resume_and_abort_from_the_app(fed: Fed) -> None:
    schedule = config.ScheduleSettings(mode="auto", every="1h", training_deadline="1h",
                                       start="paused")

    async def scenario() -> None:
        async with running(fed, schedule=schedule) as srv:
            sched = srv.coordinator.schedule
            assert sched is not None
            app = AdminApp(fed.admin())
            async with app.run_test(size=(80, 24)) as pilot, \
                    HospitalSession(fed.client(0)) as h:
                await until(pilot, lambda: "Schedule: paused" in text(app, "#schedule"))
                assert "none open" in text(app, "#schedule")
                await pilot.press("o")
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("y")
                await until(pilot, lambda: "Scheduled round 1" in text(app, "#schedule"))
                assert sched.open is not None and sched.open.schedule_round == 1
                pushed = await h.next_schedule_event(10)
                assert isinstance(pushed, wm.RoundOpen) and pushed.schedule_round == 1
                await h.training_failed(1, "no-scans")
                await until(pilot, lambda: "hospital_1 training failed: no scans"
                            in text(app, "#schedule").replace("\n", " "))
                await pilot.press("u")
                await until(pilot, lambda: "Schedule: running" in text(app, "#schedule"))
                assert not sched.paused
                await pilot.press("p")
                await until(pilot, lambda: "Schedule: paused" in text(app, "#schedule"))
                assert sched.paused
                await pilot.press("x")
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("y")
                await until(pilot, lambda: "none open" in text(app, "#schedule"))
                closed = await h.next_schedule_event(10)
                assert isinstance(closed, wm.RoundClosed) and closed.outcome == "aborted"
                assert sched.open is None and sched.paused

    asyncio.run(scenario())
