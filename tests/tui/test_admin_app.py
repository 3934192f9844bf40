"""Pilot tests of the administrator's app against a real server, with real hospitals'
sessions taking part in the rounds."""

from __future__ import annotations

import asyncio

from textual.widgets import DataTable, Static
from textual.widgets._footer import FooterKey

from securefl.client.session import RoundAbandonedError, ServerStatus
from securefl.errors import SecureFLError
from securefl.tui.admin.app import AdminApp
from securefl.tui.admin.audit import AuditScreen
from securefl.tui.admin.dashboard import AdminDashboard
from securefl.tui.admin.versions import VersionsScreen
from securefl.tui.common import ConfirmScreen
from tests.tui.conftest import (
    Fed,
    headless_send,
    notifications_kept,
    running,
    until,
    wait_collected,
)


def text(app: AdminApp, selector: str) -> str:
    return str(app.dashboard.query_one(selector, Static).render())


def footer(app: AdminApp) -> str:
    """The footer as drawn: " a Aggregate  e Close ..." (the keys offered now)."""
    return " ".join(str(k.render()) for k in app.screen.query(FooterKey))


def test_dashboard_aggregate_versions_audit_and_logout(fed: Fed) -> None:
    async def scenario() -> None:
        async with running(fed):
            sends = [asyncio.create_task(headless_send(fed.client(i), scale=0.01))
                     for i in (0, 1)]
            await wait_collected(fed, 2)
            app = AdminApp(fed.admin())
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: "updates received: 2 of 2" in text(app, "#round"))
                assert "Global version: 0" in text(app, "#version")
                table = app.dashboard.query_one("#hospitals", DataTable)
                rows = [table.get_row_at(i) for i in range(table.row_count)]
                assert [r[0] for r in rows] == ["hospital_1", "hospital_2"]
                assert all(r[1:4] == ["yes", "yes", "yes"] for r in rows)
                assert all(r[4] != "never" and r[5][:2] == "20" for r in rows)
                # Aggregate: asks first; "no" changes nothing.
                await pilot.press("a")
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("n")
                assert isinstance(app.screen, AdminDashboard)
                shown: list[str] = []  # every activity line, to see the unmask step advance
                show = app.dashboard.show
                app.dashboard.show = lambda **kw: (  # type: ignore[method-assign]
                    shown.append(kw.get("activity") or ""), show(**kw))[1]
                await pilot.press("a", "y")
                await until(pilot, lambda: "Published version 1" in text(app, "#activity"))
                assert "Combining round 1: 2 of 2 hospitals answered (2 needed)…" in shown
                assert "2 hospitals, 20 scans" in text(app, "#activity")
                assert [(await t).version for t in sends] == [1, 1]  # type: ignore[attr-defined]
                await until(pilot, lambda: "Global version: 1" in text(app, "#version"))
                # Version history: newest first, with contributors, samples and sha256.
                await pilot.press("v")
                await until(pilot, lambda: isinstance(app.screen, VersionsScreen))
                versions = app.screen.query_one("#versions", DataTable)
                assert versions.row_count == 2
                newest = versions.get_row_at(0)
                assert newest[0] == "1" and newest[2] == "2" and newest[3] == "20"
                assert newest[4].endswith("…")  # the full fingerprint is in the details
                await pilot.press("escape")
                # Audit log tail: events and names, never keys or weights.
                await pilot.press("l")
                await until(pilot, lambda: isinstance(app.screen, AuditScreen))
                audit = app.screen.query_one("#audit", DataTable)
                events = [audit.get_row_at(i)[2] for i in range(audit.row_count)]
                assert {"admin", "aggregated", "disconnected"} <= set(events)
                assert {"submission", "join", "connected"} <= set(events)
                await pilot.press("escape")
                session = app.session
                await pilot.press("q", "y")
                await until(pilot, lambda: app.return_code == 0)
                assert session is not None and session._conn is None

    asyncio.run(scenario())


def test_close_enrolment_too_few_to_unmask_and_abort(fed: Fed) -> None:
    """Three registered, two come: the admin closes enrolment; both vanish after their
    masked input, so aggregation cannot unmask and says what to do; then a round is
    aborted."""
    three = ["hospital_1", "hospital_2", "hospital_3"]

    async def scenario() -> None:
        async with running(fed, hospitals=three):
            app = AdminApp(fed.admin())
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                leavers = [asyncio.create_task(
                    headless_send(fed.client(i), leave_after="masked_input")) for i in (0, 1)]
                await until(pilot, lambda: "2 joined" in text(app, "#round"))
                # Two joined, the two this server needs: Close is offered ...
                await until(pilot, lambda: " e Close " in footer(app))
                await pilot.press("e", "y")
                await until(pilot, lambda: "Enrolment of round 1 closed" in text(app,
                                                                                  "#activity"))
                # ... and gone once enrolment is closed (walking it, "e Close" stayed while
                # updates were collected and answered only "Not now").
                # Decided from the polled status, not from when Textual redraws the footer
                # (a loaded CI run saw the footer keep it for 60 s after the status moved).
                await until(pilot, lambda: app.dashboard.status is not None
                            and app.dashboard.status.phase != "enrolling")
                assert app.check_action("close_enrolment", ()) is False
                assert await asyncio.gather(*leavers) == [None, None]
                await wait_collected(fed, 2)
                # Both left after their masked input: the dashboard says the round is lost
                # (walking it, it still read "collecting, 2 of 2").
                await until(pilot, lambda: "cannot finish" in text(app, "#activity"))
                assert "Aggregate (a) or abort (x) ends it" in text(app, "#activity")
                await pilot.press("a")
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
                assert "cannot finish" in str(app.screen.query_one("#question").render())
                await pilot.press("y")
                await until(pilot, lambda: "Aggregation failed" in text(app, "#activity"))
                said = text(app, "#activity")
                assert said.count("othing was published") == 1, said  # said once
                # A new round, aborted by the administrator: the hospitals are told.
                stayers = [asyncio.create_task(headless_send(fed.client(i))) for i in (0, 1)]
                await until(pilot, lambda: "Round 2" in text(app, "#round")
                            and "2 joined" in text(app, "#round"))
                await pilot.press("x", "y")
                await until(pilot, lambda: "Round 2 aborted" in text(app, "#activity"))
                results = await asyncio.gather(*stayers, return_exceptions=True)
                assert all(isinstance(r, RoundAbandonedError) for r in results), results
                assert all("aborted" in r.message for r in results
                           if isinstance(r, SecureFLError))

    asyncio.run(scenario())


def test_the_round_line_names_the_hospitals_a_bound_version_waits_for() -> None:
    """After a round failed once its survivor list was out, the dashboard says who the
    federation is waiting for (the docs walk found the admin app silent about it)."""
    from securefl.client.session import ServerStatus
    from securefl.tui.admin.dashboard import describe

    bound = ServerStatus(3, 7, "enrolling", ("b",), ("b",), (), 0, waiting_for=("a", "c"))
    assert describe(bound)[1].endswith("waiting for a, c")
    free = ServerStatus(3, 0, "idle", ("b",), (), (), 0)
    assert "waiting" not in describe(free)[1]


def test_the_round_line_does_not_contradict_an_open_scheduled_round() -> None:
    """Walking a scheduled federation: "Round: none in progress" stood above "Scheduled round
    7 ... enrolling" while the hospitals trained.  It now says what the round waits for."""
    from securefl.client.session import ServerStatus
    from securefl.tui.admin.dashboard import describe

    from .test_schedule_snapshots import SCHEDULE

    idle = ServerStatus(3, 0, "idle", ("hospital_1",), (), (), 0)
    line = describe(idle, SCHEDULE)[1]
    assert "none in progress" not in line
    assert "starts once scheduled round 7's hospitals have joined" in line
    assert describe(idle, None)[1] == "Round: none in progress"  # manual mode: unchanged
    publishing = SCHEDULE.model_copy(update={"round": SCHEDULE.round.model_copy(
        update={"phase": "publishing"})})
    assert describe(idle, publishing)[1] == "Round: none in progress"


def test_close_is_offered_only_with_enough_hospitals_and_says_why_not(fed: Fed) -> None:
    """Walking it: with 1 of the 3 a round needs, e asked "Close enrolment of round 4 now,
    with 1 hospital(s)?" and only after Yes said "a round needs at least 3".  Now the
    footer offers Close only when the server would close (its own figure, from the status),
    and e pressed anyway says how many joined, how many are needed and what to do, with no
    question first.  At 80 columns the footer also shows l (Audit)."""
    three = ["hospital_1", "hospital_2", "hospital_3"]

    async def scenario() -> None:
        one_colluder = fed.server_settings().round.model_copy(update={"colluders": 1})
        async with running(fed, hospitals=three, round=one_colluder):
            app = AdminApp(fed.admin())
            async with app.run_test(size=(80, 24)) as pilot:
                told = notifications_kept(app)
                await until(pilot, lambda: app.session is not None)
                joiner = asyncio.create_task(headless_send(fed.client(0)))
                await until(pilot, lambda: "1 joined" in text(app, "#round"))
                assert " e Close " not in footer(app), footer(app)
                await pilot.press("e")
                want = ("Only 1 hospital(s) joined round 1 and closing enrolment needs at "
                        "least 3: wait for more to join (enrolment also closes by itself), or "
                        "lower [round] colluders in server.toml and each hospital's [policy] "
                        "colluders and restart the server.")
                await until(pilot, lambda: want in told)
                assert not isinstance(app.screen, ConfirmScreen)
                assert want == text(app, "#activity")
                assert "1 joined" in text(app, "#round")  # the round still waits for more
                assert " l Audit " in footer(app)  # every key is in the footer or the help
                await pilot.press("x", "y")
                await until(pilot, lambda: "Round 1 aborted" in text(app, "#activity"))
                assert isinstance(*await asyncio.gather(joiner, return_exceptions=True),
                                  RoundAbandonedError)

    asyncio.run(scenario())


def test_every_admin_key_is_in_tui_md_and_shown_at_80_columns() -> None:
    """Walking it: at 80 columns the footer left out l and r, and Help named p, u and o,
    which docs/TUI.md's key table did not list.  Every key the dashboard binds is in that
    table, and at 80x24 each is in the footer or in Help's list of this screen's keys."""
    from itertools import pairwise
    from pathlib import Path

    from textual.binding import Binding

    from securefl.tui.common import help_text

    doc = (Path(__file__).parents[2] / "docs" / "TUI.md").read_text(encoding="utf-8")
    admin = doc.split("## Administrator:", 1)[1].split("\n## ", 1)[0]
    documented = {cell.strip().strip("`") for line in admin.splitlines()
                  if line.startswith("| ") for cell in line[2:].split("|", 1)[0].split(",")}
    bound = {(b if isinstance(b, Binding) else Binding(*b)).key
             for b in AdminDashboard.BINDINGS}
    assert bound - documented == set(), f"not in docs/TUI.md: {bound - documented}"

    async def scenario() -> None:
        app = AdminApp(None, connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            # The widest footer: a round enrolling with enough joined offers Close too.
            app.dashboard.show(status=ServerStatus(
                3, 4, "enrolling", ("h1", "h2", "h3"), ("h1", "h2", "h3"), (), 0, (), 3,
                "[round] colluders"))
            await pilot.pause()
            shown = footer(app)
            assert " e Close " in shown and " f1 Help " in shown
            # Drawn whole: no key overlaps the next (the palette key once covered "Help").
            spans = sorted((k.region.x, k.region.right) for k in app.screen.query(FooterKey))
            assert all(a[1] <= b[0] for a, b in pairwise(spans)), spans
            assert spans[-1][1] <= 80, shown
            keys = help_text(app, app.screen).split("Keys on this screen:", 1)[1]
            for key in sorted(bound):
                assert f" {key} " in shown or f"\n  {key} " in keys, key

    asyncio.run(scenario())


def test_with_no_round_a_and_e_say_what_opens_one(fed: Fed) -> None:
    """Walking it: a with no round said "nothing to combine" and stopped there.  Now a and
    e say what opens the next round: a hospital's Send in manual mode; u or o while the
    schedule is paused."""
    from securefl import config

    async def scenario(schedule: config.ScheduleSettings | None, opens: str) -> None:
        extra = {} if schedule is None else {"schedule": schedule}
        async with running(fed, **extra):
            app = AdminApp(fed.admin())
            async with app.run_test(size=(80, 24)) as pilot:
                told = notifications_kept(app)
                await until(pilot, lambda: app.session is not None
                            and app.dashboard.schedule is not None)
                await pilot.press("a")
                want = f"No round is running, so there is nothing to combine: {opens}."
                await until(pilot, lambda: want in told)
                assert want == text(app, "#activity")
                await pilot.press("e")
                want = f"No round is enrolling, so there is no enrolment to close: {opens}."
                await until(pilot, lambda: want in told)
                assert not isinstance(app.screen, ConfirmScreen)

    asyncio.run(scenario(None, "a round opens when a hospital sends its update (Send in "
                               "its app, or `securefl client send`)"))
    asyncio.run(scenario(config.ScheduleSettings(mode="auto", every="1h",
                                                 training_deadline="1h", start="paused"),
                         "the schedule is paused: u resumes it, o opens a round now"))
