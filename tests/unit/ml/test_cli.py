"""The hospital's ML commands end to end: data synth, client train/evaluate/classify."""

from __future__ import annotations

import json

from securefl.cli import main
from securefl.ml.train import read_history

#: A hospital.toml's connection part: ML commands never connect, but read the same file.
TLS = 'cert = "hospital.pem"\nkey = "hospital.key"\nca = "ca.pem"\n'


def test_synth_train_evaluate_classify(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--hospitals", "2", "--train", "48",
                 "--test", "16", "--size", "32", "--seed", "2"]) == 0
    assert (data / "hospital_2" / "Testing" / "pituitary").is_dir()
    cfg = tmp_path / "hospital.toml"
    cfg.write_text(
        TLS + '[ml]\nscans_dir = "data/hospital_1"\nmodel_dir = "runs/h1"\nimage_size = 32\n'
        'model_kind = "small"\nepochs = 1\nbatch_size = 16\n'
    )
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
    cfg.write_text(cfg.read_text().replace("image_size = 32", "image_size = 40"))
    assert main(["client", "--config", str(cfg), "evaluate"]) == 4
    assert "move the old model file away" in capsys.readouterr().err


def test_errors_are_one_sentence_and_an_exit_code(tmp_path, capsys):
    cfg = tmp_path / "h.toml"
    cfg.write_text(TLS + '[ml]\nscans_dir = "missing"\nmodel_dir = "runs"\n')
    assert main(["client", "--config", str(cfg), "train"]) == 4  # DataError
    assert "data folder" in capsys.readouterr().err
    cfg.write_text(TLS + '[ml]\nscans_dir = "x"\nmodel_dir = "y"\nepochs = 0\n')
    assert main(["client", "--config", str(cfg), "evaluate"]) == 3  # ConfigError
    assert "epochs" in capsys.readouterr().err
    assert main(["client", "--config", str(tmp_path / "none.toml"), "train"]) == 3
    cfg.write_text(TLS)
    assert main(["client", "--config", str(cfg), "train"]) == 3
    assert "[ml]" in capsys.readouterr().err
