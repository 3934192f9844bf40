"""Append-only audit log: one JSON object per line, each carrying the hash of the line before.

Why a hash chain: an operator (or an intruder) who edits or deletes a past line breaks every
hash after it, and ``verify`` says where.  What goes in: who connected or was refused and
why, joins, submissions (who, never what), aggregations and admin actions.  What never goes
in: key material, shares, weights — callers pass only names, numbers and codes, and
``record`` refuses bytes and arrays outright.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from securefl.errors import DataError

GENESIS = "0" * 64
_ALLOWED = (str, int, float, bool, type(None))


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = GENESIS
        self._seq = 0
        if self.path.exists():
            last = b""
            with self.path.open("rb") as f:
                for line in f:
                    if line.strip():
                        last = line
                        self._seq += 1
            if last:
                self._prev = _line_hash(last)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, event: str, *, durable: bool = False, **fields: object) -> None:
        """Append one entry.  Every line reaches the kernel at once (a killed server loses
        nothing); ``durable`` entries (versions, admin actions, abandoned rounds) are also
        fsynced, which costs milliseconds on the event loop and so is not done for every
        connection."""
        for key, value in fields.items():
            if not (isinstance(value, _ALLOWED) or (
                isinstance(value, list | tuple) and all(isinstance(v, _ALLOWED) for v in value)
            )):
                raise TypeError(f"audit field {key!r} must be plain text or numbers")
        entry = {
            "seq": self._seq,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            **fields,
            "prev": self._prev,
        }
        line = json.dumps(entry, separators=(",", ":"), sort_keys=False).encode() + b"\n"
        os.write(self._fd, line)
        if durable:
            os.fsync(self._fd)
        self._prev = _line_hash(line)
        self._seq += 1

    def close(self) -> None:
        os.close(self._fd)


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
    return [json.loads(line) for line in lines[-limit:]]


def verify(path: Path) -> int:
    """Check the chain; returns the number of entries or raises naming the first bad line."""
    prev = GENESIS
    count = 0
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise DataError(f"audit log line {number} is not JSON") from exc
        if entry.get("prev") != prev or entry.get("seq") != count:
            raise DataError(f"audit log chain broken at line {number}")
        prev = _line_hash(line)
        count += 1
    return count
