"""The hospital's ML commands end to end: data synth, client train/evaluate/classify."""

from __future__ import annotations

import json

from securefl.cli import main
from securefl.config import write_toml
from securefl.ml.train import read_history


def test_synth_train_evaluate_classify(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "2", "--train", "48",
                 "--test", "16", "--size", "32", "--seed", "2"]) == 0
    assert (data / "hospital_2" / "Testing" / "pituitary").is_dir()
    ml = {"scans_dir": "data/hospital_1", "model_dir": "runs/h1", "image_size": 32,
          "model_kind": "small", "epochs": 1, "batch_size": 16}
    cfg = write_toml(tmp_path / "hospital.toml", {"ml": ml})
    capsys.readouterr()
    assert main(["client", "--config", str(cfg), "train", "--epochs", "2"]) == 0
    out = capsys.readouterr()
    assert "trained on 48 scans" in out.out and "epoch 2/2" in out.err
    assert (tmp_path / "runs" / "h1" / "model.keras").is_file()

    assert main(["client", "--config", str(cfg), "evaluate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 16 and len(report["confusion"]) == 4

    scan = next((data / "hospital_1" / "Testing" / "meningioma").iterdir())
    assert main(["client", "--config", str(cfg), "classify", str(scan), "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == {"glioma", "meningioma", "notumor", "pituitary"}

    events = [h["event"] for h in read_history(tmp_path / "runs" / "h1" / "history.jsonl")]
    assert events == ["train", "evaluate"]

    # settings that no longer match the saved model are refused, not silently retrained
    write_toml(cfg, {"ml": {**ml, "image_size": 40}})
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    assert "move the old model file away" in capsys.readouterr().err


def test_errors_are_one_sentence_and_an_exit_code(tmp_path, capsys):
    cfg = write_toml(tmp_path / "h.toml", {"ml": {"scans_dir": "missing", "model_dir": "runs"}})
    assert main(["client", "--config", str(cfg), "train"]) == 4  # DataError
    assert "data folder" in capsys.readouterr().err
    write_toml(cfg, {"ml": {"scans_dir": "x", "model_dir": "y", "epochs": 0}})
    assert main(["client", "--config", str(cfg), "evaluate"]) == 3  # ConfigError
    assert "epochs" in capsys.readouterr().err
    assert main(["client", "--config", str(tmp_path / "none.toml"), "train"]) == 3
    write_toml(cfg, {"server": {}})
    assert main(["client", "--config", str(cfg), "train"]) == 3
    assert "no [ml] table" in capsys.readouterr().err
