"""The rules of a round, driven message by message: order, identity, refusals, privacy."""

import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest

from securefl.crypto import pki
from securefl.crypto.keys import KeyPair, sign_advertisement
from securefl.crypto.messages import (
    ConsistencyRequest,
    EnvelopeBundle,
    MaskedInput,
    UnmaskRequest,
)
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ClientRound, ClientState, ServerRound, ServerState
from securefl.errors import (
    ConfigError,
    CryptoError,
    LocalProtocolError,
    NotEnoughSurvivorsError,
    RemoteProtocolError,
    StaleVersionError,
)

D = 64


class Round:
    """Five hospitals and a server, stepped by hand."""

    def __init__(self, fed, n=5, base_version=0, **server_kw):
        self.ca, creds = fed
        self.creds = creds[:n]
        rng = np.random.default_rng(0)
        self.updates = [rng.normal(0, 0.1, D).astype(np.float32) for _ in range(n)]
        self.server = ServerRound(round_id=1, base_version=base_version, vector_len=D,
                                  encoding=Encoding(), ca_cert=self.ca.cert, **server_kw)
        self.clients = [
            ClientRound(cert=c.cert, signing_key=c.key, ca_cert=self.ca.cert, round_id=1,
                        base_version=0, update=self.updates[i], weight=10 + i)
            for i, c in enumerate(self.creds)
        ]

    def enrol(self):
        for cred, client in zip(self.creds, self.clients, strict=True):
            self.server.receive(client.advertise(), from_name=cred.name)
        self.roster = self.server.close_enrolment()
        return self.roster

    def everyone(self, msg):
        for cred, client in zip(self.creds, self.clients, strict=True):
            self.server.receive(client.receive(msg), from_name=cred.name)

    def draw(self):
        """Roster, every acknowledgement, every graph-seed value: the graph is fixed."""
        self.enrol()
        self.everyone(self.roster)
        self.everyone(self.server.close_acks())
        self.reveals = self.server.close_reveals()
        return self.reveals

    def share(self):
        self.everyone(self.draw())
        self.bundles = self.server.close_shares()
        return self.bundles

    def mask(self, skip=()):
        self.share()
        self.inputs = {}
        for i, (cred, client) in enumerate(zip(self.creds, self.clients, strict=True)):
            if i in skip:
                continue
            msg = client.receive(self.bundles[client.me])
            self.inputs[client.me] = msg
            self.server.receive(msg, from_name=cred.name)
        self.listed = self.server.close_inputs()
        return self.listed

    def check(self, skip=()):
        """Every survivor signs the list; returns the server's unmask request."""
        for i, (cred, client) in enumerate(zip(self.creds, self.clients, strict=True)):
            if i not in skip and client.me in self.listed.survivors:
                self.server.receive(client.receive(self.listed), from_name=cred.name)
        self.requests = self.server.close_check()
        self.request = next(iter(self.requests.values()))  # the full graph: all the same
        return self.request


def test_out_of_order_messages_are_protocol_errors(fed5):
    r = Round(fed5)
    client = r.clients[0]
    with pytest.raises(RemoteProtocolError, match="EnvelopeBundle is not allowed"):
        client.receive(EnvelopeBundle(1, 1, {}, {}))
    assert client.state is ClientState.FAILED  # a refusal ends the round for the hospital
    with pytest.raises(LocalProtocolError):
        client.advertise()
    other = r.clients[1]
    other.advertise()
    with pytest.raises(LocalProtocolError):
        other.advertise()
    with pytest.raises(RemoteProtocolError, match="MaskedInput is not allowed"):
        r.server.receive(MaskedInput(1, 1, np.zeros(D + 1, np.uint32)))
    with pytest.raises(LocalProtocolError):
        r.server.finish()


def test_duplicates_are_protocol_errors(fed5):
    r = Round(fed5)
    adv = r.clients[0].advertise()
    r.server.receive(adv, from_name=r.creds[0].name)
    with pytest.raises(RemoteProtocolError, match="already joined"):
        r.server.receive(adv, from_name=r.creds[0].name)
    r2 = Round(fed5)
    r2.mask()
    with pytest.raises(RemoteProtocolError):
        r2.server.receive(r2.inputs[1], from_name=r2.creds[0].name)


def test_a_hospital_cannot_speak_for_another(fed5):
    r = Round(fed5)
    adv = r.clients[0].advertise()
    with pytest.raises(RemoteProtocolError, match="in the name of"):
        r.server.receive(adv, from_name=r.creds[1].name)
    r = Round(fed5)
    r.enrol()
    shares = r.clients[0].receive(r.roster)
    with pytest.raises(RemoteProtocolError, match="as another hospital"):
        r.server.receive(shares, from_name=r.creds[1].name)


def test_stale_base_version_is_named_on_both_sides(fed5):
    r = Round(fed5, base_version=4)
    with pytest.raises(StaleVersionError, match="version 0"):
        r.server.receive(r.clients[0].advertise(), from_name=r.creds[0].name)
    # and a hospital refuses a roster for another version
    r = Round(fed5)
    roster = r.enrol()
    stale = replace(roster, config=replace(roster.config, base_version=9))
    fresh = ClientRound(cert=r.creds[0].cert, signing_key=r.creds[0].key, ca_cert=r.ca.cert,
                        round_id=1, base_version=0, update=r.updates[0], weight=3)
    fresh.advertise()
    with pytest.raises(StaleVersionError, match="fetch the new model"):
        fresh.receive(stale)


def test_server_cannot_substitute_another_hospitals_keys(fed5):
    r = Round(fed5)
    roster = r.enrol()
    victim = roster.participants[1]
    fake = replace(victim, c_pk=KeyPair().public)  # the server's own key, signature unchanged
    forged = replace(roster, participants=(roster.participants[0], fake, *roster.participants[2:]))
    with pytest.raises(CryptoError, match="bad signature"):
        r.clients[0].receive(forged)


def test_server_cannot_resign_keys_with_a_foreign_certificate(fed5, other_ca):
    r = Round(fed5)
    roster = r.enrol()
    _, impostor = other_ca
    victim = roster.participants[1]
    forged_adv = sign_advertisement(impostor.key, impostor.cert, round_id=1, base_version=0,
                                    c_pk=KeyPair().public, s_pk=KeyPair().public)
    forged_adv = replace(forged_adv, name=victim.name)
    forged = replace(roster, participants=(roster.participants[0], forged_adv,
                                           *roster.participants[2:]))
    with pytest.raises(CryptoError):
        r.clients[0].receive(forged)


def test_roster_that_alters_our_own_keys_is_refused(fed5):
    r = Round(fed5)
    roster = r.enrol()
    mine = replace(roster.participants[0], s_pk=KeyPair().public)
    with pytest.raises(CryptoError, match="own round keys"):
        r.clients[0].receive(replace(roster, participants=(mine, *roster.participants[1:])))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"threshold": 2}, ConfigError, "unsafe"),     # 5 holders: t must be >= 3
        ({"threshold": 6}, ConfigError, "unreachable"),
        ({"vector_len": D + 1}, ConfigError, "different model"),
        ({"min_contributors": 1}, ConfigError, "at least 2"),
        ({"min_contributors": 65536}, ConfigError, "could never finish"),  # no struct.error
    ],
)
def test_hospital_refuses_unsafe_round_configs(fed5, change, error, match):
    r = Round(fed5)
    roster = r.enrol()
    with pytest.raises(error, match=match):
        r.clients[0].receive(replace(roster, config=replace(roster.config, **change)))


def test_tampered_envelope_in_transit_is_refused(fed5):
    r = Round(fed5)
    bundles = r.share()
    me = r.clients[0].me
    sender, ct = next(iter(bundles[me].envelopes.items()))
    bad = bytearray(ct)
    bad[-3] ^= 0x80
    with pytest.raises(CryptoError, match="failed authentication"):
        r.clients[0].receive(EnvelopeBundle(1, me, {**bundles[me].envelopes, sender: bytes(bad)},
                                            bundles[me].digests))


def test_hospital_refuses_to_reveal_both_shares_of_one_peer(fed5):
    """The self-mask share for a survivor, the key share for a dropped hospital, never both:
    one answer splits by the signed list, and a second request (where the last survivor
    would count as dropped) is never answered."""
    r = Round(fed5)  # t = 4: the four survivors all sign
    r.mask(skip={4})
    request = r.check()
    last = request.survivors[-1]
    answer = r.clients[1].receive(request)
    assert set(answer.b_shares) == set(request.survivors)
    assert set(answer.s_shares) == {r.clients[4].me}
    with pytest.raises(RemoteProtocolError, match="not allowed while the round is finished"):
        r.clients[1].receive(UnmaskRequest(1, request.survivors[:-1], request.signatures))
    # Nor does a hospital answer a request whose list differs from the one it signed.
    with pytest.raises(CryptoError, match="other survivors than the list this hospital signed"):
        r.clients[0].receive(UnmaskRequest(1, tuple(u for u in request.survivors if u != last),
                                           request.signatures))


def test_hospital_refuses_to_unmask_a_too_small_set(fed5):
    r = Round(fed5)
    r.mask()
    me = r.clients[0].me
    other = next(x for x in range(1, 6) if x != me)
    with pytest.raises(CryptoError, match="keep each one hidden"):
        r.clients[0].receive(ConsistencyRequest(1, tuple(sorted((me, other)))))


def test_below_threshold_nothing_is_published(fed5):
    r = Round(fed5)  # 5 holders, c = 1: t = 4
    r.mask()
    request = r.check()
    for client in r.clients[:2]:
        r.server.receive(client.receive(request), from_name=client._own.name)
    with pytest.raises(NotEnoughSurvivorsError, match="2 hospital"):
        r.server.finish()
    assert r.server.state is ServerState.FAILED
    with pytest.raises(LocalProtocolError):
        r.server.finish()


def test_too_few_inputs_fail_the_round_before_unmasking(fed5):
    r = Round(fed5)
    with pytest.raises(NotEnoughSurvivorsError, match="masked update"):
        r.mask(skip={0, 1, 2})
    assert r.server.state is ServerState.FAILED


def test_wrong_shape_or_type_of_masked_input_is_refused(fed5):
    r = Round(fed5)
    r.share()
    for y in (np.zeros(D, np.uint32), np.zeros(D + 1, np.uint64), np.zeros(D + 1, np.float32)):
        with pytest.raises(RemoteProtocolError, match="expects"):
            r.server.receive(MaskedInput(1, r.clients[0].me, y))


def test_what_the_server_sees_is_indistinguishable_from_random(fed5):
    """A masked input carries no trace of the update: identical (all-zero) updates give
    unrelated, uniformly distributed vectors."""
    ca, creds = fed5
    server = ServerRound(round_id=1, base_version=0, vector_len=50_000, encoding=Encoding(),
                         ca_cert=ca.cert)
    clients = [ClientRound(cert=c.cert, signing_key=c.key, ca_cert=ca.cert, round_id=1,
                           base_version=0, update=np.zeros(50_000, np.float32), weight=1)
               for c in creds[:3]]
    for c in clients:
        server.receive(c.advertise())
    for msg in (server.close_enrolment, server.close_acks, server.close_reveals):
        sent = msg()
        for c in clients:
            server.receive(c.receive(sent))
    bundles = server.close_shares()
    ys = [c.receive(bundles[c.me]).y for c in clients]
    for y in ys:
        counts = np.bincount(y.view(np.uint8), minlength=256)
        expected = y.nbytes / 256
        assert ((counts - expected) ** 2 / expected).sum() < 400
        assert np.count_nonzero(y) > 0.99 * y.size
    assert np.count_nonzero(ys[0] == ys[1]) < 10


def test_server_keeps_one_running_sum_not_the_inputs(fed5):
    r = Round(fed5)
    r.share()
    refs = []
    for cred, client in zip(r.creds, r.clients, strict=True):
        msg = client.receive(r.bundles[client.me])
        refs.append(weakref.ref(msg.y))
        r.server.receive(msg, from_name=cred.name)
        del msg
    gc.collect()
    assert all(ref() is None for ref in refs)  # no input kept alive by the server
    assert r.server.collected == 5


def test_hospital_forgets_its_clear_update_once_masked(fed5):
    r = Round(fed5)
    r.mask()
    assert all(c._update is None and c.state is ClientState.MASKED for c in r.clients)


def test_sparse_graph_roster_carries_k_and_the_split_view_threshold(fed5):
    r = Round(fed5, neighbours=2)
    roster = r.enrol()  # 3 holders, c = 1: t = floor(4 / 2) + 1 = 3
    assert roster.config.neighbours == 2 and roster.config.threshold == 3
    r = Round(fed5, neighbours=2, colluders=0)
    assert r.enrol().config.threshold == 2  # no colluder assumed: a majority of 3


def test_certificate_of_unknown_ca_cannot_join(fed5, other_ca):
    ca, _ = fed5
    _, intruder = other_ca
    server = ServerRound(round_id=1, base_version=0, vector_len=D, encoding=Encoding(),
                         ca_cert=ca.cert)
    client = ClientRound(cert=intruder.cert, signing_key=intruder.key, ca_cert=ca.cert,
                         round_id=1, base_version=0, update=np.zeros(D, np.float32), weight=1)
    with pytest.raises(CryptoError, match="not issued by this federation"):
        server.receive(client.advertise())
    assert server.joined == []
    assert pki.identity_of(intruder.cert)[1] == "hospital-000"


@pytest.mark.parametrize(("n", "server_kw", "said"), [
    # the defaults: min_clients 2, one assumed colluder -> 3, and the message says 3
    (1, {"min_contributors": 2, "colluders": 1},
     "only 1 hospital(s) joined; a round needs at least 3 (with 1 assumed colluder(s), "
     "[round] colluders)"),
    (2, {"min_contributors": 2, "colluders": 1},
     "only 2 hospital(s) joined; a round needs at least 3 (with 1 assumed colluder(s)"),
    (3, {"min_contributors": 4, "colluders": 1},
     "only 3 hospital(s) joined; a round needs at least 4"),
], ids=["one-of-3", "two-of-3", "min-clients"])
def test_too_few_at_enrolment_names_the_one_minimum_the_hospitals_see(fed5, n, server_kw,
                                                                      said):
    """A walk found 'needs at least 2' from the admin's close while the hospital's screen
    said 3 (its colluders + 2): the close names the larger, and why."""
    r = Round(fed5, n=n, **server_kw)
    with pytest.raises(NotEnoughSurvivorsError) as err:
        r.enrol()
    assert said in err.value.message
    if server_kw["min_contributors"] >= server_kw["colluders"] + 2:
        assert "colluder" not in err.value.message
