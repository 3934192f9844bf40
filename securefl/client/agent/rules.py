"""What the hospital allows its agent, and the agent's own durable record.

Why the rules are here and not in the service: they decide whether the hospital's scans
train a model and whether anything leaves the building, so they are pure functions of the
settings, the clock and two files on disk, tested without a server.

``state_dir/agent.json`` (``AgentRecord``) holds the scheduled rounds the agent saw, one
entry each: when it started on one (what the daily and per-version limits count), how the
round ended for it, the version it published and the validation balanced accuracy of that
version here.  It is replaced atomically and fsynced (``outbox.write_json``), so a killed
agent leaves either the old record or the new one, never half of one.

The cross-round rule (docs/SECURITY.md) comes from the send record (``send.json``,
``securefl.client.outbox``): once this hospital's masked input went out on a base version,
no *new* update is ever trained and sent on that version.  The only send the agent may make
again there is the very update that went out (``sent/v<base>.npy``, same scan count), and
only when the outbox allows it (the round was announced abandoned, and a retry repeats its
signed survivor list).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from securefl.client.outbox import Outbox, vector_sha256, write_json
from securefl.config import AgentSettings
from securefl.errors import DataError, UpdateAlreadySentError

RECORD_NAME = "agent.json"
#: Entries kept in agent.json (the limits look back one day; the app shows the last few).
KEPT = 200

#: Reason codes a hospital may send in ``training_failed`` (docs/PROTOCOL.md): coarse only,
#: never counts or names of the hospital's data.
REASONS = ("no-scans", "too-few-scans", "training-error", "out-of-memory", "declined",
           "cancelled", "window", "daily-limit", "attempt-limit", "already-sent")

#: Outcomes of an entry: the round is still running for the agent ("started"), or how it
#: ended for it.
OUTCOMES = ("started", "published", "pending", "failed", "declined", "refused", "abandoned",
            "interrupted", "missed")


@dataclass(frozen=True)
class RoundEntry:
    """One scheduled round as this agent saw it."""

    schedule_round: int
    base_version: int
    #: Local calendar day (YYYY-MM-DD) the agent started on it ("" when it never started).
    day: str = ""
    outcome: str = "started"
    #: A ``REASONS`` code when the agent did not take part or failed.
    reason: str | None = None
    #: The version the round published (with this hospital's update in it).
    version: int | None = None
    #: That version's balanced accuracy on this hospital's validation scans.
    balanced_accuracy: float | None = None
    #: One sentence for people.
    detail: str = ""
    time: str = ""

    @property
    def started(self) -> bool:
        return bool(self.day)


@dataclass
class AgentRecord:
    """``agent.json``: the rounds this agent saw, oldest first."""

    path: Path
    rounds: list[RoundEntry] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> AgentRecord:
        path = Path(state_dir) / RECORD_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except ValueError:
            raise DataError(f"{path} is damaged (not JSON): stop the agent, move the file "
                            "away and start it again (the rounds it lists are then counted "
                            "afresh)") from None
        known = set(RoundEntry.__dataclass_fields__)
        rounds = [RoundEntry(**{k: v for k, v in r.items() if k in known})
                  for r in raw.get("rounds", [])]
        return cls(path, rounds)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rounds = self.rounds[-KEPT:]
        write_json(self.path, {"rounds": [asdict(r) for r in self.rounds]}, durable=True)

    def entry(self, schedule_round: int) -> RoundEntry | None:
        for r in reversed(self.rounds):
            if r.schedule_round == schedule_round:
                return r
        return None

    def put(self, entry: RoundEntry) -> RoundEntry:
        """Add or replace the entry of its round and save at once."""
        entry = replace(entry, time=datetime.now(UTC).isoformat(timespec="seconds"))
        self.rounds = [r for r in self.rounds if r.schedule_round != entry.schedule_round]
        self.rounds.append(entry)
        self.save()
        return entry

    def rounds_on(self, day: str) -> int:
        return sum(1 for r in self.rounds if r.day == day)

    def attempts_on(self, base_version: int) -> int:
        return sum(1 for r in self.rounds if r.started and r.base_version == base_version)

    def interrupted(self) -> list[RoundEntry]:
        """Entries a killed agent left as started: marked interrupted (they still count)."""
        found = [r for r in self.rounds if r.outcome == "started"]
        for r in found:
            self.put(replace(r, outcome="interrupted",
                             detail="the agent stopped while taking part in this round"))
        return found

    def recent(self, n: int = 10) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rounds[-n:]]


def in_window(settings: AgentSettings, now: datetime) -> bool:
    """Whether ``now`` (local time) is inside ``[agent] window`` (always, without one)."""
    window = settings.window_minutes()
    if window is None:
        return True
    start, end = window
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


def local_day(now: datetime) -> str:
    return now.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Resend:
    """The update that already went out on this base version, to be sent again as is."""

    update: np.ndarray
    samples: int


def refusal(settings: AgentSettings, record: AgentRecord, base_version: int,
            now: datetime) -> tuple[str, str] | None:
    """``(reason code, sentence)`` when the hospital's ``[agent]`` settings rule the round
    out (checked before anyone is asked to approve); None when they allow it."""
    if not in_window(settings, now):
        return "window", (f"it is {now:%H:%M} here, outside the agent's window "
                          f"{settings.window} ([agent] window)")
    if record.rounds_on(local_day(now)) >= settings.max_rounds_per_day:
        return "daily-limit", (f"this agent already took part in {settings.max_rounds_per_day} "
                               "round(s) today ([agent] max_rounds_per_day)")
    tried = record.attempts_on(base_version)
    if tried >= settings.max_attempts_per_version:
        return "attempt-limit", (f"this agent already tried {tried} round(s) on version "
                                 f"{base_version} ([agent] max_attempts_per_version)")
    return None


def cross_round(outbox: Outbox, base_version: int) -> Resend | None:
    """What the send record allows on ``base_version``.

    None: nothing of an update on it left yet, so train and send a new one.  A ``Resend``:
    the masked input left into a round the server announced abandoned and the record
    allows that same update again.  Raises ``UpdateAlreadySentError`` otherwise (published,
    still pending, or exposed): no update goes out on this version again.
    """
    rec = outbox.record()
    if rec is None or rec.base_version != base_version:
        return None
    outbox.check_can_send(base_version)  # raises when nothing may go out again
    if not rec.masked_rounds:
        return None  # it never left: a new update is as safe as the old one
    kept = outbox.sent_update(base_version)
    if kept is None or vector_sha256(kept) != rec.update_sha256:
        raise UpdateAlreadySentError(
            f"this hospital's masked update for version {base_version} already went out in "
            f"round {rec.masked_rounds[-1]} and the update it sent is no longer kept, so "
            "nothing more goes out on this version: the agent waits for the next version")
    return Resend(np.asarray(kept, np.float32), rec.samples)


def pending_counts(summary: dict[str, dict[str, int]], fraction: float,
                   min_per_class: int) -> dict[str, dict[str, int]]:
    """Scans per class the round would train and validate on, from file counts (no
    decoding): the split ``securefl.ml.local.split_training`` makes."""
    from securefl.ml.data import validation_count

    train, validation = {}, {}
    for cls, n in summary.get("Training", {}).items():
        k = min(n, validation_count(n, fraction, min_per_class)) if n else 0
        train[cls], validation[cls] = n - k, k
    return {"train": train, "validation": validation}
