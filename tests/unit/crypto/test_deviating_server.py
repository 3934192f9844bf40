"""A server that deviates from the protocol, played against the real hospital round.

Each test is one attack from the secure-aggregation review (issue 12), or one the issue
adds, scripted with ``tests.adversary.Adversary`` against unmodified ``ClientRound``
objects, some of them with colluding hospitals whose secrets the server holds.  Each asserts
(a) that the honest hospitals refuse with a typed error that says why, and (b), where the
attacker collected answers, that its unmasking arithmetic rebuilds no single honest
hospital's encoded update.  The ``test_control_*`` tests run the same arithmetic with one
defence taken out and show that it then does expose a hospital: (b) cannot pass vacuously.

Attack 3 (the server announces plain masking) exists only on the wire: the TLS harness that
drives the real hospital session covers it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from securefl.client.outbox import Outbox
from securefl.crypto import pki
from securefl.crypto.membership import MemberList
from securefl.crypto.messages import (
    ConsistencyRequest,
    EnvelopeBundle,
    RosterAcks,
    UnmaskRequest,
)
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ClientRound, ClientState, ServerRound
from securefl.crypto.secagg.params import GraphChoice, choose_graph
from securefl.crypto.secagg.policy import RoundPolicy
from securefl.errors import (
    CryptoError,
    RemoteProtocolError,
    SecureFLError,
    StaleVersionError,
    UpdateAlreadySentError,
)
from tests.adversary import ENCODING, Adversary, Party

#: (n, c): the split-view cases of the review, n hospitals of which c collude.
SPLITS = [(5, 1), (10, 2), (30, 6)]


def refused(adv: Adversary, party: Party, kind: type[SecureFLError], *phrases: str) -> None:
    """The hospital refused with ``kind`` and a message that says each of ``phrases``."""
    err = adv.refusal(party)
    assert isinstance(err, kind), f"{party.name}: {err!r}"
    for phrase in phrases:
        assert phrase in str(err), f"{party.name}: {phrase!r} not in {str(err)!r}"


def test_control_an_honest_round_unmasks_the_sum_and_no_single_update() -> None:
    """The harness's arithmetic is right: the protocol's own unmask gives the exact sum of
    the encoded updates, and even with a colluder no single honest update."""
    adv = Adversary(5, colluders=1)
    listed = adv.honest_round()
    assert adv.refusals == {}
    assert np.array_equal(adv.recover(listed), adv.encoded(listed))
    assert adv.exposed() == []


# -- attack 1: survivor lists padded with numbers outside the roster ----------------------

@pytest.mark.parametrize("n", [3, 5, 10, 30])
def test_survivor_lists_padded_with_numbers_outside_the_roster_are_refused(n: int) -> None:
    """Per-hospital lists {me, target, t made-up numbers} would make every hospital count t
    survivors while revealing the target's self-mask share and every other key share."""
    adv = Adversary(n)
    t = adv.enrol().config.threshold
    adv.share()
    adv.mask()
    target = adv.parties[0].me
    fake = {0} | set(range(n + 1, n + 1 + t))
    lists = {p.me: tuple(sorted({p.me, target} | fake)) for p in adv.parties}
    assert adv.collect_signatures(lists) == {}
    for p in adv.parties:
        refused(adv, p, CryptoError, "not in the round's roster", "refusing")
    assert adv.recover({target}) is None and adv.exposed() == []


# -- attack 2: withheld envelopes --------------------------------------------------------

@contextmanager
def holder_check_bypassed(client: ClientRound) -> Iterator[None]:
    """The defence against attack 2 taken out: while masking, the hospital believes t = 1,
    so it masks with whatever shares arrived, as hospitals did before the check."""
    saved = client.roster
    assert saved is not None
    client.roster = dataclasses.replace(saved, config=dataclasses.replace(saved.config,
                                                                          threshold=1))
    try:
        yield
    finally:
        client.roster = saved


def test_control_a_hospital_masking_with_its_self_mask_only_is_exposed() -> None:
    adv = Adversary(5)
    adv.enrol()
    adv.share()
    target, *others = adv.parties
    with holder_check_bypassed(target.client):
        adv.deliver(target, adv.bundle(target.me, withhold=[p.me for p in others]))
    for p in others:
        adv.deliver(p, adv.bundle(p.me))
    everyone = tuple(sorted(adv.y))
    # An ordinary survivor list: the four others sign it (t = 4) and reveal their shares of
    # the target's self-mask seed, as they must for any survivor.
    adv.unmask(UnmaskRequest(1, everyone, adv.collect_signatures(everyone)))
    assert adv.exposed() == [target.name]


@pytest.mark.parametrize("n", [3, 5, 10])
def test_a_hospital_does_not_mask_with_fewer_than_t_share_holders(n: int) -> None:
    adv = Adversary(n)
    t = adv.enrol().config.threshold
    adv.share()
    target, *others = adv.parties
    kept = {p.me for p in others[: t - 2]}  # with its own share: t - 1 holders
    adv.mask(withhold={target.me: [p.me for p in others if p.me not in kept]})
    refused(adv, target, CryptoError, f"only {t - 2} other hospital(s) shared keys",
            f"at least {t - 1} are needed", "nothing was sent")
    assert target.me not in adv.y and adv.recover({target.me}) is None
    # One more holder (t counting its own share) and it masks, as the protocol says.
    again = Adversary(n)
    again.enrol()
    again.share()
    target, *others = again.parties
    y = again.deliver(target, again.bundle(target.me, [p.me for p in others[t - 1:]]))
    assert y is not None and again.refusals == {}


# -- attack 4: differencing two rounds on one base version --------------------------------

def journalled_round(tmp_path: Path, adv: Adversary, *, listed: bool = True,
                     abandoned: bool = True) -> dict[int, Outbox]:
    """Round 1 journalled into each hospital's outbox exactly as the session does; the
    server unmasks it when a list was signed and then (``abandoned``) says it failed."""
    boxes, journals = {}, {}
    for p in adv.parties:
        boxes[p.index] = Outbox(tmp_path / p.name)
        journals[p.index], required = boxes[p.index].begin(adv.base_version, p.weight,
                                                            p.update, max_attempts=3)
        assert required is None
    adv.enrol()
    adv.share()
    for p in adv.parties:
        journals[p.index]("masked-input", adv.round_id)  # before it leaves
    adv.mask()
    if listed:
        everyone = tuple(sorted(adv.y))
        sigs = adv.collect_signatures(everyone)
        for p in adv.parties:
            journals[p.index]("signed", adv.round_id, survivors=p.client.signed_survivors,
                              encoding=p.client.signed_encoding)
        adv.unmask(UnmaskRequest(adv.round_id, everyone, sigs))
        assert np.array_equal(adv.recover(everyone), adv.encoded(everyone))
    if abandoned:
        for p in adv.parties:
            journals[p.index]("abandoned", adv.round_id)
    return boxes


def test_control_a_retry_without_one_hospital_exposes_it_when_nothing_binds_the_others(
        ) -> None:
    """The server unmasks round 1, says it failed, and opens round 2 without the target;
    the others resend the same updates.  Hospitals bound by nothing expose it."""
    first = Adversary(5)
    sum1 = first.recover(first.honest_round())
    retry = Adversary(members=[1, 2, 3, 4], round_id=2)
    sum2 = retry.recover(retry.honest_round())
    assert sum1 is not None and sum2 is not None
    assert np.array_equal(sum1 - sum2, first.encoded({first.parties[0].me}))


def test_a_retry_without_one_hospital_is_refused_by_everyone_bound_to_the_signed_list(
        tmp_path: Path) -> None:
    first = Adversary(5)
    boxes = journalled_round(tmp_path, first)
    names = frozenset(p.name for p in first.parties)
    required = {i: box.check_can_send(0) for i, box in boxes.items()}
    assert {r.survivors for r in required.values()} == {names}
    retry = Adversary(members=[1, 2, 3, 4], round_id=2,
                      policy=lambda i: RoundPolicy(**required[i].policy_fields()))
    retry.honest_round()
    for p in retry.parties:
        refused(retry, p, CryptoError, "only go into a retry of exactly the same hospitals",
                "could be subtracted")
    assert retry.y == {} and retry.share_keys == {}  # no second sum to subtract


def test_a_retry_that_leaves_a_hospital_off_the_survivor_list_is_refused(
        tmp_path: Path) -> None:
    """The same hospitals, but at the consistency check the server says the target's
    masked input did not arrive: the sum would be the first one minus the target's."""
    boxes = journalled_round(tmp_path, Adversary(5))
    required = {i: box.check_can_send(0) for i, box in boxes.items()}
    retry = Adversary(5, round_id=2,
                      policy=lambda i: RoundPolicy(**required[i].policy_fields()))
    retry.to_masked_inputs()
    assert retry.refusals == {}
    target, *others = retry.parties
    without = tuple(u for u in sorted(retry.y) if u != target.me)
    assert retry.collect_signatures(without) == {}
    for p in others:
        refused(retry, p, CryptoError, "this retry combines other hospitals", "subtracted")
    refused(retry, target, RemoteProtocolError, "does not name this hospital")
    assert retry.responses == {} and retry.exposed() == []


def test_an_update_whose_masked_input_left_without_a_signed_list_goes_nowhere_else(
        tmp_path: Path) -> None:
    """The server abandons round 1 after the masked inputs left, before any list was
    signed: the update may be in a sum the server holds, so the outbox refuses every
    round on that base version (the session never builds a ClientRound for it)."""
    boxes = journalled_round(tmp_path / "unlisted", Adversary(5), listed=False)
    for box in boxes.values():
        with pytest.raises(UpdateAlreadySentError, match="goes into no other round on "
                           "version 0; wait for the next version"):
            box.check_can_send(0)
        assert box.check_can_send(1) is None
    # A round that never reported back locks the base version as well, signed or not.
    boxes = journalled_round(tmp_path / "pending", Adversary(5), abandoned=False)
    for box in boxes.values():
        with pytest.raises(UpdateAlreadySentError, match="already left in round 1, which "
                           "has not reported back"):
            box.check_can_send(0)


def test_control_a_retry_with_a_lower_max_weight_exposes_the_heaviest_hospital() -> None:
    """The same hospitals and updates, but the retry's roster caps the sample count just
    below the largest: only the heaviest hospital's terms change, so the difference of the
    two sums is its update times (its count - the cap).  A required survivor set alone
    (what the session passes) does not stop this."""
    first = Adversary(5)
    sum1 = first.recover(first.honest_round())
    heaviest, second = first.parties[:2]  # 300 and 293 samples
    capped = dataclasses.replace(ENCODING, max_weight=second.weight)
    retry = Adversary(5, round_id=2, policy=RoundPolicy(
        required_survivors=frozenset(p.name for p in first.parties)))
    sum2 = retry.recover(retry.honest_round(encoding=capped))
    assert retry.refusals == {} and sum1 is not None and sum2 is not None
    diff = (sum1 - sum2).view(np.int32)
    assert diff[-1] == heaviest.weight - capped.max_weight
    estimate = diff[:-1] / (float(diff[-1]) * ENCODING.scale)
    assert np.abs(estimate - heaviest.update).max() <= 1 / (float(diff[-1]) * ENCODING.scale)


def test_a_retry_with_another_encoding_than_the_signed_round_is_refused() -> None:
    first = Adversary(5)
    first.honest_round()
    bound = {p.index: RoundPolicy(required_survivors=frozenset(p.client.signed_survivors or ()),
                                  required_encoding=p.client.signed_encoding)
             for p in first.parties}
    assert all(b.required_encoding == ENCODING for b in bound.values())
    capped = dataclasses.replace(ENCODING, max_weight=first.parties[1].weight)
    for other in (capped, dataclasses.replace(ENCODING, clip=0.5)):
        retry = Adversary(5, round_id=2, policy=lambda i: bound[i])
        retry.honest_round(encoding=other)
        for p in retry.parties:
            refused(retry, p, CryptoError, "retry uses another encoding (",
                    "than the round whose list this hospital signed (", "nothing was sent")
        assert retry.share_keys == {} and retry.y == {}
    same = Adversary(5, round_id=3, policy=lambda i: bound[i])
    listed = same.honest_round()
    assert same.refusals == {} and same.exposed() == []
    assert np.array_equal(same.recover(listed), same.encoded(listed))


# -- attack 5: split views of the survivor list with c colluders --------------------------

def split_view(n: int, c: int, *, hospitals_assume: int,
               a_size: int | None = None) -> tuple[Adversary, Party, list[Party], list[Party]]:
    """Show group A "everyone but the target" (its members reveal shares of the target's
    mask key) and group B, with the target, "everyone" (they reveal shares of its self-mask
    seed); the colluders sign both lists.  ``a_size``: honest hospitals in A (default the
    even split, the attacker's best)."""
    adv = Adversary(n, colluders=c, policy=RoundPolicy(colluders=hospitals_assume))
    adv.enrol(assumed_colluders=hospitals_assume)
    adv.share()
    adv.mask()
    target, *others = adv.honest
    cut = (len(others) + 1) // 2 if a_size is None else a_size
    group_a, group_b = others[:cut], [target, *others[cut:]]
    everyone = tuple(sorted(adv.y))
    without = tuple(u for u in everyone if u != target.me)
    sig_a = {**adv.collect_signatures(without, group_a), **adv.colluder_signatures(without)}
    sig_b = {**adv.collect_signatures(everyone, group_b), **adv.colluder_signatures(everyone)}
    adv.unmask(UnmaskRequest(adv.round_id, without, sig_a), group_a)
    adv.unmask(UnmaskRequest(adv.round_id, everyone, sig_b), group_b)
    return adv, target, group_a, group_b


@pytest.mark.parametrize(("n", "c"), SPLITS)
def test_control_split_views_expose_a_hospital_under_the_old_majority_threshold(
        n: int, c: int) -> None:
    adv, target, _, _ = split_view(n, c, hospitals_assume=0)
    assert adv.roster is not None and adv.roster.config.threshold == n // 2 + 1
    assert adv.refusals == {}
    assert adv.exposed() == [target.name]


@pytest.mark.parametrize(("n", "c"), SPLITS)
def test_split_views_cannot_gather_t_signatures_on_two_lists(n: int, c: int) -> None:
    """With t = floor((n + c)/2) + 1 the honest hospitals, who sign one list each, and the
    c colluders, who sign both, never make t on both: whichever way the server splits
    them, one group refuses and the target's update stays hidden."""
    t, honest = (n + c) // 2 + 1, n - c
    for a_size in sorted({honest // 2, t - c, honest - (t - c)}):
        adv, target, group_a, group_b = split_view(n, c, hospitals_assume=c, a_size=a_size)
        assert adv.roster is not None and adv.roster.config.threshold == t
        short = [g for g in (group_a, group_b) if len(g) + c < t]
        assert short, "the split-view bound does not hold"
        for group in (group_a, group_b):
            for p in group:
                if group in short:
                    refused(adv, p, CryptoError, f"only {len(group) + c} of the",
                            f"signed the survivor list; {t} must", "refusing to unmask")
                else:  # the attacker got all it could from this group
                    assert p.me in adv.responses
        assert adv.recover({target.me}) is None
        assert adv.exposed() == []


# -- attack 6: revoked certificates -------------------------------------------------------

def test_a_roster_with_a_revoked_certificate_is_refused() -> None:
    """The server seats a revoked (say stolen) hospital identity it controls."""
    stolen = Adversary(5).parties[4].cred.cert.serial_number
    adv = Adversary(5, colluders=1, policy=RoundPolicy(revoked=frozenset({stolen})))
    adv.honest_round()
    for p in adv.honest:
        refused(adv, p, CryptoError, f"the certificate of '{adv.parties[4].name}' is revoked")
    assert adv.share_keys.keys() <= {adv.parties[4].me} and adv.exposed() == []


# -- attack 7: the round's parameters against the hospital's own policy -------------------

@pytest.mark.parametrize(("n", "c"), [(5, 1), (10, 2), (10, 3)])
def test_a_threshold_below_the_hospitals_split_view_floor_is_refused(n: int, c: int) -> None:
    floor = (n + c) // 2 + 1
    adv = Adversary(n, policy=RoundPolicy(colluders=c))
    adv.enrol(threshold=floor - 1)
    adv.share()
    for p in adv.parties:
        refused(adv, p, CryptoError, f"threshold {floor - 1} is below {floor}",
                f"{c} assumed colluder(s)", "nothing was sent")
    assert adv.share_keys == {}


@pytest.mark.parametrize(("n", "policy", "needed"), [
    (3, RoundPolicy(colluders=2), 4),
    (5, RoundPolicy(min_contributors=6), 6),
])
def test_a_round_smaller_than_the_hospitals_minimum_is_refused(n: int, policy: RoundPolicy,
                                                               needed: int) -> None:
    adv = Adversary(n, policy=policy)
    adv.enrol()
    adv.share()
    for p in adv.parties:
        refused(adv, p, CryptoError, f"the round has {n} hospitals",
                f"needs at least {needed}", "nothing was sent")
    assert adv.share_keys == {}


def test_a_survivor_list_smaller_than_the_hospitals_minimum_is_not_signed() -> None:
    """The roster's min_contributors is the server's word; a hospital's own floor holds
    at the survivor list too, where the server decides how many are combined."""
    strict = RoundPolicy(min_contributors=5)
    adv = Adversary(5, policy=lambda i: strict if i == 0 else RoundPolicy())
    adv.to_masked_inputs()
    four = tuple(sorted(adv.y))[:4]
    sigs = adv.collect_signatures(four)
    refused(adv, adv.parties[0], CryptoError, "only 4 hospital(s) would be combined",
            "at least 5 are needed")
    assert set(sigs) == {p.me for p in adv.parties[1:4]}  # the others' floor is lower
    adv.unmask(UnmaskRequest(1, four, sigs))  # 3 signatures, t = 4
    assert adv.responses == {} and adv.exposed() == []


def test_a_sparse_graph_is_refused_without_the_hospitals_opt_in() -> None:
    choice = choose_graph(30, corrupt_fraction=0.05, dropout_fraction=0.1, colluders=1)
    assert (choice.degree, choice.threshold) == (10, 7)
    adv = Adversary(30)
    adv.enrol(neighbours=10, threshold=7)
    adv.share()
    for p in adv.parties:
        refused(adv, p, CryptoError, "sparse SecAgg+ graph (10 neighbours of 29)",
                "does not accept")
    opted = Adversary(30, policy=RoundPolicy(allow_sparse=True))
    opted.enrol(neighbours=10, threshold=7)
    assert len(opted.share()) == 30 and opted.refusals == {}


@pytest.mark.parametrize(("policy", "encoding", "shown"), [
    (RoundPolicy(ring_bits=frozenset({64})), ENCODING, "32-bit ring"),
    (RoundPolicy(), Encoding.auto(clip=20.0, max_clients=100, max_weight=1000), "clip 20"),
])
def test_an_encoding_outside_the_hospitals_policy_is_refused(policy: RoundPolicy,
                                                             encoding: Encoding,
                                                             shown: str) -> None:
    adv = Adversary(5, policy=policy)
    adv.enrol(encoding=encoding)
    adv.share()
    for p in adv.parties:
        refused(adv, p, CryptoError, shown, "outside this hospital's policy")
    assert adv.share_keys == {}


def test_a_max_weight_below_a_sample_count_caps_it_and_the_answers_show_nothing() -> None:
    """A refusal here would tell the server one bit of a hospital's count per roster; a
    hospital above the limit answers exactly like one below it, with its count capped."""
    low = dataclasses.replace(ENCODING, max_weight=290)
    adv = Adversary(5)
    listed = adv.honest_round(encoding=low)
    assert adv.refusals == {}
    assert [p.weight > 290 for p in adv.parties] == [True, True, False, False, False]
    assert [p.client.weight_capped for p in adv.parties] == [True, True, False, False, False]
    for sk in adv.share_keys.values():  # same recipients, same sizes, whatever the count
        assert set(sk.envelopes) == set(listed) - {sk.sender}
    assert len({len(ct) for sk in adv.share_keys.values() for ct in sk.envelopes.values()}) == 1
    total = adv.recover(listed)
    assert total is not None and int(total[-1]) == sum(min(p.weight, 290) for p in adv.parties)
    assert np.array_equal(total, adv.encoded(listed)) and adv.exposed() == []


# -- attack 8: other model bytes under one version number ---------------------------------

def test_keys_over_other_model_bytes_are_refused_by_everyone() -> None:
    """Model inconsistency (Pasquini et al., CCS 2022): one hospital got other weights
    under the same version.  Its round keys carry the sha256 it received."""
    adv = Adversary(5, client_kw={0: {"base_sha256": b"\x01" * 32}})
    adv.enrol()
    adv.share()
    odd, *others = adv.parties
    for p in others:
        refused(adv, p, CryptoError, f"'{odd.name}' was given other model bytes",
                "refusing the round")
    refused(adv, odd, CryptoError, "was given other model bytes")
    assert adv.share_keys == {}


def test_the_server_tells_a_hospital_whose_model_bytes_are_not_the_stored_ones(fed5) -> None:
    ca, creds = fed5
    server = ServerRound(round_id=1, base_version=0, vector_len=16, encoding=Encoding(),
                         ca_cert=ca.cert, base_sha256=b"\x02" * 32)
    damaged = ClientRound(cert=creds[0].cert, signing_key=creds[0].key, ca_cert=ca.cert,
                          round_id=1, base_version=0, update=np.zeros(16, np.float32),
                          weight=10, base_sha256=b"\x03" * 32)
    with pytest.raises(StaleVersionError, match=r"sha256 differs.*get the global model again"):
        server.receive(damaged.advertise(), from_name=creds[0].name)
    assert server.joined == []


# -- replays, rosters, the consistency check, membership ----------------------------------

@pytest.mark.parametrize(("replay", "kind", "phrase"), [
    ("the whole roster", RemoteProtocolError, "roster is for round 1, not 2"),
    ("the whole roster, round id reused", CryptoError, "altered this hospital's own round keys"),
    ("two hospitals' keys", RemoteProtocolError, "keys of 'hospital-003' belong to another round"),
    ("two hospitals' keys, relabelled", CryptoError,
     "round keys of 'hospital-003' carry a bad signature"),
])
def test_an_earlier_rounds_roster_or_keys_are_refused(replay: str, kind: type[SecureFLError],
                                                       phrase: str) -> None:
    old = Adversary(5, round_id=1)
    old_roster = old.enrol()
    new = Adversary(5, round_id=1 if "reused" in replay else 2)
    new.advertise()
    fresh = [new.adverts[p.name] for p in new.parties[:3]]
    stale = [old.adverts[p.name] for p in old.parties[3:]]
    if "relabelled" in replay:
        stale = [dataclasses.replace(a, round_id=2) for a in stale]
    new.roster = old_roster if "roster" in replay else new.make_roster(adverts=fresh + stale)
    new.share()
    assert new.share_keys == {}
    for p in new.parties if "roster" in replay else new.parties[:3]:
        refused(new, p, kind, phrase)


@pytest.mark.parametrize("round_id", [1, 2])
def test_survivor_signatures_from_an_earlier_round_do_not_count(round_id: int) -> None:
    """Signatures on the same list of an earlier round (even one with the same round id)
    are over another roster: the target alone has signed this round's list."""
    old = Adversary(5, round_id=1)
    old.honest_round()
    new = Adversary(5, round_id=round_id)
    new.to_masked_inputs()
    target = new.parties[0]
    everyone = tuple(sorted(new.y))
    mine = new.collect_signatures(everyone, [target])
    new.unmask(UnmaskRequest(round_id, everyone, {**old.signatures, **mine}), [target])
    refused(new, target, CryptoError, "does not verify", "refusing to unmask")
    assert new.responses == {} and new.exposed() == []


def test_hospitals_shown_different_rosters_stop_before_sharing_anything() -> None:
    """Every hospital signs the roster it holds, and reveals its graph-seed value only on
    seeing all n signatures on that same roster: two groups shown different rosters (here
    a higher threshold for one) both stop there, before a key share is made.  (Were they
    let through, their survivor-list signatures would not count for each other either:
    the roster digest is in the signed statement.)"""
    adv = Adversary(5, colluders=1)
    roster = adv.enrol()
    other = dataclasses.replace(roster, config=dataclasses.replace(roster.config,
                                                                   threshold=5))
    second = adv.honest[2:]
    shown = {p.name: other for p in second}
    acks = adv.acknowledge(shown)
    assert len(acks) == 5  # each signed what it was shown
    assert adv.reveal(RosterAcks(1, acks)) == {}
    for p in adv.honest:
        refused(adv, p, CryptoError, "acknowledged another roster", "refusing the round")
    assert adv.share_keys == {} and adv.exposed() == []


def _lie(name: str) -> Callable[[Adversary, tuple[int, ...], dict[int, bytes]], UnmaskRequest]:
    def build(adv: Adversary, listed: tuple[int, ...], sigs: dict[int, bytes]) -> UnmaskRequest:
        honest = adv.parties[1].me
        colluder = adv.colluders[0].me
        if name == "forged":
            return UnmaskRequest(1, listed, {**sigs, honest: b"\x30\x06\x02\x01\x01\x02\x01\x01"})
        if name == "on another list":
            other = adv.colluder_signatures(listed[1:])
            return UnmaskRequest(1, listed, {**sigs, colluder: other[colluder]})
        if name == "under another number":
            return UnmaskRequest(1, listed, {**sigs, honest: sigs[colluder]})
        if name == "too few":
            return UnmaskRequest(1, listed, dict(list(sigs.items())[:3]))
        if name == "from outside the list":
            return UnmaskRequest(1, listed, {**sigs, 99: sigs[honest]})
        if name == "another list than signed":
            return UnmaskRequest(1, listed[1:], sigs)
        if name == "padded list":
            return UnmaskRequest(1, (*listed, 6, 7), sigs)
        assert name == "another round"
        return UnmaskRequest(2, listed, sigs)
    return build


@pytest.mark.parametrize(("lie", "kind", "phrase"), [
    ("forged", CryptoError, "signature of 'hospital-001' on the survivor list does not verify"),
    ("on another list", CryptoError, "signature of 'hospital-004' on the survivor list does "
     "not verify"),
    ("under another number", CryptoError, "of 'hospital-001' on the survivor list does not"),
    ("too few", CryptoError, "only 3 of the 5 hospitals holding shares of this hospital "
                             "signed the survivor list; 4 must"),
    ("from outside the list", CryptoError, "signatures of hospitals that are not on the"),
    ("another list than signed", CryptoError, "other survivors than the list this hospital "
     "signed"),
    ("padded list", CryptoError, "other survivors than the list this hospital signed"),
    ("another round", RemoteProtocolError, "unmask request for another round"),
])
def test_lies_in_the_unmask_request_are_refused(lie: str, kind: type[SecureFLError],
                                                phrase: str) -> None:
    adv = Adversary(5, colluders=1)
    listed = adv.to_masked_inputs()
    sigs = {**adv.collect_signatures(listed), **adv.colluder_signatures(listed)}
    target = adv.parties[0]
    adv.unmask(_lie(lie)(adv, listed, sigs), [target])
    refused(adv, target, kind, phrase)
    assert adv.responses == {} and adv.exposed() == []


@pytest.mark.parametrize(("make_list", "kind", "phrase"), [
    (lambda me, everyone: tuple(u for u in everyone if u != me), RemoteProtocolError,
     "does not name this hospital"),
    (lambda me, everyone: tuple(reversed(everyone)), RemoteProtocolError, "not sorted"),
    (lambda me, everyone: (*everyone[:-1], everyone[-2]), RemoteProtocolError, "unique"),
    (lambda me, everyone: everyone, CryptoError, "never shared keys with this one"),
    (lambda me, everyone: (me, *everyone[2:4]), CryptoError,
     "only 3 hospital(s) would be combined"),
])
def test_a_survivor_list_that_could_expose_a_hospital_is_not_signed(
        make_list: Callable[[int, tuple[int, ...]], tuple[int, ...]],
        kind: type[SecureFLError], phrase: str) -> None:
    """The last-but-one case: the server withheld one hospital's envelopes from the target
    (it still had t - 1 others) and then lists that hospital as a survivor."""
    adv = Adversary(5)
    adv.enrol()
    adv.share()
    target = adv.parties[0]
    adv.mask(withhold={target.me: [adv.parties[1].me]})
    assert adv.refusals == {}
    everyone = tuple(sorted(adv.y))
    assert adv.collect_signatures(make_list(target.me, everyone), [target]) == {}
    refused(adv, target, kind, phrase)


def test_a_hospital_signs_one_list_and_answers_one_unmask_request() -> None:
    adv = Adversary(5, colluders=1)
    listed = adv.to_masked_inputs()
    sigs = {**adv.collect_signatures(listed), **adv.colluder_signatures(listed)}
    answered, signed_only = adv.parties[0], adv.parties[1]
    assert adv.unmask(UnmaskRequest(1, listed, sigs), [answered])
    shorter = listed[:4]
    with pytest.raises(RemoteProtocolError, match="UnmaskRequest is not allowed while the "
                       "round is finished"):
        answered.client.receive(UnmaskRequest(1, shorter, sigs))
    with pytest.raises(RemoteProtocolError, match="ConsistencyRequest is not allowed while "
                       "the round is waiting for the unmask request"):
        signed_only.client.receive(ConsistencyRequest(1, shorter))
    assert set(adv.responses) == {answered.me} and adv.exposed() == []


@pytest.mark.parametrize(("stage", "message"), [
    ("advertised", lambda adv: EnvelopeBundle(1, 1, {}, {})),
    ("advertised", lambda adv: UnmaskRequest(1, (1, 2, 3, 4, 5), {})),
    ("shared", lambda adv: ConsistencyRequest(1, (1, 2, 3, 4, 5))),
    ("masked", lambda adv: UnmaskRequest(1, tuple(sorted(adv.y)), {})),  # no consistency step
    ("masked", lambda adv: adv.roster),
])
def test_messages_out_of_order_are_refused(stage: str,
                                           message: Callable[[Adversary], object]) -> None:
    adv = Adversary(5)
    adv.enrol()
    if stage != "advertised":
        adv.share()
    if stage == "masked":
        adv.mask()
    target = adv.parties[0]
    with pytest.raises(RemoteProtocolError, match="is not allowed while the round is"):
        target.client.receive(message(adv))  # type: ignore[call-overload]


def test_a_hospital_that_refused_a_message_answers_nothing_more_in_that_round() -> None:
    """The server tampers with one envelope after a good one; the hospital refuses the
    bundle, and must not take a second one: it would mask with fewer hospitals than it
    now holds shares of, and then sign a list naming one it never masked with."""
    adv = Adversary(4, colluders=1)
    adv.enrol()
    adv.share()
    target, h1, h2, colluder = adv.parties
    tampered = _tampered_bundle(adv, target, good=h2, bad=colluder)
    assert adv.deliver(target, tampered) is None
    refused(adv, target, CryptoError, "failed authentication")
    with pytest.raises(RemoteProtocolError, match="not allowed while the round is abandoned"):
        target.client.receive(adv.bundle(target.me, withhold=[h2.me]))
    assert target.client.state is ClientState.FAILED
    for p in (h1, h2, colluder):
        adv.deliver(p, adv.bundle(p.me))
    _call_h1_dropped(adv, target, h2)
    assert adv.exposed() == []


def test_control_a_hospital_taking_a_second_bundle_after_a_refusal_is_exposed() -> None:
    adv = Adversary(4, colluders=1)
    adv.enrol()
    adv.share()
    target, h1, h2, colluder = adv.parties
    adv.deliver(target, _tampered_bundle(adv, target, good=h2, bad=colluder))
    # The defence taken out: as before, a refusal leaves the round where it was.
    target.client.state = ClientState.SHARED
    del adv.refusals[target.name]
    assert adv.deliver(target, adv.bundle(target.me, withhold=[h2.me])) is not None
    for p in (h1, h2, colluder):
        adv.deliver(p, adv.bundle(p.me))
    _call_h1_dropped(adv, target, h2)
    assert adv.exposed() == [target.name]


def test_a_list_naming_a_hospital_whose_envelopes_were_withheld_is_not_signed() -> None:
    """The target got h1's and the colluder's envelopes (t - 1 = 2, enough to mask) but
    not h2's; the list calls h1 dropped and names h2 instead."""
    adv = Adversary(4, colluders=1)
    adv.enrol()
    adv.share()
    target, _h1, h2, _colluder = adv.parties
    adv.mask(withhold={target.me: [h2.me]})
    _call_h1_dropped(adv, target, h2)
    refused(adv, target, CryptoError, "never shared keys with this one")
    refused(adv, h2, CryptoError, "only 2 of the 4 hospitals holding shares of "
            "'hospital-000' signed the survivor list; 3 must")
    assert adv.responses == {} and adv.exposed() == []


def test_control_a_list_naming_a_hospital_whose_envelopes_were_withheld_exposes() -> None:
    adv = Adversary(4, colluders=1)
    adv.enrol()
    adv.share()
    target, _h1, h2, _colluder = adv.parties
    adv.mask(withhold={target.me: [h2.me]})
    target.client._neighbours = frozenset()  # the defence taken out: no one to check
    _call_h1_dropped(adv, target, h2)
    assert adv.exposed() == [target.name]


def _tampered_bundle(adv: Adversary, target: Party, *, good: Party,
                     bad: Party) -> EnvelopeBundle:
    """``good``'s envelope, opened first, then ``bad``'s with one bit flipped."""
    assert good.me < bad.me
    ct = bytearray(adv.share_keys[bad.me].envelopes[target.me])
    ct[-3] ^= 0x80
    return EnvelopeBundle(1, target.me, {good.me: adv.share_keys[good.me].envelopes[target.me],
                                         bad.me: bytes(ct)},
                          {p.me: adv.share_keys[p.me].digests[target.me] for p in (good, bad)})


def _call_h1_dropped(adv: Adversary, target: Party, h2: Party) -> None:
    """n = 4, c = 1, t = 3, and the target masked with h1 and the colluder only.  The list
    {target, h2, colluder} calls h1 dropped: if the target signs it, three signatures make
    the target and h2 reveal shares of the target's self-mask seed and of h1's mask key,
    which is all it takes to strip the target's masks (the target and h1 were never
    together on a list, so no hospital revealed both secrets of one peer)."""
    listed = (target.me, h2.me, adv.colluders[0].me)
    sigs = {**adv.collect_signatures(listed, [target, h2]), **adv.colluder_signatures(listed)}
    adv.unmask(UnmaskRequest(1, listed, sigs), [target, h2])


def test_a_roster_with_a_hospital_not_on_the_member_list_is_refused() -> None:
    """The CA issued hospital-004's certificate, but the operator's signed member list does
    not name it: a server seating it (a test certificate, a stolen old one) is refused."""
    probe = Adversary(5)
    members = MemberList.issue(probe.ca.cert, probe.ca.key, {
        p.name: pki.cert_der(p.cred.cert) for p in probe.parties[:4]}, number=1,
        now=dt.datetime.now(dt.UTC))
    adv = Adversary(5, colluders=1, client_kw={i: {"members": members} for i in range(4)})
    adv.enrol()
    adv.share()
    for p in adv.honest:
        refused(adv, p, CryptoError, "the round names 'hospital-004', who is not a member",
                "nothing was sent")
    assert adv.share_keys.keys() <= {adv.parties[4].me}


def test_a_roster_that_leaves_this_hospital_out_is_refused() -> None:
    adv = Adversary(6)
    adv.advertise()
    roster = adv.make_roster(adverts=[adv.adverts[p.name] for p in adv.parties[1:]])
    with pytest.raises(RemoteProtocolError, match="the roster does not name this hospital"):
        adv.parties[0].client.receive(roster)


def test_a_revocation_list_not_signed_by_the_ca_is_refused(fed5, other_ca) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding as Enc

    ca, _ = fed5
    intruder_ca, _ = other_ca
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
              .last_update(now).next_update(now + dt.timedelta(days=1))
              .add_extension(x509.CRLNumber(99), critical=False)
              .sign(intruder_ca.key, hashes.SHA256()))
    with pytest.raises(CryptoError, match="not signed by this federation's CA"):
        pki.load_crl(forged.public_bytes(Enc.DER), ca.cert)


def test_a_survivor_list_whose_masks_split_into_pieces_is_not_signed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse graph (opted in), k = 2 over 10 hospitals: the pairwise masks form a ring.
    Declaring two non-adjacent hospitals dropped splits the survivors into two arcs whose
    masks cancel separately, so each arc's sum could be unmasked on its own.  Hospitals
    refuse to sign such a list; a connected one (one dropout) they sign.

    The hospitals' own analysis would refuse k = 2 outright (see the degree tests); it is
    taken out here so that this defence, the connectivity check, is tested on its own."""
    from securefl.crypto import graph
    from securefl.crypto.secagg import client as client_module

    monkeypatch.setattr(client_module, "choose_graph", lambda n, **_kw: GraphChoice(
        n=n, degree=2, threshold=2, corrupt=0, dropped=2))
    policy = RoundPolicy(colluders=0, allow_sparse=True, dropout_fraction=0.2)
    adv = Adversary(10, policy=policy)
    adv.enrol(neighbours=2, assumed_colluders=0)
    adv.share()
    adv.mask()
    ring = adv.graph
    a = 1
    b = next(v for v in range(3, 11) if v not in ring[a] and not graph.connected(
        ring, frozenset(range(1, 11)) - {a, v}))
    split = tuple(u for u in range(1, 11) if u not in (a, b))
    assert adv.collect_signatures(split) == {}
    for p in adv.honest:
        if p.me in split:
            refused(adv, p, CryptoError, "do not form one connected graph")
    assert adv.exposed() == []

    again = Adversary(10, policy=policy)
    again.enrol(neighbours=2, assumed_colluders=0)
    again.share()
    again.mask()
    one_out = tuple(range(2, 11))
    assert set(again.collect_signatures(one_out)) == set(one_out)
