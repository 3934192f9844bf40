"""The server's side of one secure-aggregation round, as a sans-I/O state machine.

The server routes keys and envelopes it cannot read, adds masked inputs into one running sum
as they arrive (memory O(model), not O(hospitals x model)), and at the end rebuilds just
enough secrets to strip the masks: ``b_u`` of every survivor, ``s_sk_u`` of every hospital
that dropped after sharing keys.  It never sees an unmasked single update.

Events (``SERVER_TABLE`` is the whole order; anything else is a protocol error):
  KeyAdvertisement*  close_enrolment() -> Roster
  RosterAck*         close_acks()      -> RosterAcks           (every participant's)
  SeedReveal*        close_reveals()   -> SeedReveals          (the graph is fixed now)
  ShareKeys*         close_shares()    -> {participant: EnvelopeBundle}
  MaskedInput*       close_inputs()    -> ConsistencyRequest   (the survivor list, U3)
  ConsistencySignature*  close_check() -> {participant: UnmaskRequest}  (list + signatures)
  UnmaskResponse*    finish()          -> AggregateResult    (or NotEnoughSurvivorsError)
The transport decides *when* to call the ``close_*`` steps (deadlines, admin actions).
"""

from __future__ import annotations

import datetime as dt
from enum import Enum

import numpy as np
from cryptography import x509

from securefl.crypto import graph, pki, shamir
from securefl.crypto.keys import (
    KeyPair,
    roster_statement,
    survivors_statement,
    verify,
    verify_advertisement,
)
from securefl.crypto.messages import (
    DIGEST_PAIR_BYTES,
    AggregateResult,
    ConsistencyRequest,
    ConsistencySignature,
    EnvelopeBundle,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    RosterAck,
    RosterAcks,
    RoundConfig,
    SeedReveal,
    SeedReveals,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from securefl.crypto.prg import MaskBuffer, derive_seed
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg.common import (
    PAIR_MASK,
    SELF_MASK,
    check_config,
    graph_commitment,
    graph_seed,
    roster_digest,
    round_context,
    self_mask_commit,
    share_digest,
    step,
)
from securefl.crypto.secagg.params import choose_graph, dropout_allowance
from securefl.crypto.secagg.policy import split_view_threshold
from securefl.errors import (
    CryptoError,
    DataError,
    LocalProtocolError,
    NotEnoughSurvivorsError,
    RemoteProtocolError,
    StaleVersionError,
)


class ServerState(Enum):
    ENROLLING = "enrolling"
    CONFIRMING = "confirming the roster"
    REVEALING = "drawing the graph seed"
    SHARING = "sharing keys"
    COLLECTING = "collecting masked updates"
    CHECKING = "checking the survivor list"
    UNMASKING = "unmasking"
    DONE = "done"
    FAILED = "failed"


CLOSE_ENROLMENT, CLOSE_ACKS, CLOSE_REVEALS, CLOSE_SHARES, CLOSE_INPUTS, CLOSE_CHECK = (
    "close_enrolment", "close_acks", "close_reveals", "close_shares", "close_inputs",
    "close_check",
)
FINISH, FAIL = "finish", "fail"
_LIVE = (ServerState.ENROLLING, ServerState.CONFIRMING, ServerState.REVEALING,
         ServerState.SHARING, ServerState.COLLECTING, ServerState.CHECKING,
         ServerState.UNMASKING)

SERVER_TABLE: dict[ServerState, dict[object, ServerState]] = {
    ServerState.ENROLLING: {KeyAdvertisement: ServerState.ENROLLING,
                            CLOSE_ENROLMENT: ServerState.CONFIRMING},
    ServerState.CONFIRMING: {RosterAck: ServerState.CONFIRMING,
                             CLOSE_ACKS: ServerState.REVEALING},
    ServerState.REVEALING: {SeedReveal: ServerState.REVEALING,
                            CLOSE_REVEALS: ServerState.SHARING},
    ServerState.SHARING: {ShareKeys: ServerState.SHARING, CLOSE_SHARES: ServerState.COLLECTING},
    ServerState.COLLECTING: {MaskedInput: ServerState.COLLECTING,
                             CLOSE_INPUTS: ServerState.CHECKING},
    ServerState.CHECKING: {ConsistencySignature: ServerState.CHECKING,
                           CLOSE_CHECK: ServerState.UNMASKING},
    ServerState.UNMASKING: {UnmaskResponse: ServerState.UNMASKING, FINISH: ServerState.DONE},
}
for _state in _LIVE:
    SERVER_TABLE[_state][FAIL] = ServerState.FAILED


class ServerRound:
    """One round on the server, from enrolment to the published weighted mean."""

    def __init__(
        self,
        *,
        round_id: int,
        base_version: int,
        vector_len: int,
        encoding: Encoding,
        ca_cert: x509.Certificate,
        neighbours: int | None = None,
        threshold: int | None = None,
        min_contributors: int = 2,
        now: dt.datetime | None = None,
        base_sha256: bytes | None = None,
        colluders: int = 1,
        sparse: bool = False,
        corrupt_fraction: float = 0.05,
        dropout_fraction: float = 0.1,
    ) -> None:
        """``base_sha256``: the stored base model's sha256; a hospital whose keys say it
        received other bytes is told at once (its download was damaged or not ours).
        ``colluders``: the c the threshold is sized for, t = floor((n + c) / 2) + 1 (the
        hospitals refuse a smaller t by their own policy, so this only has to match it).
        ``sparse``: size a SecAgg+ graph by ``params.choose_graph`` from the assumed
        ``corrupt_fraction`` and ``dropout_fraction`` (the full graph when that saves too
        little); ``neighbours``/``threshold`` fix k and t by hand (tests, benchmarks)."""
        self.state = ServerState.ENROLLING
        self.colluders = colluders
        self.sparse = sparse
        self.corrupt_fraction, self.dropout_fraction = corrupt_fraction, dropout_fraction
        self._acks: dict[int, bytes] = {}
        self._reveals: dict[int, bytes] = {}
        self._ack_statement = b""
        #: Most dropouts a sparse round's hospitals sign a survivor list with (None: full).
        self.dropout_cap: int | None = None
        self._signatures: dict[int, bytes] = {}
        self._statement = b""
        #: The survivor list sent to be signed (None until ``close_inputs``): from then on
        #: the hospitals on it resend this update only into a round of exactly them.
        self.listed: tuple[int, ...] | None = None
        self._base_sha256 = base_sha256
        self.round_id, self.base_version = round_id, base_version
        self.vector_len, self.encoding = vector_len, encoding
        self._ca, self._now = ca_cert, now
        self._want_k, self._want_t = neighbours, threshold
        self.min_contributors = min_contributors
        self._adverts: dict[str, KeyAdvertisement] = {}
        self.roster: Roster | None = None
        self._graph: dict[int, frozenset[int]] = {}
        self._envelopes: dict[int, ShareKeys] = {}       # until routed
        self.u1: frozenset[int] = frozenset()            # shared keys (U1)
        self._sum: np.ndarray | None = None
        self.survivors: set[int] = set()                 # U2
        self._responses: set[int] = set()                # answers whose shares all checked
        #: Dealer -> {holder: 64 digest bytes} and dealer -> commitment to b_u: what every
        #: returned share and rebuilt seed is checked against (a few bytes per pair).
        self._digests: dict[int, dict[int, bytes]] = {}
        self._b_commits: dict[int, bytes] = {}
        #: Hospitals caught cheating at the unmask step, name -> what they did (audited).
        self.bad_sharers: dict[str, str] = {}
        self._b_shares: dict[int, dict[int, int]] = {}   # owner -> {holder x: share}
        self._s_shares: dict[int, dict[int, int]] = {}

    # -- bookkeeping the transport shows to people ---------------------------------------
    @property
    def joined(self) -> list[str]:
        return sorted(self._adverts)

    @property
    def collected(self) -> int:
        """"Weight sets collected": masked inputs received this round."""
        return len(self.survivors)

    def name_of(self, participant: int) -> str:
        assert self.roster is not None
        return self.roster.participants[participant - 1].name

    def withdraw(self, name: str) -> None:
        """Forget a hospital that left while the round was still enrolling.

        Why this is safe: before the roster exists nobody has used its keys, so removing its
        advertisement changes nothing for the others; it lets a hospital whose ``send`` was
        interrupted join the same round again instead of being locked out of it.
        """
        if self.state is not ServerState.ENROLLING:
            raise LocalProtocolError(f"'{name}' can only be withdrawn while the round enrols")
        self._adverts.pop(name, None)

    def _check_sender(self, claimed: int, from_name: str | None) -> None:
        if self.roster is None or not 1 <= claimed <= len(self.roster.participants):
            raise RemoteProtocolError(f"unknown participant number {claimed}")
        if from_name is not None and self.name_of(claimed) != from_name:
            raise RemoteProtocolError(f"'{from_name}' sent a message as another hospital")

    # -- events --------------------------------------------------------------------------
    def receive(
        self,
        msg: KeyAdvertisement | RosterAck | SeedReveal | ShareKeys | MaskedInput
        | ConsistencySignature | UnmaskResponse,
        *,
        from_name: str | None = None,
    ) -> None:
        """Accept one hospital message.  ``from_name`` is the TLS-authenticated sender."""
        nxt = step(SERVER_TABLE, self.state, type(msg), remote=True)
        if msg.round_id != self.round_id:
            raise RemoteProtocolError(f"message for round {msg.round_id}, this is {self.round_id}")
        if isinstance(msg, KeyAdvertisement):
            self._on_advert(msg, from_name)
        elif isinstance(msg, RosterAck):
            self._on_ack(msg, from_name)
        elif isinstance(msg, SeedReveal):
            self._on_reveal(msg, from_name)
        elif isinstance(msg, ShareKeys):
            self._on_shares(msg, from_name)
        elif isinstance(msg, MaskedInput):
            self._on_input(msg, from_name)
        elif isinstance(msg, ConsistencySignature):
            self._on_signature(msg, from_name)
        else:
            self._on_unmask(msg, from_name)
        self.state = nxt

    def _on_advert(self, adv: KeyAdvertisement, from_name: str | None) -> None:
        if from_name is not None and adv.name != from_name:
            raise RemoteProtocolError(f"'{from_name}' sent keys in the name of '{adv.name}'")
        if adv.base_version != self.base_version:
            raise StaleVersionError(
                f"'{adv.name}' trained on global version {adv.base_version}; this round "
                f"aggregates version {self.base_version}: fetch the new model and retrain"
            )
        if self._base_sha256 is not None and adv.base_sha256 != self._base_sha256:
            raise StaleVersionError(
                f"the model '{adv.name}' trained on is not global version {self.base_version} "
                "as this server stores it (its sha256 differs): get the global model again, "
                "retrain and send")
        if adv.name in self._adverts:
            raise RemoteProtocolError(f"'{adv.name}' already joined this round")
        if len(self._adverts) >= self.encoding.max_clients:
            raise RemoteProtocolError("this round is full")
        verify_advertisement(adv, self._ca, now=self._now)
        for other in self._adverts.values():
            # Every hospital refuses a roster that repeats one: said to this one now,
            # rather than to everyone once the roster is out.
            if {adv.c_pk, adv.s_pk, adv.graph_commit} & {other.c_pk, other.s_pk,
                                                          other.graph_commit}:
                raise RemoteProtocolError(f"the round keys of '{adv.name}' repeat a key or "
                                          "graph commitment already in this round: make "
                                          "fresh ones")
        self._adverts[adv.name] = adv

    def _on_ack(self, msg: RosterAck, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        if msg.sender in self._acks:
            raise RemoteProtocolError(f"'{self.name_of(msg.sender)}' already acknowledged "
                                      "the roster")
        assert self.roster is not None
        cert = pki.load_cert(self.roster.participants[msg.sender - 1].cert_der)
        if not verify(cert, msg.signature, self._ack_statement):
            raise RemoteProtocolError(f"the roster acknowledgement of "
                                      f"'{self.name_of(msg.sender)}' does not verify")
        self._acks[msg.sender] = msg.signature

    def _on_reveal(self, msg: SeedReveal, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        if msg.sender in self._reveals:
            raise RemoteProtocolError(f"'{self.name_of(msg.sender)}' already revealed its "
                                      "graph-seed value")
        assert self.roster is not None
        adv = self.roster.participants[msg.sender - 1]
        if len(msg.value) != 32 or graph_commitment(
                self.round_id, self.base_version, adv.name, msg.value) != adv.graph_commit:
            raise RemoteProtocolError(f"the graph-seed value of '{adv.name}' does not match "
                                      "its commitment")
        self._reveals[msg.sender] = msg.value

    @property
    def acked(self) -> frozenset[int]:
        """Participants whose roster acknowledgement arrived."""
        return frozenset(self._acks)

    @property
    def revealed(self) -> frozenset[int]:
        """Participants whose graph-seed value arrived."""
        return frozenset(self._reveals)

    def _on_shares(self, msg: ShareKeys, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        if msg.sender in self._envelopes:
            raise RemoteProtocolError(f"'{self.name_of(msg.sender)}' already shared its keys")
        if set(msg.envelopes) != self._graph[msg.sender]:
            raise RemoteProtocolError("key shares are not addressed to exactly the neighbours")
        if set(msg.digests) != self._graph[msg.sender] | {msg.sender} or any(
                len(d) != DIGEST_PAIR_BYTES for d in msg.digests.values()):
            raise RemoteProtocolError(
                f"share digests must be {DIGEST_PAIR_BYTES} bytes for each neighbour and the "
                "hospital itself")
        if len(msg.b_commit) != 32:
            raise RemoteProtocolError("the self-mask commitment must be 32 bytes")
        self._envelopes[msg.sender] = msg

    def _on_input(self, msg: MaskedInput, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        if msg.sender not in self.u1:
            raise RemoteProtocolError("masked input from a hospital that did not share keys")
        if msg.sender in self.survivors:
            raise RemoteProtocolError(f"'{self.name_of(msg.sender)}' already sent its update")
        y = msg.y
        if y.dtype != self.encoding.dtype or y.shape != (self.vector_len + 1,):
            raise RemoteProtocolError(
                f"masked update has shape {y.shape} and type {y.dtype}; this round expects "
                f"({self.vector_len + 1},) of {np.dtype(self.encoding.dtype)}"
            )
        if self._sum is None:
            self._sum = y.copy()
        else:
            np.add(self._sum, y, out=self._sum)
        self.survivors.add(msg.sender)

    def _on_signature(self, msg: ConsistencySignature, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        v = msg.sender
        if v not in self.survivors:
            raise RemoteProtocolError("a survivor-list signature from a hospital whose "
                                      "update is not in the sum")
        if v in self._signatures:
            raise RemoteProtocolError(f"'{self.name_of(v)}' already signed the survivor list")
        assert self.roster is not None
        cert = pki.load_cert(self.roster.participants[v - 1].cert_der)
        if not verify(cert, msg.signature, self._statement):
            raise RemoteProtocolError(f"the survivor-list signature of '{self.name_of(v)}' "
                                      "does not verify")
        self._signatures[v] = msg.signature

    @property
    def signed(self) -> frozenset[int]:
        """Survivors whose signature on the survivor list arrived (U4 of Bonawitz et al.)."""
        return frozenset(self._signatures)

    def _on_unmask(self, msg: UnmaskResponse, from_name: str | None) -> None:
        self._check_sender(msg.sender, from_name)
        v = msg.sender
        if v not in self._signatures:
            raise RemoteProtocolError("unmask response from a hospital that did not sign "
                                      "the survivor list")
        if v in self._responses or self.name_of(v) in self.bad_sharers:
            raise RemoteProtocolError(f"'{self.name_of(v)}' already answered the unmask step")
        # An honest holder holds a share of every hospital in its neighbourhood that
        # shared keys (the server routed all their envelopes to it), and returns each one:
        # b for survivors, s for the dropped.  A share left out would stall the round with
        # the blame on the dealer whose secret lacks it, so a gap, like a share not asked
        # for, discards the whole answer and names the one who gave it.
        mine = (self._graph[v] | {v}) & self.u1
        for got, want, kind in ((set(msg.b_shares), mine & self.survivors, "self-mask"),
                                (set(msg.s_shares), mine - self.survivors, "key")):
            if got != want:
                n = len(self.roster.participants) if self.roster else 0
                who = ", ".join(f"'{self.name_of(u)}'" if 1 <= u <= n else f"number {u}"
                                for u in sorted(want ^ got)[:3])
                self.bad_sharers[self.name_of(v)] = (
                    f"left out its {kind} share of {who}" if got < want else
                    f"returned {kind} shares it was not asked for ({who})")
                return
        assert self.roster is not None
        cfg = self.roster.config
        for label, shares, half in ((b"b", msg.b_shares, slice(0, 32)),
                                    (b"s", msg.s_shares, slice(32, 64))):
            for owner, raw in sorted(shares.items()):
                if share_digest(cfg, label, owner, v, raw) != self._digests[owner][v][half]:
                    # Checked against what the dealer committed to over its own
                    # connection, so the one who answered is the one who lied; none of its
                    # shares is used, and the round goes on if t checked answers remain.
                    self.bad_sharers[self.name_of(v)] = (
                        f"returned a share of '{self.name_of(owner)}' that does not match "
                        "what its dealer committed to")
                    return
        for owner, raw in msg.b_shares.items():
            self._b_shares.setdefault(owner, {})[v] = shamir.share_from_bytes(raw)
        for owner, raw in msg.s_shares.items():
            self._s_shares.setdefault(owner, {})[v] = shamir.share_from_bytes(raw)
        self._responses.add(v)

    # -- local steps -----------------------------------------------------------------------
    def close_enrolment(self) -> Roster:
        """Fix the participants and the round's parameters; everyone gets the same roster.

        The graph is not fixed yet: its seed comes from the participants' revealed values
        (``close_reveals``), so the server cannot pick who neighbours whom.
        """
        nxt = step(SERVER_TABLE, self.state, CLOSE_ENROLMENT, remote=False)
        n = len(self._adverts)
        least = max(2, self.min_contributors, self.colluders + 2)
        if n < least:  # one figure, the one every screen and message names
            why = (f" (with {self.colluders} assumed colluder(s), [round] colluders)"
                   if self.colluders + 2 > max(2, self.min_contributors) else "")
            raise NotEnoughSurvivorsError(
                f"only {n} hospital(s) joined; a round needs at least {least}{why}")
        if self._want_k is None and self.sparse:
            choice = choose_graph(n, corrupt_fraction=self.corrupt_fraction,
                                  dropout_fraction=self.dropout_fraction,
                                  colluders=self.colluders)
            k, t = choice.degree, choice.threshold
            if not choice.sparse:
                t = min(n, split_view_threshold(n, self.colluders))
        else:
            k = graph.effective_degree(n, self._want_k)
            t = self._want_t if self._want_t is not None else min(
                k + 1, split_view_threshold(k + 1, self.colluders))
        if self._want_t is not None:
            t = self._want_t
        if k < n - 1:
            self.dropout_cap = dropout_allowance(n, self.dropout_fraction)
        config = RoundConfig(
            round_id=self.round_id,
            base_version=self.base_version,
            vector_len=self.vector_len,
            threshold=t,
            neighbours=k,
            encoding=self.encoding,
            min_contributors=self.min_contributors,
        )
        check_config(config, n)
        self.roster = Roster(config, tuple(self._adverts[name] for name in sorted(self._adverts)))
        self._ack_statement = roster_statement(self.round_id, self.base_version,
                                               roster_digest(self.roster))
        self.state = nxt
        return self.roster

    def _missing(self, have: frozenset[int] | set[int] | dict[int, bytes]) -> list[str]:
        assert self.roster is not None
        return [a.name for i, a in enumerate(self.roster.participants, 1) if i not in have]

    def close_acks(self) -> RosterAcks:
        """Every participant's roster signature, for every participant: each reveals its
        graph-seed value only on seeing that all hold the same roster."""
        nxt = step(SERVER_TABLE, self.state, CLOSE_ACKS, remote=False)
        missing = self._missing(self._acks)
        if missing:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"{', '.join(missing)} did not confirm the roster; every hospital in a round "
                "must, before the graph is drawn")
        self.state = nxt
        return RosterAcks(self.round_id, dict(sorted(self._acks.items())))

    def close_reveals(self) -> SeedReveals:
        """Every participant's value: the graph seed is their hash (``common.graph_seed``).

        A withheld value fails the round; the next round draws afresh, and hospitals cap
        how many rounds they take part in per base version, so withholding cannot be used
        to choose among many graphs.
        """
        nxt = step(SERVER_TABLE, self.state, CLOSE_REVEALS, remote=False)
        assert self.roster is not None
        missing = self._missing(self._reveals)
        if missing:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"{', '.join(missing)} did not reveal a graph-seed value; the round cannot "
                "draw its graph without every hospital's")
        n = len(self.roster.participants)
        values = [self._reveals[u] for u in range(1, n + 1)]
        self._graph = graph.neighbours(n, self.roster.config.neighbours,
                                       graph_seed(self.roster.config, values))
        self.state = nxt
        return SeedReveals(self.round_id, dict(sorted(self._reveals.items())))

    def close_shares(self) -> dict[int, EnvelopeBundle]:
        """Route each envelope to its recipient; hospitals that shared nothing are out (U1)."""
        nxt = step(SERVER_TABLE, self.state, CLOSE_SHARES, remote=False)
        if len(self._envelopes) < self.min_contributors:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"only {len(self._envelopes)} hospital(s) shared their keys; at least "
                f"{self.min_contributors} are needed"
            )
        self.state = nxt
        self.u1 = frozenset(self._envelopes)
        bundles: dict[int, dict[int, bytes]] = {v: {} for v in self.u1}
        digests: dict[int, dict[int, bytes]] = {v: {} for v in self.u1}
        for u, msg in self._envelopes.items():
            self._digests[u] = dict(msg.digests)
            self._b_commits[u] = msg.b_commit
            for v, ct in msg.envelopes.items():
                if v in bundles:
                    bundles[v][u] = ct
                    digests[v][u] = msg.digests[v]
        self._envelopes = {}  # routed: the server keeps none of them (only the digests)
        return {v: EnvelopeBundle(self.round_id, v, env, digests[v])
                for v, env in bundles.items()}

    def close_inputs(self) -> ConsistencyRequest:
        """Fix the survivors (U3, whose masked inputs are in the sum) for every hospital to
        sign; the dropped are those that shared keys and are not on the list."""
        nxt = step(SERVER_TABLE, self.state, CLOSE_INPUTS, remote=False)
        assert self.roster is not None
        need = max(self.roster.config.threshold, self.min_contributors)
        if len(self.survivors) < need:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"only {len(self.survivors)} masked update(s) arrived; at least {need} are "
                "needed to unmask"
            )
        dropped = len(self.roster.participants) - len(self.survivors)
        if self.dropout_cap is not None and dropped > self.dropout_cap:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"{dropped} hospitals dropped out, more than the {self.dropout_cap} this "
                "sparse round was sized for: the hospitals would refuse to sign the list")
        self.state = nxt
        cfg = self.roster.config
        listed = tuple(sorted(self.survivors))
        self.listed = listed
        self._statement = survivors_statement(
            cfg.round_id, cfg.base_version, self._base_sha256 or self.roster.participants[0]
            .base_sha256, roster_digest(self.roster), listed)
        return ConsistencyRequest(self.round_id, listed)

    def close_check(self) -> dict[int, UnmaskRequest]:
        """Hand the signed list to each hospital that signed it, with the signatures it
        counts: those of the share holders of every hospital whose share it holds (its
        neighbours' neighbours; everyone's in the full graph)."""
        nxt = step(SERVER_TABLE, self.state, CLOSE_CHECK, remote=False)
        assert self.roster is not None
        t = self.roster.config.threshold
        if len(self._signatures) < t:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"only {len(self._signatures)} hospital(s) signed the survivor list; {t} "
                "are needed before any may unmask")
        signers = frozenset(self._signatures)
        short = [u for u in sorted(self.u1) if len((self._graph[u] | {u}) & signers) < t]
        if short:
            # Each hospital reveals a share of u only with t signatures from u's own holders:
            # they would all refuse, so say so now rather than after the step's deadline.
            self.fail()
            raise NotEnoughSurvivorsError(
                f"fewer than {t} of the hospitals holding shares of "
                f"{', '.join(repr(self.name_of(u)) for u in short[:3])} signed the survivor "
                "list, so none may unmask")
        self.state = nxt
        listed = tuple(sorted(self.survivors))
        n = len(self.roster.participants)
        if self.roster.config.neighbours >= n - 1:
            every = UnmaskRequest(self.round_id, listed, dict(sorted(self._signatures.items())))
            return dict.fromkeys(self._signatures, every)
        requests = {}
        for v in self._signatures:
            near = set().union(*(self._graph[u] | {u} for u in self._graph[v] | {v}))
            requests[v] = UnmaskRequest(self.round_id, listed, {
                u: sig for u, sig in sorted(self._signatures.items()) if u in near})
        return requests

    def finish(self) -> AggregateResult:
        """Rebuild the secrets, strip every mask, decode: the weighted mean, or an error.

        Refuses (``NotEnoughSurvivorsError``) with fewer than t unmask responses, or when any
        single secret has fewer than t shares; nothing is published then.
        """
        nxt = step(SERVER_TABLE, self.state, FINISH, remote=False)
        assert self.roster is not None and self._sum is not None
        t = self.roster.config.threshold
        try:
            if len(self._responses) < t:
                raise NotEnoughSurvivorsError(
                    f"only {len(self._responses)} hospital(s) answered the unmask step with "
                    f"shares that check; {t} are needed{self._cheats()}"
                )
            dropped = set(self.u1 - self.survivors)
            for owner, pool in [(u, self._b_shares) for u in self.survivors] + [
                (u, self._s_shares) for u in dropped
            ]:
                if len(pool.get(owner, {})) < t:
                    raise NotEnoughSurvivorsError(
                        f"too few neighbours of '{self.name_of(owner)}' answered to remove its "
                        f"mask ({len(pool.get(owner, {}))} of {t}){self._cheats()}"
                    )
            result = self._strip_masks(dropped)
        except Exception:
            self.fail()
            raise
        self.state = nxt
        return result

    def _strip_masks(self, dropped: set[int]) -> AggregateResult:
        assert self.roster is not None and self._sum is not None
        cfg = self.roster.config
        ctx = round_context(cfg)
        total = self._sum
        masks = MaskBuffer(total.shape[0], self.encoding.dtype)
        for u in sorted(self.survivors):
            b_u = shamir.reconstruct(self._b_shares[u], cfg.threshold)  # t checked shares
            if self_mask_commit(cfg, u, b_u) != self._b_commits[u]:
                # Every share matched its digest, so the dealer's own shares lie on no one
                # polynomial: which seed a subset rebuilds would be the dealer's choice.
                self.bad_sharers[self.name_of(u)] = ("dealt shares of its self-mask seed "
                                                     "that do not fit together")
                raise CryptoError(f"the self-mask seed of '{self.name_of(u)}' rebuilt from "
                                  "checked shares does not match its commitment: "
                                  f"{self._cheats()[2:]}")
            masks.subtract(total, derive_seed(b_u, SELF_MASK, ctx))
        for u in sorted(dropped):
            s_u = KeyPair.from_private_bytes(shamir.reconstruct(self._s_shares[u], cfg.threshold))
            if s_u.public != self.roster.participants[u - 1].s_pk:
                self.bad_sharers[self.name_of(u)] = ("dealt shares of its masking key that "
                                                     "do not fit together")
                raise CryptoError(
                    f"the rebuilt key of '{self.name_of(u)}' does not match its advertised key: "
                    f"{self._cheats()[2:]}"
                )
            for v in sorted(self._graph[u] & self.survivors):
                s_uv = s_u.agree(self.roster.participants[v - 1].s_pk, PAIR_MASK, ctx)
                if v < u:  # v added +PRG(s_vu); take it out
                    masks.subtract(total, s_uv)
                else:
                    masks.add(total, s_uv)
        del masks  # the scratch buffer goes before the result is made
        try:
            mean, weight = self.encoding.decode(total)
        except DataError:
            mean, weight = np.zeros(0, np.float32), 0
        n, enc = len(self.survivors), self.encoding
        # Each survivor's count is 1..max_weight and each element of its clipped update at
        # most clip: a sum outside that is not one of these hospitals' updates at all (a
        # hospital returned a wrong share), and is never published.
        if not n <= weight <= n * enc.max_weight or (
                mean.size and float(np.abs(mean).max()) > enc.clip * (1 + 1e-6)
                + 1 / enc.scale):
            names = ", ".join(self.name_of(u) for u in sorted(self.survivors))
            why = (f"shares were wrong{self._cheats()}" if self.bad_sharers else
                   "every share used matched its dealer's commitment, so one of "
                   f"{names} sent a masked input that is not an encoded update (a broken or "
                   "hostile client; secure aggregation cannot tell which)")
            raise CryptoError(
                "the unmasked sum is impossible for these hospitals (sample total "
                f"{weight} for {n} hospitals, or a value beyond the clip): {why}; nothing was "
                "published")

        self._sum = None
        survivors = tuple(self.name_of(u) for u in sorted(self.survivors))
        return AggregateResult(self.round_id, self.base_version, mean, weight, survivors)

    def _cheats(self) -> str:
        """'; X returned ..., Y dealt ...' for an error message ('' when no one cheated)."""
        return "".join(f"; '{name}' {what}" for name, what in sorted(self.bad_sharers.items()))

    def fail(self) -> None:
        """Abandon the round (admin abort, too few hospitals): nothing will be published."""
        if self.state in _LIVE:
            self.state = ServerState.FAILED
            self._sum = None
