"""The hospital's ML commands end to end: data synth, client train/evaluate/classify."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from securefl.cli import main
from securefl.config import write_toml
from securefl.ml.train import read_history

#: A hospital.toml's connection part: ML commands never connect, but read the same file.
TLS = {"cert": "hospital.pem", "key": "hospital.key", "ca": "ca.pem"}


def _one_hospital(tmp_path, seed: int, **ml_changes):
    """Synthetic scans for one small hospital and its settings file (no server needed)."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "1", "--train", "48",
                 "--test", "8", "--size", "32", "--seed", str(seed)]) == 0
    ml = {"scans_dir": "data/hospital_1", "model_dir": "runs/h1", "image_size": 32,
          "model_kind": "small", "epochs": 1, "batch_size": 16,
          "min_validation_per_class": 2, **ml_changes}
    return data, write_toml(tmp_path / "hospital.toml", {**TLS, "state_dir": "state", "ml": ml})


def test_synth_train_evaluate_classify(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "1", "--train", "48",
                 "--test", "16", "--size", "32", "--seed", "2"]) == 0
    assert (data / "hospital_1" / "Testing" / "pituitary").is_dir()
    ml = {"scans_dir": "data/hospital_1", "model_dir": "runs/h1", "image_size": 32,
          "model_kind": "small", "epochs": 1, "batch_size": 16,
          "min_validation_per_class": 2}
    cfg = write_toml(tmp_path / "hospital.toml", {**TLS, "ml": ml})
    # Not a terminal: whole lines, no carriage-return redraws in a log file.
    assert capsys.readouterr().err == "64/64 images\n"
    scan = next((data / "hospital_1" / "Testing" / "meningioma").iterdir())
    # No model yet: no answer, and nothing saved that could pass for one.
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    assert "no local model yet" in capsys.readouterr().err
    assert main(["client", "--config", str(cfg), "classify", str(scan)]) == 4
    assert "get the global model or train first" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "h1" / "model.keras").exists()

    assert main(["client", "--config", str(cfg), "train", "--epochs", "2"]) == 0
    out = capsys.readouterr()
    # 12 scans of each class: 2 held out for validation (min_validation_per_class)
    assert "on 40 scans" in out.out and "epoch 2/2" in out.err and "\r" not in out.err
    assert "on 8 validation scans; probabilities calibrated with temperature" in out.out
    # The figures printed are the kept epoch's, not the last epoch's.
    import re

    record = read_history(tmp_path / "runs" / "h1" / "history.jsonl")[-1]
    best = record["best_epoch"]
    assert f"kept epoch {best} of 2" in out.out
    assert (f"training loss {record['history']['loss'][best - 1]:.4f}, accuracy "
            f"{record['history']['accuracy'][best - 1]:.3f} (epoch {best}, the one kept)"
            ) in out.out, out.out
    assert not re.search(r"final loss", out.out)
    assert (tmp_path / "runs" / "h1" / "model.keras").is_file()
    assert (tmp_path / "runs" / "h1" / "calibration.json").is_file()

    assert main(["client", "--config", str(cfg), "evaluate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "validation" and report["num_samples"] == 8
    assert len(report["confusion"]) == 4 and report["temperature"] > 0
    assert 0 <= report["balanced_accuracy"] <= 1 and report["ece_after"] is not None
    assert main(["client", "--config", str(cfg), "evaluate", "--split", "testing"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the local model trained here from a new model, on this "
                          "hospital's Testing scans: accuracy")
    assert "balanced accuracy" in out and "expected calibration error (15 bins)" in out
    # the class names a clinician reads, as the app's Get shows them
    assert "no tumour" in out and "pituitary tumour" in out and "notumor" not in out

    assert main(["client", "--config", str(cfg), "classify", str(scan), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert set(answer["probabilities"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    assert answer["calibrated"] and answer["model"].startswith("the local model trained here")

    # Below the threshold: marked low-confidence, in words a clinician can act on; the
    # version that answered is named (here: a downloaded global version, not trained since).
    write_toml(cfg, {**TLS, "state_dir": "state", "ml": {**ml, "confidence_threshold": 1.0}})
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "local.json").write_text(json.dumps(
        {"base_version": 3, "trained": False, "num_samples": 0}))
    assert main(["client", "--config", str(cfg), "classify", str(scan)]) == 0
    out = capsys.readouterr().out
    assert "model: global version 3 (calibrated, temperature " in out
    shown = {line.rsplit(None, 1)[0].strip() for line in out.splitlines()[:4]}
    assert shown == {"glioma", "meningioma", "no tumour", "pituitary tumour"}
    assert "notumor" not in out
    assert "LOW CONFIDENCE: the model's most likely class" in out
    assert "below the 100% threshold): treat this answer as inconclusive" in out
    assert main(["client", "--config", str(cfg), "classify", str(tmp_path / "nope.jpg")]) == 4
    assert "nope.jpg does not exist: check the file name" in capsys.readouterr().err
    # Pictures that cannot be scans get a refusal, not "meningioma 99.9%" (walking it).
    from PIL import Image

    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("L", (1, 1), 90).save(tmp_path / "dot.png")
    Image.fromarray((np.arange(16 * 16).reshape(16, 16) % 256).astype("uint8")).save(
        tmp_path / "thumb.png")
    # coloured noise was answered "glioma 80.5%" (a walk); MRI scans are grey
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
                    ).save(tmp_path / "noise.png")
    for name, why in (("black.png", "is blank (every pixel has the value 0), not a scan"),
                      ("red.png", "is blank"), ("dot.png", "is 1x1 pixels, too small"),
                      ("thumb.png", "is 16x16 pixels, too small to be a scan"),
                      ("noise.png", "is a colour picture, and MRI scans are grey")):
        assert main(["client", "--config", str(cfg), "classify", str(tmp_path / name)]) == 4
        out = capsys.readouterr()
        assert why in out.err and "nothing was classified" in out.err, out.err
        assert "%" not in out.out

    # A grey scan exported as a colour JPEG (R = G = B up to compression noise) is read.
    with Image.open(scan) as grey:
        grey.convert("RGB").save(tmp_path / "scan-rgb.jpg", quality=75)
    assert main(["client", "--config", str(cfg), "classify", str(tmp_path / "scan-rgb.jpg")]) \
        == 0, capsys.readouterr().err
    assert "%" in capsys.readouterr().out

    events = [h["event"] for h in read_history(tmp_path / "runs" / "h1" / "history.jsonl")]
    assert events == ["train", "evaluate", "evaluate"]

    # A second train on a version whose update is not sent yet goes on from the first; it
    # says so, and how to start over (walking it, only a docstring said it).
    (tmp_path / "state" / "local.json").write_text(json.dumps(
        {"base_version": 3, "trained": True, "num_samples": 40}))
    assert main(["client", "--config", str(cfg), "train", "--epochs", "1"]) == 0
    assert ("continuing from the model this hospital already trained on version 3 (its "
            "update is not sent yet): this adds epochs to that training; to start again from "
            "the downloaded global model, run `get --replace-trained` first"
            ) in capsys.readouterr().out

    # settings that no longer match the saved model are refused, not silently retrained
    write_toml(cfg, {**TLS, "ml": {**ml, "image_size": 40}})
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    assert "move the old model file away" in capsys.readouterr().err


def test_errors_are_one_sentence_and_an_exit_code(tmp_path, capsys):
    cfg = write_toml(tmp_path / "h.toml",
                     {**TLS, "ml": {"scans_dir": "missing", "model_dir": "runs"}})
    assert main(["client", "--config", str(cfg), "train"]) == 4  # DataError
    assert "data folder" in capsys.readouterr().err
    write_toml(cfg, {**TLS, "ml": {"scans_dir": "x", "model_dir": "y", "epochs": 0}})
    assert main(["client", "--config", str(cfg), "evaluate"]) == 3  # ConfigError
    assert "epochs" in capsys.readouterr().err
    assert main(["client", "--config", str(tmp_path / "none.toml"), "train"]) == 3
    write_toml(cfg, TLS)
    assert main(["client", "--config", str(cfg), "train"]) == 3
    assert "no [ml] table" in capsys.readouterr().err


def test_train_and_evaluate_say_which_files_were_skipped(tmp_path, capsys):
    """The files the loader could not use are named on the terminal and in the history;
    a class left with no readable scan stops the command."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "1", "--train", "24",
                 "--test", "8", "--size", "32", "--seed", "3"]) == 0
    scans = data / "hospital_1"
    for name in ("a.jpg", "b.png", "c.jpg", "d.jpg"):
        (scans / "Training" / "glioma" / name).write_bytes(b"not an image at all")
    (scans / "Training" / "notumor" / "README.txt").write_text("exported 2024-03-01")
    (scans / "Testing" / "pituitary" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ml = {"scans_dir": "data/hospital_1", "model_dir": "runs", "image_size": 32,
          "model_kind": "small", "epochs": 1, "batch_size": 8, "min_validation_per_class": 2}
    cfg = write_toml(tmp_path / "hospital.toml", {**TLS, "ml": ml})
    capsys.readouterr()
    assert main(["client", "--config", str(cfg), "train"]) == 0
    out = capsys.readouterr()
    assert "on 16 scans" in out.out  # 6 of each class, 2 of them held out for validation
    assert ("securefl: warning: 5 files were skipped and not used: "
            "Training/glioma/a.jpg (not a readable JPEG or PNG image), "
            "Training/glioma/b.png (not a readable JPEG or PNG image), "
            "Training/glioma/c.jpg (not a readable JPEG or PNG image) and 2 more; "
            "replace them with readable JPEG or PNG scans, or remove them") in out.err

    assert main(["client", "--config", str(cfg), "evaluate", "--split", "testing",
                 "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)  # the warning does not spoil the JSON
    assert report["num_samples"] == 8
    assert report["skipped"] == [[str(scans / "Testing" / "pituitary" / "e.png"),
                                  "not a readable JPEG or PNG image"]]
    assert ("1 file was skipped and not used: Testing/pituitary/e.png "
            "(not a readable JPEG or PNG image)") in out.err

    train, evaluate = read_history(tmp_path / "runs" / "history.jsonl")
    assert train["skipped_files"] == 5 and len(train["skipped"]) == 5
    assert train["skipped"][4] == {"file": "Training/notumor/README.txt",
                                   "reason": "not a .jpg/.jpeg/.png file"}
    assert evaluate["skipped_files"] == 1
    assert evaluate["skipped"] == [{"file": "Testing/pituitary/e.png",
                                    "reason": "not a readable JPEG or PNG image"}]

    # Every pituitary test scan unreadable: refused with the class and folder named.
    for f in (scans / "Testing" / "pituitary").iterdir():
        f.write_bytes(b"zeroed by a failed copy")
    assert main(["client", "--config", str(cfg), "evaluate", "--split", "testing"]) == 4
    err = capsys.readouterr().err
    assert (f"class 'pituitary' has no readable scans in {scans / 'Testing' / 'pituitary'}"
            in err and "needs at least one of every class" in err)


def test_synth_refuses_empty_sets_and_says_when_train_would_refuse_a_class(tmp_path, capsys):
    """Walking it: ``--train 0`` made an empty dataset and exited 0, and ``--train 200``
    made a class of 5 scans that ``train`` then refused; both are said at once now."""
    import pytest

    for bad in (["--train", "0"], ["--test", "-1"], ["--hospitals", "0"], ["--size", "8"]):
        with pytest.raises(SystemExit) as usage:
            main(["data", "synth", "--out", str(tmp_path / "x"), *bad])
        assert usage.value.code == 2
        assert "too small: at least" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "few"), "--hospitals", "1",
                 "--train", "20", "--test", "4", "--size", "32"]) == 0
    err = capsys.readouterr().err
    assert "note: hospital_1 has fewer than 6 training scans of" in err
    assert "make more with a larger --train" in err


@pytest.mark.parametrize(("stop", "code", "cause"), [(signal.SIGTERM, 143, "a termination signal"),
                                                (signal.SIGINT, 130, "Ctrl-C")],
                         ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_during_train_stops_it_cleanly_keeps_the_model_and_logs_it(
        tmp_path, stop, code, cause):
    """A service stop or ``kill`` during a long ``train`` used to end it with status 143
    and no word, and the hospital's log kept no entry; Ctrl-C raised in the middle of
    TensorFlow's work, and on a busy machine the process then died in its shutdown
    (``free(): invalid next size``, status -6).  Now either stops the training at the end
    of its batch, says so in one sentence, leaves the model file as it was, and logs it."""
    from securefl.client.hospital_log import HospitalLog

    _, cfg = _one_hospital(tmp_path, 3, patience=400)
    assert main(["client", "--config", str(cfg), "train"]) == 0
    model = tmp_path / "runs" / "h1" / "model.keras"
    before = model.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "securefl", "client", "--config", str(cfg),
                             "train", "--epochs", "500"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # a whole epoch is done: training is under way
        if line.startswith("epoch 1/500"):
            break
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    again = "press Ctrl-C again" if stop == signal.SIGINT else "send the signal again"
    assert ("securefl: stopping the training at the end of this batch, keeping nothing "
            f"({again} to stop at once)") in err, err
    assert err.strip().splitlines()[-1] == (
        f"securefl: train was stopped by {cause} before it finished; the model file is "
        f"unchanged ({model}): run train again")
    assert "Traceback" not in err and "trained from" not in out
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir() if ".tmp" in p.name) == []
    entries, _ = HospitalLog(tmp_path / "state").entries(5)
    assert entries[-1].detail == ("training a new model (no global version downloaded) was "
                                  "cancelled; the model file is unchanged")


@pytest.mark.parametrize("action", ["evaluate", "classify"])
def test_sigterm_during_evaluate_or_classify_ends_with_a_sentence(tmp_path, action):
    """Python's default ended them with status 143 and no word."""
    data, cfg = _one_hospital(tmp_path, 4)
    assert main(["client", "--config", str(cfg), "train"]) == 0
    scan = next((data / "hospital_1" / "Testing" / "glioma").iterdir())
    # Stopped while Python starts up and imports TensorFlow, before any answer.
    args = ["evaluate"] if action == "evaluate" else ["classify", str(scan)]
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SELF, str(cfg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"securefl: {action} was stopped by a termination signal before it finished; nothing "
        "was changed: run it again")
    assert out == ""


#: Runs the CLI and sends itself SIGTERM once the model is being loaded: a test cannot
#: time a signal into a command that takes a second, so the command's own step does it.
SIGTERM_SELF = """
import os, signal, sys
import securefl.ml.model as model
real = model.load_model
def load_and_stop(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
model.load_model = load_and_stop
from securefl.cli import main
sys.exit(main(["client", "--config", sys.argv[1], *sys.argv[2:]]))
"""


def test_stopped_early_only_when_fewer_epochs_ran_than_allowed():
    from securefl.cli import why_this_many_epochs

    assert why_this_many_epochs(True, 3, 15).startswith("stopped early")
    assert why_this_many_epochs(True, 15, 15) == "at most 15 epochs"  # Keras said early
    assert why_this_many_epochs(False, 15, 15) == "at most 15 epochs"


def test_a_stop_that_comes_after_the_last_batch_keeps_the_run_and_says_so(
        tmp_path, capsys, monkeypatch):
    """Walking it: a stop that landed while the finished model was being saved printed
    "stopping the training at the end of this batch, keeping nothing", and then the model
    was kept.  The signal here is real; the wrapper only makes it land after training."""
    import os

    from securefl.ml import local

    _, cfg = _one_hospital(tmp_path, 5)
    real = local.run_train

    def then_a_stop(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
        return result

    monkeypatch.setattr(local, "run_train", then_a_stop)
    capsys.readouterr()
    before = signal.getsignal(signal.SIGTERM)
    assert main(["client", "--config", str(cfg), "train"]) == 0
    assert signal.getsignal(signal.SIGTERM) == before  # given back when train ends
    out = capsys.readouterr()
    assert ("securefl: a termination signal came after the training had finished, so "
            "nothing was stopped: the trained model was saved in full") in out.err, out.err
    assert "trained from a new model" in out.out
    assert (tmp_path / "runs" / "h1" / "model.keras").is_file()
