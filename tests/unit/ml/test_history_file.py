"""A hospital's metrics history (``model_dir/history.jsonl``) survives a damaged line.

Walking it with a cut-off last line (a full disk, a killed write): the next record was
glued onto the damaged one and lost with it, and the app's History screen closed with a
JSONDecodeError traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from securefl.ml.train import append_history, read_history, read_history_checked


def test_a_record_after_a_cut_off_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"time": "2026-12-01T09:00:00Z", "event": "get", "version": 1}\n'
                    '{"time": "2026-12')  # cut off mid-write
    append_history(path, {"event": "evaluate", "accuracy": 0.75})
    records, damaged = read_history_checked(path)
    assert [r["event"] for r in records] == ["get", "evaluate"]
    assert records[1]["accuracy"] == 0.75
    assert damaged == 1
    # The damaged line is kept as it was, on its own.
    assert path.read_text().splitlines()[1] == '{"time": "2026-12'


def test_damaged_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    good = {"time": "t", "event": "train", "num_samples": 4}
    path.write_bytes(json.dumps(good).encode() + b"\n\x00\x00garbage\n[1, 2]\n\n"
                     + b'"a string"\n' + json.dumps(good).encode() + b"\n")
    assert read_history_checked(path) == ([good, good], 3)
    assert read_history(path) == [good, good]


def test_a_new_or_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "history.jsonl"
    assert read_history_checked(path) == ([], 0)
    append_history(path, {"event": "get"})
    assert path.read_text().count("\n") == 1 and read_history(path)[0]["event"] == "get"
