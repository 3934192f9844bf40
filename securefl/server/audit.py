"""Append-only audit log: one JSON object per line, each carrying the hash of the line before.

Why a hash chain: an operator (or an intruder) who edits or deletes a past line breaks every
hash after it, and ``verify`` says where.  What goes in: who connected or was refused and
why, joins, submissions (who, never what), aggregations and admin actions.  What never goes
in: key material, shares, weights — callers pass only names, numbers and codes, and
``record`` refuses bytes and arrays outright.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeGuard

from securefl.errors import DataError
from securefl.server import testhook

log = logging.getLogger("securefl.server")

GENESIS = "0" * 64
_ALLOWED = (str, int, float, bool, type(None))


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


#: Entries kept in memory while the log cannot be written; beyond that the oldest are
#: counted and replaced by one ``audit-gap`` entry when the log is writable again.
BACKLOG_MAX = 100_000


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = GENESIS
        self._seq = 0
        #: What the chain check at opening found, when the log was damaged before this start
        #: (None: intact or new); the server records and announces it.
        self.damage: ChainCheck | None = None
        if self.path.exists():
            found = check(self.path)  # one pass: the chain's end, and any damage before it
            self._prev, self._seq = found.head, found.next_seq
            self.damage = None if found.intact else found
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._end_torn_line()
        #: Entries not yet written (the log was unwritable), oldest first.
        self._backlog: collections.deque[tuple[dict, bool]] = collections.deque()
        self._dropped = 0
        #: Why the log cannot be written now (None: it can).
        self.fault: str | None = None
        #: Called with every entry as it is recorded (the server's console,
        #: ``securefl.server.console.on_audit``); it must not raise.
        self.listener: Callable[[dict], None] | None = None

    def _end_torn_line(self) -> None:
        """A log whose last line was cut off (a disk that filled, a copy stopped halfway)
        gets a newline, so the next entry starts a line of its own instead of being glued
        to the damaged one and lost with it.  The damaged line stays as it was, and
        ``verify`` still names it: the log shows what happened to it."""
        try:
            size = os.fstat(self._fd).st_size
            if not size:
                return
            with self.path.open("rb") as f:
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
            os.write(self._fd, b"\n")
        except OSError:
            return  # an unwritable log: the first entry will say so
        log.warning("the audit log %s ended in a cut-off line (damaged before this start); "
                    "it is kept as it is and new entries start on the next line", self.path)

    @property
    def writable(self) -> bool:
        """Whether every entry so far is in the file (tries the held ones again first)."""
        if self._backlog:
            self._flush()
        return not self._backlog

    def record(self, event: str, *, durable: bool = False, **fields: object) -> None:
        """Append one entry.  Every line reaches the kernel at once (a killed server loses
        nothing); ``durable`` entries (versions, admin actions, abandoned rounds) are also
        fsynced, which costs milliseconds on the event loop and so is not done for every
        connection.

        Never raises on a storage fault (read-only, permissions, full disk): the entry is
        held in memory, in order, the console says so once, and every later call tries the
        held ones first; the coordinator opens no round meanwhile (``writable``)."""
        for key, value in fields.items():
            if not (isinstance(value, _ALLOWED) or (
                isinstance(value, list | tuple) and all(isinstance(v, _ALLOWED) for v in value)
            )):
                raise TypeError(f"audit field {key!r} must be plain text or numbers")
        entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                 "event": event, **fields}
        if len(self._backlog) >= BACKLOG_MAX:
            self._backlog.popleft()
            self._dropped += 1
        self._backlog.append((entry, durable))
        self._flush()
        if self.listener is not None:
            try:
                self.listener(entry)
            except Exception:  # the console must never cost an audit entry or a round
                log.exception("could not show audit entry %r on the console", event)

    def _flush(self) -> None:
        while self._backlog:
            if self._dropped:
                gap = {"time": self._backlog[0][0]["time"], "event": "audit-gap",
                       "lost": self._dropped, "reason": self.fault or ""}
                if not self._write(gap, True):
                    return
                self._dropped = 0
            entry, durable = self._backlog[0]
            if not self._write(entry, durable):
                return
            self._backlog.popleft()
        if self.fault is not None:
            log.warning("the audit log %s is writable again; every held entry is in it",
                        self.path)
            self.fault = None

    def _write(self, fields: dict, durable: bool) -> bool:
        """One line with its place in the chain; False (and nothing half-written) when the
        file cannot take it."""
        entry = {"seq": self._seq, **fields, "prev": self._prev}
        line = json.dumps(entry, separators=(",", ":"), sort_keys=False).encode() + b"\n"
        try:
            end = os.fstat(self._fd).st_size
            testhook.fail_write("audit", self.path, "open")  # test-only; see its module
            testhook.fail_write("audit", self.path, "write")
            written = os.write(self._fd, line)
            if written != len(line):
                os.ftruncate(self._fd, end)  # a torn line would break the chain
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            if durable:
                os.fsync(self._fd)
        except OSError as exc:
            if self.fault is None:
                log.error("cannot write the audit log %s (%s): its entries are held in "
                          "memory and no new round opens until it is writable again",
                          self.path, exc.strerror or exc)
            self.fault = exc.strerror or str(exc)
            return False
        self._prev = _line_hash(line)
        self._seq += 1
        return True

    def close(self) -> None:
        if self._backlog:
            self._flush()
        if self._backlog:
            log.error("the audit log %s is still unwritable: %d entries were not written",
                      self.path, len(self._backlog))
        os.close(self._fd)


def clip(text: str, limit: int = 600) -> str:
    """A sentence bounded for the log, cut at a word and marked when cut.

    Why bounded: every refusal is an entry, so its text must not grow the log without
    limit.  Why marked: cut mid-word at 200 characters, the console read "...; nothing "
    and stopped, as if the sentence were all there (walking it)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " [...]"


def read_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def tail(path: Path, limit: int, chunk: int = 1 << 16) -> list[dict]:
    """The last ``limit`` entries, reading only the end of the file (the log only grows)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        start, data = end, b""
        while start > 0 and data.count(b"\n") <= limit:
            start = max(0, start - chunk)
            f.seek(start)
            data = f.read(end - start)
    lines = [line for line in data.splitlines() if line.strip()]
    if start > 0:
        lines = lines[1:]  # the first line may be cut
    return [_entry_or_damage(line) for line in lines[-limit:]]


def _entry_or_damage(line: bytes) -> dict:
    """One line as an entry; a damaged one (not a JSON object) as a ``damaged-line`` entry
    that says so, so reading the log never fails on it and the reader still sees it."""
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if isinstance(entry, dict):
        return entry
    return {"event": "damaged-line",
            "detail": f"this line of the audit log is not an entry ({len(line)} bytes, "
                      "cut off or overwritten); it is left as it is in the file"}


def _last(path: Path, marker: bytes, pick: Callable[[dict], int | None],
          chunk: int = 1 << 16) -> int | None:
    """``pick`` of the last entry (lines holding ``marker``) for which it is not None.  Read
    from the end, so a long log costs only its last lines at start-up."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start) + rest
            lines = data.split(b"\n")
            rest = lines.pop(0) if start > 0 else b""  # may be cut: read with the next chunk
            for line in reversed(lines):
                if marker not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                value = pick(entry) if isinstance(entry, dict) else None
                if value is not None:
                    return value
            end = start
    return None


def last_version(path: Path, chunk: int = 1 << 16) -> int | None:
    """The newest model version the log accounts for: that of its last ``aggregated`` or
    ``server-start`` entry (None: neither, e.g. a new log)."""
    def pick(entry: dict) -> int | None:
        if entry.get("event") in ("aggregated", "server-start") and _is_int(entry.get("version")):
            return int(entry["version"])
        return None

    return _last(path, b'"version"', pick, chunk)


def last_round(path: Path, chunk: int = 1 << 16) -> int | None:
    """The largest round number the log names (None: none yet).  Round numbers only go up,
    so it is that of the last entry naming one (reconciled entries say round 0)."""
    def pick(entry: dict) -> int | None:
        value = entry.get("round_id")
        return int(value) if _is_int(value) and value > 0 else None

    return _last(path, b'"round_id"', pick, chunk)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class ChainCheck:
    """What ``check`` found: every damaged place, not only the first."""

    path: Path
    #: Non-empty lines, damaged ones included (the writer numbers them all: ``seq``).
    entries: int = 0
    #: ``(line number, what is wrong)``, in file order.
    problems: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    #: The hash the next entry must carry as ``prev`` (the newest line's).
    head: str = GENESIS
    #: The number the next entry must carry as ``seq`` (one after the newest line's).
    next_seq: int = 0
    first_time: str | None = None
    last_time: str | None = None

    @property
    def intact(self) -> bool:
        return not self.problems

    def sentence(self) -> str:
        """One sentence for an operator: intact, or the damage and what to do about it."""
        if self.intact:
            span = (f", {self.first_time} to {self.last_time}" if self.first_time else "")
            return (f"the audit log {self.path} is intact: {self.entries} entries{span}, "
                    "each chained to the one before")
        shown = "; ".join(f"line {n}: {what}" for n, what in self.problems[:5])
        more = len(self.problems) - 5
        return (f"the audit log {self.path} is damaged at {len(self.problems)} place"
                f"{'' if len(self.problems) == 1 else 's'} ({shown}"
                f"{f'; and {more} more' if more > 0 else ''}): compare it with a backup copy "
                "to see what was changed; the server keeps adding to it, and the damage "
                "stays visible to this check")


def check(path: Path) -> ChainCheck:
    """Walk the whole chain and name every damaged line.

    Why go on past the first break: the writer chains each entry onto the hash of the line
    before it whatever that line holds (a cut-off line after a full disk included), so the
    chain resumes after damage and a second, later edit must not hide behind the first.
    An edited line is named itself (the line after it no longer carries its hash, and the
    numbering runs on without a gap); removed lines show as a break with a numbering gap,
    named at the line after the gap.  The newest line has no successor to vouch for it:
    ``head`` is its hash, for an operator who wants to note it and check later that nothing
    before it changed."""
    result = ChainCheck(Path(path))
    prev, due, before, named = GENESIS, 0, 0, set()
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                result.problems.append((number, "not an entry (cut off or overwritten)"))
                named.add(number)
            else:
                seq = entry.get("seq")
                wrong = []
                if entry.get("prev") != prev:
                    if number == 1 or not before:
                        wrong.append("it is not the first entry of a log: lines were "
                                     "removed from the start" + (
                                         f" (numbered {seq!r} where {due} was due)"
                                         if seq != due else ""))
                    elif seq == due and before not in named:
                        # No gap: the line before is the one that no longer matches.
                        result.problems.append((before, "changed after it was written (the "
                                                "line after it no longer matches it)"))
                        named.add(before)
                    elif seq != due:
                        wrong.append(f"lines were removed or inserted before it (numbered "
                                     f"{seq!r} where {due} was due)")
                elif seq != due:
                    wrong.append(f"numbered {seq!r} where {due} was due")
                if _is_int(seq):
                    due = seq  # a gap is named once, not at every line after it
                if wrong:
                    result.problems.append((number, "; ".join(wrong)))
                    named.add(number)
                if isinstance(entry.get("time"), str):
                    result.first_time = result.first_time or entry["time"]
                    result.last_time = entry["time"]
            prev, before = _line_hash(line), number
            result.entries += 1
            due += 1
    result.head, result.next_seq = prev, due
    return result


def verify(path: Path) -> int:
    """The number of entries of an intact chain; raises ``DataError`` saying where it is
    damaged (``check`` lists every place)."""
    result = check(path)
    if not result.intact:
        raise DataError(f"audit log chain broken: {result.sentence()}")
    return result.entries
