"""What a hospital sent, kept where only it can read it: the durable send record.

Why a record on disk: a ``send`` can be interrupted (Ctrl-C, a crash, a lost connection) at
any step, and the next ``send`` — maybe another process — must know whether this update's
masked input already left.  A masked input that left can be in a revealed sum even if the
hospital never answered the unmask step, so a second one on the same base version could let
a server difference two sums (docs/SECURITY.md).  The record is written *before* the masked
input leaves, so a crash in between errs on the side of "it left".

Files in the hospital's ``state_dir``:
  send.json           how far the last send for a base version got (``SendRecord``)
  sent/v<base>.npy    each update exactly as handed to a round, the newest ``SENT_KEPT``
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from securefl.client.session import Journal
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg.policy import SignedList
from securefl.errors import DataError, UpdateAlreadySentError
from securefl.fsutil import replace_file

#: Sent updates kept in ``state_dir/sent`` (one model-sized file each).
SENT_KEPT = 5


@dataclass(frozen=True)
class SendRecord:
    """How far the last send for ``base_version`` got (``state_dir/send.json``)."""

    base_version: int
    samples: int
    update_sha256: str
    #: ``joining``, ``joined``, ``keys-shared``, ``masked-input`` (written before the masked
    #: input leaves) or ``published``.
    stage: str = "joining"
    round_id: int | None = None
    #: Rounds in which this update's masked input (may have) left, oldest first.
    masked_rounds: tuple[int, ...] = ()
    #: SecAgg+ rounds in which this hospital revealed its graph-seed value: each is one
    #: more random graph a dishonest server could have hoped for (``max_attempts``).
    graph_rounds: tuple[int, ...] = ()
    #: Draws allowed beyond max_attempts: the dishonest hospitals assumed in the last one.
    graph_spare: int = 0
    #: The version a round published with this update in it.
    published_version: int | None = None
    #: Rounds the server announced as abandoned after the masked input left.
    abandoned_rounds: tuple[int, ...] = ()
    #: The survivor list (names) this update was signed into; None while none was.  After
    #: an abandoned round, the update may only go into a round of exactly these hospitals.
    signed_survivors: tuple[str, ...] | None = None
    #: The encoding of the round whose list was signed (``Encoding`` fields): a retry with
    #: the same hospitals but another encoding would give a sum that differs by one.
    signed_encoding: dict[str, Any] | None = None
    #: The masked input left into a round where the other hospitals alone could have
    #: signed a survivor list with it (t <= n - 1) and this hospital signed none: its
    #: update may be in a sum the server holds, so it goes into no other round on the base.
    unlisted_exposed: bool = False
    updated: str = ""

    @property
    def pending_round(self) -> int | None:
        """A round whose outcome this hospital never heard, after its masked input left."""
        open_rounds = [r for r in self.masked_rounds if r not in self.abandoned_rounds]
        return open_rounds[-1] if open_rounds and self.stage != "published" else None


def _cap_reached(base_version: int, rounds: list[int]) -> str:
    return (f"this hospital's update for version {base_version} already went into "
            f"{len(rounds)} round(s) (rounds {', '.join(map(str, rounds))}), the most its "
            "[policy] max_attempts allows: it is not sent into another; wait for the next "
            "version, then get, train and send (if the federation's rounds on this version "
            "keep failing and no next version comes, ask the operator why: once the cause "
            "is fixed, raising max_attempts by one in hospital.toml lets this same update "
            "into one more round)")


def _draws_reached(base_version: int, rounds: list[int], spare: int) -> str:
    return (f"this hospital already helped draw the SecAgg+ graph of {len(rounds)} round(s) "
            f"on version {base_version} (rounds {', '.join(map(str, rounds))}), the most its "
            f"[policy] max_attempts allows (plus {spare} for the hospitals it assumes "
            "dishonest, each of which can stop one round): nothing more is sent on this "
            "version; wait for the next, or, if those rounds were stopped by hospitals the "
            "operator has since removed, raise max_attempts by one and send again")


def write_json(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    """Replace ``path`` atomically; ``durable`` also fsyncs the file and its folder."""
    replace_file(path, json.dumps(data).encode(), durable=durable)


def vector_sha256(vector: np.ndarray) -> str:
    """sha256 of a weight vector as float32 little-endian bytes (the wire's layout)."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").data).hexdigest()


class Outbox:
    """The send record and the kept updates of one hospital's ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def record(self) -> SendRecord | None:
        try:
            raw = json.loads((self.state_dir / "send.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            # A torn record is read as "the masked input may have left": the safe side.
            raise DataError(f"{self.state_dir / 'send.json'} is damaged, so it is unknown "
                            "whether the last update left: wait for the next global version, "
                            "then get, train and send (and remove that file)") from None
        raw["masked_rounds"] = tuple(raw.get("masked_rounds", ()))
        raw["abandoned_rounds"] = tuple(raw.get("abandoned_rounds", ()))
        raw["graph_rounds"] = tuple(raw.get("graph_rounds", ()))
        if raw.get("signed_survivors") is not None:
            raw["signed_survivors"] = tuple(raw["signed_survivors"])
        return SendRecord(**raw)

    def save(self, record: SendRecord) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stamped = replace(record, updated=datetime.now(UTC).isoformat(timespec="seconds"))
        write_json(self.state_dir / "send.json", asdict(stamped), durable=True)

    def note_abandoned(self, round_id: int) -> None:
        """The server announced that ``round_id`` was abandoned (e.g. by its restart): an
        update whose masked input went to that round may be sent again, but only into a
        round of exactly the survivors it signed (``check_can_send``)."""
        rec = self.record()
        if rec is not None and round_id in rec.masked_rounds \
                and round_id not in rec.abandoned_rounds:
            self.save(replace(rec, abandoned_rounds=(*rec.abandoned_rounds, round_id)))

    def note_published(self, round_id: int, version: int) -> bool:
        """The server said ``round_id`` published ``version`` while this hospital was not
        there to hear it; True when this update's masked input went to that round (it is
        then in that version, and is never sent again)."""
        rec = self.record()
        if rec is None or round_id not in rec.masked_rounds or rec.stage == "published":
            return False
        self.save(replace(rec, stage="published", round_id=round_id,
                          published_version=version))
        return True

    def sent_update(self, base_version: int) -> np.ndarray | None:
        """The update this hospital handed to a round on ``base_version`` (None if none)."""
        path = self.state_dir / "sent" / f"v{base_version:08d}.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def check_can_send(self, base_version: int) -> SignedList | None:
        """Refuse an update on ``base_version`` when one already left for it; resending is
        allowed while nothing left, and after the server announced the round abandoned —
        then only into a round of exactly the signed survivors, which are returned.

        Why so strict: a masked input that left can be in a sum the server revealed even
        if it says the round failed; a second sum over another set of hospitals that holds
        the same update could be subtracted from the first (docs/SECURITY.md).
        """
        rec = self.record()
        if rec is None or rec.base_version != base_version:
            return None
        if rec.stage == "published":
            raise UpdateAlreadySentError(
                f"this hospital's update trained on version {base_version} is already in "
                f"global version {rec.published_version} (round {rec.round_id}): get that "
                "version, train on it and send again")
        pending = rec.pending_round
        if pending is not None:
            raise UpdateAlreadySentError(
                f"this hospital's masked update for version {base_version} already left in "
                f"round {pending}, which has not reported back: if that round publishes, the "
                "update is in it (then get, train and send on the new version); if it fails, "
                "the server says so when this hospital next connects and send may join a new "
                "round")
        if rec.masked_rounds and rec.unlisted_exposed:
            raise UpdateAlreadySentError(
                f"this hospital's masked update for version {base_version} left in round "
                f"{rec.masked_rounds[-1]}, which failed before the hospitals agreed on who is "
                "in the sum, so it may be in a sum the server holds: to keep it hidden it "
                f"goes into no other round on version {base_version}; wait for the next "
                "version, then get, train and send")
        if rec.signed_survivors is None:
            return None
        enc = Encoding(**rec.signed_encoding) if rec.signed_encoding else None
        return SignedList(frozenset(rec.signed_survivors), enc)

    def begin(self, base_version: int, samples: int, update: np.ndarray,
              max_attempts: int) -> tuple[Journal, SignedList | None]:
        """Keep ``update``, record the send, and return the journal the round calls at each
        step (it refuses, before the masked input leaves, a round past ``max_attempts``)
        with the survivor set a retry must repeat (None: any round)."""
        required = self.check_can_send(base_version)
        previous = self.record()
        record = SendRecord(base_version, int(samples), vector_sha256(update))
        if required is not None and previous is not None and (
                previous.update_sha256, previous.samples) != (record.update_sha256,
                                                              record.samples):
            # The same hospitals with another update or count give a sum that differs
            # from the first by exactly this hospital's change.
            raise UpdateAlreadySentError(
                f"this hospital's update for version {base_version} already went into round "
                f"{previous.masked_rounds[-1]}, which failed after its survivor list was "
                "signed: only that same update with the same number of scans may be sent "
                "again (a different one would let the two sums be subtracted): send it with "
                f"`send --update {self.state_dir / 'sent' / f'v{base_version:08d}.npy'} "
                f"--samples {previous.samples}`, or wait for the next version")
        if previous is not None and previous.base_version == base_version:
            # Said before joining: a hospital that would refuse at the round's first step
            # must not hold up the others' round first.
            if len(set(previous.masked_rounds)) >= max_attempts:
                raise UpdateAlreadySentError(_cap_reached(base_version,
                                                          sorted(set(previous.masked_rounds))))
            if len(set(previous.graph_rounds)) >= max_attempts + previous.graph_spare:
                raise UpdateAlreadySentError(_draws_reached(
                    base_version, sorted(set(previous.graph_rounds)), previous.graph_spare))
            # Same base: keep the history of rounds it went to (a resend after an abandon).
            record = replace(record, masked_rounds=previous.masked_rounds,
                             graph_rounds=previous.graph_rounds,
                             graph_spare=previous.graph_spare,
                             abandoned_rounds=previous.abandoned_rounds,
                             signed_survivors=previous.signed_survivors,
                             signed_encoding=previous.signed_encoding,
                             unlisted_exposed=previous.unlisted_exposed)
        self._keep(base_version, update)
        self.save(record)
        current = [record]

        def journal(stage: str, round_id: int, version: int | None = None, *,
                    survivors: tuple[str, ...] | None = None,
                    others_can_sign: bool = True,
                    encoding: Encoding | None = None, spare: int = 0) -> None:
            rec = current[0]
            if stage in ("masked-input", "graph-drawn"):
                # A round id seen before for this step is a server reusing ids, which would
                # let it draw graphs (or collect sums) without the count going up.
                seen = rec.graph_rounds if stage == "graph-drawn" else rec.masked_rounds
                if round_id in seen or (stage == "graph-drawn" and round_id in rec.masked_rounds):
                    raise UpdateAlreadySentError(
                        f"the server reused round number {round_id} for another attempt with "
                        f"this update on version {base_version}: refusing, nothing was sent "
                        "(round numbers never repeat on an honest server; tell the operator)")
                # Raised before the masked input (or the seed value) leaves: nothing of this
                # attempt is sent.  Two caps: sums that hold this update (max_attempts), and
                # graphs drawn (max_attempts + the assumed dishonest hospitals, since an
                # honest server shuts each out after it stops one round; without that margin
                # they could take turns and halt a version for good).
                earlier = sorted(set(seen))  # round_id is not among them (checked above)
                if stage == "masked-input" and len(earlier) >= max_attempts:
                    raise UpdateAlreadySentError(_cap_reached(base_version, earlier))
                if stage == "graph-drawn" and len(earlier) >= max_attempts + spare:
                    raise UpdateAlreadySentError(_draws_reached(base_version, earlier, spare))
            if stage == "graph-drawn":
                rec = replace(rec, graph_rounds=(*rec.graph_rounds, round_id),
                              graph_spare=spare)
            elif stage == "masked-input":
                rec = replace(rec, stage=stage, round_id=round_id,
                              masked_rounds=(*rec.masked_rounds, round_id),
                              unlisted_exposed=rec.unlisted_exposed or (
                                  others_can_sign and rec.signed_survivors is None))
            elif stage == "signed":
                # The list covers this round: a sum with this update is over these names.
                rec = replace(rec, stage=stage, round_id=round_id,
                              signed_survivors=rec.signed_survivors or survivors,
                              signed_encoding=rec.signed_encoding or (
                                  asdict(encoding) if encoding is not None else None),
                              unlisted_exposed=False if rec.signed_survivors is None
                              and len(rec.masked_rounds) == 1 else rec.unlisted_exposed)
            elif stage == "abandoned":
                if round_id in rec.masked_rounds:
                    rec = replace(rec, abandoned_rounds=(*rec.abandoned_rounds, round_id))
            elif stage == "published":
                rec = replace(rec, stage=stage, round_id=round_id, published_version=version)
            else:
                rec = replace(rec, stage=stage, round_id=round_id)
            current[0] = rec
            self.save(rec)

        return journal, required

    def _keep(self, base_version: int, update: np.ndarray) -> None:
        folder = self.state_dir / "sent"
        folder.mkdir(parents=True, exist_ok=True)
        replace_file(folder / f"v{base_version:08d}.npy", lambda f: np.save(f, update),
                     durable=False)
        for old in sorted(folder.glob("v*.npy"))[:-SENT_KEPT]:
            old.unlink(missing_ok=True)
