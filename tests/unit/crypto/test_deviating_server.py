"""A server that deviates from the protocol, played message by message against the real
hospital round (``ClientRound``): each attack from the secure-aggregation review that a
hospital can now refuse on its own.  The harness is the server here; the hospitals are
unmodified.  Each test asserts that no hospital answers the attack, so the attacker never
holds what it needs.

Not yet covered here (the rest of the secure-aggregation issue): split views of the
survivor set across hospitals, which need the consistency round, and retry differencing.
"""

from __future__ import annotations

import pytest

from securefl.crypto.messages import EnvelopeBundle, UnmaskRequest
from securefl.crypto.secagg import ClientRound
from securefl.errors import CryptoError
from tests.unit.crypto.test_round_rules import Round


def test_unmask_requests_padded_with_numbers_outside_the_roster_are_refused(fed5) -> None:
    """Attack 1: to one target, 'survivors = {me, target, t made-up numbers}, dropped =
    everyone else' would make every hospital reveal the target's self-mask share and every
    other hospital's key share: enough to strip all of the target's masks."""
    r = Round(fed5)
    r.mask()
    t = r.roster.config.threshold
    target = r.clients[0].me
    everyone = {c.me for c in r.clients}
    answers = []
    for client in r.clients:
        fake = {100 + i for i in range(t)}
        survivors = frozenset({client.me, target} | fake)
        dropped = frozenset(everyone - survivors)
        with pytest.raises(CryptoError, match="not in the round's roster"):
            answers.append(client.receive(UnmaskRequest(1, survivors, dropped)))
    assert answers == []


def test_a_hospital_does_not_mask_with_fewer_than_t_share_holders(fed5) -> None:
    """Attack 2: the server withholds the target's share envelopes; a hospital that masked
    anyway would send y = x + PRG(b), and one ordinary unmask request then yields b."""
    r = Round(fed5)
    r.share()
    t = r.roster.config.threshold
    client: ClientRound = r.clients[0]
    full = r.bundles[client.me]
    kept = dict(list(full.envelopes.items())[: t - 2])  # t - 2 others + its own share
    with pytest.raises(CryptoError, match=r"at least .* are needed before it may mask"):
        client.receive(EnvelopeBundle(full.round_id, full.recipient, kept))
    # With t - 1 others (t holders counting its own share) it masks as the protocol says.
    r2 = Round(fed5)
    r2.share()
    c2 = r2.clients[0]
    b2 = r2.bundles[c2.me]
    enough = dict(list(b2.envelopes.items())[: t - 1])
    assert c2.receive(EnvelopeBundle(b2.round_id, b2.recipient, enough)).y is not None


def test_a_hospitals_own_minimum_holds_whatever_the_roster_says(fed5) -> None:
    """The roster's min_contributors is the server's word; a hospital's [policy] floor is
    not negotiable: it refuses to help unmask a smaller sum."""
    r = Round(fed5)
    strict = ClientRound(cert=r.creds[0].cert, signing_key=r.creds[0].key,
                         ca_cert=r.ca.cert, round_id=1, base_version=0,
                         update=r.updates[0], weight=10, min_contributors=5)
    r.clients[0] = strict
    r.mask()
    t = r.roster.config.threshold
    assert t < 5
    survivors = frozenset(c.me for c in r.clients[:4])
    dropped = frozenset({r.clients[4].me})
    with pytest.raises(CryptoError, match="at least 5 are needed"):
        strict.receive(UnmaskRequest(1, survivors, dropped))
    # An ordinary hospital (floor 2) answers the same request: the floor is the policy's.
    assert r.clients[1].receive(UnmaskRequest(1, survivors, dropped)).sender == r.clients[1].me


def test_a_low_max_weight_in_the_roster_caps_the_count_and_reveals_nothing(fed5) -> None:
    """Attack 7 (the count bit): a hospital used to refuse a roster whose max_weight was
    below its sample count, so a server could learn one bit of that count per attempt
    by varying max_weight.  It now takes part either way, with its count capped."""
    from dataclasses import replace

    from securefl.crypto.quantize import Encoding

    r = Round(fed5)
    roster = r.enrol()
    low = Encoding.auto(max_clients=roster.config.encoding.max_clients, max_weight=10)
    lying = replace(roster, config=replace(roster.config, encoding=low))
    heavy = r.clients[4]  # weight 14, above the lying limit of 10
    light = r.clients[0]  # weight 10, at the limit
    for client in (heavy, light):
        assert client.receive(lying).sender == client.me  # both answer alike
    assert heavy.weight_capped and not light.weight_capped


def test_different_model_bytes_under_one_version_are_caught_at_the_roster(fed5) -> None:
    """Attack 8 (model inconsistency, Pasquini et al. CCS 2022): the server hands one
    hospital other weights under the same version number.  Each hospital signs the sha256
    of the bytes it received with its round keys, so every other hospital sees the
    difference and refuses before sharing anything; so does the odd one out."""
    r = Round(fed5)
    odd = ClientRound(cert=r.creds[0].cert, signing_key=r.creds[0].key, ca_cert=r.ca.cert,
                      round_id=1, base_version=0, update=r.updates[0], weight=10,
                      base_sha256=b"\x01" * 32)
    r.clients[0] = odd
    roster = r.enrol()
    for client in r.clients[1:]:
        with pytest.raises(CryptoError, match=f"'{r.creds[0].name}' was given other model"):
            client.receive(roster)
    with pytest.raises(CryptoError, match="was given other model bytes"):
        odd.receive(roster)


def test_the_server_tells_a_hospital_whose_model_bytes_are_not_the_stored_ones(fed5) -> None:
    from securefl.crypto.quantize import Encoding
    from securefl.crypto.secagg import ServerRound
    from securefl.errors import StaleVersionError

    ca, creds = fed5
    server = ServerRound(round_id=1, base_version=0, vector_len=64, encoding=Encoding(),
                         ca_cert=ca.cert, base_sha256=b"\x02" * 32)
    damaged = ClientRound(cert=creds[0].cert, signing_key=creds[0].key, ca_cert=ca.cert,
                          round_id=1, base_version=0, update=Round(fed5).updates[0],
                          weight=10, base_sha256=b"\x03" * 32)
    with pytest.raises(StaleVersionError, match=r"sha256 differs.*get the global model again"):
        server.receive(damaged.advertise(), from_name=creds[0].name)
    assert server.joined == []


def test_round_keys_of_a_revoked_hospital_are_refused(fed5) -> None:
    """Attack 6: a revoked certificate still verified as the signer of round keys, so a
    server could seat a revoked (e.g. stolen) hospital identity in a round.  Hospitals now
    check round keys against the CA's revocation list they hold."""
    r = Round(fed5)
    stolen = r.creds[4].cert.serial_number
    r.clients[:4] = [
        ClientRound(cert=c.cert, signing_key=c.key, ca_cert=r.ca.cert, round_id=1,
                    base_version=0, update=r.updates[i], weight=10, revoked=frozenset({stolen}))
        for i, c in enumerate(r.creds[:4])]
    roster = r.enrol()
    for client in r.clients[:4]:
        with pytest.raises(CryptoError, match=f"'{r.creds[4].name}' is revoked"):
            client.receive(roster)


def test_a_revocation_list_not_signed_by_the_ca_is_refused(fed5, other_ca) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from securefl.crypto import pki

    ca, _ = fed5
    intruder_ca, _ = other_ca
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
              .last_update(now).next_update(now + dt.timedelta(days=1))
              .add_extension(x509.CRLNumber(99), critical=False)
              .sign(intruder_ca.key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding as Enc

    with pytest.raises(CryptoError, match="not signed by this federation's CA"):
        pki.load_crl(forged.public_bytes(Enc.DER), ca.cert)
