"""The hospital's ML commands end to end: data synth, client train/evaluate/classify."""

from __future__ import annotations

import json

from securefl.cli import main
from securefl.config import write_toml
from securefl.ml.train import read_history

#: A hospital.toml's connection part: ML commands never connect, but read the same file.
TLS = {"cert": "hospital.pem", "key": "hospital.key", "ca": "ca.pem"}


def test_synth_train_evaluate_classify(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "2", "--train", "48",
                 "--test", "16", "--size", "32", "--seed", "2"]) == 0
    assert (data / "hospital_2" / "Testing" / "pituitary").is_dir()
    ml = {"scans_dir": "data/hospital_1", "model_dir": "runs/h1", "image_size": 32,
          "model_kind": "small", "epochs": 1, "batch_size": 16}
    cfg = write_toml(tmp_path / "hospital.toml", {**TLS, "ml": ml})
    capsys.readouterr()
    scan = next((data / "hospital_1" / "Testing" / "meningioma").iterdir())
    # No model yet: no answer, and nothing saved that could pass for one.
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    assert "no local model yet" in capsys.readouterr().err
    assert main(["client", "--config", str(cfg), "classify", str(scan)]) == 4
    assert "get the global model or train first" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "h1" / "model.keras").exists()

    assert main(["client", "--config", str(cfg), "train", "--epochs", "2"]) == 0
    out = capsys.readouterr()
    assert "on 48 scans" in out.out and "epoch 2/2" in out.err
    assert (tmp_path / "runs" / "h1" / "model.keras").is_file()

    assert main(["client", "--config", str(cfg), "evaluate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 16 and len(report["confusion"]) == 4

    assert main(["client", "--config", str(cfg), "classify", str(scan), "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == {"glioma", "meningioma", "notumor", "pituitary"}

    events = [h["event"] for h in read_history(tmp_path / "runs" / "h1" / "history.jsonl")]
    assert events == ["train", "evaluate"]

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
          "model_kind": "small", "epochs": 1, "batch_size": 8}
    cfg = write_toml(tmp_path / "hospital.toml", {**TLS, "ml": ml})
    capsys.readouterr()
    assert main(["client", "--config", str(cfg), "train"]) == 0
    out = capsys.readouterr()
    assert "on 24 scans" in out.out
    assert ("securefl: warning: 5 files were skipped and not used: "
            "Training/glioma/a.jpg (not a readable JPEG or PNG image), "
            "Training/glioma/b.png (not a readable JPEG or PNG image), "
            "Training/glioma/c.jpg (not a readable JPEG or PNG image) and 2 more; "
            "replace them with readable JPEG or PNG scans, or remove them") in out.err

    assert main(["client", "--config", str(cfg), "evaluate", "--json"]) == 0
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
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    err = capsys.readouterr().err
    assert (f"class 'pituitary' has no readable scans in {scans / 'Testing' / 'pituitary'}"
            in err and "needs at least one of every class" in err)
