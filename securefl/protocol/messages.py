"""Wire messages: the JSON header of every frame, validated by one pydantic TypeAdapter.

Why this shape: each header is a frozen model with ``extra="forbid"`` and a ``kind`` literal,
so a misspelt or smuggled field is refused, and the whole vocabulary is one discriminated
union (``Message``).  Requests carry ``rid`` >= 1 and get exactly one reply with the same
``rid`` (a result or an ``error``); pushes from the server carry ``rid`` 0.

Binary data: short byte strings (X25519 keys, signatures, certificates, Shamir shares,
AES-GCM envelopes) travel base64 in the header; arrays travel as raw little-endian bytes in
the payload, described by ``ArraySpec`` (dtype + shape), never as JSON numbers.  Identity is
never in a header: the server takes the name and role from the TLS client certificate.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
)

from securefl.errors import RemoteProtocolError
from securefl.protocol.frames import Frame

#: 4: the consistency check (``survivor_list`` / ``sign_survivors``, signatures in
#: ``unmask_request``) and the other changes of the same release, see PROTOCOL.md.
PROTOCOL_VERSION = 4
MAX_DIMS = 4
U32 = Field(ge=0, le=2**32 - 1)
#: Round ids, versions and byte counts are unsigned 64-bit on the wire (signed bytes pack
#: them as such): a larger number is a malformed request, not a stale or unknown one.
U64_MAX = 2**64 - 1

MAX_BYTES_FIELD = 16_384


def _from_base64(value: object) -> object:
    """JSON carries standard base64 (with padding); Python code passes bytes directly."""
    if isinstance(value, str):
        if len(value) > MAX_BYTES_FIELD * 4 // 3 + 4:
            raise ValueError("byte string too long")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("not valid base64") from None
    return value


#: Short binary values: bytes in Python, standard base64 strings in the JSON header.
Bytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
    Field(max_length=MAX_BYTES_FIELD),
]


_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,9})")


def _participant_key(value: object) -> object:
    """Map keys are participant numbers written as plain decimal ("1", never "01", "+1",
    " 1" or "1_0"): one number has one spelling, so two keys cannot name one hospital."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError("a participant number is written in plain decimal")
        return int(value)
    return value


#: A participant number as a JSON object key (1..n, roster order).
ParticipantNo = Annotated[int, BeforeValidator(_participant_key), Field(ge=1, le=2**32 - 1)]


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key '{key[:40]}' appears twice")
        out[key] = value
    return out


#: Characters no text field may hold: C0 controls (newline and tab included), DEL, C1
#: controls, the Unicode line and paragraph separators, and the bidirectional overrides.
#: Why: every text a peer sends ends up on
#: someone's terminal, console or log (an error's message, a reason, a name), and an escape
#: sequence there can clear the screen, recolour a refusal as success or rewrite a line
#: above it; an override reorders what is read.  Refused, not cleaned: no honest peer
#: sends them, and a cleaned text would differ from what was signed or audited.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _refuse_control_characters(value: object) -> None:
    """Raise ValueError when any key or string inside ``value`` holds a :data:`_CONTROL`
    character (walked with a stack: the header's nesting was already bounded by json)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                raise ValueError("a text field holds a terminal control character")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rid: int = Field(0, ge=0, le=2**32 - 1)


class ArraySpec(BaseModel):
    """How to read the payload: numpy dtype string (little-endian) and shape."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dtype: Literal["<f4", "<f8", "<u4", "<u8"]
    shape: tuple[Annotated[int, Field(ge=0, le=2**31)], ...] = Field(min_length=1,
                                                                     max_length=MAX_DIMS)

    @property
    def nbytes(self) -> int:
        # Python integers: a product of four 2**16 dimensions wraps to 0 in int64, and an
        # empty payload then passed the size check (issue 14).
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, array: np.ndarray) -> ArraySpec:
        dtype = array.dtype.newbyteorder("<").str
        return cls(dtype=dtype, shape=array.shape)  # type: ignore[arg-type]


# -- requests: hospital and admin -> server -------------------------------------------------
class Hello(_Wire):
    kind: Literal["hello"] = "hello"
    #: Required: a peer that does not say which protocol it speaks is refused.
    protocol: int = Field(ge=0, le=2**32 - 1)


class GetGlobal(_Wire):
    kind: Literal["get_global"] = "get_global"


class Status(_Wire):
    kind: Literal["status"] = "status"


class Join(_Wire):
    """Ask to take part in the current round with an update trained on ``base_version``."""

    kind: Literal["join"] = "join"
    base_version: int = Field(ge=0, le=U64_MAX)


class Advertise(_Wire):
    """Round 0: fresh X25519 public keys signed with the certificate's key."""

    kind: Literal["advertise"] = "advertise"
    round_id: int = Field(ge=0, le=U64_MAX)
    c_pk: Bytes
    s_pk: Bytes
    signature: Bytes
    #: sha256 of the base model bytes this hospital received (signed with the keys).
    base_sha256: Bytes
    #: Commitment to this hospital's graph-seed value (signed with the keys).
    graph_commit: Bytes


class AckRoster(_Wire):
    """Round 1: this hospital's signature on the roster it was sent
    (``securefl.crypto.keys.roster_statement``)."""

    kind: Literal["ack_roster"] = "ack_roster"
    round_id: int = Field(ge=0, le=U64_MAX)
    signature: Bytes


class RevealSeed(_Wire):
    """Round 1: the 32-byte value this hospital's advertisement committed to."""

    kind: Literal["reveal_seed"] = "reveal_seed"
    round_id: int = Field(ge=0, le=U64_MAX)
    value: Bytes


class ShareKeysMsg(_Wire):
    """Round 1: one envelope per neighbour, and the dealer's digests of every share it
    dealt (neighbours and itself, 64 bytes each) with its commitment to b_u (32 bytes):
    what the server checks returned shares against (docs/PROTOCOL.md)."""

    kind: Literal["share_keys"] = "share_keys"
    round_id: int = Field(ge=0, le=U64_MAX)
    envelopes: dict[ParticipantNo, Bytes] = Field(max_length=1000)
    digests: dict[ParticipantNo, Bytes] = Field(max_length=1001)
    b_commit: Bytes


class UploadSlot(_Wire):
    """Ask for the server's upload slot before sending a masked input (protocol 2).

    The reply (``ack``) is the grant, and it comes when the slot is free: the server takes
    one model-sized upload at a time, and a hospital that waits for its grant keeps its
    bytes on its own side, so the server's memory stays O(model) for any number of
    hospitals.  ``nbytes`` is the payload the hospital is about to send.
    """

    kind: Literal["upload_slot"] = "upload_slot"
    round_id: int = Field(ge=0, le=U64_MAX)
    nbytes: int = Field(ge=0, le=U64_MAX)


class MaskedInputMsg(_Wire):
    """Round 2: y_u in the payload (ring elements, length D + 1)."""

    kind: Literal["masked_input"] = "masked_input"
    round_id: int = Field(ge=0, le=U64_MAX)
    array: ArraySpec


class SignSurvivors(_Wire):
    """Round 3: this hospital's signature on the survivor list it was sent (see
    ``securefl.crypto.keys.survivors_statement`` for the signed bytes)."""

    kind: Literal["sign_survivors"] = "sign_survivors"
    round_id: int = Field(ge=0, le=U64_MAX)
    signature: Bytes


class UnmaskResponseMsg(_Wire):
    kind: Literal["unmask_response"] = "unmask_response"
    round_id: int = Field(ge=0, le=U64_MAX)
    b_shares: dict[ParticipantNo, Bytes] = Field(max_length=1000)
    s_shares: dict[ParticipantNo, Bytes] = Field(max_length=1000)


class Keepalive(_Wire):
    """Nothing to say, but still here: resets the server's idle timer (issue 17).

    Why a request and not a silent frame: its ``ack`` tells the sender the connection still
    carries replies, so a long-running agent notices a dead link within one interval."""

    kind: Literal["keepalive"] = "keepalive"


#: Coarse reasons a hospital gives for not taking part in a scheduled round: never counts or
#: names of its data (the server and the administrator learn only which kind of trouble).
TrainingFailedReason = Literal[
    "no-scans", "too-few-scans", "training-error", "out-of-memory", "declined", "cancelled",
    "window", "daily-limit", "attempt-limit", "already-sent"]


class TrainingFailed(_Wire):
    """A hospital will not join scheduled round ``schedule_round``: the server stops
    waiting for it (the others are not stalled) and shows the reason to the administrator."""

    kind: Literal["training_failed"] = "training_failed"
    schedule_round: int = Field(ge=1, le=U64_MAX)
    reason: TrainingFailedReason


class AdminCommand(_Wire):
    """Admin actions; the server checks the certificate's role, not this message.

    ``pause`` / ``resume`` / ``open`` act on the server's ``[schedule]`` (auto mode only);
    ``abort`` also ends an open scheduled round."""

    kind: Literal["admin"] = "admin"
    action: Literal["aggregate", "version", "count", "close", "abort", "pause", "resume",
                    "open"]


class AdminQuery(_Wire):
    """Read-only views for the admin dashboard (not audited: the dashboard polls them).

    ``hospitals``: registered and connected hospitals with last-seen time and certificate
    expiry; ``history``: the newest ``limit`` global versions' metadata; ``audit``: the last
    ``limit`` audit-log entries (names, events and numbers only: the log holds no keys or
    weights); ``schedule``: the server's ``[schedule]`` and the scheduled round's phase.
    """

    kind: Literal["admin_query"] = "admin_query"
    what: Literal["hospitals", "history", "audit", "schedule"]
    limit: int = Field(50, ge=1, le=1000)


# -- replies and pushes: server -> peer ----------------------------------------------------
_Iso = Annotated[str, Field(min_length=1, max_length=40)]


class OpenRound(BaseModel):
    """A scheduled round as hospitals hear of it (``round_open``, ``welcome.schedule``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Numbers the server's scheduled rounds (from 1, never repeated, survives restarts);
    #: not the secure-aggregation ``round_id``, which counts attempts.
    schedule_round: int = Field(ge=1, le=U64_MAX)
    #: The global version to train on (and to ``join`` with).
    base_version: int = Field(ge=0, le=U64_MAX)
    #: UTC ISO 8601 times: when it opened, and after when joins are refused (``round-busy``).
    opened: _Iso
    deadline: _Iso


class RoundOpen(_Wire):
    """Push (rid 0): a scheduled round opened; download ``base_version``, train, ``join``.
    The fields are ``OpenRound``'s."""

    kind: Literal["round_open"] = "round_open"
    schedule_round: int = Field(ge=1, le=U64_MAX)
    base_version: int = Field(ge=0, le=U64_MAX)
    opened: _Iso
    deadline: _Iso

    @classmethod
    def of(cls, info: OpenRound) -> RoundOpen:
        return cls(**info.model_dump())

    def info(self) -> OpenRound:
        return OpenRound(**self.model_dump(exclude={"kind", "rid"}))


class RoundClosed(_Wire):
    """Push (rid 0): a scheduled round ended, to every connected hospital (participants also
    get ``round_done``)."""

    kind: Literal["round_closed"] = "round_closed"
    schedule_round: int = Field(ge=1, le=U64_MAX)
    outcome: Literal["published", "abandoned", "aborted", "expired"]
    version: int | None = Field(None, ge=0, le=U64_MAX)
    message: str = Field("", max_length=1000)


class WelcomeSchedule(BaseModel):
    """``welcome.schedule`` in auto mode: whether rounds open, and the one open now."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["auto"] = "auto"
    paused: bool
    open_round: OpenRound | None = None


class Welcome(_Wire):
    kind: Literal["welcome"] = "welcome"
    name: str
    role: str
    version: int
    protocol: int = PROTOCOL_VERSION
    #: Set when a server restart abandoned a round this hospital was in: send again.
    resend_round: int | None = None
    #: Set when a round of this hospital published while it was not there to hear it (the
    #: server stopped just after writing the version, or it published a held result
    #: later): that round and the version it published, said once.  Not to be sent again.
    published_round: int | None = None
    published_version: int | None = None
    #: The CA's current revocation list (DER, CA-signed), for hospitals to check round keys.
    crl: Bytes | None = None
    #: The operator's signed member list (``members.json``, CA-signed and numbered), for
    #: hospitals to check every roster against (protocol 4).
    members: Bytes | None = None
    #: The server's schedule (issue 17); None: rounds run by hand (``mode = "manual"``).
    schedule: WelcomeSchedule | None = None


class GlobalModel(_Wire):
    kind: Literal["global_model"] = "global_model"
    version: int
    sha256: str
    contributors: int
    total_samples: int
    created: str
    #: The federation's class names in label order (empty for a plain vector model): a
    #: hospital whose ``[ml] classes`` differ would train with swapped labels.
    classes: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        max_length=1000)
    array: ArraySpec


class StatusReply(_Wire):
    kind: Literal["status_reply"] = "status_reply"
    version: int
    round_id: int
    phase: str
    online: list[str]
    joined: list[str]
    submitted: list[str]
    collected: int
    #: After a round failed once its survivor list went out: the listed hospitals not yet
    #: in the current round (rounds on this version need exactly them).
    waiting_for: list[str] = Field(default_factory=list, max_length=10_000)
    #: The fewest joined hospitals a round's enrolment closes with (by itself or by the
    #: admin's ``close``), and the server.toml setting that sets it.
    min_joined: int = Field(2, ge=0, le=U64_MAX)
    min_joined_by: str = Field("", max_length=100)


class Joined(_Wire):
    """Reply to ``join``: the round to advertise keys for and its encoding."""

    kind: Literal["joined"] = "joined"
    round_id: int
    base_version: int
    vector_len: int
    masking: Literal["secagg", "plain"]
    ring_bits: int
    clip: float
    scale: float
    max_clients: int
    max_weight: int


class Ack(_Wire):
    kind: Literal["ack"] = "ack"
    collected: int = 0


class AdminResult(_Wire):
    kind: Literal["admin_result"] = "admin_result"
    action: str
    value: int
    sha256: str = ""
    contributors: int = 0
    total_samples: int = 0


class HospitalRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    registered: bool
    online: bool
    joined: bool
    submitted: bool
    last_seen: str = ""  # UTC ISO time of the last frame or disconnect; "" = never seen
    cert_expires: str = ""  # UTC ISO expiry of the certificate it last connected with


class VersionRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: int
    created: str
    contributors: int
    total_samples: int
    sha256: str


class AuditRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seq: int
    time: str
    event: str
    name: str = ""
    detail: str = Field("", max_length=500)


#: A hospital's part in the scheduled round, for the administrator: ``waiting`` (not yet
#: started), ``training`` (downloaded the base version after the round opened), ``joined``,
#: ``submitted`` (its masked input is in), ``failed:<reason>``, ``declined``, ``offline``.
HOSPITAL_STATUS = re.compile(r"waiting|training|joined|submitted|declined|offline"
                             r"|failed:[a-z-]{1,40}")


def _hospital_status(value: object) -> object:
    if isinstance(value, str) and not HOSPITAL_STATUS.fullmatch(value):
        raise ValueError(f"'{value[:40]}' is not a hospital status of the schedule")
    return value


class ScheduledRound(OpenRound):
    """The open scheduled round in the ``schedule`` query."""

    #: ``enrolling`` (hospitals train and join), then the secure-aggregation round's own
    #: phases (``confirming`` ... ``unmasking``), ``publishing``.
    phase: str = Field(max_length=40)
    hospitals: dict[Annotated[str, Field(max_length=200)],
                    Annotated[str, BeforeValidator(_hospital_status)]] = Field(
        default_factory=dict, max_length=10_000)


class Stalled(BaseModel):
    """A base version the cross-round rule holds up, and why (for people)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base_version: int = Field(ge=0, le=U64_MAX)
    reason: str = Field(max_length=1000)


class ScheduleView(BaseModel):
    """The ``schedule`` query's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["manual", "auto"]
    paused: bool
    #: As written in server.toml ("24h", "after-publish").
    every: str = Field(max_length=40)
    training_deadline: str = Field(max_length=40)
    #: When the next scheduled round opens (UTC ISO); None: none planned (manual mode,
    #: paused, "after-publish" with a round open).
    next_open: str | None = Field(None, max_length=40)
    round: ScheduledRound | None = None
    stalled: Stalled | None = None


class AdminQueryReply(_Wire):
    kind: Literal["admin_query_reply"] = "admin_query_reply"
    what: str
    hospitals: list[HospitalRow] = Field(default_factory=list, max_length=10_000)
    versions: list[VersionRow] = Field(default_factory=list, max_length=1000)
    audit: list[AuditRow] = Field(default_factory=list, max_length=1000)
    schedule: ScheduleView | None = None


class Participant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    c_pk: Bytes
    s_pk: Bytes
    cert_der: Bytes
    signature: Bytes
    base_sha256: Bytes
    graph_commit: Bytes


class RosterMsg(_Wire):
    """Push when enrolment closes: round configuration and every participant's keys."""

    kind: Literal["roster"] = "roster"
    round_id: int
    base_version: int
    vector_len: int
    threshold: int
    neighbours: int
    ring_bits: int
    clip: float
    scale: float
    max_clients: int
    max_weight: int
    min_contributors: int
    participants: list[Participant] = Field(max_length=1000)


class RosterAcksMsg(_Wire):
    """Push, round 1: every participant's signature on the roster (by participant number)."""

    kind: Literal["roster_acks"] = "roster_acks"
    round_id: int
    signatures: dict[ParticipantNo, Bytes] = Field(max_length=1000)


class SeedRevealsMsg(_Wire):
    """Push, round 1: every participant's graph-seed value (by participant number)."""

    kind: Literal["seed_reveals"] = "seed_reveals"
    round_id: int
    values: dict[ParticipantNo, Bytes] = Field(max_length=1000)


class EnvelopesMsg(_Wire):
    kind: Literal["envelopes"] = "envelopes"
    round_id: int
    recipient: int
    envelopes: dict[ParticipantNo, Bytes] = Field(max_length=1000)
    digests: dict[ParticipantNo, Bytes] = Field(max_length=1000)


class SurvivorListMsg(_Wire):
    """Push, round 3: the participants whose masked inputs are in the sum, to be signed."""

    kind: Literal["survivor_list"] = "survivor_list"
    round_id: int
    survivors: list[int] = Field(max_length=1000)


class UnmaskRequestMsg(_Wire):
    """Push, round 4: the same survivor list and the signatures gathered on it."""

    kind: Literal["unmask_request"] = "unmask_request"
    round_id: int
    survivors: list[int] = Field(max_length=1000)
    signatures: dict[ParticipantNo, Bytes] = Field(max_length=1000)


class AggregateProgress(_Wire):
    """Pushed to the admin during ``aggregate``: hospitals that answered the unmask step.

    Why a push: aggregation holds the admin's request open for the whole unmask step, and
    the administrator should see it advance ("2 of 3 answered, 2 needed") rather than a
    spinner.
    """

    kind: Literal["aggregate_progress"] = "aggregate_progress"
    round_id: int
    asked: int
    answered: int
    needed: int


class RoundDone(_Wire):
    """Push: the round published ``version`` (or, with ``resend``, was abandoned)."""

    kind: Literal["round_done"] = "round_done"
    round_id: int
    version: int
    sha256: str = ""
    resend: bool = False
    #: With ``resend``: the round the server opened at once for the members still online
    #: (no-halt retry); they rejoin it with the same update.  0: no automatic retry.
    retry_round: int = 0
    #: The round is complete but its version could not be stored yet (``code``
    #: ``publish-deferred``): the server holds the result and publishes ``version`` once its
    #: store is writable.  Nothing to resend; ``welcome.published_round`` says when it is out.
    pending: bool = False
    code: str = ""
    message: str = ""


class ErrorMsg(_Wire):
    """A typed refusal: ``code`` is stable, ``message`` is written by us, never exception text."""

    kind: Literal["error"] = "error"
    code: str
    message: str
    version: int | None = None


Message = Annotated[
    Hello | GetGlobal | Status | Join | Advertise | ShareKeysMsg | MaskedInputMsg
    | UnmaskResponseMsg | AdminCommand | Welcome | GlobalModel | StatusReply | Joined | Ack
    | AdminResult | RosterMsg | EnvelopesMsg | UnmaskRequestMsg | RoundDone | ErrorMsg
    | AdminQuery | AdminQueryReply | UploadSlot | AggregateProgress | SurvivorListMsg
    | SignSurvivors | AckRoster | RevealSeed | RosterAcksMsg | SeedRevealsMsg | Keepalive
    | TrainingFailed | RoundOpen | RoundClosed,
    Field(discriminator="kind"),
]
MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)

WITH_ARRAY = (MaskedInputMsg, GlobalModel)


def encode_header(msg: _Wire) -> bytes:
    return msg.model_dump_json().encode()


def request_id(header: bytes) -> int:
    """The ``rid`` of a header that failed to decode, when it is itself a valid u32 (else
    0), so the error reply still answers the request a client is waiting on."""
    objects: list[list[tuple[str, object]]] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        objects.append(items)  # the top-level object comes last
        return dict(items)

    try:
        raw = json.loads(header, object_pairs_hook=pairs)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0
    if not isinstance(raw, dict):
        return 0
    rids = [v for k, v in objects[-1] if k == "rid"]
    if len(rids) != 1:  # given twice, the request has no one rid to answer
        return 0
    rid = rids[0]
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2**32 - 1:
        return rid
    return 0


def decode(frame: Frame) -> tuple[Message, np.ndarray | None]:
    """Header -> message; payload -> array when the message carries one (shape checked)."""
    try:
        # A key given twice is refused, not silently overwritten: what the server
        # validates must be what every reader of the same bytes would see.
        _refuse_control_characters(json.loads(frame.header, object_pairs_hook=_refuse_duplicates))
    except RecursionError:
        raise RemoteProtocolError("header is nested too deeply", code="bad-message") from None
    except ValueError as exc:
        if "appears twice" in str(exc) or "terminal control character" in str(exc):
            raise RemoteProtocolError(f"malformed message header: {exc}",
                                      code="bad-message") from None
        raise RemoteProtocolError("header is not JSON", code="bad-message") from None
    try:
        msg = MESSAGE.validate_json(frame.header)
    except RecursionError:
        raise RemoteProtocolError("header is nested too deeply", code="bad-message") from None
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "header" for e in exc.errors()})
        raise RemoteProtocolError(
            f"malformed message header (fields: {', '.join(fields)[:200]})", code="bad-message"
        ) from None
    except (ValueError, json.JSONDecodeError):
        raise RemoteProtocolError("header is not JSON", code="bad-message") from None
    if isinstance(msg, WITH_ARRAY):
        spec = msg.array
        if spec.nbytes != len(frame.payload):
            raise RemoteProtocolError(
                f"payload holds {len(frame.payload)} bytes but {spec.dtype}{list(spec.shape)} "
                f"needs {spec.nbytes}",
                code="bad-shape",
            )
        array = np.frombuffer(frame.payload, dtype=np.dtype(spec.dtype)).reshape(spec.shape)
        return msg, array
    if frame.payload:
        raise RemoteProtocolError(f"'{msg.kind}' carries no payload", code="bad-message")
    return msg, None
