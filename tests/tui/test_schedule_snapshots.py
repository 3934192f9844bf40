"""SVG snapshots of the administrator's dashboard with the server's schedule on (issue 17),
at 80x24 and 120x40: the schedule lines, each hospital's part in the open round, a stalled
version.  Fixed data through the app's own ``show``, as in ``test_snapshots``."""

from __future__ import annotations

import pytest

from securefl.protocol import messages as wm
from securefl.tui.admin.app import AdminApp

from .test_snapshots import HOSPITALS, SIZES, STATUS

SCHEDULE = wm.ScheduleView(
    mode="auto", paused=False, every="24h", training_deadline="2h",
    next_open="2026-11-29T10:00:00+00:00",
    round=wm.ScheduledRound(schedule_round=7, base_version=3,
                            opened="2026-11-28T10:00:00+00:00",
                            deadline="2026-11-28T12:00:00+00:00", phase="enrolling",
                            hospitals={"hospital_1": "submitted", "hospital_2": "training",
                                       "hospital_3": "failed:no-scans"}),
    stalled=wm.Stalled(base_version=3, reason="hospital_3 already sent a masked update on "
                       "version 3 into a round that did not publish, so the cross-round "
                       "rule keeps them out until a new version is published"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_admin_dashboard_with_a_schedule(snap_compare, size: tuple[int, int]) -> None:
    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS, schedule=SCHEDULE)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=show)


def test_admin_dashboard_schedule_paused(snap_compare) -> None:
    app = AdminApp(None, connect=False)
    paused = SCHEDULE.model_copy(update={"paused": True, "round": None, "stalled": None,
                                         "next_open": None})

    async def show(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS, schedule=paused)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)
