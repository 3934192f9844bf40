"""SecAgg+ (sparse graph) against a server that deviates: the four attacks of issue 13.

1. The degree is the server's choice: k = 2 for n = 100, or n = 10 with two dropouts
   splitting the ring.  Each hospital now sizes the least k and t it accepts from its own
   assumed fractions (``params.choose_graph``, rounding counts up) and refuses less.
2. Split views without colluders: each of the target's share holders gets its own survivor
   list, padded with signatures of hospitals that hold nothing of the target.  Hospitals
   now count signatures per neighbourhood (t of the target's own holders).
3. Grinding the graph seed: the server drew it, so it could draw until its colluders were
   the target's neighbours.  The seed is now the hash of every hospital's value, committed
   in its signed advertisement and revealed only after everyone acknowledged one roster.
4. Grinding through the advertisements: re-signed or regenerated keys change nothing the
   seed depends on; a withheld value aborts the round, and hospitals count each reveal
   against ``max_attempts`` per base version.

Every defence is shown with its control: the same attack with the defence taken out does
expose the target (or does bias the graph), so the arithmetic is the real one.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from securefl.client.outbox import Outbox
from securefl.crypto import graph
from securefl.crypto.keys import KeyPair, roster_statement, sign, sign_advertisement
from securefl.crypto.messages import Roster, RosterAcks, RoundConfig, UnmaskRequest
from securefl.crypto.secagg import ClientRound
from securefl.crypto.secagg import client as client_module
from securefl.crypto.secagg.common import graph_commitment, graph_seed, roster_digest
from securefl.crypto.secagg.params import GraphChoice, choose_graph
from securefl.crypto.secagg.policy import RoundPolicy, split_view_threshold
from securefl.errors import CryptoError, UpdateAlreadySentError
from tests.adversary import BASE_SHA256, ENCODING, Adversary

SPARSE = RoundPolicy(allow_sparse=True)


# -- attack 1: the degree --------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k", "says"), [
    (100, 2, "needs at least 28"),
    (100, 26, "needs at least 28"),
    (10, 2, "calls for the full graph"),
    (16, 8, "calls for the full graph"),  # k = 8 is safe at 16 but saves less than half
])
def test_a_degree_below_the_hospitals_own_analysis_is_refused(n: int, k: int,
                                                              says: str) -> None:
    adv = Adversary(n, policy=SPARSE)
    t = split_view_threshold(k + 1, 1)
    adv.enrol(neighbours=k, threshold=min(t, k + 1))
    assert adv.acknowledge() == {}
    for p in adv.parties:
        assert says in adv.refusal(p).message
        assert "nothing was sent" in adv.refusal(p).message


def test_a_threshold_below_the_analysis_for_the_servers_degree_is_refused() -> None:
    """A server may choose more neighbours than a hospital needs, but then t must rise
    with them: 2t > k + 1 + the neighbours assumed dishonest."""
    adv = Adversary(30, policy=SPARSE)
    adv.enrol(neighbours=12, threshold=7)  # the analysis gives t = 8 for k = 12 at n = 30
    assert adv.acknowledge() == {}
    assert "threshold 7 is below 8" in adv.refusal(adv.parties[0]).message
    ok = Adversary(30, policy=SPARSE)
    ok.enrol(neighbours=12, threshold=8)
    assert len(ok.acknowledge()) == 30


def test_the_analysis_keeps_the_survivors_graph_whole_for_every_allowed_dropout() -> None:
    """The issue's attack 1 in full: with k = 2 and two ordinary dropouts the survivors'
    ring splits and even an honest server learns two partial sums.  At the degree the
    analysis gives, no set of up to the allowed dropouts (rounded up) splits it."""
    n = 30
    choice = choose_graph(n, corrupt_fraction=0.05, dropout_fraction=0.1, colluders=1)
    g = graph.neighbours(n, choice.degree, os.urandom(32))
    everyone = frozenset(range(1, n + 1))
    for gone in itertools.combinations(range(1, n + 1), choice.dropped):
        assert graph.connected(g, everyone - set(gone))
    # Control: the ring the issue found, k = 2, splits with two dropouts.
    ring = graph.neighbours(n, 2, os.urandom(32))
    assert any(not graph.connected(ring, everyone - set(gone))
               for gone in itertools.combinations(range(1, n + 1), 2))


def test_a_list_with_more_dropouts_than_the_hospital_allows_is_not_signed() -> None:
    adv = Adversary(30, policy=SPARSE)
    listed = adv.to_masked_inputs(neighbours=10, threshold=7)
    assert adv.graph and len(listed) == 30
    four_out = listed[4:]  # 4 dropped; ceil(0.1 * 30) = 3 allowed
    assert adv.collect_signatures(four_out) == {}
    assert "allows at most 3 (dropout_fraction)" in adv.refusal(adv.parties[10]).message
    again = Adversary(30, policy=SPARSE)
    listed = again.to_masked_inputs(neighbours=10, threshold=7)
    three_out = tuple(u for u in listed if u not in (1, 2, 3))
    assert set(again.collect_signatures(three_out)) == set(three_out)


# -- attack 2: split views without colluders -------------------------------------------------
def _padded_split_views(adv: Adversary, target: int) -> None:
    """The issue's attack 2, no colluder needed: each neighbour w of the target gets its
    own list, the whole round minus the target's other neighbours, so w reveals its share
    of the target's self-mask seed and of every other neighbour's mask key; the target and
    everyone else get the round minus all the target's neighbours.  Each list is signed
    by its owner and t - 1 hospitals that hold nothing of that owner (each signs the one
    list it is handed), and each unmask request carries the signatures on its list."""
    assert adv.roster is not None
    n, t = len(adv.roster.participants), adv.roster.config.threshold
    g, near = adv.graph, adv.graph[target]
    everyone = set(range(1, n + 1))
    lists = {u: tuple(sorted(everyone - near)) for u in everyone}
    free = sorted(everyone - near - {target})
    for w in sorted(near):
        mine = tuple(sorted(everyone - (near - {w})))
        lists[w] = mine
        pads = [u for u in free if u not in g[w]][:t - 1]
        for u in pads:
            lists[u] = mine
            free.remove(u)
    signatures = adv.collect_signatures(lists)
    requests = {u: UnmaskRequest(adv.round_id, lists[u],
                                 {v: s for v, s in signatures.items() if lists[v] == lists[u]})
                for u in everyone}
    adv.unmask(requests, adv.parties)


def _sparse_by_hand(monkeypatch: pytest.MonkeyPatch, k: int, t: int) -> RoundPolicy:
    """The hospitals' degree analysis out of the way, so that the issue's own small
    graphs (no colluder assumed, the majority threshold) can be run; a dropout cap high
    enough for the attack's lists."""
    monkeypatch.setattr(client_module, "choose_graph", lambda n, **_kw: GraphChoice(
        n=n, degree=k, threshold=t, corrupt=0, dropped=n))
    return RoundPolicy(allow_sparse=True, colluders=0, dropout_fraction=0.45,
                       corrupt_fraction=0.0)


@pytest.mark.parametrize("connectivity", ["checked", "not checked"])
@pytest.mark.parametrize(("n", "k"), [(30, 6), (100, 8)])
def test_split_views_padded_with_non_neighbours_reveal_nothing(
        monkeypatch: pytest.MonkeyPatch, n: int, k: int, connectivity: str) -> None:
    """The per-neighbourhood count alone stops it (the connectivity check, which also
    refuses the target's isolating list, is taken out in one case)."""
    policy = _sparse_by_hand(monkeypatch, k, split_view_threshold(k + 1, 0))
    if connectivity == "not checked":
        monkeypatch.setattr(client_module.graph, "connected", lambda *_a: True)
    adv = Adversary(n, policy=policy)
    adv.to_masked_inputs(neighbours=k, assumed_colluders=0)
    _padded_split_views(adv, 1)
    assert adv.exposed() == []
    for w in adv.graph[1]:
        assert "holding shares of" in adv.refusal(adv.party(w)).message


@pytest.mark.parametrize(("n", "k"), [(30, 6), (100, 8)])
def test_control_split_views_expose_a_hospital_when_any_t_signatures_count(
        monkeypatch: pytest.MonkeyPatch, n: int, k: int) -> None:
    """The same attack against hospitals that count any t signatures (the rule before the
    per-neighbourhood check) and do not check connectivity: the target's update is
    rebuilt bit for bit, with no colluding hospital."""
    policy = _sparse_by_hand(monkeypatch, k, split_view_threshold(k + 1, 0))

    def any_t(self: ClientRound, signers: frozenset[int]) -> None:
        assert self.roster is not None
        if len(signers) < self.roster.config.threshold:
            raise CryptoError("too few signatures")

    monkeypatch.setattr(ClientRound, "_check_signers", any_t)
    monkeypatch.setattr(client_module.graph, "connected", lambda *_a: True)
    adv = Adversary(n, policy=policy)
    adv.to_masked_inputs(neighbours=k, assumed_colluders=0)
    _padded_split_views(adv, 1)
    assert adv.party(1).name in adv.exposed()


def test_at_the_analysed_degree_the_padded_lists_are_not_even_signed() -> None:
    """With the parameters the hospitals compute (n = 30: k = 10, t = 7, at most 3
    dropouts), every padded list drops more of the round than a hospital signs for."""
    adv = Adversary(30, policy=SPARSE)
    adv.to_masked_inputs(neighbours=10, threshold=7)
    _padded_split_views(adv, 1)
    assert adv.exposed() == [] and adv.responses == {}
    assert "dropout_fraction" in adv.refusal(adv.party(1)).message


# -- attacks 3 and 4: the graph seed -------------------------------------------------------
class SeedGrinder:
    """The server and every hospital but the target, trying to place chosen hospitals
    next to the target: it builds rosters of validly signed advertisements with any
    commitments it likes, signs every acknowledgement, sees the target's value first, and
    aborts whenever the graph does not suit it.  The target is a real ``ClientRound``."""

    def __init__(self, n: int = 30) -> None:
        from securefl.crypto.simulate import federation

        self.ca, self.creds = federation(30)
        self.n = n
        self.choice = choose_graph(n, corrupt_fraction=0.05, dropout_fraction=0.1,
                                   colluders=1)
        self.values = {c.name: os.urandom(32) for c in self.creds[1:n]}

    def attempt(self, round_id: int, journal: object = None) -> frozenset[str]:
        """One round up to the target's reveal; returns the target's neighbours' names."""
        target = self.creds[0]
        client = ClientRound(cert=target.cert, signing_key=target.key, ca_cert=self.ca.cert,
                             round_id=round_id, base_version=0,
                             update=np.full(8, 0.01, np.float32), weight=10,
                             base_sha256=BASE_SHA256, policy=SPARSE)
        adverts = [client.advertise()]
        for c in self.creds[1:self.n]:
            # Re-signed and regenerated each round, any commitment the server likes.
            adverts.append(sign_advertisement(
                c.key, c.cert, round_id=round_id, base_version=0,
                c_pk=KeyPair().public, s_pk=KeyPair().public, base_sha256=BASE_SHA256,
                graph_commit=graph_commitment(round_id, 0, c.name, self.values[c.name])))
        adverts.sort(key=lambda a: a.name)
        config = RoundConfig(round_id=round_id, base_version=0, vector_len=8,
                             threshold=self.choice.threshold, neighbours=self.choice.degree,
                             encoding=ENCODING)
        roster = Roster(config, tuple(adverts))
        client.receive(roster)
        statement = roster_statement(round_id, 0, roster_digest(roster))
        by_name = {c.name: c for c in self.creds}
        acks = {i: sign(by_name[a.name].key, statement)
                for i, a in enumerate(roster.participants, 1)}
        if journal is not None:
            journal("graph-drawn", round_id)  # as the hospital's session does, first
        mine = client.receive(RosterAcks(round_id, acks)).value
        values = [mine if a.name == target.name else self.values[a.name]
                  for a in roster.participants]
        g = graph.neighbours(self.n, self.choice.degree, graph_seed(config, values))
        me = roster.index_of(target.name)
        return frozenset(roster.participants[v - 1].name for v in g[me])


def test_the_target_s_neighbours_stay_uniform_however_the_server_grinds() -> None:
    """Over many aborted rounds, with the server and all other hospitals choosing their
    values and keys freely, each hospital lands next to the target about k / (n - 1) of
    the time: the target's own fresh value, hidden until every roster is signed, decides."""
    grinder = SeedGrinder()
    rounds = 150
    counts: Counter[str] = Counter()
    for r in range(rounds):
        counts.update(grinder.attempt(r + 1))
    k, others = grinder.choice.degree, grinder.n - 1
    expected = rounds * k / others
    chi2 = sum((counts[c.name] - expected) ** 2 / expected for c in grinder.creds[1:grinder.n])
    assert chi2 < 80  # 28 degrees of freedom: p < 1e-6 of a false alarm


def test_control_a_server_chosen_seed_places_colluders_at_will() -> None:
    """Before the commit-then-reveal draw the server picked the seed: milliseconds of
    grinding put three chosen hospitals next to the target (the issue's attack 3)."""
    n, k = 30, 10
    wanted = {2, 3, 4}
    for tries in range(1, 200_000):
        g = graph.neighbours(n, k, tries.to_bytes(32, "big"))
        if wanted <= g[1]:
            break
    assert wanted <= g[1] and tries < 200_000


def test_a_server_that_keeps_aborting_gets_at_most_max_attempts_draws(tmp_path: Path
                                                                       ) -> None:
    """Each reveal is counted before it leaves: on one base version the grinding server
    gets ``max_attempts`` graphs to choose from, then nothing more from this hospital."""
    outbox = Outbox(tmp_path)
    journal, _ = outbox.begin(0, 10, np.full(8, 0.01, np.float32), max_attempts=3)
    grinder = SeedGrinder()
    drawn = [grinder.attempt(r, journal) for r in (1, 2, 3)]
    assert len(drawn) == 3
    with pytest.raises(UpdateAlreadySentError, match="max_attempts"):
        grinder.attempt(4, journal)
    record = outbox.record()
    assert record is not None and record.graph_rounds == (1, 2, 3)
    # A later send of the same update on that version stops before joining anything.
    with pytest.raises(UpdateAlreadySentError, match=r"graph of 3 round\(s\) on version 0"):
        outbox.begin(0, 10, np.full(8, 0.01, np.float32), max_attempts=3)


def test_each_assumed_dishonest_hospital_adds_one_draw(tmp_path: Path) -> None:
    """Found by the adversary review: three hostile hospitals taking turns to withhold
    their values stopped three rounds and used up every honest hospital's draws, halting
    the version for good.  An honest server shuts each one out after one stop, so a
    hospital allows one more draw per hospital its analysis assumes dishonest."""
    outbox = Outbox(tmp_path)
    journal, _ = outbox.begin(0, 10, np.full(8, 0.01, np.float32), max_attempts=3)
    for r in (1, 2, 3, 4):
        journal("graph-drawn", r, spare=1)  # n = 20: one assumed dishonest hospital
    with pytest.raises(UpdateAlreadySentError, match=r"plus 1 for the hospitals it assumes"):
        journal("graph-drawn", 5, spare=1)
    with pytest.raises(UpdateAlreadySentError, match=r"graph of 4 round\(s\)"):
        outbox.begin(0, 10, np.full(8, 0.01, np.float32), max_attempts=3)
    journal("masked-input", 4)  # the sums cap is apart: the masked input may still go


def test_a_server_reusing_a_round_number_gets_no_uncounted_draw(tmp_path: Path) -> None:
    """Found by the adversary review: the cap counted distinct round numbers, so a server
    giving every retry the same number drew graphs without end."""
    outbox = Outbox(tmp_path)
    journal, _ = outbox.begin(0, 10, np.full(8, 0.01, np.float32), max_attempts=3)
    grinder = SeedGrinder()
    grinder.attempt(101, journal)
    with pytest.raises(UpdateAlreadySentError, match="reused round number 101"):
        grinder.attempt(101, journal)
    journal("masked-input", 102)
    with pytest.raises(UpdateAlreadySentError, match="reused round number 102"):
        journal("graph-drawn", 102)  # a graph after the masked input: another round
    with pytest.raises(UpdateAlreadySentError, match="reused round number 102"):
        journal("masked-input", 102)


def test_a_value_that_does_not_open_its_commitment_is_refused() -> None:
    """A colluder that sees the target's value first cannot change its own afterwards."""
    adv = Adversary(5, colluders=1)
    adv.enrol()
    acks = adv.acknowledge()
    values = adv.reveal(RosterAcks(1, acks))
    assert len(values) == 5
    late = adv.colluders[0].me
    swapped: Mapping[int, bytes] = {**values, late: os.urandom(32)}
    from securefl.crypto.messages import SeedReveals

    adv.draw(SeedReveals(1, swapped))
    for p in adv.honest:
        assert "does not match what its keys committed to" in adv.refusal(p).message
    assert adv.share_keys == {}


def test_a_withheld_value_gives_no_graph() -> None:
    adv = Adversary(5)
    adv.enrol()
    values = adv.reveal(RosterAcks(1, adv.acknowledge()))
    from securefl.crypto.messages import SeedReveals

    del values[2]
    adv.draw(SeedReveals(1, values))
    for p in adv.honest:
        assert "not every hospital revealed" in adv.refusal(p).message
    assert adv.share_keys == {}


def test_the_server_refuses_a_repeated_commitment_when_it_arrives() -> None:
    """Every hospital would refuse a roster repeating a commitment (a colluder copying an
    honest hospital's, hoping to reveal the same value): our server says so at once."""
    from securefl.crypto.secagg import ServerRound
    from securefl.crypto.simulate import federation
    from securefl.errors import RemoteProtocolError

    ca, creds = federation(30)
    server = ServerRound(round_id=1, base_version=0, vector_len=8, encoding=ENCODING,
                         ca_cert=ca.cert)
    first = sign_advertisement(creds[0].key, creds[0].cert, round_id=1, base_version=0,
                               c_pk=KeyPair().public, s_pk=KeyPair().public,
                               graph_commit=b"\x01" * 32)
    copy = sign_advertisement(creds[1].key, creds[1].cert, round_id=1, base_version=0,
                              c_pk=KeyPair().public, s_pk=KeyPair().public,
                              graph_commit=first.graph_commit)
    server.receive(first, from_name=creds[0].name)
    with pytest.raises(RemoteProtocolError, match="repeat a key or graph commitment"):
        server.receive(copy, from_name=creds[1].name)
    assert server.joined == [creds[0].name]


def test_the_server_stops_when_a_neighbourhood_lacks_t_signatures() -> None:
    """Rather than send unmask requests every hospital would refuse, the server fails the
    round at once, naming whose holders fell short."""
    from securefl.crypto.secagg import ServerRound
    from securefl.crypto.simulate import federation
    from securefl.errors import NotEnoughSurvivorsError

    ca, creds = federation(30)
    server = ServerRound(round_id=1, base_version=0, vector_len=8, encoding=ENCODING,
                         ca_cert=ca.cert, sparse=True)
    clients = {c.name: ClientRound(cert=c.cert, signing_key=c.key, ca_cert=ca.cert,
                                   round_id=1, base_version=0,
                                   update=np.full(8, 0.01, np.float32), weight=5,
                                   policy=SPARSE) for c in creds[:30]}
    for name, c in clients.items():
        server.receive(c.advertise(), from_name=name)
    for step in (server.close_enrolment, server.close_acks, server.close_reveals,
                 server.close_shares):
        out = step()
        for name, c in clients.items():
            msg = out[c.me] if isinstance(out, dict) else out
            server.receive(c.receive(msg), from_name=name)
    listed = server.close_inputs()
    target = 1
    near = server._graph[target] | {target}
    for name, c in clients.items():  # the target's holders do not sign
        if c.me not in near:
            server.receive(c.receive(listed), from_name=name)
    with pytest.raises(NotEnoughSurvivorsError, match="holding shares of 'hospital-000'"):
        server.close_check()
