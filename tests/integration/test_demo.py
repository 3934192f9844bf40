"""The federated demo end to end, shrunk: certificates, synthetic scans, a server process,
two hospitals training for real and one secure round over TLS.  What the README's first
command runs, minus the minutes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from securefl.demo.federated import DemoSettings, run
from securefl.errors import ConfigError
from securefl.server.store import ModelStore
from tests.outcome import (
    assert_published,
    fedavgm_step,
    keras_weight_names,
    statistics_masks,
    tolerance,
    weighted_mean,
)


def test_demo_runs_a_federation_end_to_end(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    # --keep as people type it, relative to where they stand (the server and the agents
    # once looked for their certificates under fed/fed/)
    monkeypatch.chdir(tmp_path)
    settings = DemoSettings(hospitals=2, rounds=2, epochs=1, image_size=32, train_images=70,
                            test_images=16, keep=Path("fed"), min_validation_per_class=1)
    result = run(settings, say=lines.append)
    assert [r.version for r in result.rows] == [1, 2]
    row = result.rows[-1]
    assert set(row.global_acc) == set(row.local_acc) == {"hospital_1", "hospital_2"}
    assert set(row.pooled_local) == {"hospital_1", "hospital_2"}
    assert all(0.0 <= acc <= 1.0 for acc in [*row.global_acc.values(), *row.local_acc.values(),
                                              *row.pooled_local.values(), row.pooled_global])
    # The per-round table is validation; the summary's figures are Testing, scored once.
    final = result.testing
    assert final is not None and final.version == row.version == 2
    assert result.final_global_acc == final.pooled_global
    assert result.best_local_acc == max(final.pooled_local.values())
    from securefl.client.hospital import Hospital

    for name in ("hospital_1", "hospital_2"):
        h = Hospital.from_file(tmp_path / "fed" / "certs" / "kits" / name / "hospital.toml")
        assert row.global_acc[name] == h.evaluate("validation").balanced_accuracy
        assert final.global_acc[name] == h.evaluate("testing").balanced_accuracy
    text = "\n".join(lines)
    assert "SYNTHETIC" in text and "summary:" in text and "points" in text
    # every line fits an 80-column terminal (the table was 113 columns, its legend 428)
    printed = text.splitlines()
    assert [line for line in printed if len(line) > 80] == []
    # the summary leads with whether each hospital is better off with its copy
    first = " ".join(printed[next(i for i, line in enumerate(printed)
                                  if line.startswith("summary:")):]).split(".")[0]
    lost = [n for n in ("hospital_1", "hospital_2")
            if not final.global_acc[n] > final.local_acc[n]]
    assert all(n in first for n in lost) and ("every hospital" in first) == (not lost)
    assert str(tmp_path / "fed") in text
    store = ModelStore(tmp_path / "fed" / "server" / "store")
    assert store.versions() == [0, 1, 2]
    info, _ = store.read(2)
    assert info.contributors == 2
    # The time column is the server's: version 0 to the last version, round by round.
    from datetime import datetime

    made = [datetime.fromisoformat(store.info(v).created) for v in (0, 2)]
    assert sum(r.seconds for r in result.rows) == (made[1] - made[0]).total_seconds()
    # The outcome of both rounds, from what each hospital kept of its own updates: round 1
    # is FedAvgM's first step (statistics plainly averaged), round 2 carries momentum.
    states = [tmp_path / "fed" / "hospitals" / n / "state" for n in ("hospital_1", "hospital_2")]
    samples = [json.loads((s / "send.json").read_text())["samples"] for s in states]
    stats, variances = statistics_masks(keras_weight_names(
        str(tmp_path / "fed" / "hospitals" / "hospital_1" / "model" / "model.keras")))
    momentum = None
    bound = 0.0
    for version in (1, 2):
        parts = [(np.load(s / "sent" / f"v{version - 1:08d}.npy"), n)
                 for s, n in zip(states, samples, strict=True)]
        previous = store.read(version - 1)[1]
        expected, momentum = fedavgm_step(previous, weighted_mean(parts), momentum,
                                          statistics=stats, variances=variances)
        bound = tolerance(parts) + 0.3 * bound  # the last round's error rides the momentum
        assert_published(store.read(version)[1], expected, bound, previous)
    np.testing.assert_array_equal(np.load(states[0] / "global.npy"), store.read(2)[1])
    audit = [json.loads(x)
             for x in (tmp_path / "fed" / "server" / "audit.jsonl").read_text().splitlines()]
    events = [e["event"] for e in audit]
    assert "aggregated" in events
    # After the last round the server opened no other one for the agents to decline.
    assert [e["schedule_round"] for e in audit if e["event"] == "schedule-open"] == [1, 2]
    assert [(e.get("reason"), e.get("version")) for e in audit
            if e["event"] == "schedule-paused"] == [("until-version", 2)]
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
