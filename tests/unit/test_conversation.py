"""The wire order of one connection (``securefl.protocol.conversation``), both ends back to
back without sockets, as wsproto's tests do it.

Every message crosses a simulated wire (encoded to a frame and decoded again), so what the
far end judges is what it would really receive.  The illegal (phase, event) pairs are
generated from the tables themselves, so a phase or event added later is covered at once.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.errors import LocalProtocolError, RemoteProtocolError
from securefl.protocol import messages as wm
from securefl.protocol.conversation import (
    ADMIN_ACTIONS,
    ADMIN_TABLE,
    HOSPITAL_TABLE,
    INITIAL,
    PUSHES,
    REPLY_TO,
    ROUND_REQUESTS,
    TABLES,
    AdminPhase,
    Conversation,
    HospitalPhase,
    Side,
)
from securefl.protocol.frames import Frame, FrameParser, encode_frame

H, A = HospitalPhase, AdminPhase
B = b"\x01" * 32
ROUND = 7


def wire(msg: wm._Wire, payload: bytes = b"") -> wm._Wire:
    """``msg`` as the far end decodes it from a frame."""
    parser = FrameParser()
    parser.receive_data(encode_frame(wm.encode_header(msg), payload))
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    decoded, _ = wm.decode(frame)
    return decoded


def payload_of(msg: wm._Wire) -> bytes:
    spec = getattr(msg, "array", None)
    return bytes(spec.nbytes) if spec is not None else b""


# -- one message per event ------------------------------------------------------------------
def request(event: str, rid: int, round_id: int = ROUND) -> wm._Wire:
    kind, _, action = event.partition(":")
    make: dict[str, Callable[[], wm._Wire]] = {
        "hello": lambda: wm.Hello(rid=rid, protocol=wm.PROTOCOL_VERSION),
        "status": lambda: wm.Status(rid=rid),
        "get_global": lambda: wm.GetGlobal(rid=rid),
        "join": lambda: wm.Join(rid=rid, base_version=0),
        "advertise": lambda: wm.Advertise(rid=rid, round_id=round_id, c_pk=B, s_pk=B,
                                          signature=B, base_sha256=B, graph_commit=B),
        "ack_roster": lambda: wm.AckRoster(rid=rid, round_id=round_id, signature=B),
        "reveal_seed": lambda: wm.RevealSeed(rid=rid, round_id=round_id, value=B),
        "share_keys": lambda: wm.ShareKeysMsg(rid=rid, round_id=round_id, envelopes={2: B},
                                              digests={1: B, 2: B}, b_commit=B),
        "upload_slot": lambda: wm.UploadSlot(rid=rid, round_id=round_id, nbytes=12),
        "masked_input": lambda: wm.MaskedInputMsg(
            rid=rid, round_id=round_id, array=wm.ArraySpec(dtype="<u4", shape=(3,))),
        "sign_survivors": lambda: wm.SignSurvivors(rid=rid, round_id=round_id, signature=B),
        "unmask_response": lambda: wm.UnmaskResponseMsg(rid=rid, round_id=round_id,
                                                        b_shares={1: B}, s_shares={}),
        "admin": lambda: wm.AdminCommand(rid=rid, action=action),  # type: ignore[arg-type]
        "admin_query": lambda: wm.AdminQuery(rid=rid, what="audit"),
        "keepalive": lambda: wm.Keepalive(rid=rid),
        "training_failed": lambda: wm.TrainingFailed(rid=rid, schedule_round=1,
                                                     reason="no-scans"),
    }
    return make[kind]()


def reply(event: str, rid: int, round_id: int = ROUND) -> wm._Wire:
    """The successful reply to request ``event`` (``joined:plain`` etc. name the reply)."""
    kind, _, detail = event.partition(":")
    kind = {"admin_result": "admin", "joined": "join"}.get(kind, kind)
    make: dict[str, Callable[[], wm._Wire]] = {
        "hello": lambda: wm.Welcome(rid=rid, name="a", role="hospital", version=0),
        "status": lambda: wm.StatusReply(rid=rid, version=0, round_id=0, phase="idle",
                                         online=[], joined=[], submitted=[], collected=0),
        "get_global": lambda: wm.GlobalModel(rid=rid, version=0, sha256="0" * 64,
                                             contributors=0, total_samples=0, created="",
                                             classes=[], array=wm.ArraySpec(dtype="<f4",
                                                                            shape=(2,))),
        "join": lambda: wm.Joined(rid=rid, round_id=round_id, base_version=0, vector_len=2,
                                  masking=detail or "secagg",  # type: ignore[arg-type]
                                  ring_bits=32, clip=1.0, scale=1.0, max_clients=10,
                                  max_weight=10),
        "admin": lambda: wm.AdminResult(rid=rid, action=detail, value=1),
        "admin_query": lambda: wm.AdminQueryReply(rid=rid, what="audit"),
    }
    return make.get(kind, lambda: wm.Ack(rid=rid, collected=1))()


def push(event: str, round_id: int = ROUND, **fields: object) -> wm._Wire:
    make: dict[str, Callable[[], wm._Wire]] = {
        "roster": lambda: wm.RosterMsg(
            round_id=round_id, base_version=0, vector_len=2, threshold=2, neighbours=1,
            ring_bits=32, clip=1.0, scale=1.0, max_clients=10, max_weight=10,
            min_contributors=2, participants=[]),
        "roster_acks": lambda: wm.RosterAcksMsg(round_id=round_id, signatures={1: B, 2: B}),
        "seed_reveals": lambda: wm.SeedRevealsMsg(round_id=round_id, values={1: B, 2: B}),
        "envelopes": lambda: wm.EnvelopesMsg(round_id=round_id, recipient=1,
                                             envelopes={2: B}, digests={2: B}),
        "survivor_list": lambda: wm.SurvivorListMsg(round_id=round_id, survivors=[1, 2]),
        "unmask_request": lambda: wm.UnmaskRequestMsg(round_id=round_id, survivors=[1, 2],
                                                      signatures={1: B, 2: B}),
        "round_done": lambda: wm.RoundDone(round_id=round_id, version=1),
        "aggregate_progress": lambda: wm.AggregateProgress(round_id=round_id, asked=2,
                                                           answered=1, needed=2),
        "round_open": lambda: wm.RoundOpen(schedule_round=3, base_version=0,
                                           opened="2025-01-01T00:00:00Z",
                                           deadline="2025-01-01T02:00:00Z"),
        "round_closed": lambda: wm.RoundClosed(schedule_round=3, outcome="published",
                                               version=1),
    }
    return make[event]().model_copy(update=fields)


# -- the two ends ---------------------------------------------------------------------------
class Link:
    """A client end and the server's end of one connection, joined by a simulated wire."""

    def __init__(self, role: str, *, greeted: bool = True) -> None:
        self.role = role
        self.client = Conversation(role, Side.CLIENT)
        self.server = Conversation(role, Side.SERVER)
        # Most tests start after hello/welcome (which any phase allows again).
        self.client.greeted = self.server.greeted = greeted
        self.rid = 0

    def ask(self, req: wm._Wire) -> int:
        """The client sends ``req``; the server receives it (not yet answered)."""
        self.client.send(req)
        self.server.receive(wire(req, payload_of(req)))
        return req.rid

    def answer(self, msg: wm._Wire) -> None:
        self.server.send(msg)
        assert self.client.receive(wire(msg, payload_of(msg))) is True

    def exchange(self, event: str, reply_event: str | None = None, **kw: object) -> None:
        """A whole request and its successful reply."""
        self.rid += 1
        self.ask(request(event, self.rid, **kw))  # type: ignore[arg-type]
        self.answer(reply(reply_event or event, self.rid, **kw))  # type: ignore[arg-type]

    def refuse(self, event: str, code: str, **kw: object) -> None:
        """A request the server's own logic refuses (after the table let it through)."""
        self.rid += 1
        self.ask(request(event, self.rid, **kw))  # type: ignore[arg-type]
        self.answer(wm.ErrorMsg(rid=self.rid, code=code, message="refused"))

    def push(self, event: str, **kw: object) -> bool:
        msg = push(event, **kw)
        self.server.send(msg)
        return self.client.receive(wire(msg))

    @property
    def phase(self) -> Enum:
        assert self.client.phase is self.server.phase, (self.client, self.server)
        assert self.client.round_id == self.server.round_id
        return self.client.phase


def secagg_round(link: Link, round_id: int = ROUND, *, slot: bool = True,
                 stop: str | None = None) -> list[Enum]:
    """Join and take every step of a masked round (up to ``stop``); the phases seen."""
    seen = []
    link.exchange("join", "joined:secagg", round_id=round_id)
    seen.append(link.phase)
    for step, kind in [("advertise", "ask"), ("roster", "push"), ("ack_roster", "ask"),
                       ("roster_acks", "push"), ("reveal_seed", "ask"),
                       ("seed_reveals", "push"), ("share_keys", "ask"),
                       ("envelopes", "push"), ("upload_slot", "ask"), ("masked_input", "ask"),
                       ("survivor_list", "push"), ("sign_survivors", "ask"),
                       ("unmask_request", "push"), ("unmask_response", "ask")]:
        if step == "upload_slot" and not slot:
            continue
        if kind == "ask":
            link.exchange(step, round_id=round_id)
        else:
            assert link.push(step, round_id=round_id)
        seen.append(link.phase)
        if step == stop:
            break
    return seen


def test_a_secagg_round_back_to_back() -> None:
    link = Link("hospital")
    link.exchange("hello")
    link.exchange("get_global")
    assert link.phase is H.IDLE and not link.client.in_round
    assert secagg_round(link) == [H.JOINED, H.ADVERTISED, H.ROSTER, H.ACKED, H.ACKS,
                                  H.REVEALED, H.SEEDED, H.SHARED, H.ENVELOPES,
                                  H.SLOT, H.SUBMITTED, H.LISTED, H.SIGNED, H.UNMASKING,
                                  H.ANSWERED]
    assert link.client.round_id == ROUND
    link.exchange("status")  # asking how things stand changes nothing
    notice = wm.ErrorMsg(code="timeout", message="connection closed: idle timeout")
    link.server.send(notice)  # an error about the connection itself may come at any time
    assert link.client.receive(wire(notice)) is True
    assert link.phase is H.ANSWERED
    assert link.push("round_done", version=1, sha256="ab")
    assert link.phase is H.IDLE and link.client.round_id is None
    assert not link.client.waiting and not link.server.waiting
    # The next round on the same connection, without asking for the slot (still allowed).
    assert secagg_round(link, ROUND + 1, slot=False)[-1] is H.ANSWERED


def test_a_plain_round_back_to_back() -> None:
    link = Link("hospital")
    link.exchange("join", "joined:plain")
    assert link.phase is H.PLAIN
    link.exchange("upload_slot")
    assert link.phase is H.PLAIN_SLOT
    link.exchange("masked_input")
    assert link.phase is H.PLAIN_SENT
    for step in ("advertise", "sign_survivors", "unmask_response"):
        with pytest.raises(LocalProtocolError, match=f"'{step}' is not allowed while this "
                           "hospital has sent its update for round 7, which does not mask"):
            link.client.send(request(step, 99))
    with pytest.raises(RemoteProtocolError, match="the server sent 'survivor_list' while"):
        link.client.receive(wire(push("survivor_list")))
    assert link.push("round_done")
    assert link.phase is H.IDLE


def test_a_retry_after_round_done_resend() -> None:
    """Round 7 fails after the masked input; the server opens round 8 and says so."""
    link = Link("hospital")
    assert secagg_round(link, stop="masked_input")[-1] is H.SUBMITTED
    link.push("survivor_list")
    assert link.push("round_done", resend=True, retry_round=ROUND + 1, code="too-few-hospitals")
    assert link.phase is H.IDLE
    # Round 7 is over: anything more of it is refused, except another word of its end.
    with pytest.raises(RemoteProtocolError, match="the server sent 'unmask_request' for round "
                       "7 while this hospital is in no round"):
        link.client.receive(wire(push("unmask_request")))
    assert link.client.receive(wire(push("round_done"))) is False
    assert secagg_round(link, ROUND + 1)[-1] is H.ANSWERED
    assert link.push("round_done", round_id=ROUND + 1)
    assert link.phase is H.IDLE


def test_admin_aggregate_back_to_back() -> None:
    link = Link("admin")
    link.exchange("hello")
    link.exchange("admin:close", "admin_result:close")
    assert link.phase is A.READY
    with pytest.raises(LocalProtocolError, match="the server may not send 'aggregate_progress' "
                       "while this administrator has no aggregation running"):
        link.server.send(push("aggregate_progress"))
    link.rid += 1
    aggregate = link.ask(request("admin:aggregate", link.rid))
    assert link.phase is A.AGGREGATING
    link.exchange("admin_query")  # the dashboard polls meanwhile
    for answered in (1, 2):
        assert link.push("aggregate_progress", answered=answered)
    link.answer(reply("admin_result:aggregate", aggregate))
    assert link.phase is A.READY and not link.client.waiting
    with pytest.raises(RemoteProtocolError, match="the server sent 'aggregate_progress' while "
                       "this administrator has no aggregation running"):
        link.client.receive(wire(push("aggregate_progress")))
    # A refused aggregate ends the same way.
    link.refuse("admin:aggregate", "round-not-ready")
    assert link.phase is A.READY


def test_a_push_may_overtake_the_reply_it_follows() -> None:
    """The server may push the roster before its ``ack`` to the last advertisement."""
    link = Link("hospital")
    link.exchange("join", "joined:secagg")
    link.rid += 1
    rid = link.ask(request("advertise", link.rid))
    assert link.push("roster")
    link.answer(reply("advertise", rid))
    assert link.phase is H.ROSTER


def test_a_refused_request_leaves_the_phase_as_it_was() -> None:
    link = Link("hospital")
    link.refuse("join", "stale-version")
    assert link.phase is H.IDLE
    link.exchange("join", "joined:secagg")
    link.refuse("advertise", "crypto")
    assert link.phase is H.JOINED
    link.exchange("advertise")  # asking again is fine
    assert link.phase is H.ADVERTISED


def test_requests_and_replies_are_paired_by_request_id() -> None:
    link = Link("hospital")
    with pytest.raises(RemoteProtocolError, match="request id") as err:
        link.server.receive(wire(wm.Status(rid=0)))
    assert err.value.code == "bad-message"
    rid = link.ask(request("join", 5))
    with pytest.raises(RemoteProtocolError, match="request id 5 is still waiting"):
        link.server.receive(wire(request("status", 5)))
    with pytest.raises(LocalProtocolError, match=re.escape("'join' (request id 5) must be "
                                                             "answered with 'joined', not 'ack'")):
        link.server.send(wm.Ack(rid=rid))
    with pytest.raises(RemoteProtocolError, match="no request with that id"):
        link.client.receive(wire(wm.Ack(rid=6)))
    with pytest.raises(RemoteProtocolError, match="'ack' is a reply and must carry"):
        link.client.receive(wire(wm.Ack()))
    with pytest.raises(RemoteProtocolError, match="'ack' is not a request") as err:
        link.server.receive(wire(wm.Ack(rid=9)))
    assert err.value.code == "bad-message"
    link.server.send(wm.ErrorMsg(rid=9, code="bad-message", message="x"))  # still answerable
    assert link.client.receive(wire(wm.ErrorMsg(code="timeout", message="idle")))  # rid 0
    admin = Link("admin")
    admin.ask(request("admin:version", 1))
    with pytest.raises(LocalProtocolError, match="answered with the result of 'count'"):
        admin.server.send(reply("admin_result:count", 1))


def test_a_round_request_for_another_round_is_wrong_round() -> None:
    link = Link("hospital")
    link.exchange("join", "joined:secagg")
    with pytest.raises(RemoteProtocolError, match="'advertise' is for round 12, and this "
                       "hospital is in round 7") as err:
        link.server.receive(wire(request("advertise", 3, round_id=12)))
    assert err.value.code == "wrong-round"


def test_pushes_for_an_earlier_round_are_skipped() -> None:
    """As ``HospitalSession._expect`` did: another round's end is skipped, so is whatever the
    server still sends for a round this hospital left; another round's step is refused."""
    link = Link("hospital")
    secagg_round(link)
    link.push("round_done")
    link.exchange("join", "joined:secagg", round_id=ROUND + 1)
    stale = push("round_done", round_id=ROUND)
    assert link.client.receive(wire(stale)) is False
    assert link.client.receive(wire(push("round_done", round_id=ROUND, resend=True))) is False
    assert link.phase is H.JOINED and link.client.round_id == ROUND + 1
    with pytest.raises(RemoteProtocolError, match="the server sent 'roster' for round 7 "
                       "while this hospital has joined round 8"):
        link.client.receive(wire(push("roster", round_id=ROUND)))
    # The hospital stops after its masked input and stays connected; the server, which
    # cannot know, goes on with round 8: all of it is skipped.
    link.exchange("advertise", round_id=ROUND + 1)
    link.push("roster", round_id=ROUND + 1)
    link.client.leave()
    assert link.client.phase is H.IDLE and not link.client.in_round
    for event in ("envelopes", "survivor_list", "unmask_request", "round_done"):
        assert link.client.receive(wire(push(event, round_id=ROUND + 1))) is False
    # ... and it may join another round on this connection.
    link.client.send(request("join", 50))


def test_the_server_leaving_a_hospital_out_makes_its_round_requests_not_joined() -> None:
    link = Link("hospital")
    link.exchange("join", "joined:secagg")
    link.server.leave()  # enrolment closed before it advertised keys
    with pytest.raises(RemoteProtocolError) as err:
        link.server.receive(wire(request("advertise", 4)))
    assert err.value.code == "not-joined"
    with pytest.raises(LocalProtocolError, match="'round_done' for round 7"):
        link.server.send(push("round_done"))
    link.client.leave()
    link.exchange("join", "joined:secagg", round_id=ROUND + 1)  # a later round, as usual
    assert link.phase is H.JOINED


# -- every illegal (phase, event) pair, generated from the tables ---------------------------
@dataclass(frozen=True)
class Step:
    event: str
    direction: str  # "request" (client -> server), "push" or "reply" (server -> client)


def _direction(role: str, event: str) -> str:
    kind = event.split(":")[0]
    if kind in REPLY_TO:
        return "request"
    return "push" if any(kind in p for p in PUSHES.values()) else "reply"


def _replay(role: str, path: list[Step]) -> Link:
    """A fresh link driven along ``path``: requests answered at once unless the next phase
    waits for the reply itself (``join``, ``aggregate``)."""
    link = Link(role)
    for step in path:
        if step.direction == "request":
            link.rid += 1
            link.ask(request(step.event, link.rid))
            if not any(_direction(role, e) == "reply"
                       for e in TABLES[role][link.client.phase]):
                link.answer(reply(step.event, link.rid))
        elif step.direction == "reply":
            link.answer(reply(step.event, link.rid))
        else:
            assert link.push(step.event)
    return link


def paths(role: str) -> dict[Enum, list[Step]]:
    """A shortest path of legal steps from the first phase to every phase."""
    table = TABLES[role]
    found: dict[Enum, list[Step]] = {INITIAL[role]: []}
    todo = deque([INITIAL[role]])
    while todo:
        phase = todo.popleft()
        for event, nxt in table[phase].items():
            if nxt not in found:
                found[nxt] = [*found[phase], Step(event, _direction(role, event))]
                todo.append(nxt)
    return found


#: Every event either role's table names: requests, pushes, and the replies that decide.
EVENTS = sorted({e for t in TABLES.values() for row in t.values() for e in row})


def expected_code(role: str, phase: Enum, event: str) -> str:
    """PROTOCOL.md section 6: what the server answers a request out of order."""
    kind = event.split(":")[0]
    if event not in {e for row in TABLES[role].values() for e in row}:
        return "forbidden"
    if kind in ROUND_REQUESTS and phase in (H.IDLE, H.JOINING):
        return "not-joined"
    if kind == "join":
        return "already-joined"
    if kind == "upload_slot":
        sent = (H.SUBMITTED, H.LISTED, H.SIGNED, H.UNMASKING, H.ANSWERED, H.PLAIN_SENT)
        return "already-submitted" if phase in sent else "wrong-phase"
    return "remote-protocol"


def illegal_pairs() -> Iterator[tuple[str, Enum, str]]:
    for role, table in TABLES.items():
        for phase in table:
            for event in EVENTS:
                if event not in table[phase]:
                    yield role, phase, event


def test_every_phase_is_reachable_and_has_a_way_on() -> None:
    for role, table in TABLES.items():
        assert set(paths(role)) == set(table), role
        for phase, row in table.items():
            assert any(nxt is not phase for nxt in row.values()), (role, phase)


@pytest.mark.parametrize(("role", "phase", "event"), list(illegal_pairs()),
                         ids=lambda v: getattr(v, "name", v))
def test_every_event_the_table_does_not_allow_is_refused_by_both_ends(
        role: str, phase: Enum, event: str) -> None:
    link = _replay(role, paths(role)[phase])
    assert link.phase is phase
    direction = _direction(role, event)
    if direction == "request":
        link.rid += 1
        msg = request(event, link.rid)
        with pytest.raises(LocalProtocolError, match=f"'{msg.kind}'"):
            link.client.send(msg)
        with pytest.raises(RemoteProtocolError, match=f"'{msg.kind}'") as err:
            link.server.receive(wire(msg, payload_of(msg)))
        assert err.value.code == expected_code(role, phase, event)
        assert "\n" not in err.value.message and ". " not in err.value.message
        link.server.send(wm.ErrorMsg(rid=link.rid, code=err.value.code, message="no"))
    elif direction == "push":
        msg = push(event)
        if (event == "round_done" and role == "hospital"
                and not link.client.in_round):
            # Not a step of this connection's round: the end of another, skipped.
            assert link.client.receive(wire(msg)) is False
            with pytest.raises(LocalProtocolError):
                link.server.send(msg)
            return
        with pytest.raises(LocalProtocolError, match=f"'{event}'"):
            link.server.send(msg)
        with pytest.raises(RemoteProtocolError, match=f"the server sent '{event}'"):
            link.client.receive(wire(msg))
    else:  # a reply that decides the phase, when no request of its kind is waiting
        msg = reply(event, 999)
        with pytest.raises(LocalProtocolError):
            link.server.send(msg)
        with pytest.raises(RemoteProtocolError):
            link.client.receive(wire(msg))
    assert link.client.phase is phase and link.server.phase is phase


def test_the_generated_pairs_cover_both_roles_and_every_kind() -> None:
    pairs = list(illegal_pairs())
    assert {r for r, _, _ in pairs} == {"hospital", "admin"}
    kinds = {e.split(":")[0] for _, _, e in pairs}
    assert kinds >= {"join", "advertise", "ack_roster", "reveal_seed", "roster_acks",
                     "seed_reveals", "share_keys", "upload_slot", "masked_input",
                     "sign_survivors", "unmask_response", "roster", "envelopes",
                     "survivor_list", "unmask_request", "aggregate_progress", "admin",
                     "admin_query"}
    assert {f"admin:{a}" for a in ADMIN_ACTIONS} <= set(EVENTS)
    assert len(pairs) > 300
    assert HOSPITAL_TABLE[H.SUBMITTED] and ADMIN_TABLE[A.READY]


def test_the_disorders_the_issue_names_are_decided_by_the_table() -> None:
    """Spelled out for the cases the issue names: keys before joining, a masked input
    without envelopes, a signature before the survivor list."""
    link = Link("hospital")
    for event, code in [("advertise", "not-joined"), ("masked_input", "not-joined")]:
        with pytest.raises(RemoteProtocolError) as err:
            link.server.receive(wire(request(event, 40), payload_of(request(event, 40))))
        assert err.value.code == code
        link.server.send(wm.ErrorMsg(rid=40, code=code, message="no"))
    link.exchange("join", "joined:secagg")
    link.exchange("advertise")
    link.push("roster")
    link.exchange("ack_roster")
    link.push("roster_acks")
    link.exchange("reveal_seed")
    link.push("seed_reveals")
    link.exchange("share_keys")
    for event, code, says in [
            ("masked_input", "remote-protocol", "'masked_input' is not allowed while this "
             "hospital has shared its keys for round 7 and waits for the share envelopes"),
            ("upload_slot", "wrong-phase", "'upload_slot' is not allowed while"),
            ("sign_survivors", "remote-protocol", "'sign_survivors' is not allowed while")]:
        msg = request(event, 41)
        with pytest.raises(RemoteProtocolError, match=says) as err:
            link.server.receive(wire(msg, payload_of(msg)))
        assert err.value.code == code
        link.server.send(wm.ErrorMsg(rid=41, code=code, message="no"))
    assert link.phase is H.SHARED


# -- random conversations --------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(role=st.sampled_from(sorted(TABLES)), choices=st.lists(st.integers(0, 10**6),
                                                               max_size=40))
def test_random_legal_conversations_keep_both_ends_in_step(role: str,
                                                           choices: list[int]) -> None:
    """Any walk along the table (requests answered, some refused) leaves both ends in the
    same phase, with nothing left waiting."""
    link = Link(role)
    rounds = iter(range(100, 10**6))
    for choice in choices:
        phase = link.phase
        events = sorted(TABLES[role][phase])
        event = events[choice % len(events)]
        direction = _direction(role, event)
        round_id = link.client.round_id
        if direction == "push":
            assert link.push(event, round_id=round_id if round_id is not None else 0)
        elif direction == "request":
            link.rid += 1
            kw = {"round_id": round_id} if round_id is not None else {}
            msg = request(event, link.rid, **kw)
            link.ask(msg)
            if choice % 5 == 0:  # the server refuses it after all
                link.answer(wm.ErrorMsg(rid=link.rid, code="crypto", message="no"))
                assert link.phase is phase
                continue
            decides = [e for e in TABLES[role][link.client.phase]
                       if _direction(role, e) == "reply"]
            if decides:
                done = decides[choice % len(decides)]
                link.answer(reply(done, link.rid, round_id=next(rounds)))
            else:
                link.answer(reply(event, link.rid, **kw))
        assert link.phase is link.client.phase
        assert not link.client.waiting and not link.server.waiting


def test_the_coordinator_handles_every_request_the_tables_admit() -> None:
    """The coordinator's dispatch table and the wire order name the same requests (the
    connection grants ``upload_slot`` itself)."""
    from securefl.server.coordinator import _HANDLERS

    assert set(_HANDLERS) | {"upload_slot"} == set(REPLY_TO)


@pytest.mark.parametrize("role", ["hospital", "admin"])
def test_hello_comes_first_on_both_ends(role: str) -> None:
    """Until a hello is answered with welcome, nothing else is a request (issue 14, item 7):
    the server refuses it with bad-message, and our own client cannot send it."""
    link = Link(role, greeted=False)
    with pytest.raises(LocalProtocolError, match="before 'hello'"):
        link.client.send(request("status", 1))
    for kind in ("status", "get_global", "join" if role == "hospital" else "admin_query"):
        with pytest.raises(RemoteProtocolError, match="before 'hello'") as refused:
            link.server.receive(wire(request(kind, 7)))
        assert refused.value.code == "bad-message"
        link.server.send(wm.ErrorMsg(rid=7, code="bad-message", message="hello first"))
    # A hello refused (another protocol) greets nobody; one answered with welcome does.
    link.refuse("hello", "unsupported-protocol")
    assert not link.client.greeted and not link.server.greeted
    link.exchange("hello")
    assert link.client.greeted and link.server.greeted
    link.exchange("status")


@pytest.mark.parametrize("phase", list(HospitalPhase), ids=lambda p: p.name)
def test_schedule_pushes_and_requests_are_taken_in_every_hospital_phase(phase: Enum) -> None:
    """Issue 17: ``round_open``/``round_closed`` come whenever the server's schedule moves,
    whatever round the connection is in; ``keepalive`` and ``training_failed`` may be asked
    in every phase; none of them moves the phase or the round."""
    link = _replay("hospital", paths("hospital")[phase])
    round_id = link.client.round_id
    for event in ("round_open", "round_closed"):
        assert link.push(event) is True
        assert link.phase is phase and link.client.round_id == round_id
    for event in ("keepalive", "training_failed"):
        link.rid += 1
        link.ask(request(event, link.rid))
        link.answer(reply(event, link.rid))
        assert link.phase is phase and link.client.round_id == round_id


def test_keepalive_for_the_admin_even_while_aggregating() -> None:
    link = Link("admin")
    link.rid += 1
    link.ask(request("admin:aggregate", link.rid))
    link.exchange("keepalive")
    link.exchange("admin:pause", "admin_result:pause")
    assert link.phase is AdminPhase.AGGREGATING
