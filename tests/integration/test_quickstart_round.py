"""docs/QUICKSTART.md's round, exactly as a newcomer types it, checked by its outcome.

Certificates by ``certs init``, synthetic scans put in each kit's ``scans/``, a server
process, and at two hospitals ``get`` -> ``train`` -> ``send`` as separate CLI processes
(``send`` stays until the admin aggregates), then ``admin aggregate``.  Real TLS, real
training.  The test then computes, from what each hospital kept (the update it handed to the
round and its scan count) and the version it downloaded, what version 1 must be by the
documented encoding and server-optimiser rules, and compares it with what ``get`` returns.
A test of version numbers alone let an all-zero update through before.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl.cli import EXIT_CODES
from securefl.config import read_toml, write_toml
from securefl.errors import UpdateAlreadySentError
from tests.outcome import assert_published, fedavgm_step, tolerance, weighted_mean

from .test_restart import free_port

SITES = ("north", "south", "east")  # c = 1 (the default) needs 3


def securefl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "securefl", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def spawn(*args: str | Path, cwd: Path, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "securefl", *map(str, args)], cwd=cwd,
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(what: str, check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def small_model(path: Path, **top: object) -> None:
    """The tutorial's one edit for a quick trial: smaller images, in the server and kits."""
    data = read_toml(path)
    table = data["model"]["ml"] if "model" in data else data["ml"]
    assert table["image_size"] == 128  # what the kits come with
    table["image_size"] = 32
    if "ml" in data:  # a kit: 70 synthetic scans leave the rarest class 2, one to validate
        data["ml"]["min_validation_per_class"] = 1
        assert data["ml"]["epochs"] == 15  # the kits carry the product's default ...
        data["ml"]["epochs"] = 2  # ... which a quick trial shortens (the round is the point)
    write_toml(path, {**data, **top})


def test_quickstart_round_publishes_the_weighted_mean_of_the_trained_updates(
        tmp_path: Path) -> None:
    port = free_port()
    ok = securefl("certs", "--dir", "certs", "init", "--server-host", "127.0.0.1",
                  "--hospitals", ",".join(SITES), "--port", str(port), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    certs = tmp_path / "certs"
    synth = securefl("data", "synth", "--out", "synth", "--hospitals", str(len(SITES)),
                     "--train", "70", "--test", "8", "--size", "32", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr
    kits = {name: certs / "kits" / name for name in SITES}
    for i, kit in enumerate(kits.values(), start=1):
        shutil.move(tmp_path / "synth" / f"hospital_{i}", kit / "scans")
        small_model(kit / "hospital.toml")
    server_toml = certs / "server.toml"
    small_model(server_toml, host="127.0.0.1")  # listen on loopback only: a test
    server = spawn("server", "--config", server_toml, cwd=tmp_path, log=tmp_path / "server.log")
    sends: dict[str, subprocess.Popen] = {}
    try:
        wait_for("the server", lambda: "listening on" in (tmp_path / "server.log").read_text())
        v0: dict[str, np.ndarray] = {}
        for name, kit in kits.items():
            cfg = kit / "hospital.toml"
            got = securefl("client", "--config", cfg, "get", cwd=tmp_path)
            assert got.returncode == 0 and "global version 0 downloaded" in got.stdout, got.stderr
            # What this hospital evaluates with is its own: the best on its validation
            # scans of the download as is, recalibrated or fine-tuned, with the figures.
            assert re.search(r"model is now global version 0, (fine-tuned on this hospital's "
                             r"scans|recalibrated on this hospital's scans|as downloaded, "
                             r"chosen on this hospital's validation scans)", got.stdout), \
                got.stdout
            assert re.search(r"balanced accuracy on the validation scans: as downloaded "
                             r"[\d.]+%, recalibrated [\d.]+%", got.stdout), got.stdout
            # in lines a terminal can show (it was one line of some 500 characters)
            assert re.search(r"\n  how: ", got.stdout), got.stdout
            assert max(map(len, got.stdout.splitlines())) < 300, got.stdout
            # The fine-tuning epoch shows it is moving (a minute or more on real data).
            assert re.search(r"fine-tuning on this hospital's scans: epoch 1/1  batch \d+/\d+",
                             got.stderr), got.stderr
            assert "already had" not in got.stdout
            if name == "east":  # a second get says it is the same version (a walk)
                again = securefl("client", "--config", cfg, "get", cwd=tmp_path)
                assert again.returncode == 0, again.stderr
                assert "note: this hospital already had global version 0; nothing new was " \
                       "published since the last get, and this hospital's own copy was made " \
                       "again from its current scans" in again.stdout, again.stdout
            v0[name] = np.load(kit / "state" / "global.npy")
            # the download is in the history the app's History screen lists (it was only
            # when the app made it)
            from securefl.ml.train import read_history

            got_record = read_history(kit / "model" / "history.jsonl")[-1]
            assert (got_record["event"], got_record["version"]) == ("get", 0), got_record
            trained = securefl("client", "--config", cfg, "train", cwd=tmp_path)
            assert trained.returncode == 0, trained.stderr
            assert "from global version 0 on 59 scans" in trained.stdout  # 11 validate
            if name == "north":  # get now would overwrite training that was not sent
                model = (kit / "model" / "model.keras").read_bytes()
                again = securefl("client", "--config", cfg, "get", cwd=tmp_path)
                assert again.returncode == 4 and "send it first" in again.stderr
                assert (kit / "model" / "model.keras").read_bytes() == model
            sends[name] = spawn("client", "--config", cfg, "send", cwd=tmp_path,
                                log=tmp_path / f"send-{name}.log")
        admin = certs / "admin.toml"
        wait_for("three masked updates", lambda: securefl(
            "admin", "--config", admin, "count", "--json",
            cwd=tmp_path).stdout.strip() == '{"collected": 3}')
        # What each hospital handed to the round, checked against its trained model before
        # anything overwrites the model: the update is (trained weights - version 0).
        import keras

        from securefl.ml.model import to_vector
        from securefl.ml.preprocess import layer_classes

        layer_classes()  # securefl's own preprocessing layers, registered for loading

        contributions = []
        for name, kit in kits.items():
            sent = np.load(kit / "state" / "sent" / "v00000000.npy")
            model = keras.saving.load_model(kit / "model" / "model.keras", compile=False)
            # global.npy is the model as downloaded (the same at every hospital, checked
            # below), not this hospital's personalised copy of it.
            np.testing.assert_array_equal(sent, to_vector(model) - v0[name])
            record = json.loads((kit / "state" / "send.json").read_text())
            assert record["stage"] == "masked-input" and record["base_version"] == 0
            contributions.append((sent, record["samples"]))
        assert [n for _, n in contributions] == [59, 59, 59]
        assert all(np.abs(u).max() > 1e-3 for u, _ in contributions)

        agg = securefl("admin", "--config", admin, "aggregate", cwd=tmp_path)
        assert agg.returncode == 0 and "published version 1 from 3 hospitals" in agg.stdout, \
            agg.stderr
        for name, proc in sends.items():
            assert proc.wait(timeout=120) == 0, (tmp_path / f"send-{name}.log").read_text()
            said = (tmp_path / f"send-{name}.log").read_text()
            assert "published global version 1 with this hospital's update in it" in said

        got = securefl("client", "--config", kits["north"] / "hospital.toml", "get",
                       cwd=tmp_path)
        assert got.returncode == 0 and "global version 1" in got.stdout
        v1 = np.load(kits["north"] / "state" / "global.npy")
        np.testing.assert_array_equal(v0["north"], v0["south"])
        expected, _ = fedavgm_step(v0["north"], weighted_mean(contributions), None)
        assert_published(v1, expected, tolerance(contributions), v0["north"])

        # The update is in version 1: south (which did not get it yet) cannot send it again.
        again = securefl("client", "--config", kits["south"] / "hospital.toml", "send",
                         cwd=tmp_path)
        assert again.returncode == EXIT_CODES[UpdateAlreadySentError] == 13
        assert "already in global version 1" in again.stderr
        # North downloaded version 1: its model is version 1, not trained since.
        stale = securefl("client", "--config", kits["north"] / "hospital.toml", "send",
                         cwd=tmp_path)
        assert stale.returncode == 4 and "train first" in stale.stderr

        # "What went wrong?": each hospital's own log tells the story, refusals included.
        story = {name: securefl("client", "--config", kit / "hospital.toml", "log", cwd=tmp_path)
                 for name, kit in kits.items()}
        north = story["north"].stdout.splitlines()
        assert [line.split()[3] for line in north] == [
            "downloaded", "trained", "REFUSED", "sending", "joined", "masked-input",
            "signed", "published", "downloaded", "REFUSED"], story["north"].stdout
        assert "trained from global version 0 on 59 scans" in north[1]
        assert "[data, by this hospital]" in north[2] and "send it first" in north[2]
        assert "list of 3 hospitals" in north[6]
        assert "published global version 1" in north[7] and "train first" in north[9]
        south = story["south"].stdout.splitlines()
        assert "REFUSED         base v0            [already-sent, by this hospital]" in south[-1]
        assert "already in global version 1" in south[-1]
    finally:
        for proc in [*sends.values(), server]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
