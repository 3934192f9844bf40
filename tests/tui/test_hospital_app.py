"""Pilot tests of the hospital app against a real server on loopback with real certificates.

Each test is a plain function around ``asyncio.run`` (as in tests/integration): the server
and the app share the test's event loop.  Other hospitals and the administrator take part
through their real sessions.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from textual.widgets import DataTable, Input, Label, ProgressBar, Static

from securefl.client.hospital import Hospital
from securefl.client.session import AdminSession, HospitalSession
from securefl.tui.common import ConfirmScreen
from securefl.tui.hospital.app import HospitalApp
from securefl.tui.hospital.dashboard import DashboardScreen
from securefl.tui.hospital.get import GetScreen
from securefl.tui.hospital.history import HistoryScreen
from securefl.tui.hospital.login import LoginScreen
from securefl.tui.hospital.send import SendScreen
from securefl.tui.hospital.train import TrainScreen
from tests.outcome import assert_published, fedavgm_step, tolerance, weighted_mean
from tests.tui.conftest import (
    HEADLESS_SAMPLES,
    HEADLESS_UPDATE,
    Fed,
    headless_send,
    notifications_kept,
    running,
    until,
    wait_collected,
)


def text(app: HospitalApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def test_the_name_may_be_left_empty_and_the_certificate_names_the_hospital(fed: Fed) -> None:
    """A walk asked why the app wants a name the certificate already carries: the field
    says it is optional, and left empty the certificate's name is used."""
    async def scenario() -> None:
        app = HospitalApp(fed.hospital_tomls[0], None, connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            assert isinstance(app.screen, LoginScreen)
            assert "optional" in " ".join(str(w.render()) for w in app.screen.query(Label))
            assert app.screen.query_one("#name", Input).value == ""
            await pilot.click("#sign-in")
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            assert app.hospital is not None and app.hospital.name == "hospital_1"

    asyncio.run(scenario())


def test_sign_in_checks_the_name_against_the_certificate(fed: Fed) -> None:
    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(fed.hospital_tomls[0], None)
            async with app.run_test(size=(80, 24)) as pilot:
                assert isinstance(app.screen, LoginScreen)
                app.screen.query_one("#name", Input).value = "hospital_2"
                await pilot.click("#sign-in")
                await pilot.pause()
                problem = text(app, "#problem")
                assert "belongs to 'hospital_1', not 'hospital_2'" in problem
                # A mistyped path is about the field, not a --config never typed (a walk).
                config = app.screen.query_one("#config", Input)
                right = config.value
                config.value = right + ".typo"
                app.screen.query_one("#name", Input).focus()
                await pilot.press("enter")  # Enter in the name field signs in
                await until(pilot, lambda: "no settings file at" in text(app, "#problem"))
                assert "check the path typed above" in text(app, "#problem")
                assert "--config" not in text(app, "#problem")
                config.value = right
                assert isinstance(app.screen, LoginScreen)
                name = app.screen.query_one("#name", Input)
                name.value = "hospital_1"
                name.focus()
                await pilot.press("enter")  # Enter in the name field signs in too
                await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
                await until(pilot, lambda: "Connected" in text(app, "#connection"))
                await until(pilot, lambda: "version on server: 0" in text(app, "#global"))
                assert "Round: none in progress" in text(app, "#phase")
                table = app.screen.query_one("#data", DataTable)
                assert table.row_count == 5  # four classes and the total
                total = table.get_row_at(4)
                assert total[0] == "total" and int(total[1]) == 70 and int(total[2]) == 16

    asyncio.run(scenario())


def test_unreachable_server_is_said_plainly(fed: Fed) -> None:
    async def scenario() -> None:
        app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
        told = notifications_kept(app)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
            await until(pilot, lambda: "trying again in" in text(app, "#connection"))
            assert any("is it running" in m for m in told), told
            # The cause stays on the dashboard after the notification fades (a walk saw only
            # "Not connected since 06:45:06 — trying again").
            s = app.hospital.settings
            assert f"no answer from {s.host}:{s.port}; is the server running?" in \
                " ".join(text(app, "#connection").split())

    asyncio.run(scenario())


def test_get_train_send_history_and_logout(fed: Fed) -> None:
    """The weekly routine: get -> evaluate, train, send (with another hospital), history."""

    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                # Get weights: download, sha256, load, evaluate.
                await pilot.press("g")
                assert isinstance(app.screen, GetScreen)
                await pilot.press("enter")
                await until(pilot, lambda: "accuracy" in text(app, "#summary"), 120)
                assert "Global version 0" in text(app, "#summary")
                assert "on 11 validation scans" in text(app, "#summary")  # not Testing
                assert app.screen.query_one("#confusion", DataTable).row_count == 4
                assert app.screen.query_one("#per-class", DataTable).row_count == 4
                bar = app.screen.query_one("#download", ProgressBar)  # bytes, not just steps
                weights = np.load(app.hospital.state_dir / "global.npy")
                assert bar.total == weights.nbytes and bar.progress == weights.nbytes
                await pilot.press("escape")
                await until(pilot, lambda: "based on global version 0" in text(app, "#local"))
                # Train with the settings' epochs (1) and a batch size typed in.
                await pilot.press("t")
                assert isinstance(app.screen, TrainScreen)
                app.screen.query_one("#batch", Input).value = "8"
                await pilot.click("#start")
                await until(pilot, lambda: "Trained on 59 scans" in text(app, "#state"), 120)
                assert app.screen.losses and app.screen.accuracies
                await pilot.press("escape")
                assert "trained on 59 scans" in text(app, "#local")
                # Get now would overwrite the unsent training: asked first, No by default.
                await pilot.press("g")
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
                assert "was not sent" in str(app.screen.query_one("#question", Label).render())
                await pilot.press("enter")  # the focused button is No
                await until(pilot, lambda: "Kept the trained model" in text(app, "#state"))
                await pilot.press("escape")
                assert "trained on 59 scans" in text(app, "#local")
                # Send: the stepper follows the round; hospital_2 and the admin take part.
                await pilot.press("s")
                assert isinstance(app.screen, SendScreen)
                await pilot.press("enter")
                other = asyncio.create_task(headless_send(fed.client(1)))
                await wait_collected(fed, 2)
                await until(pilot, lambda: "Masked update sent" in text(app, "#steps")
                            and app.screen.done >= 4)
                async with AdminSession(fed.admin()) as admin:
                    assert (await admin.aggregate()).version == 1
                await until(pilot, lambda: "published global version 1" in text(app, "#message"))
                assert text(app, "#steps").count("✔") == 6
                assert (await other).version == 1  # type: ignore[attr-defined]
                # The outcome: version 1 is the weighted mean of what the app trained (kept
                # by the hospital as it was handed to the round) and the other hospital's.
                v0 = np.load(app.hospital.state_dir / "global.npy")
                mine = np.load(app.hospital.state_dir / "sent" / "v00000000.npy")
                theirs = np.full(mine.shape, HEADLESS_UPDATE, np.float32)
                parts = [(mine, 59), (theirs, HEADLESS_SAMPLES)]
                async with HospitalSession(fed.client(1)) as s:
                    v1 = (await s.get_global()).weights
                expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
                assert_published(v1, expected, tolerance(parts), v0)
                assert np.abs(mine - theirs).max() > 0.01  # the app's own training is in it
                await pilot.press("escape")
                assert "its update is in version 1" in text(app, "#local")
                await pilot.press("r")
                await until(pilot, lambda: "version on server: 1" in text(app, "#global"))
                # History shows the download, the evaluation and the training.
                await pilot.press("h")
                assert isinstance(app.screen, HistoryScreen)
                table = app.screen.query_one("#table", DataTable)
                events = [table.get_row_at(i)[1] for i in range(table.row_count)]
                assert events == ["get", "evaluate", "train"]
                await pilot.press("escape")
                # Log out: confirmation, then a clean disconnect.
                session = app.session
                await pilot.press("q")
                await pilot.press("n")
                assert isinstance(app.screen, DashboardScreen)
                await pilot.press("q")
                await pilot.press("y")
                await until(pilot, lambda: isinstance(app.screen, LoginScreen))
                assert session is not None and session._conn is None
                assert app.return_code is None  # back at sign-in, not out of the app

    asyncio.run(scenario())


def test_send_with_a_stale_model_says_what_to_do(fed: Fed) -> None:
    """Trained on version 0 while the others published version 1: refused, with advice."""

    async def scenario() -> None:
        async with running(fed):
            hospital = Hospital.from_file(fed.hospital_tomls[0])
            async with hospital.session() as s:
                await hospital.get(s)
            await asyncio.to_thread(hospital.train)
            # Version 1 without hospital_1: hospital_2 twice is not possible, so a plain pair
            # of real sessions for both sites publishes it first.
            sends = [asyncio.create_task(headless_send(fed.client(i))) for i in (0, 1)]
            await wait_collected(fed, 2)
            async with AdminSession(fed.admin()) as admin:
                await admin.aggregate()
            await asyncio.gather(*sends)
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                await pilot.press("s")
                await pilot.press("enter")
                await until(pilot, lambda: "current version is 1" in text(app, "#message"))
                assert "press g to get the new global weights" in text(app, "#message")
                assert "✘" in text(app, "#steps")

    asyncio.run(scenario())


def test_history_names_the_figure_and_the_scans_and_draws_validation_only() -> None:
    """History speaks like Get: balanced accuracy, on which scans; the curve is one kind
    of figure (validation), not validation and Testing mixed."""
    from securefl.tui.hospital.history import history_rows, validation_curve

    records = [
        {"time": "2026-12-01T10:00:00Z", "event": "evaluate", "accuracy": 0.9,
         "balanced_accuracy": 0.6, "num_samples": 11, "split": "validation"},
        {"time": "2026-12-01T10:01:00Z", "event": "evaluate", "accuracy": 0.8,
         "balanced_accuracy": 0.5, "num_samples": 16, "split": "testing"},
        {"time": "2026-12-01T10:02:00Z", "event": "evaluate", "accuracy": 0.7},  # an old line
        {"time": "2026-12-01T10:03:00Z", "event": "train", "num_samples": 59,
         "history": {"loss": [1.0, 0.5], "accuracy": [0.4, 0.475]}},
        {"time": "2026-12-01T09:00:00Z", "event": "get", "version": 0, "contributors": 0,
         "total_samples": 0},
        {"time": "2026-12-01T11:00:00Z", "event": "get", "version": 1, "contributors": 3,
         "total_samples": 597},
    ]
    metrics = [row[3] for row in history_rows(records)]
    # Version 0 read "0 hospitals, 0 scans", as if something had gone wrong (a walk).
    assert metrics[4:] == ["the starting model, before any round",
                           "3 hospitals, 597 scans"]
    assert metrics[0] == "balanced accuracy 60.0% on 11 validation scans"
    assert metrics[1] == "balanced accuracy 50.0% on 16 Testing scans"
    assert metrics[2] == "accuracy 70.0%"
    assert metrics[3] == "accuracy 47.5% on its 59 training scans"
    assert validation_curve(records) == [0.6, 0.7]


def test_history_shows_the_kept_epoch_and_a_stopped_training_as_such() -> None:
    """A walk found History listing a training stopped with Ctrl-C as a normal run (its
    "(cancelled)" cut off at 80 columns) and the last epoch's accuracy where `train` had
    printed the kept epoch's (75.7% against 78.5%)."""
    from securefl.tui.hospital.history import history_rows

    accuracy = [0.5, 0.6, 0.785, 0.757]
    records = [
        {"time": "2026-12-03T06:30:00Z", "event": "train", "num_samples": 507,
         "best_epoch": 3, "stopped_early": False,
         "history": {"loss": [1.2, 1.0, 0.8, 0.85], "accuracy": accuracy}},
        {"time": "2026-12-03T06:32:00Z", "event": "train", "num_samples": 507,
         "cancelled": True, "history": {"loss": [1.2], "accuracy": [0.781]}},
        {"time": "2026-12-03T06:40:00Z", "event": "train", "num_samples": 507,
         "best_epoch": 4, "history": {"accuracy": accuracy}},
    ]
    kept, stopped, last = (row[3] for row in history_rows(records))
    assert kept == "epoch 3 kept: accuracy 78.5%, 507 scans"
    assert stopped == "stopped before the end: nothing kept"
    assert last == "accuracy 75.7% on its 507 training scans"
    assert max(len(kept), len(stopped), len(last)) <= 40  # what the column shows at 80


def test_history_with_a_damaged_line_shows_the_rest_and_says_so(fed: Fed) -> None:
    """A cut-off line in history.jsonl closed the app with a traceback (found walking it);
    now the History screen lists the readable records and a warning counts the rest."""
    path = Hospital.from_file(fed.hospital_tomls[0]).ml.history_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"time": "2026-11-20T09:00:00Z", "event": "get", "version": 3, '
                    '"contributors": 3, "total_samples": 900}\n{"time": "2026-11-2')
    app = HospitalApp(fed.hospital_tomls[0], "hospital_1", connect=False)
    told = notifications_kept(app)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            while not isinstance(app.screen, DashboardScreen):
                await pilot.pause(0.02)
            await pilot.press("h")
            await pilot.pause()
            assert isinstance(app.screen, HistoryScreen)
            table = app.screen.query_one("#table", DataTable)
            assert table.row_count == 1
            assert any("1 damaged line(s)" in n and str(path) in n for n in told), told

    asyncio.run(scenario())


def test_a_server_that_went_back_a_version_is_said_on_connecting(fed: Fed) -> None:
    """Walking QUICKSTART §6: a server started from an older backup while this hospital
    held a newer version; the app showed the server's version and nothing else until Get
    or Send failed.  Now it says what happened as soon as it connects, and keeps the
    hospital's files as they were."""
    async def scenario() -> None:
        async with running(fed):
            hospital = Hospital.from_file(fed.hospital_tomls[0])
            async with hospital.session() as s:
                await hospital.get(s)  # version 0 ...
            meta = hospital.state_dir / "global.json"
            held = json.loads(meta.read_text())
            meta.write_text(json.dumps({**held, "version": 4}))  # ... as if 4 had been got
            before = meta.read_bytes()
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            told = notifications_kept(app)
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: any("went back" in m or "newest global" in m
                                               for m in told))
            said = next(m for m in told if "newest global" in m)
            assert said.startswith("The server's newest global version is 0, but this "
                                   "hospital already has version 4: global versions never "
                                   "go back"), said
            assert "ask the federation operator to restore the newest backup" in said
            assert meta.read_bytes() == before

    asyncio.run(scenario())


def test_bracketed_setting_names_are_shown_not_swallowed(fed: Fed, tmp_path) -> None:
    """Walking it at 80x24: a kit without its [ml] table was told "... has no  table: add
    scans_dir ...": Textual read "[ml]" as a style tag.  Messages are plain text now, in
    the screens' fields and in notifications alike."""
    from securefl import config

    data = config.read_toml(fed.hospital_tomls[0])
    data.pop("ml", None)
    plain = config.write_toml(fed.hospital_tomls[0].with_name("plain.toml"), data)

    async def scenario() -> None:
        app = HospitalApp(plain, "hospital_1")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, LoginScreen))
            await pilot.click("#sign-in")
            await until(pilot, lambda: "table" in text(app, "#problem"))
            assert "has no [ml] table: copy the [ml] table from the hospital.toml of the kit" \
                in text(app, "#problem")
            app.screen.notify("raise [policy] max_attempts by one", timeout=60)  # a screen's
            await until(pilot, lambda: bool(list(app._notifications)))
            shown = list(app._notifications)
            assert [(n.message, n.markup) for n in shown] == [
                ("raise [policy] max_attempts by one", False)]

    asyncio.run(scenario())
