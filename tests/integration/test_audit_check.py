"""The audit log's hash chain, checked the way an operator checks it: every damaged place
named (not only the first), at start-up and by ``securefl server --verify-audit``."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from securefl import config
from securefl.cli import EXIT_CODES, main
from securefl.client.session import HospitalSession
from securefl.errors import DataError
from securefl.server import audit

from .conftest import Federation, running


def _a_few_entries(fed: Federation, settings: config.ServerSettings) -> None:
    async def scenario() -> None:
        async with running(settings) as srv:
            for name in "abc":
                async with HospitalSession(fed.client_settings(name, srv.port)) as h:
                    await h.status()

    asyncio.run(scenario())


def test_every_damaged_place_is_named_at_start_and_by_the_command(
        fed: Federation, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Walking it: ``verify`` stopped at the first damaged line (a second, later edit hid
    behind it), the server never checked the chain at start, and an operator had to call
    Python to check it at all."""
    toml = fed.server_toml(0)
    settings = config.load(toml, config.ServerSettings)
    log = Path(settings.audit_log)
    _a_few_entries(fed, settings)

    assert main(["server", "--config", str(toml), "--verify-audit"]) == 0
    out = capsys.readouterr().out
    entries = len(log.read_bytes().splitlines())
    assert f"the audit log {log} is intact: {entries} entries" in out
    head = audit.check(log).head
    assert f"hash of the newest entry: {head}" in out

    lines = log.read_bytes().splitlines(keepends=True)
    names = [i for i, line in enumerate(lines) if b'"name":"b"' in line]
    edited, removed = names[0], len(lines) - 2  # an edit, and a later line deleted
    assert edited + 1 < removed
    lines[edited] = lines[edited].replace(b'"name":"b"', b'"name":"x"')
    del lines[removed]
    log.write_bytes(b"".join(lines))
    damaged = [edited + 1, removed + 1]  # 1-based: the edited line, the line after the gap

    copy = fed.tmp / "audit-copy.jsonl"
    copy.write_bytes(log.read_bytes())
    for argv in (["--config", str(toml), "--verify-audit"], ["--verify-audit", str(copy)]):
        assert main(["server", *argv]) == EXIT_CODES[DataError]
        err = capsys.readouterr().err
        assert "is damaged at 2 places" in err, err
        # The edited line itself is named (walking it, the line after it was).
        assert (f"line {damaged[0]}: changed after it was written (the line after it no "
                "longer matches it)") in err, err
        assert (f"line {damaged[1]}: lines were removed or inserted before it (numbered "
                f"{removed + 1} where {removed} was due)") in err, err
        assert "compare it with a backup copy" in err

    with caplog.at_level(logging.WARNING, logger="securefl"):
        _a_few_entries(fed, settings)  # the server starts on the damaged log
    warned = [r.getMessage() for r in caplog.records if "is damaged at 2 places" in
              r.getMessage()]
    assert len(warned) == 1 and "found at start-up" in warned[0], warned
    recorded = [e for e in audit.read_entries(log) if e["event"] == "audit-damaged"]
    assert [(e["places"], e["lines"]) for e in recorded] == [(2, damaged)]
    # What it added chains on: the damage is still the same two places, no more.
    assert [n for n, _ in audit.check(log).problems] == damaged
    with pytest.raises(DataError, match="damaged at 2 places"):
        audit.verify(log)


def test_lines_removed_from_the_start_and_a_cut_off_line_are_named(tmp_path: Path) -> None:
    log = audit.AuditLog(tmp_path / "audit.jsonl")
    for i in range(4):
        log.record("admin", action=f"step {i}")
    log.close()
    path = tmp_path / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[2:]) + b'{"seq":4,"time":"2026-')
    found = audit.check(path)
    assert found.problems == [
        (1, "it is not the first entry of a log: lines were removed from the start "
            "(numbered 2 where 0 was due)"),
        (3, "not an entry (cut off or overwritten)")]
    # The writer chains onto the cut-off line, so the chain goes on after it.
    log = audit.AuditLog(path)
    assert log.damage is not None and log.damage.problems == found.problems
    log.record("admin", action="after")
    log.close()
    assert [n for n, _ in audit.check(path).problems] == [1, 3]
    assert json.loads(path.read_bytes().splitlines()[-1])["action"] == "after"


@pytest.mark.parametrize("what", ["missing", "folder", "no config"])
def test_a_wrong_file_to_check_gets_one_sentence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    argv = {"missing": ["--verify-audit", str(tmp_path / "nope.jsonl")],
            "folder": ["--verify-audit", str(tmp_path)],
            "no config": ["--verify-audit"]}[what]
    code = main(["server", *argv])
    err = capsys.readouterr().err
    assert code == (3 if what == "no config" else 4), err
    assert {"missing": "there is no audit log at", "folder": "is a folder, not an audit log",
            "no config": "--verify-audit needs --config server.toml"}[what] in err
    assert "Traceback" not in err


def test_a_long_refusal_is_kept_whole_up_to_a_bound_and_marked_when_cut() -> None:
    """Walking it: the console's refusal line stopped at "...; nothing " (cut at 200
    characters mid-sentence, unmarked)."""
    sentence = ("round 3 could not be unmasked ('east' left after sending its masked update, "
                "and the survivor list needs 3 signatures while only 2 of the round's "
                "hospitals (north, south) are still connected); nothing was published and "
                "too few hospitals are online to retry: ask the hospitals to connect and "
                "send again")
    assert len(sentence) > 200 and audit.clip(sentence) == sentence
    cut = audit.clip(sentence * 4)
    assert len(cut) <= 606 and cut.endswith(" [...]") and not cut[:-6].endswith(" ")
