"""The hospital's own log: what it did and what it refused, kept on its own machine.

Why a log of its own: the server's audit log is written by the party a hospital's policy
defends against.  A hospital that refused a round (a server asking for the update in the
clear, a roster below its threshold, a retry past its attempts) must be able to show why
without asking the server, and its staff must be able to answer "what went wrong?" after a
night of unattended sends.  So ``Hospital`` writes here at every ``get``, ``train`` and step
of ``send``, and ``securefl client ... log`` reads it back.

Format: ``state_dir/log.jsonl``, one JSON object per line — ``time`` (UTC), ``event``,
``round``, ``base_version``, ``detail`` (one sentence), and where they apply ``action``,
``version``, ``code`` (the error's stable code) and ``by`` (``hospital`` when this
hospital's own check refused, ``server`` when the server did).  Refusals, failures and
published versions are fsynced before the error reaches the user; a torn last line (a crash,
a full disk) is skipped when reading and never glued to the next entry.

Bounded: past ``MAX_BYTES`` the file is renamed ``log.1.jsonl`` (older ones shift up to
``log.<BACKUPS>.jsonl`` and the oldest is dropped), so the log never grows past
``(BACKUPS + 1) * MAX_BYTES``.  Writers lock the file (``flock``), so the hospital app and
its training process can both write; the stdlib ``RotatingFileHandler`` rotates without
such a lock, and its loggers are process-wide, where the demo runs several hospitals in one
process — hence this small appender rather than ``logging``.

What never goes in: key material, shares, weights, scans.  Entries carry only numbers,
codes and sentences written by us; as a second line of defence any long hex or base64 run
in a sentence is cut before it is written (``scrub``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from securefl.client.session import RoundAbandonedError
from securefl.errors import NotEnoughSurvivorsError, SecureFLError, TransportError

try:  # POSIX; elsewhere one writer at a time is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOG_NAME = "log.jsonl"
#: Size at which the log is rotated, and how many rotated files are kept.
MAX_BYTES = 512 * 1024
BACKUPS = 3
#: Longest sentence kept (error messages are one sentence; this only bounds a runaway one).
MAX_DETAIL = 1000

_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_RUN = re.compile(r"[A-Za-z0-9+/=_-]{40,}")
_PLAIN = (str, int, type(None))


def scrub(text: str) -> str:
    """``text`` without long hex or base64 runs: a key, a share or a weight dump that slipped
    into an error message by mistake (a second line of defence: callers pass only numbers
    and our own sentences).  Hex runs keep their first 12 digits, enough to tell two digests
    apart; runs that look like base64 (digits and both cases, and no plain path: a ``+``, a
    ``=`` or no ``/``) are removed."""
    text = _HEX.sub(lambda m: m.group()[:12] + "...", text)

    def b64(m: re.Match[str]) -> str:
        run = m.group()
        mixed = (any(c.isdigit() for c in run) and any(c.isupper() for c in run)
                 and any(c.islower() for c in run))
        pathlike = "/" in run and "+" not in run and "=" not in run
        return "<removed>" if mixed and not pathlike else run

    return _RUN.sub(b64, text)[:MAX_DETAIL]


@dataclass(frozen=True)
class Entry:
    """One line of the log, as read back."""

    time: str
    event: str
    round: int | None
    base_version: int | None
    detail: str
    action: str | None = None
    version: int | None = None
    code: str | None = None
    by: str | None = None

    def format(self) -> str:
        """One line for people: when, what, which round and version, and the sentence."""
        when = self.time.replace("T", " ")[:19] + " UTC"
        where = []
        if self.round is not None:
            where.append(f"round {self.round}")
        if self.base_version is not None:
            where.append(f"base v{self.base_version}")
        what = self.event.upper() if self.event in ("refused", "failed", "error") \
            else self.event
        detail = self.detail
        if self.code:
            who = {"hospital": ", by this hospital", "server": ", by the server"}.get(
                self.by or "", "")
            detail = f"[{self.code}{who}] {detail}"
        # 15: the longest event name (train-cancelled), so every column lines up
        return f"{when}  {what:<15} {', '.join(where) or '-':<18} {detail}"


class HospitalLog:
    """The append-only, size-bounded log in one hospital's ``state_dir``."""

    def __init__(self, state_dir: Path, *, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOG_NAME
        self.max_bytes, self.backups = max_bytes, backups
        self._warned = False

    # -- writing ---------------------------------------------------------------------------
    def record(self, event: str, detail: str, *, round: int | None = None,
               base_version: int | None = None, durable: bool = False,
               **extra: str | int | None) -> None:
        """Append one entry; ``durable`` fsyncs it before returning.

        A log that cannot be written (full disk, permissions) never stops the hospital's
        work: the hospital's user is told once on stderr, and the error it was about to
        record still reaches them.
        """
        fields: dict[str, Any] = {"round": round, "base_version": base_version, **extra}
        for key, value in fields.items():
            if not isinstance(value, _PLAIN):
                raise TypeError(f"hospital log field {key!r} must be plain text or a number")
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                 "event": event, "round": round, "base_version": base_version,
                 "detail": scrub(" ".join(detail.split())),
                 **{k: (scrub(v) if isinstance(v, str) else v)
                    for k, v in extra.items() if v is not None}}
        line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        try:
            self._append(line, durable)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                print(f"securefl: warning: cannot write the hospital's log {self.path} "
                      f"({exc.strerror or exc}); its entries are lost until that is fixed",
                      file=sys.stderr)

    def _append(self, line: bytes, durable: bool) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if _replaced(fd, self.path):
                    continue  # another writer rotated it while we waited: open the new one
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                    continue
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn last line stays on its own
                os.write(fd, line)
                if durable:
                    os.fsync(fd)
                return
            finally:
                os.close(fd)  # also releases the lock

    def _rotate(self) -> None:
        """log.jsonl -> log.1.jsonl -> ... -> log.<backups>.jsonl; the oldest is dropped."""
        if self.backups < 1:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self._file(i)
            if older.exists():
                os.replace(older, self._file(i + 1))
        os.replace(self.path, self._file(1))

    def _file(self, i: int) -> Path:
        return self.path if i == 0 else self.state_dir / f"log.{i}.jsonl"

    # -- what Hospital calls ---------------------------------------------------------------
    def downloaded(self, version: int, contributors: int, total_samples: int,
                   sha256: str) -> None:
        made = ("the starting model" if version == 0 else
                f"from {contributors} hospitals, {total_samples} scans")
        self.record("downloaded", f"downloaded global version {version} ({made}; sha256 "
                    f"{sha256[:12]}...)", version=version, action="get")

    def trained(self, base_version: int | None, scans: int, cancelled: bool = False) -> None:
        start = (f"from global version {base_version}" if base_version is not None
                 else "a new model (no global version downloaded)")
        if cancelled:
            self.record("train-cancelled", f"training {start} was cancelled; the model "
                        "file is unchanged", base_version=base_version, action="train")
        else:
            self.record("trained", f"trained {start} on {scans} scans",
                        base_version=base_version, action="train")

    def round_ended(self, round_id: int) -> None:
        self.record("round-ended", f"the server said round {round_id} ended without "
                    "publishing anything, so an update sent into it may be sent again",
                    round=round_id, durable=True)

    def round_published(self, round_id: int, version: int) -> None:
        self.record("published", f"the server said round {round_id} published global "
                    f"version {version} with this hospital's update in it while this "
                    "hospital was not connected", round=round_id, version=version,
                    action="send", durable=True)

    def follow(self, journal: Callable[..., None], base_version: int,
               samples: int) -> Callable[..., None]:
        """``journal`` (the send record's) that also writes each step of the round here.

        The inner journal runs first: when it refuses (``max_attempts``), the refusal is
        what gets logged, not a step that did not happen.
        """
        self.record("sending", f"sending the update trained on version {base_version} "
                    f"({samples} scans)", base_version=base_version, action="send")
        attempt = _ATTEMPT.get()

        def logged_journal(stage: str, round_id: int, version: int | None = None, *,
                           survivors: tuple[str, ...] | None = None,
                           others_can_sign: bool = True, encoding: object = None,
                           spare: int = 0) -> None:
            journal(stage, round_id, version, survivors=survivors,
                    others_can_sign=others_can_sign, encoding=encoding, spare=spare)
            if attempt is not None:
                attempt["round"] = round_id
            if stage == "joined":
                self.record("joined", f"joined round {round_id}", round=round_id,
                            base_version=base_version, action="send")
            elif stage == "graph-drawn":
                self.record("graph-drawn", f"revealed this hospital's share of round "
                            f"{round_id}'s SecAgg+ graph; each such round counts against "
                            "[policy] max_attempts on this version", round=round_id,
                            base_version=base_version, action="send")
            elif stage == "masked-input":
                self.record("masked-input", f"the masked update is being sent into round "
                            f"{round_id}; from here it can be part of that round's sum",
                            round=round_id, base_version=base_version, action="send",
                            durable=True)
            elif stage == "signed":
                self.record("signed", f"signed round {round_id}'s list of "
                            f"{len(survivors or ())} hospitals whose updates are in the sum; "
                            f"a retry may only combine exactly these: "
                            f"{', '.join(survivors or ())}", round=round_id,
                            base_version=base_version, action="send", durable=True)
            elif stage == "abandoned":
                self.record("abandoned", f"round {round_id} was abandoned by the server "
                            "before it published anything", round=round_id,
                            base_version=base_version, action="send", durable=True)
            elif stage == "published":
                self.record("published", f"round {round_id} published global version "
                            f"{version} with this hospital's update in it", round=round_id,
                            base_version=base_version, version=version, action="send",
                            durable=True)

        return logged_journal

    def failed(self, action: str, exc: BaseException, *, round: int | None = None,
               base_version: int | None = None) -> None:
        """Why ``action`` stopped: a refusal (ours or the server's), a failure, or an
        interruption.  Always fsynced: this is the entry the log exists for."""
        common = {"round": round, "base_version": base_version, "action": action,
                  "durable": True}
        if isinstance(exc, SecureFLError):
            if isinstance(exc, TransportError | RoundAbandonedError | NotEnoughSurvivorsError):
                by = None if isinstance(exc, TransportError) else "server"
                self.record("failed", f"{action} failed: {exc.message}", code=exc.code,
                            by=by, **common)  # type: ignore[arg-type]
            else:
                # Errors the server sent are made by ``transport.error_from_wire``, which
                # marks them with the server's version.
                by = "server" if hasattr(exc, "server_version") else "hospital"
                self.record("refused", exc.message, code=exc.code, by=by,
                            **common)  # type: ignore[arg-type]
        elif isinstance(exc, KeyboardInterrupt | SystemExit) or _is_cancel(exc):
            # Only a send has an update that may have left (walking it, every interrupted
            # train and get said so too).
            note = (" (if a masked-input entry for this round is above, the update had "
                    "already left and may be in that round's sum)" if action == "send" else
                    "; nothing was sent")
            self.record("interrupted", f"{action} was interrupted before it finished{note}",
                        **common)  # type: ignore[arg-type]
        else:
            self.record("error", f"{action} stopped on an unexpected error "
                        f"({type(exc).__name__}): please report it", **common)  # type: ignore[arg-type]

    # -- reading ---------------------------------------------------------------------------
    def entries(self, limit: int) -> tuple[list[Entry], int]:
        """The newest ``limit`` entries, oldest first, and how many damaged lines were
        skipped on the way (a torn last line, a line that is not one of ours)."""
        found: list[Entry] = []
        damaged = 0
        for i in range(self.backups + 1):
            path = self._file(i)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            batch = []
            for line in raw.splitlines():
                if not line.strip():
                    continue
                entry = _parse(line)
                if entry is None:
                    damaged += 1
                else:
                    batch.append(entry)
            found = batch + found
            if len(found) >= limit:
                break
        return found[-limit:], damaged


def _parse(line: bytes) -> Entry | None:
    try:
        raw = json.loads(line)
        if not (isinstance(raw, dict) and isinstance(raw.get("event"), str)
                and isinstance(raw.get("time"), str) and isinstance(raw.get("detail"), str)):
            return None
        fields: dict[str, Any] = {k: raw.get(k) for k in Entry.__dataclass_fields__}
        return Entry(**fields)
    except (ValueError, TypeError):
        return None


def _replaced(fd: int, path: Path) -> bool:
    """Whether ``path`` no longer names the file open as ``fd`` (rotated meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) != (own.st_ino, own.st_dev)


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


# -- hooking Hospital's methods -------------------------------------------------------------

#: The action being logged in this task or thread (a dict with its round and base version),
#: so a ``send`` that calls ``local_update`` and ``send_update`` logs its failure once.
_ATTEMPT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "securefl_hospital_log_attempt", default=None)

F = TypeVar("F", bound=Callable[..., Any])


def logged(action: str, *, base: str | None = None) -> Callable[[F], F]:
    """Decorate a ``Hospital`` method so that whatever stops it is written to ``self.log``.

    ``base`` names the parameter holding the base version the action is about.  Nested
    logged calls (``send`` -> ``local_update``, ``send_update``) share the outer attempt:
    the failure is written once, with the round the journal saw last.
    """
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        def begin(args: tuple, kwargs: dict) -> tuple[dict[str, Any], contextvars.Token | None]:
            attempt = _ATTEMPT.get()
            token = None
            if attempt is None:
                attempt = {"round": None, "base_version": None}
                token = _ATTEMPT.set(attempt)
            if base is not None and attempt["base_version"] is None:
                value = signature.bind(*args, **kwargs).arguments.get(base)
                attempt["base_version"] = int(value) if isinstance(value, int) else None
            return attempt, token

        def end(self: Any, attempt: dict[str, Any], token: contextvars.Token | None,
                exc: BaseException | None) -> None:
            if token is None:
                return  # an outer logged call records it
            _ATTEMPT.reset(token)
            if exc is not None:
                self.log.failed(action, exc, **attempt)

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                attempt, token = begin((self, *args), kwargs)
                try:
                    result = await fn(self, *args, **kwargs)
                except BaseException as exc:
                    end(self, attempt, token, exc)
                    raise
                end(self, attempt, token, None)
                return result

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            attempt, token = begin((self, *args), kwargs)
            try:
                result = fn(self, *args, **kwargs)
            except BaseException as exc:
                end(self, attempt, token, exc)
                raise
            end(self, attempt, token, None)
            return result

        return run  # type: ignore[return-value]

    return decorate
