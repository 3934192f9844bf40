"""The hospital app's local ML screens: classify a scan, cancel training, and no blocking
call on the event loop while TensorFlow trains in the thread worker.

These need no round, but the app still signs in and connects to a real server.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from blockbuster import BlockBuster, BlockingError
from textual.widgets import Input, Static
from textual_image.widget import Image

from securefl.client.hospital import Hospital
from securefl.tui.hospital.app import HospitalApp
from securefl.tui.hospital.classify import ClassifyScreen, probability_bars
from securefl.tui.hospital.train import TrainScreen
from tests.tui.conftest import Fed, notifications_kept, running, until


def text(app: HospitalApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def test_probability_bars_put_the_likeliest_class_first() -> None:
    bars = probability_bars({"glioma": 0.1, "notumor": 0.75, "pituitary": 0.15}, width=20)
    lines = bars.splitlines()
    assert lines[0].startswith("no tumour ") and "█" * 15 + "░" * 5 in lines[0]
    assert lines[0].endswith("75.0%") and lines[2].startswith("glioma")
    assert lines[1].startswith("pituitary tumour ")  # the names Get's tables use
    assert len({line.index("█") for line in lines if "█" in line}) == 1  # bars aligned


def test_classify_a_scan_picked_by_path(fed: Fed) -> None:
    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            told = notifications_kept(app)
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                await pilot.press("c")
                assert isinstance(app.screen, ClassifyScreen)
                # No model yet: the error says what to do.
                scan = next((app.hospital.ml.scans_dir / "Testing" / "glioma").iterdir())
                app.screen.query_one("#path", Input).value = str(scan)
                app.screen.query_one("#path", Input).focus()
                await pilot.press("enter")
                await until(pilot, lambda: "Could not classify" in text(app, "#probs"), 120)
                # the reason stays where the answer would be (a notification fades)
                assert "get the global model or train first" in text(app, "#probs")
                assert any("get the global model or train first" in n for n in told)
                await pilot.press("escape")
                await pilot.press("g", "enter")
                await until(pilot, lambda: "accuracy" in text(app, "#summary"), 120)
                await pilot.press("escape", "c")
                app.screen.query_one("#path", Input).value = str(scan)
                app.screen.query_one("#path", Input).focus()
                await pilot.press("enter")
                await until(pilot, lambda: "%" in text(app, "#probs"), 120)
                probs = text(app, "#probs").splitlines()
                assert probs[0] == scan.name
                # the clinical names Get's tables use, not the folder names
                assert {re.match(r"(.+?) +[█░]", line)[1] for line in probs[1:5]} == {
                    "glioma", "meningioma", "no tumour", "pituitary tumour"}
                assert "notumor" not in text(app, "#probs")
                # which model answered, and whether its probabilities are calibrated
                assert re.match(r"Model: global version 0, (fine-tuned on this hospital's "
                                r"scans|recalibrated on this hospital's scans|as downloaded, "
                                r"chosen on this hospital's validation scans) \(calibrated, "
                                r"temperature", probs[5])
                top = max(float(line.split()[-1].rstrip("%")) for line in probs[1:5])
                assert ("LOW CONFIDENCE" in text(app, "#probs")) == (top < 70.0)
                assert probs[-1].startswith("Decision support only")
                assert app.screen.query_one("#scan", Image).image == scan
                # Not an image: refused with advice, nothing classified, the last answer gone.
                app.screen.query_one("#path", Input).value = str(fed.server_toml)
                await pilot.press("enter")
                await pilot.pause()
                assert any("not a JPEG or PNG" in n for n in told)
                assert "is not a JPEG or PNG file: pick a scan image" in text(app, "#probs")
                assert "%" not in text(app, "#probs")
                assert app.screen.query_one("#scan", Image).image is None
                # A damaged scan (text named .jpg, a cut-off JPEG): refused with advice,
                # and the app goes on (the preview's decoder used to end it).
                broken = fed.root / "broken.jpg"
                broken.write_text("not an image")
                cut = fed.root / "cut.jpg"
                cut.write_bytes(scan.read_bytes()[:200])
                for bad in (broken, cut):
                    app.screen.query_one("#path", Input).value = str(bad)
                    await pilot.press("enter")
                    await pilot.pause()
                    assert any(f"{bad} is not a readable JPEG or PNG image" in n
                               and "pick another scan" in n for n in told), bad
                    assert isinstance(app.screen, ClassifyScreen) and app.is_running
                    assert app.screen.query_one("#scan", Image).image is None
                    assert "%" not in text(app, "#probs")
                # A file that is not there is said not to exist.
                app.screen.query_one("#path", Input).value = str(scan.parent / "gone.jpg")
                await pilot.press("enter")
                await pilot.pause()
                assert any("gone.jpg does not exist" in n for n in told)

    asyncio.run(scenario())


def test_training_keeps_the_event_loop_responsive_and_can_be_cancelled(fed: Fed) -> None:
    """No blocking call of ours runs on the event loop while the thread worker trains
    (BlockBuster raises on one: sleeps, file and socket I/O, locks), and the screen keeps
    updating; then a second run is cancelled and leaves the model as it was.

    Why detection rather than measuring the loop's lag: lag depends on how busy the
    machine is, so a lag bound either flakes on a loaded machine or is too loose to catch
    anything; a blocking call is caught whatever the load.
    """

    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                await pilot.press("t")
                screen = app.screen
                assert isinstance(screen, TrainScreen)
                screen.query_one("#epochs", Input).value = "3"
                screen.query_one("#batch", Input).value = "4"
                busted = BlockBuster(scanned_modules=["securefl"])
                busted.activate()
                try:
                    await pilot.click("#start")
                    await until(pilot, lambda: "Trained on 59 scans" in text(app, "#state"),
                                180)
                finally:
                    busted.deactivate()
                assert app.return_code is None and app._exception is None
                assert len(screen.losses) > 3  # the chart followed the batches
                assert screen.query_one("#epoch-label", Static).render().plain == "Epoch 3 of 3"
                # Cancel a second, long run once it is under way.
                mtime = app.hospital.ml.model_path.stat().st_mtime_ns
                screen.query_one("#epochs", Input).value = "200"
                await pilot.click("#start")
                await until(pilot, lambda: len(screen.losses) >= 1, 120)
                await pilot.press("ctrl+x")
                await until(pilot, lambda: "cancelled" in text(app, "#state"), 120)
                assert app.hospital.ml.model_path.stat().st_mtime_ns == mtime

    asyncio.run(scenario())


def test_skipped_files_are_shown_after_training_and_after_evaluation(fed: Fed) -> None:
    """Scans in a patient subfolder count (dashboard and training); files that could not be
    used are named in the train screen and in the get screen's evaluation (on validation
    scans, from the same folder), not dropped silently."""
    hospital_toml = fed.hospital_tomls[0]
    scans = Hospital.from_file(hospital_toml).ml.scans_dir
    glioma = scans / "Training" / "glioma"
    flat = sorted(glioma.iterdir())
    (glioma / "patient_1").mkdir()
    for f in flat[:2]:  # two more glioma scans, exported one folder per patient
        (glioma / "patient_1" / f"copy_{f.name}").write_bytes(f.read_bytes())
    (glioma / "broken.jpg").write_bytes(b"not a scan")
    (glioma / "export.log").write_text("done")

    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(hospital_toml, "hospital_1")
            told = notifications_kept(app)  # a toast expires; under load it was missed
            async with app.run_test(size=(80, 24)) as pilot:  # the smallest we support
                await until(pilot, lambda: app.session is not None)
                # counted by file name, as training reads them: the copies and broken.jpg
                assert app.dashboard.summary["Training"]["glioma"] == len(flat) + 3
                await pilot.press("t")
                screen = app.screen
                assert isinstance(screen, TrainScreen)
                screen.query_one("#epochs", Input).value = "1"
                await pilot.click("#start")
                await until(pilot, lambda: "Trained on 60 scans" in text(app, "#state"), 180)
                skipped = text(app, "#skipped")
                assert skipped.startswith("2 files were skipped and not used: "
                                          "Training/glioma/broken.jpg (not a readable JPEG or "
                                          "PNG image), Training/glioma/export.log (not a "
                                          ".jpg/.jpeg/.png file)")
                # A notification arrives as a message: wait for it rather than race it.
                await until(pilot, lambda: skipped in told, 10)
                # and the list itself is scrolled into view at 80x24 (it was below the
                # bottom of the screen)
                area = screen.query_one("#train").region

                def shown() -> bool:
                    return area.contains_region(screen.query_one("#skipped").region)

                await until(pilot, shown, 10)
                await pilot.press("escape", "g", "enter")
                await until(pilot, lambda: "accuracy" in text(app, "#summary"), 120)
                # evaluated on the validation scans, from the same Training folder
                assert "on 12 validation scans" in text(app, "#summary")
                assert "2 files were skipped and not used: Training/glioma/broken.jpg" in text(
                    app, "#summary")
                # the toast names them as what they are (Training files, not test files)
                await until(pilot, lambda: "Some scan files were not used" in told.titles, 10)
                assert not any("test files" in title for title in told.titles)

    asyncio.run(scenario())


def test_control_a_blocking_call_on_the_event_loop_is_caught(tmp_path: Path) -> None:
    """The detector above is live: our own file writing, called on the loop, raises."""
    from securefl import config

    async def on_the_loop() -> None:
        busted = BlockBuster(scanned_modules=["securefl"])
        busted.activate()
        try:
            config.write_toml(tmp_path / "x.toml", {"port": 1})
        finally:
            busted.deactivate()

    with pytest.raises(BlockingError):
        asyncio.run(on_the_loop())


def test_get_shows_the_fine_tuning_epoch_on_its_own_bar(fed: Fed) -> None:
    """The fine-tuning epoch after a download takes a minute or more on a real Training
    folder: a Fine-tune bar appears on the Get screen and follows it batch by batch."""
    from securefl.tui.common import Progress as ProgressBar

    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(fed.hospital_tomls[0], "hospital_1")
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                assert app.hospital.ml.personalise == "best"  # the kits' default
                await pilot.press("g", "enter")
                await until(pilot, lambda: "accuracy" in text(app, "#summary"), 120)
                screen = app.screen
                assert screen.query_one("#finetune-row").display
                bar = screen.query_one("#finetune", ProgressBar)
                # It ends full: the epoch's batches, then the batch-norm layers measured.
                assert bar.total is not None and bar.progress == bar.total > 0
                # Which model was kept, and the figures it was chosen on.
                assert re.search(r"Balanced accuracy on the validation scans: as downloaded "
                                 r"[\d.]+%, recalibrated [\d.]+%", text(app, "#summary"))

    asyncio.run(scenario())


def test_a_failed_get_or_train_keeps_its_reason_on_the_screen(fed: Fed) -> None:
    """Walking it at 80x24 (helper): with no scans, Get and Train showed their reason only
    in a notification that faded after 10 s, leaving "Get weights failed; see the message."
    and "Training failed." on the screen, and the batch bar kept animating."""
    import shutil

    hospital_toml = fed.hospital_tomls[0]
    scans = Hospital.from_file(hospital_toml).ml.scans_dir
    for split in ("Training", "Testing"):
        shutil.rmtree(scans / split)
        for name in ("glioma", "meningioma", "notumor", "pituitary"):
            (scans / split / name).mkdir(parents=True)

    async def scenario() -> None:
        async with running(fed):
            app = HospitalApp(hospital_toml, "hospital_1")
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.session is not None)
                await pilot.press("g", "enter")
                await until(pilot, lambda: "failed: " in text(app, "#state"), 120)
                got = text(app, "#state")
                assert "see the message" not in got and "scan" in got, got
                await pilot.press("escape", "t")
                app.screen.query_one("#epochs", Input).value = "1"
                await pilot.click("#start")
                await until(pilot, lambda: "Training failed: " in text(app, "#state"), 120)
                assert "scan" in text(app, "#state"), text(app, "#state")
                from securefl.tui.common import Progress

                bar = app.screen.query_one("#batch-bar", Progress)
                assert bar.total is not None  # stopped, not animating as if at work

    asyncio.run(scenario())
