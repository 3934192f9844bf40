"""The hospital's own log (``securefl.client.hospital_log``), without a network: bounded,
readable after a torn write, free of long blobs, and its ``log`` command's ``--limit``."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.cli import main
from securefl.client.hospital import Hospital
from securefl.client.hospital_log import LOG_NAME, HospitalLog
from securefl.client.outbox import SendRecord
from securefl.client.session import RoundAbandonedError
from securefl.client.transport import error_from_wire
from securefl.errors import CryptoError, ServerUnreachableError, UpdateAlreadySentError
from securefl.protocol import messages as wm


def _files(state: Path) -> list[Path]:
    return sorted(state.glob("log*.jsonl"))


def test_the_log_stays_bounded_and_keeps_the_newest_entries_in_order(tmp_path: Path) -> None:
    log = HospitalLog(tmp_path, max_bytes=2000, backups=2)
    for i in range(500):
        log.record("joined", f"joined round {i}", round=i, base_version=i // 10)
    files = _files(tmp_path)
    assert [f.name for f in files] == ["log.1.jsonl", "log.2.jsonl", LOG_NAME]
    assert all(f.stat().st_size <= 2000 for f in files)
    newest, damaged = log.entries(5)
    assert [e.round for e in newest] == [495, 496, 497, 498, 499] and damaged == 0
    kept, _ = log.entries(10_000)  # everything still held: consecutive, ending at the newest
    rounds = [e.round for e in kept]
    assert rounds == list(range(rounds[0], 500)) and 20 < len(rounds) < 500


def test_a_torn_last_line_is_skipped_and_never_glued_to_the_next_entry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = HospitalLog(tmp_path)
    for i in range(3):
        log.record("joined", f"joined round {i}", round=i)
    raw = log.path.read_bytes()
    log.path.write_bytes(raw[:-9])  # a crash in the middle of the last write
    entries, damaged = log.entries(10)
    assert [e.round for e in entries] == [0, 1] and damaged == 1

    log.record("refused", "the server asked for the update without masks", round=3,
               code="crypto", by="hospital", durable=True)
    with log.path.open("ab") as f:
        f.write(b"\xff\xfe not ours\n[1, 2]\n")  # bytes that are not an entry at all
    entries, damaged = log.entries(10)
    assert [e.round for e in entries] == [0, 1, 3] and damaged == 3
    assert entries[-1].event == "refused" and entries[-1].code == "crypto"

    cfg = _hospital_toml(tmp_path)
    assert main(["client", "--config", str(cfg), "log", "--limit", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "round 1" in lines[0]
    assert "REFUSED         round 3            [crypto, by this hospital]" in lines[1]
    assert "without masks" in lines[1]
    assert "3 damaged line(s)" in err


def _hospital_toml(tmp_path: Path) -> Path:
    return config.write_toml(tmp_path / "hospital.toml", {
        "cert": "c.pem", "key": "k.pem", "ca": "ca.pem", "state_dir": str(tmp_path)})


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "2.5", "", "10001"])
def test_a_bad_limit_is_refused_in_one_sentence(tmp_path: Path, bad: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["client", "--config", str(_hospital_toml(tmp_path)), "log", "--limit", bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert (f"argument --limit: must be a whole number of entries from 1 to 10000, not "
            f"{bad!r}") in err


def test_an_empty_log_says_where_it_is_and_when_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--config", str(_hospital_toml(tmp_path)), "log"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / LOG_NAME) in out and "first get, train or send" in out


def test_key_bytes_in_a_sentence_never_reach_the_file(tmp_path: Path) -> None:
    key = os.urandom(32)
    log = HospitalLog(tmp_path)
    path = "/Users/Alice/Federation2024/kits/north/state"
    log.record("refused", f"bad key {key.hex()} or {base64.b64encode(key).decode()} or "
               f"{base64.urlsafe_b64encode(key * 2).decode()} in {path}", code="crypto")
    text = log.path.read_text()
    assert key.hex() not in text and key.hex()[12:] not in text
    assert base64.b64encode(key).decode() not in text
    assert base64.urlsafe_b64encode(key * 2).decode() not in text
    assert path in text  # a path is not a blob
    with pytest.raises(TypeError, match="plain text or a number"):
        log.record("joined", "x", round=key)  # type: ignore[arg-type]


def test_each_kind_of_stop_is_told_apart(tmp_path: Path) -> None:
    log = HospitalLog(tmp_path)
    server_said = error_from_wire(wm.ErrorMsg(code="crypto", message="bad signature"))
    for exc in (CryptoError("masking off"), server_said, ServerUnreachableError("down"),
                RoundAbandonedError("round 4 was abandoned"), asyncio.CancelledError(),
                KeyboardInterrupt(), ZeroDivisionError("x")):
        log.failed("send", exc, round=4, base_version=2)
    got = [(e.event, e.code, e.by) for e in log.entries(10)[0]]
    assert got == [("refused", "crypto", "hospital"), ("refused", "crypto", "server"),
                   ("failed", "unreachable", None), ("failed", "round-abandoned", "server"),
                   ("interrupted", None, None), ("interrupted", None, None),
                   ("error", None, None)]
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert all(x["round"] == 4 and x["base_version"] == 2 and x["action"] == "send"
               for x in lines)
    assert "server refused: bad signature" in lines[1]["detail"]


def test_a_refusal_before_sending_is_logged_by_the_hospital(tmp_path: Path) -> None:
    """``check_can_send`` (what the CLI asks before it prints "sending") writes its
    refusal with the base version, without any network."""
    settings = config.ClientSettings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                     ca=tmp_path / "ca.pem", state_dir=tmp_path / "state")
    h = Hospital(settings, None)
    h.outbox.save(SendRecord(3, 5, "x", stage="published", round_id=7, published_version=4))
    with pytest.raises(UpdateAlreadySentError):
        h.check_can_send(3)
    (entry,), _ = h.log.entries(5)
    assert (entry.event, entry.code, entry.by, entry.base_version, entry.action) == (
        "refused", "already-sent", "hospital", 3, "send")
    assert "already in global version 4" in entry.detail


def _write_many(state: str, who: int, start: object) -> None:
    start.wait(30)  # type: ignore[attr-defined]
    log = HospitalLog(Path(state), max_bytes=2000, backups=1000)
    for i in range(WRITES):
        log.record("joined", f"writer {who} entry {i}", round=who * 1000 + i)


WRITES = 300


def test_processes_writing_at_once_lose_and_tear_nothing(tmp_path: Path) -> None:
    """The hospital app and its training process write the same log, rotating it often
    here; with the lock no entry is lost or torn (without it, rotations overwrite files)."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    writers = (1, 2, 3)
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), w, start)) for w in writers]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries, damaged = HospitalLog(tmp_path, backups=1000).entries(10_000)
    assert damaged == 0
    for w in writers:  # every entry of each writer, in its own order
        mine = [e.round for e in entries if e.round // 1000 == w]
        assert mine == [w * 1000 + i for i in range(WRITES)]


def test_each_secagg_plus_graph_draw_is_in_the_hospitals_log(tmp_path: Path) -> None:
    """A clinician reading the log sees each SecAgg+ round its hospital helped draw a graph
    for, since each counts against max_attempts; the send record's refusal past the cap is
    what gets logged then, not a draw that did not happen."""
    from securefl.client.outbox import Outbox

    log = HospitalLog(tmp_path)
    journal, _ = Outbox(tmp_path).begin(2, 10, np.full(4, 0.1, np.float32), max_attempts=1)
    follow = log.follow(journal, 2, 10)
    follow("graph-drawn", 7)
    with pytest.raises(UpdateAlreadySentError):
        follow("graph-drawn", 8)
    entries, _ = log.entries(10)
    drawn = [e for e in entries if e.event == "graph-drawn"]
    assert len(drawn) == 1 and drawn[0].round == 7 and "max_attempts" in drawn[0].detail


def test_an_interrupted_train_or_get_does_not_say_an_update_may_have_left(
        tmp_path: Path) -> None:
    """Walking it, every interrupted train and get was logged with "the update had already
    left and may be in that round's sum", which only a send can mean."""
    log = HospitalLog(tmp_path)
    for action in ("train", "get", "send"):
        log.failed(action, KeyboardInterrupt(), round=None, base_version=1)
    details = [e.detail for e in log.entries(10)[0]]
    assert details[0] == "train was interrupted before it finished; nothing was sent"
    assert details[1] == "get was interrupted before it finished; nothing was sent"
    assert "may be in that round's sum" in details[2]


def test_the_log_columns_line_up_for_every_event_name(tmp_path: Path) -> None:
    """Walking it: a `train-cancelled` line pushed its round and sentence out of line."""
    log = HospitalLog(tmp_path)
    said = {"train-cancelled": "training from global version 2 was cancelled",
            "joined": "joined round 4", "downloaded": "downloaded global version 3"}
    log.record("train-cancelled", said["train-cancelled"])
    log.record("joined", said["joined"], round=4, base_version=2)
    log.record("downloaded", said["downloaded"])
    lines = {e.event: e.format() for e in log.entries(10)[0]}
    assert len({line.index(said[event]) for event, line in lines.items()}) == 1, lines
    assert len({line.index("round 4") if event == "joined" else line.index(" - ") + 1
                for event, line in lines.items()}) == 1, lines
