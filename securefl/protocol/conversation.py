"""The wire order of one connection, as a sans-I/O state machine per role (h11's idea).

Why one object per connection, used by both ends: the order in which a hospital and the
server may say things (PROTOCOL.md section 5) used to be enforced in pieces (the server's
upload-slot checks, the coordinator's message branches, the hospital session's "expected X"),
so no one place said what may come next, and the two ends could disagree.  Here it is one
table per role, ``{phase: {event: next phase}}``: the server's end of a hospital's connection
and the hospital's own end run the same table, and so does the administrator's.  Whatever
the table does not list is refused before anyone acts on it: ``RemoteProtocolError`` when the
peer sent it (the server answers it with an error code of PROTOCOL.md section 6; a hospital
refuses the round), ``LocalProtocolError`` when our own side tried to (a bug on our side).

Events are message kinds, refined where the message decides the next phase: ``joined:secagg``
or ``joined:plain`` (the round masks or not), ``admin:<action>`` / ``admin_result:<action>``.
Requests carry ``rid`` >= 1 and each is answered exactly once by its reply kind (or
``error``) with the same ``rid``; pushes carry ``rid`` 0.  A request moves the phase when it is
sent, and its ``error`` reply moves it back, so both ends stay in step whether a push
overtakes a reply or not.  Replies move the phase only where they decide it (``joined``, the
end of an ``aggregate``).

A connection starts with ``hello``: until a ``welcome`` has answered one, every other request
is refused (``bad-message``), so a peer cannot skip the version check.

Rounds: the phase is that of the round this connection is in (``round_id``).  A push for
another round is refused, except ``round_done``, which is skipped (the end of a round this
side already saw end or left); pushes for a round this side left on its own (``leave()``,
e.g. a hospital that stops after sending its masked input and stays connected) are skipped
too, since the peer cannot know.

The schedule (issue 17): ``round_open`` and ``round_closed`` are about the server's scheduled
rounds, not the secure-aggregation round a connection is in, so a hospital's end takes them
in every phase and they move nothing; ``keepalive`` (any role) and ``training_failed`` (a
hospital's) may be asked in every phase after ``hello`` and move nothing either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from securefl.errors import LocalProtocolError, RemoteProtocolError
from securefl.protocol import messages as wm


class Side(Enum):
    """Which end of the connection this object keeps."""

    CLIENT = "client"  # the hospital's or the administrator's end
    SERVER = "server"  # the server's end of one hospital's or the administrator's connection


class HospitalPhase(Enum):
    """Where a hospital's connection is; each value completes "while this hospital ..."."""

    IDLE = "is in no round"
    JOINING = "waits for the reply to its join"
    JOINED = "has joined round {r} but not yet advertised its keys"
    ADVERTISED = "has advertised its keys for round {r} and waits for the roster"
    ROSTER = "holds the roster of round {r} and has not yet acknowledged it"
    ACKED = ("has acknowledged the roster of round {r} and waits for every hospital's "
             "acknowledgement")
    ACKS = "holds every acknowledgement of round {r} and has not yet revealed its seed value"
    REVEALED = "has revealed its seed value for round {r} and waits for everyone's"
    SEEDED = "holds every seed value of round {r} and has not yet shared its keys"
    SHARED = "has shared its keys for round {r} and waits for the share envelopes"
    ENVELOPES = "holds its share envelopes of round {r} and has not yet sent its masked input"
    SLOT = "has asked for the upload slot of round {r} and not yet sent its masked input"
    SUBMITTED = "has sent its masked input for round {r} and waits for the survivor list"
    LISTED = "holds the survivor list of round {r} and has not yet signed it"
    SIGNED = "has signed the survivor list of round {r} and waits for the unmask request"
    UNMASKING = "holds the unmask request of round {r} and has not yet answered it"
    ANSWERED = "has answered the unmask request of round {r} and waits for the round's end"
    PLAIN = "has joined round {r}, which does not mask, and not yet sent its update"
    PLAIN_SLOT = ("has asked for the upload slot of round {r}, which does not mask, and not "
                  "yet sent its update")
    PLAIN_SENT = "has sent its update for round {r}, which does not mask, and waits for its end"


class AdminPhase(Enum):
    """Where the administrator's connection is ("while this administrator ...")."""

    READY = "has no aggregation running"
    AGGREGATING = "waits for its aggregation to finish"


# -- the vocabulary --------------------------------------------------------------------------
#: Requests any certificate may make, in any phase; they change nothing.
ANYTIME = ("hello", "status", "get_global", "keepalive")
#: A hospital's requests about the schedule, in any phase (they change no phase).
HOSPITAL_ANYTIME = ("training_failed",)
#: Pushes about the server's schedule: taken in every phase, they change no phase and name
#: no secure-aggregation round.
SCHEDULE_PUSHES = ("round_open", "round_closed")
#: A hospital's requests inside a round: each names the round (``round_id``).
ROUND_REQUESTS = ("advertise", "ack_roster", "reveal_seed", "share_keys", "upload_slot",
                  "masked_input", "sign_survivors", "unmask_response")
ADMIN_ACTIONS = ("aggregate", "version", "count", "close", "abort", "pause", "resume", "open")
#: Request kind -> the kind of its (successful) reply.
REPLY_TO: Mapping[str, str] = {
    "hello": "welcome", "status": "status_reply", "get_global": "global_model",
    "join": "joined", **dict.fromkeys(ROUND_REQUESTS, "ack"), "admin": "admin_result",
    "admin_query": "admin_query_reply", "keepalive": "ack", "training_failed": "ack",
}
#: Every request kind of the protocol (whoever may send it).
REQUEST_KINDS = frozenset(REPLY_TO)
#: What the server sends each role unprompted (``rid`` 0), besides ``error``.
PUSHES: Mapping[str, frozenset[str]] = {
    "hospital": frozenset({"roster", "roster_acks", "seed_reveals", "envelopes",
                           "survivor_list", "unmask_request", "round_done",
                           *SCHEDULE_PUSHES}),
    "admin": frozenset({"aggregate_progress"}),
}

H = HospitalPhase
#: The round's order for one hospital: the steps of PROTOCOL.md section 5, nothing else.
_ROUND_ORDER: Mapping[HospitalPhase, Mapping[str, HospitalPhase]] = {
    H.IDLE: {"join": H.JOINING},
    H.JOINING: {"joined:secagg": H.JOINED, "joined:plain": H.PLAIN},
    H.JOINED: {"advertise": H.ADVERTISED},
    H.ADVERTISED: {"roster": H.ROSTER},
    H.ROSTER: {"ack_roster": H.ACKED},
    H.ACKED: {"roster_acks": H.ACKS},
    H.ACKS: {"reveal_seed": H.REVEALED},
    H.REVEALED: {"seed_reveals": H.SEEDED},
    H.SEEDED: {"share_keys": H.SHARED},
    H.SHARED: {"envelopes": H.ENVELOPES},
    # Asking for the upload slot first is what a hospital should do; a masked input sent
    # without asking is still taken (the server reads it when the slot is free).
    H.ENVELOPES: {"upload_slot": H.SLOT, "masked_input": H.SUBMITTED},
    H.SLOT: {"upload_slot": H.SLOT, "masked_input": H.SUBMITTED},
    H.SUBMITTED: {"survivor_list": H.LISTED},
    H.LISTED: {"sign_survivors": H.SIGNED},
    H.SIGNED: {"unmask_request": H.UNMASKING},
    H.UNMASKING: {"unmask_response": H.ANSWERED},
    H.ANSWERED: {},
    # masking = "plain" (the benchmark's baseline): the update goes right after joining.
    H.PLAIN: {"upload_slot": H.PLAIN_SLOT, "masked_input": H.PLAIN_SENT},
    H.PLAIN_SLOT: {"upload_slot": H.PLAIN_SLOT, "masked_input": H.PLAIN_SENT},
    H.PLAIN_SENT: {},
}
#: Phases inside a round: the server may end the round (``round_done``) in any of them,
#: published or abandoned, e.g. for a hospital that missed a step's deadline.
IN_ROUND = frozenset(_ROUND_ORDER) - {H.IDLE, H.JOINING}
#: After the masked input left: another upload slot is "already-submitted".
SENT = frozenset({H.SUBMITTED, H.LISTED, H.SIGNED, H.UNMASKING, H.ANSWERED, H.PLAIN_SENT})

#: The hospital's table: the round's order, plus the requests allowed in every phase and
#: the round's end from every phase inside a round.
HOSPITAL_TABLE: Mapping[Enum, Mapping[str, Enum]] = {
    phase: {**dict.fromkeys((*ANYTIME, *HOSPITAL_ANYTIME, *SCHEDULE_PUSHES), phase), **steps,
            **({"round_done": H.IDLE} if phase in IN_ROUND else {})}
    for phase, steps in _ROUND_ORDER.items()
}

A = AdminPhase
_ADMIN_ANYTIME = (*ANYTIME, "admin_query",
                  *(f"admin:{a}" for a in ADMIN_ACTIONS if a != "aggregate"))
#: The administrator's table: one ``aggregate`` at a time, its progress only while it runs.
ADMIN_TABLE: Mapping[Enum, Mapping[str, Enum]] = {
    A.READY: {**dict.fromkeys(_ADMIN_ANYTIME, A.READY), "admin:aggregate": A.AGGREGATING},
    A.AGGREGATING: {**dict.fromkeys(_ADMIN_ANYTIME, A.AGGREGATING),
                    "aggregate_progress": A.AGGREGATING,
                    "admin_result:aggregate": A.READY},
}

TABLES: Mapping[str, Mapping[Enum, Mapping[str, Enum]]] = {
    "hospital": HOSPITAL_TABLE, "admin": ADMIN_TABLE,
}
INITIAL: Mapping[str, Enum] = {"hospital": H.IDLE, "admin": A.READY}
#: Replies that move the phase (every other reply only answers its request).
DECISIVE_REPLIES = frozenset({"joined:secagg", "joined:plain", "admin_result:aggregate"})
#: Request events each role may send at all (others: ``forbidden``).
REQUEST_EVENTS: Mapping[str, frozenset[str]] = {
    role: frozenset(e for row in table.values() for e in row
                    if e.split(":")[0] in REQUEST_KINDS)
    for role, table in TABLES.items()
}
_WHO = {"hospital": "hospital", "admin": "administrator"}


def event_of(msg: wm._Wire) -> str:
    """The table's name for ``msg``: its kind, refined where the content decides the phase."""
    if isinstance(msg, wm.Joined):
        return f"joined:{msg.masking}"
    if isinstance(msg, wm.AdminCommand):
        return f"admin:{msg.action}"
    if isinstance(msg, wm.AdminResult):
        return f"admin_result:{msg.action}"
    return str(getattr(msg, "kind", type(msg).__name__))


@dataclass
class _Pending:
    """A request waiting for its reply: where it moved the phase from and to."""

    event: str
    before: Enum
    after: Enum
    refused: bool = False  # refused on arrival: only an ``error`` may answer it


class _Refusal(Exception):
    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.text, self.code = text, code


class Conversation:
    """One connection's wire order, for one role, seen from one end.

    ``send(msg)`` before our side writes a message, ``receive(msg)`` when the peer's message
    is decoded; both raise when the table does not allow it.  ``receive`` returns False for
    a push to skip (see the module docstring).
    """

    def __init__(self, role: str, side: Side | str) -> None:
        if role not in TABLES:
            raise ValueError(f"no conversation for role {role!r}")
        self.role, self.side = str(role), Side(side)
        self.table = TABLES[role]
        self.phase: Enum = INITIAL[role]
        #: The round this connection is in (None: none).
        self.round_id: int | None = None
        self._left: set[int] = set()
        self._pending: dict[int, _Pending] = {}
        #: A ``hello`` has been answered with ``welcome``: until then it is the only request.
        self.greeted = False

    def __repr__(self) -> str:
        return (f"Conversation({self.role}, {self.side.value}, {self.phase.name}, "
                f"round {self.round_id})")

    # -- the two directions --------------------------------------------------------------
    def send(self, msg: wm._Wire) -> None:
        """Our side is about to send ``msg``: ``LocalProtocolError`` if it may not now."""
        if self.side is Side.CLIENT:
            self._request(msg, ours=True)
        elif msg.rid:
            self._reply(msg, ours=True)
        else:
            self._push(msg, ours=True)

    def receive(self, msg: wm._Wire) -> bool:
        """The peer sent ``msg``: ``RemoteProtocolError`` if it may not have; False when it is
        a push to skip (for a round this side left, or the end of another round)."""
        if self.side is Side.SERVER:
            self._request(msg, ours=False)
            return True
        if msg.rid:
            self._reply(msg, ours=False)
            return True
        return self._push(msg, ours=False)

    def leave(self) -> None:
        """Our side stops taking part in its round without telling the peer (a hospital that
        stops after a step; the server dropping a connection from a round it never started
        for it, or replaced by a newer connection).  Later pushes for that round are skipped
        on the hospital's end; on the server's end requests for it are ``not-joined``."""
        if self.round_id is not None:
            self._left.add(self.round_id)
        self.round_id = None
        if self.role == "hospital":
            self.phase = H.IDLE

    @property
    def in_round(self) -> bool:
        return self.round_id is not None

    @property
    def waiting(self) -> frozenset[int]:
        """Request ids sent and not yet answered."""
        return frozenset(self._pending)

    # -- rules ---------------------------------------------------------------------------
    def _where(self) -> str:
        text = str(self.phase.value).format(r=self.round_id)
        return f"this {_WHO[self.role]} {text}"

    def _request(self, msg: wm._Wire, *, ours: bool) -> None:
        kind, rid = str(getattr(msg, "kind", "")), msg.rid
        try:
            nxt = self._check_request(msg, kind, rid)
        except _Refusal as r:
            if ours:
                raise LocalProtocolError(r.text) from None
            if rid and rid not in self._pending:  # its error reply answers it
                self._pending[rid] = _Pending(kind, self.phase, self.phase, refused=True)
            raise RemoteProtocolError(r.text, code=r.code) from None
        self._pending[rid] = _Pending(event_of(msg), self.phase, nxt)
        self.phase = nxt

    def _check_request(self, msg: wm._Wire, kind: str, rid: int) -> Enum:
        if kind not in REQUEST_KINDS:
            raise _Refusal(f"'{kind}' is not a request", "bad-message")
        if rid == 0:
            raise _Refusal("requests need a request id (rid) of 1 or more", "bad-message")
        if rid in self._pending:
            raise _Refusal(f"request id {rid} is still waiting for its reply: use another",
                           "bad-message")
        if not self.greeted and kind != "hello":
            raise _Refusal(f"'{kind}' before 'hello': a connection must start with 'hello' "
                           "and wait for its 'welcome'", "bad-message")
        event = event_of(msg)
        if event not in REQUEST_EVENTS[self.role]:
            raise _Refusal(f"'{kind}' needs the administrator's certificate; this "
                           "connection has a hospital's" if self.role == "hospital" else
                           f"'{kind}' is for hospitals; this connection has the "
                           "administrator's certificate", "forbidden")
        if kind in ROUND_REQUESTS:
            asked = getattr(msg, "round_id", None)
            if self.round_id is None:
                raise _Refusal(f"'{kind}' is for a round, and {self._where()}: join first",
                               "not-joined")
            if asked != self.round_id:
                raise _Refusal(f"'{kind}' is for round {asked}, and this hospital is in round "
                               f"{self.round_id}", "wrong-round")
        nxt = self.table[self.phase].get(event)
        if nxt is None:
            raise _Refusal(f"'{kind}' is not allowed while {self._where()}",
                           self._refusal_code(kind))
        return nxt

    def _refusal_code(self, kind: str) -> str:
        """PROTOCOL.md section 6's code for a request out of order."""
        if kind == "join":
            return "already-joined"
        if kind == "upload_slot":
            return "already-submitted" if self.phase in SENT else "wrong-phase"
        return "remote-protocol"

    def _reply(self, msg: wm._Wire, *, ours: bool) -> None:
        fault = LocalProtocolError if ours else RemoteProtocolError
        kind, rid = str(getattr(msg, "kind", "")), msg.rid
        pending = self._pending.get(rid)
        if pending is None and ours and isinstance(msg, wm.ErrorMsg):
            # The server refusing a request that never reached this table (its header did
            # not decode): the refusal still carries the rid the client is waiting on.
            return
        if pending is None:
            raise fault(f"'{kind}' answers request id {rid}, and no request with that id is "
                        "waiting for a reply")
        if isinstance(msg, wm.ErrorMsg):
            del self._pending[rid]
            if self.phase is pending.after and not pending.refused:
                self.phase = pending.before  # refused: as if it had not been asked
            return
        asked = pending.event.split(":")[0]
        if pending.refused or kind != REPLY_TO[asked]:
            raise fault(f"'{asked}' (request id {rid}) must be answered with "
                        f"'{'error' if pending.refused else REPLY_TO[asked]}', not '{kind}'")
        if isinstance(msg, wm.AdminResult) and pending.event != f"admin:{msg.action}":
            raise fault(f"'{pending.event}' (request id {rid}) was answered with the result "
                        f"of '{msg.action}'")
        if isinstance(msg, wm.Welcome):
            self.greeted = True
        event, nxt = event_of(msg), None
        if event in DECISIVE_REPLIES and self.phase is pending.after:
            nxt = self.table[self.phase].get(event)
            if nxt is None:
                raise fault(f"'{kind}' is not allowed while {self._where()}")
        del self._pending[rid]
        if nxt is not None:
            self.phase = nxt
            if isinstance(msg, wm.Joined):
                self.round_id = msg.round_id
        elif isinstance(msg, wm.Joined):  # this side left before the reply came: a round
            self._left.add(msg.round_id)  # it left, whatever the server sends for it

    def _push(self, msg: wm._Wire, *, ours: bool) -> bool:
        kind = str(getattr(msg, "kind", ""))

        def refuse(what: str, why: str = "") -> RemoteProtocolError | LocalProtocolError:
            if ours:
                return LocalProtocolError(f"the server may not send {what} while "
                                          f"{self._where()}")
            return RemoteProtocolError(f"the server sent {what} while {self._where()}{why}")

        if kind == "error":
            return True  # a notice about the connection itself (a deadline, a bad frame)
        if kind in REPLY_TO.values():
            fault = LocalProtocolError if ours else RemoteProtocolError
            raise fault(f"'{kind}' is a reply and must carry the request id it answers")
        if kind not in PUSHES[self.role]:
            raise refuse(f"'{kind}'", f", and it never sends that to a {_WHO[self.role]}")
        if self.role == "hospital" and kind not in SCHEDULE_PUSHES:
            round_id = getattr(msg, "round_id", None)
            if not ours and round_id in self._left:
                return False  # a round this hospital left: the server could not know
            if round_id != self.round_id:
                if kind == "round_done" and not ours:
                    return False  # the end of a round already over for this hospital
                raise refuse(f"'{kind}' for round {round_id}")
        nxt = self.table[self.phase].get(kind)
        if nxt is None:
            raise refuse(f"'{kind}'", ", which is out of the protocol's order")
        if nxt is not self.phase:
            self.phase = nxt
            if nxt is H.IDLE:
                self.round_id = None
        return True
