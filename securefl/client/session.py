"""``HospitalSession`` and ``AdminSession``: the only network API the CLI and TUIs use.

Why sessions and not raw messages: a hospital's ``send`` is a whole secure-aggregation round
(join, keys, shares, masked input, unmask answer, result) driven by the crypto core's
``ClientRound``; callers should see one awaitable that returns the published version or
raises a ``SecureFLError`` saying what to do next.  The update is given to the round object
and masked there; it never reaches the socket in the clear (except with a server explicitly
configured ``masking = "plain"``, the benchmark baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

import numpy as np

from securefl.certs import load_credential
from securefl.client import membership, revocation
from securefl.client.transport import Connection, error_from_wire
from securefl.config import ClientSettings
from securefl.crypto import pki
from securefl.crypto.membership import MemberList
from securefl.crypto.quantize import Encoding, check_update
from securefl.crypto.secagg import ClientRound
from securefl.crypto.secagg.policy import RoundPolicy, SignedList
from securefl.errors import (
    ConfigError,
    CryptoError,
    DataError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SecureFLError,
    TransportError,
    UpdateAlreadySentError,
)
from securefl.protocol import mapping
from securefl.protocol import messages as wm
from securefl.protocol.conversation import Conversation, Side
from securefl.protocol.messages import ScheduleView

__all__ = ["ScheduleView"]  # what ``AdminSession.schedule`` returns, for the apps

#: A wire message type: ``_expect`` hands back what it was asked for.
W = TypeVar("W", bound=wm._Wire)


@dataclass(frozen=True)
class GlobalModel:
    version: int
    weights: np.ndarray
    sha256: str
    contributors: int
    total_samples: int
    created: str
    #: The federation's class names in label order (empty for a plain vector model).
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundOutcome:
    round_id: int
    version: int
    sha256: str
    #: The round is complete but the server could not store ``version`` yet: it holds the
    #: result (with this update in it) and publishes it once its storage works again.
    pending: bool = False
    #: The server's words for why (set with ``pending``).
    message: str = ""


@dataclass(frozen=True)
class ServerStatus:
    version: int
    round_id: int
    phase: str
    online: tuple[str, ...]
    joined: tuple[str, ...]
    submitted: tuple[str, ...]
    collected: int
    #: Hospitals the current version's rounds still need (after a failed round's survivor
    #: list bound them); empty otherwise.
    waiting_for: tuple[str, ...] = ()
    #: The fewest joined hospitals a round's enrolment closes with, and the server.toml
    #: setting that sets it (the server's own figure: the admin app offers Close only then).
    min_joined: int = 2
    min_joined_by: str = ""


@dataclass(frozen=True)
class AggregateOutcome:
    version: int
    sha256: str
    contributors: int
    total_samples: int


@dataclass(frozen=True)
class UnmaskProgress:
    """How far ``aggregate`` has got: hospitals asked for, and answering with, their shares;
    ``needed`` answers (the Shamir threshold) remove the masks."""

    round_id: int
    asked: int
    answered: int
    needed: int


@dataclass(frozen=True)
class HospitalInfo:
    """One hospital as the admin dashboard shows it (times are UTC ISO text, "" = unknown)."""

    name: str
    registered: bool
    online: bool
    joined: bool
    submitted: bool
    last_seen: str
    cert_expires: str


@dataclass(frozen=True)
class VersionEntry:
    version: int
    created: str
    contributors: int
    total_samples: int
    sha256: str


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    event: str
    name: str
    detail: str


@dataclass(frozen=True)
class RoundStep:
    """Where a hospital's ``send`` is, for progress displays (the TUI's stepper, the CLI).

    ``name`` is one of ``STEPS``; ``detail`` a short human sentence.
    """

    name: str
    detail: str


STEPS = ("joined", "roster", "keys-shared", "masked-sent", "signed", "unmasked", "published")
#: Not part of the normal sequence: the round failed and this hospital rejoins a new one.
RETRY_STEP = "retrying"
#: Server-announced retries a hospital follows before giving up (the server bounds them too).
MAX_RESENDS = 3


class Journal(Protocol):
    """Hears how far a send got, synchronously (see ``HospitalSession.send``)."""

    def __call__(self, stage: str, round_id: int, version: int | None = None, *,
                 survivors: tuple[str, ...] | None = None,
                 others_can_sign: bool = True, encoding: Encoding | None = None,
                 spare: int = 0) -> None: ...


def _no_journal(stage: str, round_id: int, version: int | None = None, *,
                survivors: tuple[str, ...] | None = None, others_can_sign: bool = True,
                encoding: Encoding | None = None, spare: int = 0) -> None:
    return None


@dataclass
class _Sent:
    """What earlier attempts of one ``send`` fix for the next (the cross-round rule)."""

    #: The survivor list this update was signed into: a retry must repeat it exactly.
    required: SignedList | None = None
    #: A round this update's masked input went to before any survivor list was signed, in
    #: which the other hospitals alone could sign a list with it (t <= n - 1).
    unlisted_round: int | None = None


class RoundAbandonedError(ProtocolError):
    """The round this update was in was aborted or could not finish: send it again."""

    code = "round-abandoned"

    def __init__(self, message: str, *, code: str | None = None, retry_round: int = 0) -> None:
        super().__init__(message, code=code)
        #: The round the server opened at once for the hospitals still online (0: none).
        self.retry_round = retry_round


#: Below this share of clipped values the notice says there is nothing to do.
CLIP_NOTICE_SHARE = 0.01


def clip_notice(beyond: int, size: int, largest: float, clip: float) -> str:
    """What a hospital is told when part of its update goes into the sum clipped: how much,
    and whether anyone needs to act (a walk found the bare figures alarming)."""
    share = beyond / size
    head = (f"{beyond} of {size} values of this update ({share:.2%}; largest {largest:.3g}) "
            f"are beyond the round's clip of {clip:g} and go into the sum clipped to it")
    if share < CLIP_NOTICE_SHARE:
        return (f"{head}: normal for a few values, nothing to do (typically batch-norm "
                "statistics, which every hospital re-measures on its own scans after get)")
    return (f"{head}: more than {CLIP_NOTICE_SHARE:.0%} of the update, so the sum loses part "
            "of this hospital's training; tell the federation operator (the server's "
            "[round] clip may be too small for this model)")


def _a_role(role: str) -> str:
    return {"hospital": "a hospital", "admin": "the federation's administrator"}.get(
        role, f"a '{role}'")


class _Session:
    #: Whose wire order this session keeps (``securefl.protocol.conversation``).
    ROLE = "hospital"

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._conn: Connection | None = None

    async def connect(self) -> Self:
        self._conn = await Connection.open(self.settings,
                                           Conversation(self.ROLE, Side.CLIENT))
        role = self._conn.welcome.role if self._conn.welcome is not None else self.ROLE
        if role != self.ROLE:  # e.g. admin.toml given to `securefl client`
            await self.close()
            use = ("this hospital's hospital.toml with `securefl client --config`"
                   if self.ROLE == "hospital" else
                   "the administrator's admin.toml with `securefl admin --config`")
            raise ConfigError(f"these settings hold the certificate of {_a_role(role)}, "
                              f"not of {_a_role(self.ROLE)}: give {use}")
        return self

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise LocalProtocolError("not connected: call connect() first")
        return self._conn

    @property
    def name(self) -> str:
        assert self.conn.welcome is not None
        return self.conn.welcome.name

    async def keepalive(self) -> None:
        """Tell the server this connection is alive (its idle timer starts again)."""
        await self.conn.request(wm.Keepalive())

    async def status(self) -> ServerStatus:
        reply, _ = await self.conn.request(wm.Status())
        assert isinstance(reply, wm.StatusReply)
        return ServerStatus(reply.version, reply.round_id, reply.phase, tuple(reply.online),
                            tuple(reply.joined), tuple(reply.submitted), reply.collected,
                            tuple(reply.waiting_for), reply.min_joined, reply.min_joined_by)


class HospitalSession(_Session):
    def __init__(self, settings: ClientSettings, *, offload: bool = True) -> None:
        """``offload``: run the heavy round steps in a worker thread (keeps a TUI's event
        loop live); many simulated hospitals in one process are faster without it."""
        super().__init__(settings)
        self._offload = offload
        self._cred = load_credential(settings.cert, settings.key)
        self._ca = pki.load_cert_file(settings.ca)
        #: Global version of the last ``get_global()``: what a following update is based on.
        self.base_version: int | None = None
        #: sha256 (hex) of the bytes that ``get_global()`` returned as ``base_version``.
        self.base_sha256: str | None = None
        #: Serial numbers of revoked certificates, from the newest revocation list held.
        self.revoked: frozenset[int] = frozenset()
        #: The operator's signed member list (the newest held): rosters are checked against it.
        self.members: MemberList | None = None
        self._length: int | None = None

    async def connect(self) -> Self:
        await super().connect()
        welcome, state = self.conn.welcome, self.settings.state_dir
        assert welcome is not None

        def accept() -> None:  # reads and keeps the lists in state_dir: off the event loop
            self.revoked = revocation.accept(self._ca, welcome.crl, kit=self.settings.crl,
                                             held=state / "crl.der",
                                             server_cert=self.conn.server_cert)
            self.members = membership.accept(self._ca, welcome.members,
                                             kit=self.settings.members,
                                             held=state / "members.json", me=self._cred.cert)

        try:
            await asyncio.to_thread(accept)
        except SecureFLError:
            await self.close()
            raise
        return self

    @property
    def resend_round(self) -> int | None:
        """A round of ours that a server restart abandoned (send the update again)."""
        return self.conn.welcome.resend_round if self.conn.welcome else None

    @property
    def schedule(self) -> wm.WelcomeSchedule | None:
        """The server's schedule as the welcome said it (None: rounds run by hand)."""
        return self.conn.welcome.schedule if self.conn.welcome else None

    async def next_schedule_event(self, timeout: float | None = None
                                  ) -> wm.RoundOpen | wm.RoundClosed:
        """The next ``round_open`` or ``round_closed`` the server pushed (they queue while a
        ``send`` runs, and are never lost to it); ``TimeoutError`` after ``timeout``."""
        return await self.conn.next_schedule_push(timeout)

    def pending_schedule_events(self) -> list[wm.RoundOpen | wm.RoundClosed]:
        """Every queued ``round_open`` / ``round_closed``, oldest first, without waiting."""
        out = []
        q = self.conn.schedule_pushes
        while not q.empty():
            item = q.get_nowait()
            if isinstance(item, SecureFLError):
                q.put_nowait(item)
                break
            out.append(item)
        return out

    async def training_failed(self, schedule_round: int, reason: str) -> None:
        """Tell the server this hospital will not join scheduled round ``schedule_round``
        (a coarse reason code of ``wm.TrainingFailedReason``; never counts of its data)."""
        await self.conn.request(wm.TrainingFailed(schedule_round=schedule_round,
                                                  reason=reason))  # type: ignore[arg-type]

    @property
    def published_round(self) -> tuple[int, int] | None:
        """``(round, version)``: a round of ours that published while we were not there to
        hear it (the server stopped right after storing the version, or published a held
        result later).  Its update is in that version: nothing to send again."""
        w = self.conn.welcome
        if w is None or w.published_round is None or w.published_version is None:
            return None
        return w.published_round, w.published_version

    async def get_global(
        self, on_progress: Callable[[int, int], None] | None = None
    ) -> GlobalModel:
        """Download the current global model; its sha256 is checked before it is returned.

        ``on_progress(received, total)`` hears the download's bytes as they arrive.
        """
        self.conn.payload_progress = on_progress
        try:
            reply, weights = await self.conn.request(wm.GetGlobal())
        finally:
            self.conn.payload_progress = None
        assert isinstance(reply, wm.GlobalModel) and weights is not None
        weights = weights.astype("<f4", copy=False)
        if hashlib.sha256(weights.data).hexdigest() != reply.sha256:
            raise DataError("the downloaded model does not match its sha256: download again")
        self.base_version = reply.version
        self.base_sha256 = reply.sha256
        self._length = int(weights.shape[0])
        return GlobalModel(reply.version, weights, reply.sha256, reply.contributors,
                           reply.total_samples, reply.created, tuple(reply.classes))

    async def send(
        self,
        update: np.ndarray,
        samples: int,
        *,
        base_version: int | None = None,
        leave_after: Literal["join", "share_keys", "masked_input", "signed"] | None = None,
        on_step: Callable[[RoundStep], None] | None = None,
        journal: Journal | None = None,
        base_sha256: str | None = None,
        bound_to: SignedList | None = None,
    ) -> RoundOutcome | None:
        """Take part in one round with ``update`` (w_local - w_global) from ``samples`` images.

        Stays connected through the unmask step and returns the version the round
        published.  ``leave_after`` makes the hospital vanish after that step (demos and
        tests of dropouts); the call then returns None.  ``on_step`` hears each step.
        ``base_sha256`` (hex) is the sha256 of the base model the update was trained on
        (default: that of the last ``get_global()`` when it is the same version); it is
        signed with the round keys, so every hospital checks all received the same model.
        ``journal(stage, round_id[, version])`` is called synchronously at ``joined``,
        ``graph-drawn`` (SecAgg+ only, before the graph-seed value leaves), ``keys-shared``,
        ``masked-input`` (*before* the masked input leaves), ``signed``
        (with the survivor names, before the signature leaves), ``abandoned`` and
        ``published``: the hospital's durable send record (``client.hospital``).
        ``bound_to``: this update's masked input already went into a round that signed this
        survivor list and then failed; it may only go into a round of exactly these
        hospitals and that encoding (another sum could be subtracted from the first).
        """

        def step(name: str, detail: str) -> None:
            if on_step is not None:
                on_step(RoundStep(name, detail))

        base = self.base_version if base_version is None else base_version
        if base is None:
            raise LocalProtocolError("call get_global() first, or pass base_version")
        if base_sha256 is None and base == self.base_version:
            base_sha256 = self.base_sha256
        digest = bytes.fromhex(base_sha256) if base_sha256 else None
        check_update(update)  # NaN, Inf, wrong type: refused here, before joining anything
        update = np.ascontiguousarray(update, dtype=np.float32)
        if self._length is not None and update.shape[0] != self._length:
            raise DataError(f"the update has {update.shape[0]} values, the global model "
                            f"{self._length}: train on the current model")
        if not isinstance(samples, int | np.integer) or samples < 1:
            raise DataError(f"the sample count must be a positive whole number, not {samples}")
        if not update.any():
            raise DataError("the update is all zeros (the local model equals the global "
                            "model): train before sending")
        note = journal or _no_journal
        sent = _Sent(required=bound_to)
        for attempt in range(MAX_RESENDS + 1):
            try:
                return await self._round(update, int(samples), base, leave_after, step, note,
                                         digest, sent)
            except RoundAbandonedError as exc:
                if not exc.retry_round or attempt == MAX_RESENDS:
                    raise
                if sent.unlisted_round is not None:
                    raise UpdateAlreadySentError(
                        f"round {sent.unlisted_round} failed after this hospital's masked "
                        "update left but before the hospitals agreed on who is in the sum, so "
                        "it may be in a sum the server holds: to keep it hidden it goes into "
                        f"no other round on version {base}; wait for the next version, then "
                        "get, train and send") from exc
                step(RETRY_STEP, f"the round could not be finished ({exc.message}); "
                     f"joining round {exc.retry_round} with the same update")
        raise AssertionError("unreachable")

    async def _round(self, update: np.ndarray, samples: int, base: int,
                     leave_after: str | None, step: Callable[[str, str], None],
                     journal: Journal, digest: bytes | None,
                     sent: _Sent) -> RoundOutcome | None:
        """One attempt: join, the four secure-aggregation steps, the published version."""
        joined, _ = await self.conn.request(wm.Join(base_version=base))
        assert isinstance(joined, wm.Joined)
        try:
            return await self._joined(joined, update, samples, base, leave_after, step,
                                      journal, digest, sent)
        finally:
            # Still in the round (refused it, or left after a step): whatever the server
            # still sends for it is skipped, and this connection may join another.
            if self._conn is not None:
                self._conn.conversation.leave()

    async def _joined(self, joined: wm.Joined, update: np.ndarray, samples: int, base: int,
                      leave_after: str | None, step: Callable[[str, str], None],
                      journal: Journal, digest: bytes | None,
                      sent: _Sent) -> RoundOutcome | None:
        journal("joined", joined.round_id)
        step("joined", f"joined round {joined.round_id}; waiting for the other hospitals")
        if joined.vector_len != update.shape[0]:
            raise DataError(f"the update has {update.shape[0]} values, the global model "
                            f"{joined.vector_len}: train on the current model")
        if joined.masking == "plain" and not self.settings.policy.allow_unmasked:
            raise CryptoError(
                "the server asked for this hospital's update without masks (masking = "
                "\"plain\"), which would show it to the server; nothing was sent: tell the "
                "federation operator (only a test federation may set [policy] "
                "allow_unmasked = true)")
        enc = Encoding(joined.ring_bits, joined.clip, joined.scale, joined.max_clients,
                       joined.max_weight)
        original_samples = samples
        if samples > enc.max_weight:
            # Capped, not refused: a refusal would tell the server one bit of the count.
            step("joined", f"this hospital's {samples} scans count as {enc.max_weight} in "
                 "this round (the federation's limit per hospital)")
            samples = enc.max_weight
        least = self.settings.policy.min_scale
        if enc.scale < least:
            raise CryptoError(
                f"the server's encoding is coarser (scale {enc.scale:g}) than this "
                f"hospital's [policy] min_scale ({least:g}): refusing the round, nothing "
                "was sent")
        # Checked at the hospital's own scale with its own count, never the server's
        # encoding: a refusal that depended on a value the server chose would tell it
        # about the update's magnitude, one bit per attempt.
        if float(np.abs(update).max()) * original_samples * least < 0.5:
            raise DataError(
                f"every change in this update is below the federation's precision "
                f"(1/{least:g} per scan): it would add nothing to the model; train "
                "longer or with a higher learning rate, then send")
        beyond = int(np.count_nonzero(np.abs(update) > enc.clip))
        if beyond:
            # Never clipped silently: the sum gets these values at +-clip.
            step("joined", clip_notice(beyond, update.size, float(np.abs(update).max()),
                                       enc.clip))
        try:
            return await self._steps(joined, enc, update, samples, base, leave_after, step,
                                     journal, digest, sent)
        except RoundAbandonedError:
            journal("abandoned", joined.round_id)
            raise

    async def _steps(self, joined: wm.Joined, enc: Encoding, update: np.ndarray, samples: int,
                     base: int, leave_after: str | None, step: Callable[[str, str], None],
                     journal: Journal, digest: bytes | None,
                     sent: _Sent) -> RoundOutcome | None:
        if joined.masking == "plain":
            y = enc.encode(update, samples)
            journal("masked-input", joined.round_id)
            await self._send_input(joined.round_id, y)
            step("masked-sent", "update sent (this server does not mask: benchmark mode)")
            if leave_after is not None:
                return None
        else:
            if digest is None:
                raise LocalProtocolError("the base model's sha256 is unknown: call "
                                         "get_global() first, or pass base_sha256")
            rnd = ClientRound(cert=self._cred.cert, signing_key=self._cred.key, ca_cert=self._ca,
                              round_id=joined.round_id, base_version=base, update=update,
                              weight=samples, base_sha256=digest,
                              policy=self.round_policy(sent.required), members=self.members)
            await self._in_round(joined.round_id, mapping.advertisement_to_wire(rnd.advertise()))
            if leave_after == "join":
                return None
            roster = mapping.roster_from_wire(
                await self._expect(wm.RosterMsg, joined.round_id))
            if roster.config.encoding != enc:
                raise RemoteProtocolError("the roster's encoding is not the one the server "
                                          "announced when this hospital joined: refusing "
                                          "the round, nothing was sent")
            step("roster", f"{len(roster.participants)} hospitals in the round; "
                 "checking their keys")
            # Checking every signature and splitting secrets, then masking, take tens of ms
            # per step: done in a thread so the caller's event loop (a TUI) stays live.
            ack = await self._run(rnd.receive, roster)
            await self._in_round(joined.round_id, mapping.roster_ack_to_wire(ack))
            acks = await self._expect(wm.RosterAcksMsg, joined.round_id)
            reveal = await self._run(rnd.receive, mapping.roster_acks_from_wire(acks))
            if rnd.sparse:
                # Each reveal lets the graph be drawn again: counted against max_attempts
                # before it leaves, so a server aborting rounds gets few draws to pick from.
                journal("graph-drawn", joined.round_id, spare=rnd.assumed_corrupt)
            await self._in_round(joined.round_id, mapping.seed_reveal_to_wire(reveal))
            reveals = await self._expect(wm.SeedRevealsMsg, joined.round_id)
            shares = await self._run(rnd.receive, mapping.seed_reveals_from_wire(reveals))
            await self._in_round(joined.round_id, mapping.share_keys_to_wire(shares))
            journal("keys-shared", joined.round_id)
            step("keys-shared", "protective keys shared with the other hospitals; waiting for "
                 "theirs")
            if leave_after == "share_keys":
                return None
            bundle = await self._expect(wm.EnvelopesMsg, joined.round_id)
            masked = await self._run(rnd.receive, mapping.bundle_from_wire(bundle))
            # Could the others sign a list with this update in it without this hospital?
            # Not when t > n - 1: then its update is in no sum it did not sign for.
            others_can_sign = len(roster.participants) - 1 >= roster.config.threshold
            journal("masked-input", joined.round_id,  # before it leaves: a crash errs safe
                    others_can_sign=others_can_sign)
            if sent.required is None and others_can_sign:
                sent.unlisted_round = joined.round_id
            await self._send_input(joined.round_id, masked.y)
            step("masked-sent", "masked update sent; waiting for the server to combine the "
                 "updates on its schedule" if self.schedule is not None else
                 "masked update sent; waiting for the administrator to aggregate")
            if leave_after == "masked_input":
                return None
            listed = await self._expect(wm.SurvivorListMsg, joined.round_id)
            signature = await self._run(rnd.receive, mapping.survivor_list_from_wire(listed))
            assert rnd.signed_survivors is not None
            journal("signed", joined.round_id, survivors=rnd.signed_survivors,
                    encoding=rnd.signed_encoding)
            sent.required = SignedList(frozenset(rnd.signed_survivors), rnd.signed_encoding)
            sent.unlisted_round = None
            await self._in_round(joined.round_id, mapping.signature_to_wire(signature))
            step("signed", f"{len(rnd.signed_survivors)} hospitals' updates are in the sum; "
                 "confirmed, waiting for the others to confirm")
            if leave_after == "signed":
                return None
            request = await self._expect(wm.UnmaskRequestMsg, joined.round_id)
            answer = await self._run(rnd.receive, mapping.unmask_request_from_wire(request))
            await self._in_round(joined.round_id, mapping.unmask_response_to_wire(answer))
            step("unmasked", "this hospital's part in removing the protective masks was sent; "
                 "waiting for the new version")
        done = await self._expect(wm.RoundDone, joined.round_id)
        if done.pending:  # complete; its version waits for the server's storage
            step("unmasked", f"round {done.round_id} is complete; the server will publish "
                 f"version {done.version} once it can store it")
            return RoundOutcome(done.round_id, done.version, "", pending=True,
                                message=done.message)
        journal("published", joined.round_id, done.version)
        step("published", f"aggregated into global version {done.version}")
        return RoundOutcome(done.round_id, done.version, done.sha256)

    async def _in_round(self, round_id: int, msg: wm._Wire,
                        array: np.ndarray | None = None) -> tuple[wm.Message, Any]:
        """A request inside round ``round_id``.  Refused because the server ended the round
        meanwhile (its ``round_done`` crossed our request on the wire), it is that round's
        end that is raised, so ``send`` follows the server's retry like any other abandon."""
        try:
            return await self.conn.request(msg, array)
        except SecureFLError as exc:
            # Refused by the server for a round it no longer runs, or not even sent: this
            # connection's wire order already saw that round end (its round_done came in
            # while the step was being computed).
            ended_here = self.conn.conversation.round_id != round_id
            if exc.code not in ("not-joined", "wrong-round", "wrong-phase") \
                    and not ended_here:
                raise
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while loop.time() < deadline:
                ends = [m for m in self.conn.take_pushes(wm.RoundDone)
                        if isinstance(m, wm.RoundDone) and m.round_id == round_id
                        and m.resend]
                if ends:
                    raise RoundAbandonedError(
                        f"round {round_id} was abandoned ({ends[0].message}); send the "
                        "update again", code=ends[0].code or RoundAbandonedError.code,
                        retry_round=ends[0].retry_round) from exc
                await asyncio.sleep(0.05)
            raise

    def round_policy(self, bound_to: SignedList | None = None) -> RoundPolicy:
        """This hospital's ``[policy]`` as the round checks it, with the revoked serials
        and, for a retry, the signed list and encoding it must repeat."""
        p = self.settings.policy
        return RoundPolicy(colluders=p.colluders, min_contributors=p.min_contributors,
                           ring_bits=frozenset(p.ring_bits), max_clip=p.max_clip,
                           min_scale=p.min_scale,
                           allow_sparse=p.allow_sparse, revoked=self.revoked,
                           **(bound_to.policy_fields() if bound_to else {}))  # type: ignore[arg-type]

    async def _run(self, fn: Callable[[Any], Any], arg: object) -> Any:
        return await asyncio.to_thread(fn, arg) if self._offload else fn(arg)

    async def _send_input(self, round_id: int, y: np.ndarray) -> None:
        """Wait for the server's upload slot, then send: the server takes one model-sized
        upload at a time, and the bytes wait here rather than in its buffers."""
        await self._in_round(round_id, wm.UploadSlot(round_id=round_id, nbytes=y.nbytes))
        await self._in_round(round_id, wm.MaskedInputMsg(round_id=round_id,
                                                         array=wm.ArraySpec.of(y)), y)

    async def _expect(self, kind: type[W], round_id: int) -> W:
        """The next push of ``kind`` for this round; an abandoned round is raised.

        The connection's table (``securefl.protocol.conversation``) has already refused
        every push out of order (a ``RemoteProtocolError`` raised here); what reaches this
        loop is in order, or from a round this hospital left, or a round's end.
        """
        while True:
            msg, _ = await self.conn.next_push(self.settings.round_timeout)
            if isinstance(msg, wm.RoundDone) and msg.round_id == round_id and msg.resend:
                raise RoundAbandonedError(
                    f"round {round_id} was abandoned ({msg.message}); send the update again",
                    code=msg.code or RoundAbandonedError.code, retry_round=msg.retry_round)
            if isinstance(msg, wm.ErrorMsg):
                raise error_from_wire(msg)
            if isinstance(msg, kind) and getattr(msg, "round_id", round_id) == round_id:
                return msg
            if isinstance(msg, wm.RoundDone) or getattr(msg, "round_id", round_id) != round_id:
                continue  # the end of a round, or a step of one this hospital left
            raise LocalProtocolError(f"this hospital waited for '{kind.__name__}' in round "
                                     f"{round_id}, and its wire order let '{msg.kind}' through")


def _retrieved(task: asyncio.Future) -> None:
    """Mark a task's outcome as seen (it is reported another way)."""
    if not task.cancelled():
        task.exception()


class AdminSession(_Session):
    ROLE = "admin"

    async def _admin(self, action: str) -> wm.AdminResult:
        reply, _ = await self.conn.request(wm.AdminCommand(action=action))  # type: ignore[arg-type]
        assert isinstance(reply, wm.AdminResult)
        return reply

    async def aggregate(
        self, on_progress: Callable[[UnmaskProgress], None] | None = None
    ) -> AggregateOutcome:
        """Unmask the collected updates and publish the next global version.

        ``on_progress`` hears each hospital's answer to the unmask step as it arrives.
        """
        def report(msgs: list) -> None:
            for m in msgs:
                if isinstance(m, wm.AggregateProgress) and on_progress is not None:
                    on_progress(UnmaskProgress(m.round_id, m.asked, m.answered, m.needed))

        self.conn.take_pushes(wm.AggregateProgress)  # left over from an earlier call
        request = asyncio.ensure_future(self._admin("aggregate"))
        push: asyncio.Future | None = None
        try:
            while not request.done():
                push = asyncio.ensure_future(self.conn.next_push(self.settings.reply_timeout))
                await asyncio.wait({request, push}, return_when=asyncio.FIRST_COMPLETED)
                if not push.done():
                    break
                with contextlib.suppress(SecureFLError):  # the request reports failures
                    report([push.result()[0]])
                push = None
            r = await request
        except TransportError as exc:
            raise TransportError(
                "the connection to the server was lost during aggregate: once the server is "
                "back, `admin status` and `admin version` show whether the round published "
                "(a restarted server records a version it stored), else aggregate again"
            ) from exc
        finally:
            for task in (request, push):
                # A push still waiting is cancelled; one whose wait had already ended
                # finishes with the connection's failure instead, which is the request's
                # too: retrieved here, never left to "Task exception was never retrieved".
                if task is not None:
                    task.cancel()
                    task.add_done_callback(_retrieved)
        report(self.conn.take_pushes(wm.AggregateProgress))  # sent just before the reply
        return AggregateOutcome(r.value, r.sha256, r.contributors, r.total_samples)

    async def version(self) -> int:
        return (await self._admin("version")).value

    async def count(self) -> int:
        """Weight sets collected in the current round (masked inputs received)."""
        return (await self._admin("count")).value

    async def close_enrolment(self) -> int:
        return (await self._admin("close")).value

    async def abort_round(self) -> int:
        return (await self._admin("abort")).value

    async def pause(self) -> int:
        """Stop the schedule opening rounds (an open one runs on); the last round number."""
        return (await self._admin("pause")).value

    async def resume(self) -> int:
        return (await self._admin("resume")).value

    async def open_round(self) -> int:
        """Open a scheduled round now; its ``schedule_round``."""
        return (await self._admin("open")).value

    async def schedule(self) -> wm.ScheduleView:
        """The server's schedule, the open scheduled round with each hospital's status, and
        a base version the cross-round rule holds up (``wm.ScheduleView``)."""
        view = (await self._query("schedule")).schedule
        assert view is not None
        return view

    async def _query(self, what: str, limit: int = 50) -> wm.AdminQueryReply:
        reply, _ = await self.conn.request(
            wm.AdminQuery(what=what, limit=limit))  # type: ignore[arg-type]
        assert isinstance(reply, wm.AdminQueryReply)
        return reply

    async def hospitals(self) -> list[HospitalInfo]:
        """Registered and connected hospitals: online, in the round, last seen, cert expiry."""
        return [HospitalInfo(**r.model_dump()) for r in (await self._query("hospitals")).hospitals]

    async def history(self, limit: int = 50) -> list[VersionEntry]:
        """The newest ``limit`` global versions, oldest first."""
        return [VersionEntry(**r.model_dump()) for r in (await self._query("history",
                                                                             limit)).versions]

    async def audit(self, limit: int = 50) -> list[AuditEntry]:
        """The last ``limit`` audit-log entries (no key material or weights: the log has none)."""
        return [AuditEntry(**r.model_dump()) for r in (await self._query("audit", limit)).audit]
