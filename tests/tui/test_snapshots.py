"""SVG snapshots of the main screens at 80x24 and 120x40 (``pytest --snapshot-update`` to
accept a change after looking at it).

Deterministic on purpose: the apps start with ``connect=False`` and are shown fixed server
data through the same ``show`` methods the live apps use, so no time, port, temporary path
or random value reaches a snapped screen.  The hospital's scans come from the seeded
synthetic federation, so its data table is the same on every run.
"""

from __future__ import annotations

import pytest

from securefl.client.session import HospitalInfo, RoundStep, ServerStatus
from securefl.tui.admin.app import AdminApp
from securefl.tui.hospital.app import HospitalApp
from securefl.tui.hospital.dashboard import DashboardScreen
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
