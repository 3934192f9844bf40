"""A scripted dishonest server for the sans-I/O secure-aggregation round, and its arithmetic.

Why a harness: a hospital's defences are only worth what a server that deviates from the
protocol can still get out of it.  ``Adversary`` plays the server message by message
against REAL ``ClientRound`` objects (unmodified honest hospitals), optionally with
colluding hospitals: they run the real round too and then hand the server everything they
hold (the shares others sent them, their own secrets, a signature on any list it asks for).
It records every answer and every refusal, and then does what an attacker would do with
them: rebuild self-mask seeds b_u and mask keys s_sk_u from the Shamir shares it gathered
(``securefl.crypto.shamir``) and strip the masks off masked inputs (``recover``).

``exposed()`` asks the question that matters: can the attacker rebuild any single honest
hospital's encoded update bit for bit?  Attacking the hospital's own masked input y_T is
the attacker's strongest position: any sum that holds T's update carries T's masks too, so
removing them needs the same secrets.  Tests first show, with a defence bypassed, that this
arithmetic does recover an update; otherwise "not exposed" could pass vacuously.

Not covered here: attack 3 (a ``joined`` reply announcing plain masking) exists only on the
wire, so the TLS harness that drives the real hospital session tests it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from securefl.crypto import graph, pki, shamir
from securefl.crypto.keys import KeyPair, sign, survivors_statement
from securefl.crypto.messages import (
    ConsistencyRequest,
    EnvelopeBundle,
    KeyAdvertisement,
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
from securefl.crypto.secagg import ClientRound
from securefl.crypto.secagg.common import (
    PAIR_MASK,
    SELF_MASK,
    graph_seed,
    roster_digest,
    round_context,
)
from securefl.crypto.secagg.policy import RoundPolicy, split_view_threshold
from securefl.crypto.simulate import federation
from securefl.errors import CryptoError, SecureFLError

#: One federation for every test: hospital-000 .. hospital-099 and their CA (cached).
FEDERATION_SIZE = 100
#: The sha256 of the base model every hospital says it trained on.
BASE_SHA256 = hashlib.sha256(b"global model, version 0").digest()
ENCODING = Encoding.auto(max_clients=100, max_weight=1000)


def hospital_data(index: int, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """The update and sample count of hospital ``index``: the same in every round, as a
    resend after a failed round would be.  Counts fall with the index (the first 40), all
    distinct."""
    rng = np.random.default_rng([seed, index])
    return rng.normal(0, 0.1, dim).astype(np.float32), (300 - 7 * index if index < 40
                                                         else 400 + index)


@dataclass
class Party:
    """One hospital of the harness: a real ``ClientRound`` and what it was given."""

    index: int
    cred: pki.Credential
    update: np.ndarray
    weight: int
    client: ClientRound
    colluding: bool

    @property
    def name(self) -> str:
        return self.cred.name

    @property
    def me(self) -> int:
        """Participant number in the roster it accepted (0 before, or if it refused)."""
        return self.client.me


class Adversary:
    """The server, scripted by a test one step at a time.

    ``members``: federation indices of the hospitals in the round (default the first n);
    the last ``colluders`` of them collude with the server.  ``policy``: one RoundPolicy
    for every hospital, or a function index -> policy.  ``client_kw``: extra ClientRound
    arguments by index (another base_sha256, a member list).
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        members: Sequence[int] | None = None,
        colluders: int = 0,
        policy: RoundPolicy | Callable[[int], RoundPolicy] | None = None,
        dim: int = 32,
        round_id: int = 1,
        base_version: int = 0,
        client_kw: Mapping[int, Mapping[str, object]] | None = None,
    ) -> None:
        self.ca, creds = federation(FEDERATION_SIZE)
        indices = list(members) if members is not None else list(range(n or 0))
        self.round_id, self.base_version, self.dim = round_id, base_version, dim
        policy_of = policy if callable(policy) else (lambda _i: policy or RoundPolicy())
        self.parties: list[Party] = []
        for j, i in enumerate(indices):
            update, weight = hospital_data(i, dim)
            kw: dict[str, object] = dict(
                cert=creds[i].cert, signing_key=creds[i].key, ca_cert=self.ca.cert,
                round_id=round_id, base_version=base_version, update=update, weight=weight,
                base_sha256=BASE_SHA256, policy=policy_of(i))
            kw.update((client_kw or {}).get(i, {}))
            self.parties.append(Party(i, creds[i], update, weight, ClientRound(**kw),
                                      colluding=j >= len(indices) - colluders))
        self.adverts: dict[str, KeyAdvertisement] = {}
        self.roster: Roster | None = None
        self.shown: dict[str, Roster] = {}            # the roster each hospital was shown
        self.graph: dict[int, frozenset[int]] = {}    # once every value was revealed
        self.share_keys: dict[int, ShareKeys] = {}
        self.y: dict[int, np.ndarray] = {}            # masked inputs by participant number
        self.mask_sets: dict[int, frozenset[int]] = {}  # whose envelopes each one got
        self.signatures: dict[int, bytes] = {}        # honest signatures, on any list
        self.responses: dict[int, UnmaskResponse] = {}
        self.refusals: dict[str, SecureFLError] = {}
        self.b_pool: dict[int, dict[int, int]] = {}   # owner -> {holder: share of b}
        self.s_pool: dict[int, dict[int, int]] = {}   # owner -> {holder: share of s_sk}

    # -- who is who ----------------------------------------------------------------------
    @property
    def honest(self) -> list[Party]:
        return [p for p in self.parties if not p.colluding]

    @property
    def colluders(self) -> list[Party]:
        return [p for p in self.parties if p.colluding]

    def party(self, number: int) -> Party:
        assert self.roster is not None
        name = self.roster.participants[number - 1].name
        return next(p for p in self.parties if p.name == name)

    def number(self, party: Party) -> int:
        assert self.roster is not None
        return self.roster.index_of(party.name)

    def _ask(self, party: Party, msg: object) -> object | None:
        """Give a hospital one message; its answer, or None with the refusal recorded."""
        if party.name in self.refusals:
            return None
        try:
            return party.client.receive(msg)  # type: ignore[call-overload]
        except SecureFLError as exc:
            self.refusals[party.name] = exc
            return None

    def refusal(self, party: Party) -> SecureFLError:
        """The typed error the hospital refused with (fails the test if it answered)."""
        assert party.name in self.refusals, f"{party.name} answered the attack"
        return self.refusals[party.name]

    # -- round 0 and 1 ---------------------------------------------------------------------
    def advertise(self) -> dict[str, KeyAdvertisement]:
        for p in self.parties:
            self.adverts[p.name] = p.client.advertise()
        return self.adverts

    def make_roster(
        self,
        *,
        threshold: int | None = None,
        neighbours: int | None = None,
        encoding: Encoding | None = None,
        min_contributors: int = 2,
        assumed_colluders: int = 1,
        adverts: Collection[KeyAdvertisement] | None = None,
        round_id: int | None = None,
    ) -> Roster:
        """A roster of the advertised keys with whatever parameters the server likes; the
        threshold defaults to the least a hospital assuming ``assumed_colluders`` takes."""
        advs = sorted(adverts if adverts is not None else self.adverts.values(),
                      key=lambda a: a.name)
        n = len(advs)
        k = neighbours if neighbours is not None else n - 1
        t = threshold or min(k + 1, split_view_threshold(k + 1, assumed_colluders))
        config = RoundConfig(
            round_id=self.round_id if round_id is None else round_id,
            base_version=self.base_version, vector_len=self.dim, threshold=t, neighbours=k,
            encoding=encoding or ENCODING,
            min_contributors=min_contributors)
        return Roster(config, tuple(advs))

    def enrol(self, **config: object) -> Roster:
        self.advertise()
        self.roster = self.make_roster(**config)  # type: ignore[arg-type]
        return self.roster

    def share(self, shown: Mapping[str, Roster] | None = None) -> dict[int, ShareKeys]:
        """Send the roster (or, per hospital name, another one), then every acknowledgement
        and every graph-seed value as the protocol says; collect the key shares."""
        acks = self.acknowledge(shown)
        if not acks:
            return self.share_keys
        reveals = self.reveal(RosterAcks(self.round_id, acks))
        return self.draw(SeedReveals(self.round_id, reveals))

    def acknowledge(self, shown: Mapping[str, Roster] | None = None) -> dict[int, bytes]:
        """Round 1a: each hospital's signature on the roster it was shown."""
        assert self.roster is not None
        got: dict[int, bytes] = {}
        for p in self.parties:
            roster = (shown or {}).get(p.name, self.roster)
            self.shown[p.name] = roster
            out = self._ask(p, roster)
            if isinstance(out, RosterAck):
                got[out.sender] = out.signature
        return got

    def reveal(self, acks: RosterAcks | Mapping[str, RosterAcks]) -> dict[int, bytes]:
        """Round 1b: hand out acknowledgements (the same, or per name); collect values."""
        got: dict[int, bytes] = {}
        for p in self.parties:
            msg = acks.get(p.name) if isinstance(acks, Mapping) else acks
            if msg is None:
                continue
            out = self._ask(p, msg)
            if isinstance(out, SeedReveal):
                got[out.sender] = out.value
        return got

    def draw(self, reveals: SeedReveals) -> dict[int, ShareKeys]:
        """Round 1c: hand out every value; the graph is fixed; collect key shares."""
        assert self.roster is not None
        n = len(self.roster.participants)
        if set(reveals.values) == set(range(1, n + 1)):
            seed = graph_seed(self.roster.config, [reveals.values[u] for u in range(1, n + 1)])
            self.graph = graph.neighbours(n, self.roster.config.neighbours, seed)
        for p in self.parties:
            out = self._ask(p, reveals)
            if isinstance(out, ShareKeys):
                self.share_keys[out.sender] = out
        return self.share_keys

    # -- round 2 ------------------------------------------------------------------------------
    def bundle(self, recipient: int, withhold: Collection[int] = ()) -> EnvelopeBundle:
        envelopes = {u: sk.envelopes[recipient] for u, sk in sorted(self.share_keys.items())
                     if recipient in sk.envelopes and u not in withhold}
        return EnvelopeBundle(self.round_id, recipient, envelopes,
                              {u: self.share_keys[u].digests[recipient] for u in envelopes})

    def deliver(self, party: Party, bundle: EnvelopeBundle) -> np.ndarray | None:
        out = self._ask(party, bundle)
        y = getattr(out, "y", None)
        if y is not None:
            self.y[party.me] = y
            self.mask_sets[party.me] = frozenset(bundle.envelopes)
        return y

    def mask(self, withhold: Mapping[int, Collection[int]] | None = None) -> dict[int, np.ndarray]:
        """Route the envelopes (minus ``withhold[recipient]``) and collect masked inputs."""
        for p in self.parties:
            if p.me in self.share_keys:
                self.deliver(p, self.bundle(p.me, (withhold or {}).get(p.me, ())))
        return self.y

    # -- round 3: the consistency check ----------------------------------------------------
    def statement(self, survivors: Sequence[int], roster: Roster | None = None) -> bytes:
        """The bytes a survivor signs, as a colluder would compute them."""
        r = roster or self.roster
        assert r is not None
        return survivors_statement(r.config.round_id, r.config.base_version, BASE_SHA256,
                                   roster_digest(r), tuple(survivors))

    def collect_signatures(
        self, lists: Sequence[int] | Mapping[int, Sequence[int]],
        parties: Collection[Party] | None = None,
    ) -> dict[int, bytes]:
        """Send each honest hospital a survivor list (the same one, or one per participant
        number); returns the signatures that came back, by signer."""
        got: dict[int, bytes] = {}
        for p in parties if parties is not None else self.honest:
            if p.me not in self.y:
                continue
            listed = lists.get(p.me) if isinstance(lists, Mapping) else lists
            if listed is None:
                continue
            out = self._ask(p, ConsistencyRequest(self.round_id, tuple(listed)))
            sig = getattr(out, "signature", None)
            if sig is not None:
                got[p.me] = self.signatures[p.me] = sig
        return got

    def colluder_signatures(self, survivors: Sequence[int],
                            roster: Roster | None = None) -> dict[int, bytes]:
        """Colluders sign any list the server wants, as often as it wants."""
        statement = self.statement(survivors, roster)
        return {p.me: sign(p.cred.key, statement) for p in self.colluders
                if p.me in survivors}

    # -- round 4 ----------------------------------------------------------------------------
    def unmask(self, requests: UnmaskRequest | Mapping[int, UnmaskRequest],
               parties: Collection[Party] | None = None) -> dict[int, UnmaskResponse]:
        """Send unmask requests to honest hospitals (by default those that signed a list);
        keep every share that comes back."""
        got: dict[int, UnmaskResponse] = {}
        asked = parties if parties is not None else [p for p in self.honest
                                                      if p.me in self.signatures]
        for p in asked:
            req = requests.get(p.me) if isinstance(requests, Mapping) else requests
            if req is None:
                continue
            out = self._ask(p, req)
            if isinstance(out, UnmaskResponse):
                got[p.me] = self.responses[p.me] = out
                for owner, raw in out.b_shares.items():
                    self.b_pool.setdefault(owner, {})[p.me] = shamir.share_from_bytes(raw)
                for owner, raw in out.s_shares.items():
                    self.s_pool.setdefault(owner, {})[p.me] = shamir.share_from_bytes(raw)
        return got

    def to_masked_inputs(self, **config: object) -> tuple[int, ...]:
        """Enrol, share keys and collect every masked input honestly; returns who sent one
        (the honest survivor list)."""
        self.enrol(**config)
        self.share()
        self.mask()
        return tuple(sorted(self.y))

    def honest_round(self, **config: object) -> tuple[int, ...]:
        """Run the round as the protocol says (everyone listed, everyone signs, unmask);
        returns the survivor list."""
        listed = self.to_masked_inputs(**config)
        sigs = {**self.collect_signatures(listed), **self.colluder_signatures(listed)}
        self.unmask(UnmaskRequest(self.round_id, listed, sigs))
        return listed

    # -- the arithmetic ---------------------------------------------------------------------
    def _threshold(self, owner: int) -> int:
        """t of the polynomial ``owner`` shared its secrets with (from the roster it took)."""
        return self.shown[self.party(owner).name].config.threshold

    def _s_pk(self, u: int) -> bytes:
        assert self.roster is not None
        return self.roster.participants[u - 1].s_pk

    def self_mask_seed(self, u: int) -> bytes | None:
        """b_u: a colluder's own, or rebuilt from t gathered shares (honest and colluders')."""
        p = self.party(u)
        if p.colluding:
            return p.client._b
        shares = dict(self.b_pool.get(u, {}))
        for c in self.colluders:  # colluders hand over the shares they hold
            if u in c.client._held:
                shares[c.me] = c.client._held[u][0]
        if len(shares) < self._threshold(u):
            return None
        return shamir.reconstruct(shares, self._threshold(u))

    def mask_key(self, u: int) -> KeyPair | None:
        """s_sk_u: a colluder's own, or rebuilt from t shares and checked against s_pk_u."""
        p = self.party(u)
        if p.colluding:
            return p.client._s
        shares = dict(self.s_pool.get(u, {}))
        for c in self.colluders:
            if u in c.client._held:
                shares[c.me] = c.client._held[u][1]
        if len(shares) < self._threshold(u):
            return None
        try:
            key = KeyPair.from_private_bytes(shamir.reconstruct(shares, self._threshold(u)))
        except CryptoError:
            return None
        return key if key.public == self._s_pk(u) else None

    def recover(self, members: Collection[int]) -> np.ndarray | None:
        """sum of y_u over ``members`` with every mask stripped that the attacker can
        rebuild; None as soon as one it needs is out of reach.

        Masks between two members cancel in the sum when both applied them; every other
        mask (a self mask, or a pair mask with anyone outside ``members``) must be rebuilt:
        b_u from its shares, s_uv from s_sk_u or s_sk_v."""
        assert self.roster is not None
        if not members or any(u not in self.y for u in members):
            return None
        cfg = self.roster.config
        ctx = round_context(cfg)
        total = np.sum([self.y[u] for u in members], axis=0, dtype=cfg.encoding.dtype)
        masks = MaskBuffer(total.shape[0], cfg.encoding.dtype)
        for u in sorted(members):
            b_u = self.self_mask_seed(u)
            if b_u is None:
                return None
            masks.subtract(total, derive_seed(b_u, SELF_MASK, ctx))
            for v in sorted(self.mask_sets[u]):
                if v in members and u in self.mask_sets.get(v, ()):
                    continue  # +PRG(s_uv) and -PRG(s_uv) are both in the sum
                s_u, s_v = self.mask_key(u), self.mask_key(v)
                if s_u is not None:
                    seed = s_u.agree(self._s_pk(v), PAIR_MASK, ctx)
                elif s_v is not None:
                    seed = s_v.agree(self._s_pk(u), PAIR_MASK, ctx)
                else:
                    return None
                if u < v:  # u added +PRG(s_uv)
                    masks.subtract(total, seed)
                else:
                    masks.add(total, seed)
        return total

    def encoded(self, members: Collection[int]) -> np.ndarray:
        """What the masked inputs of ``members`` add up to once unmasked: their encoded
        updates (each with its sample count, capped by the roster it accepted)."""
        out = None
        for u in members:
            p = self.party(u)
            enc = self.shown[p.name].config.encoding
            y = enc.encode(p.update, min(p.weight, enc.max_weight))
            out = y if out is None else out + y
        assert out is not None
        return out

    def exposed(self) -> list[str]:
        """Honest hospitals whose own encoded update the attacker rebuilds bit for bit."""
        found = []
        for p in self.honest:
            if p.me in self.y:
                got = self.recover({p.me})
                if got is not None and np.array_equal(got, self.encoded({p.me})):
                    found.append(p.name)
        return found
