"""SVG snapshots of every screen and dialog at 80x24 (and the dashboards at 120x40;
``pytest --snapshot-update`` to accept a change after looking at it).

Deterministic on purpose: the apps start with ``connect=False`` and are shown fixed server
data through the same ``show`` methods the live apps use, so no time, port, temporary path
or random value reaches a snapped screen.  The hospital's scans come from the seeded
synthetic federation, so its data table is the same on every run.
"""

from __future__ import annotations

import pytest

from securefl.client.hospital import LocalState
from securefl.client.session import (
    AuditEntry,
    HospitalInfo,
    RoundStep,
    ServerStatus,
    VersionEntry,
)
from securefl.ml.train import Classification, ClassMetrics, EvalReport
from securefl.tui.admin.app import AdminApp
from securefl.tui.admin.audit import AuditScreen
from securefl.tui.admin.versions import VersionsScreen
from securefl.tui.hospital.app import HospitalApp
from securefl.tui.hospital.classify import ClassifyScreen
from securefl.tui.hospital.dashboard import DashboardScreen
from securefl.tui.hospital.get import GetScreen
from tests.tui.conftest import Fed

from .samples import REPORT

SIZES = [(80, 24), (120, 40)]
STATUS = ServerStatus(version=3, round_id=4, phase="collecting",
                      online=("hospital_1", "hospital_2"),
                      joined=("hospital_1", "hospital_2"), submitted=("hospital_1",),
                      collected=1)
HOSPITALS = (
    HospitalInfo("hospital_1", True, True, True, True, "2026-11-28T10:15:00+00:00",
                 "2027-11-28T09:00:00+00:00"),
    HospitalInfo("hospital_2", True, True, True, False, "2026-11-28T10:14:30+00:00",
                 "2027-11-28T09:00:00+00:00"),
    HospitalInfo("hospital_3", True, False, False, False, "", ""),
)


async def _signed_in(pilot) -> None:
    while not isinstance(pilot.app.screen, DashboardScreen):
        await pilot.pause(0.02)
    pilot.app.show_status(STATUS, "Connected to localhost:9095 (mutual TLS)")
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_hospital_dashboard(snap_compare, fed: Fed, size: tuple[int, int]) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
    assert snap_compare(app, terminal_size=size, run_before=_signed_in)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_admin_dashboard(snap_compare, size: tuple[int, int]) -> None:
    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=show)


def test_hospital_login(snap_compare) -> None:
    assert snap_compare(HospitalApp(None, None, connect=False), terminal_size=(80, 24))


def test_hospital_train(snap_compare, fed: Fed) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def train(pilot) -> None:
        await _signed_in(pilot)
        await pilot.press("t")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=train)


def test_hospital_send_stepper(snap_compare, fed: Fed) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def send(pilot) -> None:
        await _signed_in(pilot)
        await pilot.press("s")
        await pilot.pause()
        screen = pilot.app.screen
        screen.started = screen.running = True
        screen.on_step(RoundStep("joined", "joined round 4"))
        screen.on_step(RoundStep("roster", "2 hospitals in the round; checking their keys"))
        screen.on_step(RoundStep("keys-shared", "key shares sent"))
        screen.running = False  # (no worker behind it: nothing to wait for on exit)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=send)


def test_admin_aggregating(snap_compare) -> None:
    """The unmask step's bar and count while ``aggregate`` runs."""
    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS)
        app.dashboard.show(activity="Unmasking round 4: 1 of 2 hospitals answered (2 "
                           "needed)…", progress=(1, 2))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


VERSIONS = [VersionEntry(v, f"2026-11-{20 + v}T09:00:00+00:00", 0 if v == 0 else 3,
                         0 if v == 0 else 480 * 3, f"{v:x}" * 64) for v in range(4)]
AUDIT = [AuditEntry(i, f"2026-11-28T10:{i:02d}:00+00:00", ev, name, detail)
         for i, (ev, name, detail) in enumerate([
             ("connected", "hospital_1", "address=10.0.0.5:50122 role=hospital"),
             ("join", "hospital_1", "round_id=4"),
             ("submission", "hospital_1", "round_id=4 collected=1"),
             ("refused", "", "address=10.0.0.9:40100 reason=tls: certificate revoked"),
             ("admin", "admin", "action=aggregate"),
             ("aggregated", "", "round_id=4 version=4 contributors=2")])]


@pytest.mark.parametrize("which", ["versions", "audit"])
def test_admin_history_screens(snap_compare, which: str) -> None:
    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        await pilot.app.push_screen(VersionsScreen(VERSIONS) if which == "versions"
                                    else AuditScreen(AUDIT))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)




def test_hospital_get_evaluated(snap_compare, fed: Fed) -> None:
    """Get weights after the download: the per-class sensitivity and the confusion matrix."""
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def got(pilot) -> None:
        await _signed_in(pilot)
        await pilot.press("g")
        await pilot.pause()
        screen = pilot.app.screen
        screen._downloaded(4_000_000, 4_000_000)  # what the download worker reports
        screen.version = 4
        # what get's personalisation records (securefl.client.hospital.apply_global)
        screen.hospital._set_local_state(LocalState(4, False, 0, personalisation="recalibrate",
                                                    personalised_scans=59))
        screen.post_message(GetScreen.Evaluated(REPORT, None))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=got)


def test_hospital_classified(snap_compare, fed: Fed) -> None:
    """A scan in the terminal (unicode blocks here) and its class probabilities as bars."""
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def classified(pilot) -> None:
        await _signed_in(pilot)
        await pilot.press("c")
        await pilot.pause()
        screen = pilot.app.screen
        scan = sorted((screen.hospital.ml.scans_dir / "Testing" / "glioma").iterdir())[0]
        screen.query_one("#scan").image = scan
        screen.post_message(ClassifyScreen.Classified(scan, Classification(
            {"glioma": 0.61, "meningioma": 0.27, "notumor": 0.04, "pituitary": 0.08},
            True, 1.8, 0.7, "global version 4"), None))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=classified)


def test_train_screen_says_when_it_measures_the_batch_norm_statistics(fed: Fed) -> None:
    """After the last epoch the bar keeps moving: one step per batch-norm layer measured."""
    import asyncio

    from textual.widgets import Label, ProgressBar, Static

    from securefl.ml.train import Progress
    from securefl.tui.hospital.train import TrainScreen

    async def scenario() -> None:
        app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await _signed_in(pilot)
            await pilot.press("t")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TrainScreen)
            screen.post_message(TrainScreen.Update(
                Progress(1, 1, 2, 4, 0.5, 0.7, stage="calibrating")))
            await pilot.pause()
            assert "Batch-norm layer 2 of 4" in str(screen.query_one("#batch-label",
                                                                      Label).render())
            assert "batch-norm statistics" in str(screen.query_one("#state", Static).render())
            bar = screen.query_one("#batch-bar", ProgressBar)
            assert (bar.progress, bar.total) == (2, 4)

    asyncio.run(scenario())


# -- issue 16: every screen and dialog at 80x24, help included ----------------------------


async def _press(pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await pilot.pause()


@pytest.mark.parametrize("screen", ["dashboard", "train", "send", "get", "history",
                                    "classify", "login"])
def test_hospital_help(snap_compare, fed: Fed, screen: str) -> None:
    """``?`` (F1 on the sign-in screen) on each hospital screen: every key, and what for."""
    app = HospitalApp(fed.hospital_tomls[0], None if screen == "login" else "hospital_1",
                      connect=False)

    async def helped(pilot) -> None:
        if screen == "login":
            await _press(pilot, "f1")
            return
        await _signed_in(pilot)
        key = {"dashboard": "", "train": "t", "send": "s", "get": "g", "history": "h",
               "classify": "c"}[screen]
        if key:
            await _press(pilot, key)
        if screen == "classify":
            pilot.app.screen.query_one("#tree").focus()
        await _press(pilot, "question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=helped)


@pytest.mark.parametrize("screen", ["dashboard", "versions", "audit"])
def test_admin_help(snap_compare, screen: str) -> None:
    app = AdminApp(None, connect=False)

    async def helped(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS)
        if screen != "dashboard":
            await pilot.app.push_screen(VersionsScreen(VERSIONS) if screen == "versions"
                                        else AuditScreen(AUDIT))
        await _press(pilot, "question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=helped)


def test_hospital_confirm_logout(snap_compare, fed: Fed) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def asked(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "q")

    assert snap_compare(app, terminal_size=(80, 24), run_before=asked)


def test_hospital_confirm_quit_during_training(snap_compare, fed: Fed) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def asked(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "t")
        pilot.app.screen.running = True
        await _press(pilot, "ctrl+q")
        pilot.app.screen_stack[-2].running = False  # (nothing runs behind it)

    assert snap_compare(app, terminal_size=(80, 24), run_before=asked)


def test_hospital_train_in_progress(snap_compare, fed: Fed) -> None:
    """The bars mid-run, drawn with blocks so they show in any terminal."""
    from securefl.ml.train import Progress
    from securefl.tui.hospital.train import TrainScreen

    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def training(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "t")
        screen = pilot.app.screen
        screen._set_running(True)
        for batch, (loss, acc) in enumerate([(1.4, 0.3), (1.2, 0.4), (1.1, 0.45)], 1):
            screen.post_message(TrainScreen.Update(Progress(2, 3, batch, 5, loss, acc)))
            await pilot.pause()
        screen.running = False

    assert snap_compare(app, terminal_size=(80, 24), run_before=training)


def test_hospital_get_one_class_warning(snap_compare, fed: Fed) -> None:
    """A model that calls every scan glioma is flagged, in words."""

    all_glioma = EvalReport(
        accuracy=0.25, macro_f1=0.1,
        per_class={c: ClassMetrics(0.25 if c == "glioma" else 0.0,  # precision, recall
                                   1.0 if c == "glioma" else 0.0, 0.4 if c == "glioma"
                                   else 0.0, 4)
                   for c in ("glioma", "meningioma", "notumor", "pituitary")},
        confusion=[[4, 0, 0, 0]] * 4, num_samples=16, balanced_accuracy=0.25,
        split="validation")
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def got(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "g")
        screen = pilot.app.screen
        screen._downloaded(4_000_000, 4_000_000)
        screen.version = 1
        screen.post_message(GetScreen.Evaluated(all_glioma, None))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=got)


def test_hospital_get_details(snap_compare, fed: Fed) -> None:
    """The technical report behind d: macro F1, precision, the fingerprint."""
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def details(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "g")
        screen = pilot.app.screen
        screen.version, screen.sha256 = 4, "ab" * 32
        screen.post_message(GetScreen.Evaluated(REPORT, None))
        await pilot.pause()
        await _press(pilot, "d")

    assert snap_compare(app, terminal_size=(80, 24), run_before=details)


def test_hospital_send_before_start(snap_compare, fed: Fed) -> None:
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def opened(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "s")

    assert snap_compare(app, terminal_size=(80, 24), run_before=opened)


def test_hospital_disconnected(snap_compare, fed: Fed) -> None:
    """The server went away: the last known values greyed, marked stale."""
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def lost(pilot) -> None:
        await _signed_in(pilot)
        dash = pilot.app.dashboard
        dash.as_of = "10:15:02"
        dash.show(connection="Connection lost since 10:15:04: no answer from localhost:9095; "
                  "is the server running? — trying again in 4 s (r: now)",
                  stale=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=lost)


def _history_file(fed: Fed) -> None:
    from securefl.client.hospital import Hospital

    path = Hospital.from_file(fed.hospital_tomls[0]).ml.history_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '{"time": "2026-11-20T09:00:00Z", "event": "get", "version": 0, "contributors": 0, '
        '"total_samples": 0}\n'
        '{"time": "2026-11-20T09:01:00Z", "event": "evaluate", "accuracy": 0.25, '
        '"macro_f1": 0.1, "num_samples": 16}\n'
        '{"time": "2026-11-20T09:05:00Z", "event": "train", "num_samples": 40, "history": '
        '{"loss": [1.3, 1.1], "accuracy": [0.4, 0.55]}}\n'
        '{"time": "2026-11-27T09:00:00Z", "event": "get", "version": 1, "contributors": 2, '
        '"total_samples": 80}\n'
        '{"time": "2026-11-27T09:01:00Z", "event": "evaluate", "accuracy": 0.8125, '
        '"macro_f1": 0.8011, "num_samples": 16}\n')


@pytest.mark.parametrize("details", [False, True], ids=["table", "details"])
def test_hospital_history(snap_compare, fed: Fed, details: bool) -> None:
    _history_file(fed)
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)

    async def shown(pilot) -> None:
        await _signed_in(pilot)
        await _press(pilot, "h")
        if details:
            pilot.app.screen.query_one("#table").focus()
            await _press(pilot, "down", "enter")

    assert snap_compare(app, terminal_size=(80, 24), run_before=shown)


@pytest.mark.parametrize("which", ["versions", "audit"])
def test_admin_row_details(snap_compare, which: str) -> None:
    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        await pilot.app.push_screen(VersionsScreen(VERSIONS) if which == "versions"
                                    else AuditScreen(AUDIT))
        await pilot.pause()
        if which == "audit":
            await _press(pilot, "down", "down", "down")  # the refused connection
        await _press(pilot, "enter")

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


def test_admin_confirm_abort(snap_compare) -> None:
    """Abort asks with No focused (the admin app asks the server first; shown directly)."""
    from securefl.tui.common import ConfirmScreen

    app = AdminApp(None, connect=False)

    async def asked(pilot) -> None:
        app.dashboard.show(connection="Connected to localhost:9095 as admin", status=STATUS,
                           hospitals=HOSPITALS)
        await pilot.app.push_screen(ConfirmScreen(
            "Abort round 4? Nothing is published; every hospital in it has to send again.",
            title="Abort the round"))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=asked)


def test_admin_refused_and_disconnected(snap_compare) -> None:
    """Aggregate during enrolment is explained, not offered; then the server goes away and
    the table is greyed and marked stale."""
    app = AdminApp(None, connect=False)
    enrolling = ServerStatus(3, 4, "enrolling", ("hospital_1", "hospital_2"),
                             ("hospital_1",), (), 0)

    async def show(pilot) -> None:
        from securefl.tui.admin.app import cannot

        d = app.dashboard
        d.show(connection="Connected to localhost:9095 as admin", status=enrolling,
               hospitals=HOSPITALS)
        d.show(activity=cannot("aggregate", enrolling))
        d.as_of = "10:15:02"
        d.show(connection="Connection lost since 10:15:04 — trying again in 2 s (r: now)",
               stale=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


def test_admin_aggregation_failed(snap_compare) -> None:
    from securefl.errors import NotEnoughSurvivorsError
    from securefl.tui.admin.app import too_few_advice

    app = AdminApp(None, connect=False)

    async def show(pilot) -> None:
        d = app.dashboard
        d.show(connection="Connected to localhost:9095 as admin", status=STATUS,
               hospitals=HOSPITALS)
        d.show(activity=too_few_advice(NotEnoughSurvivorsError(
            "only 1 of 2 hospitals answered the unmask step; 2 are needed")), sticky=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=show)


def test_hospital_login_problem(snap_compare) -> None:
    app = HospitalApp(None, None, connect=False)

    async def enter(pilot) -> None:
        await _press(pilot, "enter")

    assert snap_compare(app, terminal_size=(80, 24), run_before=enter)
