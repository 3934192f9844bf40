"""The hospital's side of one secure-aggregation round, as a sans-I/O state machine.

Typed messages in, typed messages out; no sockets, files or clocks.  The transition table
``CLIENT_TABLE`` is the whole protocol order for this role: anything else raises
``RemoteProtocolError`` (the server sent it) or ``LocalProtocolError`` (we called it).

Bonawitz et al. 2017, Fig. 4 with the §6 consistency check, user side, and the graph
seed drawn by commit-then-reveal (SecAgg+, Bell et al. 2020, with no server-chosen seed):
  round 0  ``advertise()``                    -> KeyAdvertisement (commits to a value)
  round 1  ``receive(Roster)``                -> RosterAck        (signs the roster)
           ``receive(RosterAcks)``            -> SeedReveal       (all n signed the same)
           ``receive(SeedReveals)``           -> ShareKeys        (graph from all values)
  round 2  ``receive(EnvelopeBundle)``        -> MaskedInput
  round 3  ``receive(ConsistencyRequest)``    -> ConsistencySignature
  round 4  ``receive(UnmaskRequest)``         -> UnmaskResponse

At every step the hospital goes on only with at least t hospitals' messages of the step
before (its own counts, as it holds its own share and signs the list too), and every
request is checked against the hospital's ``RoundPolicy``, never only the server's roster.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import overload

import numpy as np
from cryptography import x509

from securefl.crypto import envelope, graph, pki, shamir
from securefl.crypto.keys import (
    KeyPair,
    SigningKey,
    roster_statement,
    sign,
    sign_advertisement,
    survivors_statement,
    verify,
    verify_advertisement,
)
from securefl.crypto.membership import MemberList
from securefl.crypto.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EnvelopeBundle,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    RosterAck,
    RosterAcks,
    SeedReveal,
    SeedReveals,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from securefl.crypto.prg import MaskBuffer, derive_seed
from securefl.crypto.quantize import Encoding, check_update
from securefl.crypto.randomness import SYSTEM, Randomness
from securefl.crypto.secagg.common import (
    ENVELOPE_KEY,
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
from securefl.crypto.secagg.params import (
    choose_graph,
    dropout_allowance,
    sparse_threshold_floor,
)
from securefl.crypto.secagg.policy import RoundPolicy
from securefl.errors import ConfigError, CryptoError, RemoteProtocolError, StaleVersionError


def _describe(enc: Encoding) -> str:
    return (f"{enc.ring_bits}-bit ring, clip {enc.clip:g}, scale {enc.scale:g}, "
            f"max weight {enc.max_weight}")


class ClientState(Enum):
    NEW = "not started"
    ADVERTISED = "waiting for the roster"
    ACKED = "waiting for every hospital's acknowledgement of the roster"
    REVEALED = "waiting for every hospital's graph-seed value"
    SHARED = "waiting for key shares"
    MASKED = "waiting for the survivor list"
    SIGNED = "waiting for the unmask request"
    DONE = "finished"
    FAILED = "abandoned after a refusal"


ADVERTISE = "advertise"

CLIENT_TABLE: dict[ClientState, dict[object, ClientState]] = {
    ClientState.NEW: {ADVERTISE: ClientState.ADVERTISED},
    ClientState.ADVERTISED: {Roster: ClientState.ACKED},
    ClientState.ACKED: {RosterAcks: ClientState.REVEALED},
    ClientState.REVEALED: {SeedReveals: ClientState.SHARED},
    ClientState.SHARED: {EnvelopeBundle: ClientState.MASKED},
    ClientState.MASKED: {ConsistencyRequest: ClientState.SIGNED},
    ClientState.SIGNED: {UnmaskRequest: ClientState.DONE},
}


class ClientRound:
    """One hospital in one round.  Holds its update until it is masked, then forgets it."""

    def __init__(
        self,
        *,
        cert: x509.Certificate,
        signing_key: SigningKey,
        ca_cert: x509.Certificate,
        round_id: int,
        base_version: int,
        update: np.ndarray,
        weight: int,
        now: dt.datetime | None = None,
        base_sha256: bytes = bytes(32),
        policy: RoundPolicy | None = None,
        members: MemberList | None = None,
        randomness: Randomness = SYSTEM,
    ) -> None:
        """``policy``: the hospital's own floors (threshold, contributors, encoding,
        revoked certificates, a required survivor set) that no roster can lower.
        ``randomness``: where every random value of the round comes from (tests fix it to
        reproduce docs/PROTOCOL.md's vectors)."""
        check_update(update)
        self.policy = policy or RoundPolicy()
        self._base_sha256 = base_sha256
        #: The survivor list this hospital signed, by name (what a retry must repeat).
        self.signed_survivors: tuple[str, ...] | None = None
        #: The encoding of the round whose list it signed (what a retry must repeat too).
        self.signed_encoding: Encoding | None = None
        self._statement = b""
        self._members = members  # the operator's signed member list: who may be in a round
        #: Whether the roster's limit lowered this hospital's sample count.
        self.weight_capped = False
        self.state = ClientState.NEW
        self._cert, self._signing_key, self._ca = cert, signing_key, ca_cert
        self.round_id, self.base_version = round_id, base_version
        self._update: np.ndarray | None = update
        self._weight = weight
        self._now = now
        self._rand = randomness
        self._c = KeyPair.from_private_bytes(randomness.x25519_private("c"))
        self._s = KeyPair.from_private_bytes(randomness.x25519_private("s"))
        self.me = 0  # participant number, known from the roster
        self.roster: Roster | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of s_sk)
        self._envelope_keys: dict[int, bytes] = {}  # neighbour -> AES-GCM key (symmetric)
        self._graph: dict[int, frozenset[int]] = {}
        self._seed_value = randomness.graph_value()  # this hospital's share of the graph seed
        self._roster_statement = b""
        #: Whether the roster's graph is sparse (SecAgg+): then the dropout cap applies.
        self.sparse = False
        #: SecAgg+: the dishonest hospitals this hospital's analysis assumes for the round
        #: (each could stop one round by withholding its value: the draw cap's margin).
        self.assumed_corrupt = 0

    # -- round 0 -----------------------------------------------------------------------
    def advertise(self) -> KeyAdvertisement:
        self.state = step(CLIENT_TABLE, self.state, ADVERTISE, remote=False)
        self._own = sign_advertisement(
            self._signing_key,
            self._cert,
            round_id=self.round_id,
            base_version=self.base_version,
            c_pk=self._c.public,
            s_pk=self._s.public,
            base_sha256=self._base_sha256,
            graph_commit=graph_commitment(self.round_id, self.base_version,
                                          pki.identity_of(self._cert)[1], self._seed_value),
        )
        return self._own

    # -- dispatch ----------------------------------------------------------------------
    @overload
    def receive(self, msg: Roster) -> RosterAck: ...
    @overload
    def receive(self, msg: RosterAcks) -> SeedReveal: ...
    @overload
    def receive(self, msg: SeedReveals) -> ShareKeys: ...
    @overload
    def receive(self, msg: EnvelopeBundle) -> MaskedInput: ...
    @overload
    def receive(self, msg: ConsistencyRequest) -> ConsistencySignature: ...
    @overload
    def receive(self, msg: UnmaskRequest) -> UnmaskResponse: ...

    def receive(
        self, msg: Roster | RosterAcks | SeedReveals | EnvelopeBundle | ConsistencyRequest
        | UnmaskRequest,
    ) -> RosterAck | SeedReveal | ShareKeys | MaskedInput | ConsistencySignature \
            | UnmaskResponse:
        """Feed the server's next message; returns this hospital's answer to send back.

        Any refusal ends the round for this hospital (``ClientState.FAILED``), as h11 does
        after a protocol error.  Why: a refused message may already have changed the state
        (shares opened from a bundle before a forged envelope in it, a capped sample
        count), and a server allowed to try the step again could use that: e.g. make the
        hospital hold shares of more hospitals than it masked with, then sign a list that
        names one it never masked with, which exposes its update (see
        test_deviating_server.py).
        """
        try:
            nxt = step(CLIENT_TABLE, self.state, type(msg), remote=True)
            out: (RosterAck | SeedReveal | ShareKeys | MaskedInput | ConsistencySignature
                  | UnmaskResponse)
            if isinstance(msg, Roster):
                out = self._on_roster(msg)
            elif isinstance(msg, RosterAcks):
                out = self._on_acks(msg)
            elif isinstance(msg, SeedReveals):
                out = self._on_reveals(msg)
            elif isinstance(msg, EnvelopeBundle):
                out = self._on_envelopes(msg)
            elif isinstance(msg, ConsistencyRequest):
                out = self._on_consistency(msg)
            else:
                out = self._on_unmask(msg)
        except Exception:
            self.state = ClientState.FAILED
            raise
        self.state = nxt
        return out

    # -- round 1 -----------------------------------------------------------------------
    def _on_roster(self, roster: Roster) -> RosterAck:
        cfg = roster.config
        if (cfg.round_id, cfg.base_version) != (self.round_id, self.base_version):
            if cfg.base_version != self.base_version:
                raise StaleVersionError(
                    f"the round aggregates global version {cfg.base_version} but this update "
                    f"was trained from version {self.base_version}: fetch the new model first"
                )
            raise RemoteProtocolError(f"roster is for round {cfg.round_id}, not {self.round_id}")
        if self._members is not None:
            self._members.check_roster(roster.participants)
        n = len(roster.participants)
        check_config(cfg, n)
        self._check_policy(roster)
        assert self._update is not None
        if cfg.vector_len != self._update.shape[0]:
            raise ConfigError(
                f"the server expects {cfg.vector_len} parameters but this model has "
                f"{self._update.shape[0]}: the hospital runs a different model"
            )
        if self._weight < 1:
            raise ConfigError(f"the sample count must be at least 1, not {self._weight}")
        # Capped, not refused: refusing a roster for its max_weight would tell the server
        # one bit of this hospital's count per attempt.
        self.weight_capped = self._weight > cfg.encoding.max_weight
        self._weight = min(self._weight, cfg.encoding.max_weight)
        names = [a.name for a in roster.participants]
        if names != sorted(set(names)):
            raise RemoteProtocolError("roster names are not unique and sorted")
        if self._own.name not in names:  # a typed refusal, not a KeyError further down
            raise RemoteProtocolError("the roster does not name this hospital: it belongs to "
                                      "another round, refusing it")
        keys = [a.c_pk for a in roster.participants] + [a.s_pk for a in roster.participants]
        if len(set(keys)) != len(keys):
            raise CryptoError("roster repeats a public key: refusing the round")
        for adv in roster.participants:
            if (adv.round_id, adv.base_version) != (self.round_id, self.base_version):
                raise RemoteProtocolError(f"keys of '{adv.name}' belong to another round")
            if adv.name == self._own.name:
                if adv != self._own:
                    raise CryptoError("the roster altered this hospital's own round keys")
                continue
            if adv.base_sha256 != self._base_sha256:
                raise CryptoError(
                    f"'{adv.name}' was given other model bytes for version "
                    f"{self.base_version} than this hospital: refusing the round (a server "
                    "that shows hospitals different models could learn about one of them)")
            verify_advertisement(adv, self._ca, now=self._now, revoked=self.policy.revoked)
        commits = [a.graph_commit for a in roster.participants]
        if len(set(commits)) != len(commits):
            raise CryptoError("roster repeats a graph commitment: refusing the round")
        self.roster = roster
        self.me = roster.index_of(self._own.name)
        self.sparse = cfg.neighbours < n - 1
        self._roster_statement = roster_statement(cfg.round_id, cfg.base_version,
                                                  roster_digest(roster))
        return RosterAck(cfg.round_id, self.me, sign(self._signing_key,
                                                     self._roster_statement))

    # -- round 1: every hospital holds the same roster, then the graph seed --------------
    def _on_acks(self, acks: RosterAcks) -> SeedReveal:
        assert self.roster is not None
        cfg, parts = self.roster.config, self.roster.participants
        if acks.round_id != cfg.round_id:
            raise RemoteProtocolError("roster acknowledgements for another round")
        if set(acks.signatures) != set(range(1, len(parts) + 1)):
            raise CryptoError(
                "not every hospital on the roster acknowledged it: this hospital reveals its "
                "share of the graph seed only when all have, refusing the round")
        for u, sig in sorted(acks.signatures.items()):
            if not verify(pki.load_cert(parts[u - 1].cert_der), sig, self._roster_statement):
                raise CryptoError(
                    f"'{parts[u - 1].name}' acknowledged another roster than this hospital "
                    "holds: the server showed hospitals different rosters; refusing the round")
        return SeedReveal(cfg.round_id, self.me, self._seed_value)

    def _on_reveals(self, reveals: SeedReveals) -> ShareKeys:
        assert self.roster is not None and self._update is not None
        roster = self.roster
        cfg, parts, n = roster.config, roster.participants, len(roster.participants)
        if reveals.round_id != cfg.round_id:
            raise RemoteProtocolError("graph-seed values for another round")
        if set(reveals.values) != set(range(1, n + 1)):
            raise CryptoError("not every hospital revealed its share of the graph seed: "
                              "refusing the round")
        if reveals.values[self.me] != self._seed_value:
            raise CryptoError("the server altered this hospital's own graph-seed value: "
                              "refusing the round")
        for u, value in sorted(reveals.values.items()):
            a = parts[u - 1]
            if len(value) != 32 or graph_commitment(cfg.round_id, cfg.base_version, a.name,
                                                    value) != a.graph_commit:
                raise CryptoError(
                    f"the graph-seed value of '{a.name}' does not match what its keys "
                    "committed to: refusing the round")
        seed = graph_seed(cfg, [reveals.values[u] for u in range(1, n + 1)])
        self._graph = graph.neighbours(n, cfg.neighbours, seed)
        self._neighbours = self._graph[self.me]
        ctx = round_context(cfg)

        rand = self._rand
        b_u = rand.self_mask_seed()
        self._b = b_u
        holders = self._neighbours | {self.me}  # keep a share of our own, as Bonawitz does
        t = cfg.threshold
        b_shares = shamir.split(b_u, sorted(holders), t, rand.coefficients("b", t - 1))
        s_shares = shamir.split(self._s.private_bytes(), sorted(holders), t,
                                rand.coefficients("s", t - 1))
        self._held[self.me] = (b_shares[self.me], s_shares[self.me])
        digests = {
            v: share_digest(cfg, b"b", self.me, v, shamir.share_to_bytes(b_shares[v]))
            + share_digest(cfg, b"s", self.me, v, shamir.share_to_bytes(s_shares[v]))
            for v in sorted(holders)}
        envelopes = {}
        for v in sorted(self._neighbours):
            key = self._c.agree(roster.participants[v - 1].c_pk, ENVELOPE_KEY, ctx)
            self._envelope_keys[v] = key
            envelopes[v] = envelope.seal(
                key,
                round_id=cfg.round_id,
                base_version=cfg.base_version,
                sender=self.me,
                recipient=v,
                b_share=shamir.share_to_bytes(b_shares[v]),
                s_share=shamir.share_to_bytes(s_shares[v]),
                nonce=rand.nonce(v),
            )
        return ShareKeys(cfg.round_id, self.me, envelopes, digests,
                         self_mask_commit(cfg, self.me, b_u))

    # -- round 2 -----------------------------------------------------------------------
    def _on_envelopes(self, bundle: EnvelopeBundle) -> MaskedInput:
        assert self.roster is not None and self._update is not None
        cfg = self.roster.config
        if bundle.round_id != cfg.round_id or bundle.recipient != self.me:
            raise RemoteProtocolError("share envelopes addressed to another round or hospital")
        senders = set(bundle.envelopes)
        if not senders <= self._neighbours:
            raise RemoteProtocolError("share envelopes from hospitals that are not neighbours")
        if set(bundle.digests) != senders:
            raise RemoteProtocolError("share envelopes without their dealers' share digests")
        if len(senders) + 1 < cfg.threshold:  # our own share counts: we hold it
            # Masking with fewer than t holders' shares would leave the self mask as the
            # only mask on some view a server can unmask (Bonawitz et al. 2017, Fig. 4).
            raise CryptoError(
                f"only {len(senders)} other hospital(s) shared keys with this one; at least "
                f"{cfg.threshold - 1} are needed before it may mask its update: refusing the "
                "round, nothing was sent")
        for u in sorted(senders):
            b_raw, s_raw = envelope.open_envelope(
                self._envelope_keys[u],
                bundle.envelopes[u],
                round_id=cfg.round_id,
                base_version=cfg.base_version,
                sender=u,
                recipient=self.me,
            )
            # The server checks the shares this hospital returns against these digests:
            # a dealer that committed to other shares than it sent would get an honest
            # holder named as the cheat, so the holder refuses the round instead.
            if bundle.digests[u] != (share_digest(cfg, b"b", u, self.me, b_raw)
                                     + share_digest(cfg, b"s", u, self.me, s_raw)):
                raise CryptoError(
                    f"the key shares '{self.roster.participants[u - 1].name}' sent this "
                    "hospital do not match the digests it gave the server: refusing the "
                    "round, nothing was sent")
            self._held[u] = (shamir.share_from_bytes(b_raw), shamir.share_from_bytes(s_raw))

        ctx = round_context(cfg)
        enc = cfg.encoding
        y = enc.encode(self._update, self._weight)
        masks = MaskBuffer(y.shape[0], enc.dtype)
        masks.add(y, derive_seed(self._b, SELF_MASK, ctx))
        for v in sorted(senders):  # mask only with neighbours whose shares arrived (U1)
            s_uv = self._s.agree(self.roster.participants[v - 1].s_pk, PAIR_MASK, ctx)
            if self.me < v:
                masks.add(y, s_uv)
            else:
                masks.subtract(y, s_uv)
        self._update = None  # the clear update is no longer needed
        return MaskedInput(cfg.round_id, self.me, y)

    def _check_policy(self, roster: Roster) -> None:
        """Refuse a roster that falls below this hospital's own floors (one sentence each)."""
        cfg, pol = roster.config, self.policy
        n = len(roster.participants)
        enc = cfg.encoding
        if cfg.neighbours < n - 1 and not pol.allow_sparse:
            raise CryptoError(
                f"the server chose a sparse SecAgg+ graph ({cfg.neighbours} neighbours of "
                f"{n - 1}), which this hospital's policy does not accept: refusing the round, "
                "nothing was sent")
        if n < pol.contributors_floor:
            raise CryptoError(
                f"the round has {n} hospitals; with {pol.colluders} assumed colluder(s) this "
                f"hospital needs at least {pol.contributors_floor} so that every sum holds two "
                "honest ones: refusing the round, nothing was sent")
        if cfg.neighbours < n - 1:
            self._check_sparse(cfg.neighbours, cfg.threshold, n)
        floor = pol.threshold_floor(cfg.neighbours + 1)
        if cfg.threshold < floor:
            raise CryptoError(
                f"the round's threshold {cfg.threshold} is below {floor}, the least that "
                f"stops a server showing hospitals different survivor lists with "
                f"{pol.colluders} assumed colluder(s): refusing the round, nothing was sent")
        if floor > cfg.neighbours + 1:
            raise CryptoError(
                f"with {pol.colluders} assumed colluder(s) no threshold is safe for "
                f"{cfg.neighbours + 1} share holders: refusing the round, nothing was sent")
        if (enc.ring_bits not in pol.ring_bits or enc.clip > pol.max_clip
                or enc.scale < pol.min_scale):
            raise CryptoError(
                f"the round's encoding ({enc.ring_bits}-bit ring, clip {enc.clip:g}) is outside "
                "this hospital's policy: refusing the round, nothing was sent")
        names = frozenset(a.name for a in roster.participants)
        if pol.required_survivors is not None and names != pol.required_survivors:
            raise CryptoError(
                "this update's masked input already went into a round that failed; it may "
                "only go into a retry of exactly the same hospitals ("
                f"{', '.join(sorted(pol.required_survivors))}), and this round has "
                f"{', '.join(sorted(names))}: refusing, as two sums of different hospitals "
                "could be subtracted to expose one")
        # Same hospitals and same updates, but another encoding (a lower max_weight that
        # caps one hospital's count, another clip) would give another sum: the difference
        # of the two exposes e.g. the heaviest hospital's update.
        if pol.required_encoding is not None and enc != pol.required_encoding:
            raise CryptoError(
                "this update's masked input already went into a round that failed, and this "
                f"retry uses another encoding ({_describe(enc)}) than the round whose list "
                f"this hospital signed ({_describe(pol.required_encoding)}): refusing, as the "
                "two sums could be subtracted to expose one hospital; nothing was sent")

    def _check_sparse(self, k: int, t: int, n: int) -> None:
        """A sparse graph must be at least as dense, and its threshold at least as high, as
        this hospital's own analysis (Bell et al. 2020) gives for its assumed corrupted and
        dropped fractions: the server's numbers are never taken on trust."""
        pol = self.policy
        want = choose_graph(n, corrupt_fraction=pol.corrupt_fraction,
                            dropout_fraction=pol.dropout_fraction, colluders=pol.colluders)
        if not want.sparse:
            raise CryptoError(
                f"with {n} hospitals this hospital's policy calls for the full graph (a "
                f"sparse one would save little or not be safe), and the server chose {k} "
                f"neighbours of {n - 1}: refusing the round, nothing was sent")
        self.assumed_corrupt = want.corrupt
        if k < want.degree:
            raise CryptoError(
                f"the server's SecAgg+ graph gives each hospital {k} neighbours; with {n} "
                f"hospitals, {want.corrupt} assumed dishonest and {want.dropped} dropout(s) "
                f"this hospital needs at least {want.degree}: refusing the round, nothing "
                "was sent")
        floor = sparse_threshold_floor(n, k, want.corrupt)
        if t < floor:
            raise CryptoError(
                f"the round's threshold {t} is below {floor}, the least that keeps a "
                f"hospital's {k} neighbours from rebuilding both of its masks with "
                f"{want.corrupt} assumed dishonest hospital(s): refusing the round, nothing "
                "was sent")

    # -- round 3: consistency check ------------------------------------------------------
    def _on_consistency(self, req: ConsistencyRequest) -> ConsistencySignature:
        assert self.roster is not None
        cfg = self.roster.config
        survivors = tuple(req.survivors)
        if req.round_id != cfg.round_id:
            raise RemoteProtocolError("survivor list for another round")
        if list(survivors) != sorted(set(survivors)):
            raise RemoteProtocolError("the survivor list is not sorted and unique")
        n = len(self.roster.participants)
        if not set(survivors) <= set(range(1, n + 1)):
            # Numbers outside the roster would pad the survivor count past the threshold
            # while every real hospital but one is declared dropped.
            raise CryptoError(
                "the survivor list names hospitals that are not in the round's roster: "
                "refusing, as answering could reveal another hospital's update")
        if self.me not in survivors:
            raise RemoteProtocolError("the survivor list does not name this hospital")
        if not (set(survivors) & self._neighbours) <= set(self._held):
            raise CryptoError(
                "the survivor list names hospitals that never shared keys with this one: "
                "refusing the round")
        needed = max(cfg.threshold, cfg.min_contributors, self.policy.contributors_floor)
        if len(survivors) < needed:
            raise CryptoError(
                f"only {len(survivors)} hospital(s) would be combined; at least {needed} are "
                "needed to keep each one hidden: refusing the round")
        if self.sparse:
            allowed = dropout_allowance(n, self.policy.dropout_fraction)
            if n - len(survivors) > allowed:
                # The analysis that sized k and t assumed at most this many dropouts; past
                # it, the survivors' graph may split or a neighbourhood fall below t.
                raise CryptoError(
                    f"{n - len(survivors)} of the round's {n} hospitals are not on the "
                    f"survivor list; this hospital's policy allows at most {allowed} "
                    "(dropout_fraction) in a sparse round: refusing to sign the list")
        if not graph.connected(self._graph, frozenset(survivors)):
            # Sparse graph only (the full graph is always connected): the sum of each piece
            # could be unmasked on its own, so fewer hospitals than agreed would be combined.
            raise CryptoError(
                "the survivors' masks do not form one connected graph, so the sum of a "
                "smaller group could be unmasked on its own: refusing to sign the list")
        names = frozenset(self.roster.participants[u - 1].name for u in survivors)
        required = self.policy.required_survivors
        if required is not None and names != required:
            raise CryptoError(
                "this retry combines other hospitals than the round whose list this "
                "hospital signed before: refusing, as the two sums could be subtracted")
        self._statement = survivors_statement(cfg.round_id, cfg.base_version,
                                              self._base_sha256, roster_digest(self.roster),
                                              survivors)
        self._survivors = survivors
        self.signed_survivors = tuple(sorted(names))
        self.signed_encoding = cfg.encoding
        return ConsistencySignature(cfg.round_id, self.me,
                                    sign(self._signing_key, self._statement))

    # -- round 4: unmask -----------------------------------------------------------------
    def _check_signers(self, signers: frozenset[int]) -> None:
        """A share of u's secrets leaves only when t of u's own share holders (its
        neighbours and itself) signed this list -- not any t hospitals.

        Why per neighbourhood: honest holders sign one list each, so two lists (u survived
        / u dropped) cannot both reach t among u's holders while 2t > holders + dishonest
        holders.  Counted over everyone instead, a server could hand each of u's holders
        its own list, padded with signatures of hospitals that hold nothing of u, and
        gather both of u's secrets without a single colluder (test_secagg_plus.py).
        """
        assert self.roster is not None
        t = self.roster.config.threshold
        for u in sorted(self._held):
            holders = self._graph[u] | {u}
            got = len(holders & signers)
            if got < t:
                who = ("this hospital" if u == self.me else
                       f"'{self.roster.participants[u - 1].name}'")
                raise CryptoError(
                    f"only {got} of the {len(holders)} hospitals holding shares of {who} "
                    f"signed the survivor list; {t} must before any share is revealed: "
                    "refusing to unmask")

    def _on_unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        assert self.roster is not None
        cfg = self.roster.config
        if req.round_id != cfg.round_id:
            raise RemoteProtocolError("unmask request for another round")
        if tuple(req.survivors) != self._survivors:
            raise CryptoError(
                "the unmask request names other survivors than the list this hospital "
                "signed: refusing, as answering could reveal another hospital's update")
        if not set(req.signatures) <= set(self._survivors):
            raise CryptoError("the unmask request carries signatures of hospitals that are "
                              "not on the survivor list: refusing")
        for u, sig in req.signatures.items():
            cert = pki.load_cert(self.roster.participants[u - 1].cert_der)
            if not verify(cert, sig, self._statement):
                raise CryptoError(
                    f"the signature of '{self.roster.participants[u - 1].name}' on the "
                    "survivor list does not verify (it signed another list, roster or "
                    "round): refusing to unmask")
        self._check_signers(frozenset(req.signatures))
        known = set(self._held)
        survivors = set(self._survivors)
        b_for = sorted(survivors & known)
        s_for = sorted(known - survivors)  # shared keys with us, masked input not summed
        return UnmaskResponse(
            cfg.round_id,
            self.me,
            {u: shamir.share_to_bytes(self._held[u][0]) for u in b_for},
            {u: shamir.share_to_bytes(self._held[u][1]) for u in s_for},
        )
