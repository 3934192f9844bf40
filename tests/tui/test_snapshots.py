"""SVG snapshots of the main screens at 80x24 and 120x40 (``pytest --snapshot-update`` to
accept a change after looking at it).

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
        screen.on_step(RoundStep("joined", "joined round 4"))
        screen.on_step(RoundStep("roster", "2 hospitals in the round; checking their keys"))
        screen.on_step(RoundStep("keys-shared", "key shares sent"))
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


REPORT = EvalReport(
    accuracy=0.8125, macro_f1=0.8011,
    per_class={"glioma": ClassMetrics(0.75, 0.75, 0.75, 4),
               "meningioma": ClassMetrics(0.667, 1.0, 0.8, 4),
               "notumor": ClassMetrics(1.0, 0.75, 0.857, 4),
               "pituitary": ClassMetrics(0.8, 0.75, 0.774, 4)},
    confusion=[[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 3, 1], [1, 0, 0, 3]], num_samples=16,
    balanced_accuracy=0.8125, split="validation", ece_before=0.142, ece_after=0.051,
    temperature=1.8)


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
