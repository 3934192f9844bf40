"""The federated demo end to end, shrunk: certificates, synthetic scans, a server process,
two hospitals training for real and one secure round over TLS.  What the README's first
command runs, minus the minutes."""

from __future__ import annotations

import json
from pathlib import Path

from securefl.demo.federated import DemoSettings, run
from securefl.errors import ConfigError
from securefl.server.store import ModelStore


def test_demo_runs_a_federation_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    settings = DemoSettings(hospitals=2, rounds=1, epochs=1, image_size=32, train_images=48,
                            test_images=16, keep=tmp_path / "fed")
    result = run(settings, say=lines.append)
    assert len(result.rows) == 1 and result.rows[0].version == 1
    row = result.rows[0]
    assert set(row.global_acc) == set(row.local_acc) == {"hospital_1", "hospital_2"}
    assert set(row.pooled_local) == {"hospital_1", "hospital_2"}
    assert all(0.0 <= acc <= 1.0 for acc in [*row.global_acc.values(), *row.local_acc.values(),
                                              *row.pooled_local.values(), row.pooled_global])
    assert result.final_global_acc == row.pooled_global
    assert result.best_local_acc == max(row.pooled_local.values())
    text = "\n".join(lines)
    assert "SYNTHETIC" in text and "summary:" in text and "points" in text
    assert str(tmp_path / "fed") in text
    store = ModelStore(tmp_path / "fed" / "server" / "store")
    assert store.versions() == [0, 1]
    info, _ = store.read(1)
    assert info.contributors == 2
    events = [json.loads(x)["event"]
              for x in (tmp_path / "fed" / "server" / "audit.jsonl").read_text().splitlines()]
    assert "aggregated" in events
    for name in ("hospital_1", "hospital_2"):  # each hospital kept its model and its history
        assert (tmp_path / "fed" / "hospitals" / name / "model" / "model.keras").is_file()
        assert (tmp_path / "fed" / "hospitals" / name / "model" / "history.jsonl").is_file()


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    try:
        run(DemoSettings(keep=precious), say=lambda _line: None)
    except ConfigError as err:
        assert "not empty" in err.message
    else:
        raise AssertionError("the demo ran in a folder with someone else's files")
    assert (precious / "notes.txt").read_text() == "keep me"
