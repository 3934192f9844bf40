"""The operator's signed member list (``securefl.crypto.membership``), and a server that puts
someone else in a round.

The CA vouches for every certificate it ever issued; the member list says which of them
are in the federation now.  A server that fills a round with a CA-issued hospital
certificate the operator did not list (a test certificate, a renewed hospital's old one,
one minted by mistake) is refused by every listed hospital before it shares anything.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from securefl.client import membership as held_lists
from securefl.crypto import pki
from securefl.crypto.membership import MemberList, fingerprint
from securefl.crypto.secagg import ClientRound
from securefl.errors import ConfigError, CryptoError
from tests.unit.crypto.test_round_rules import Round


def _listed(fed, names=None, number=1, **swap) -> MemberList:
    ca, creds = fed
    members = {c.name: pki.cert_der(c.cert) for c in creds if names is None or c.name in names}
    members.update(swap)
    return MemberList.issue(ca.cert, ca.key, members, number=number)


def test_a_signed_list_reads_back_and_pins_each_certificate(fed5) -> None:
    ca, creds = fed5
    listed = MemberList.load(_listed(fed5, number=7).to_bytes(), ca.cert)
    assert listed.number == 7 and sorted(listed.members) == sorted(c.name for c in creds)
    assert listed.members[creds[0].name] == fingerprint(pki.cert_der(creds[0].cert))
    listed.check_member(creds[0].name, pki.cert_der(creds[0].cert))  # a member: no error


def test_a_tampered_list_is_refused(fed5) -> None:
    ca, creds = fed5
    doc = json.loads(_listed(fed5, names={creds[0].name}).to_bytes())
    # The server adds its own hospital, pinned to a certificate of its choosing.
    doc["body"]["members"]["mallory"] = fingerprint(pki.cert_der(creds[4].cert))
    with pytest.raises(CryptoError, match="not signed by this federation's CA, or was altered"):
        MemberList.load(json.dumps(doc).encode(), ca.cert)
    # Raising its number to outrank a newer list is tampering too.
    doc = json.loads(_listed(fed5).to_bytes())
    doc["body"]["number"] = 99
    with pytest.raises(CryptoError, match="altered"):
        MemberList.load(json.dumps(doc).encode(), ca.cert)


def test_an_unsigned_or_unreadable_list_is_refused(fed5) -> None:
    ca, _ = fed5
    doc = json.loads(_listed(fed5).to_bytes())
    doc["signature"] = base64.b64encode(b"").decode()
    with pytest.raises(CryptoError, match="not signed by this federation's CA"):
        MemberList.load(json.dumps(doc).encode(), ca.cert)
    for garbage in (b"", b"[]", b"{}", json.dumps({"body": doc["body"]}).encode(),
                    b"\xff\xfe"):
        with pytest.raises(CryptoError, match="cannot be read"):
            MemberList.load(garbage, ca.cert)


def test_a_list_signed_by_another_ca_is_refused(fed5, other_ca) -> None:
    ca, _ = fed5
    intruder_ca, intruder = other_ca
    forged = MemberList.issue(intruder_ca.cert, intruder_ca.key,
                              {intruder.name: pki.cert_der(intruder.cert)}, number=1000)
    with pytest.raises(CryptoError, match="not signed by this federation's CA"):
        MemberList.load(forged.to_bytes(), ca.cert)


def test_unknown_names_and_other_certificates_are_named_in_the_refusal(fed5) -> None:
    _, creds = fed5
    listed = _listed(fed5, names={c.name for c in creds[:4]})
    with pytest.raises(CryptoError, match=rf"the round names '{creds[4].name}', who is not a "
                       "member of this federation.*nothing was sent"):
        listed.check_member(creds[4].name, pki.cert_der(creds[4].cert))
    with pytest.raises(CryptoError, match=f"presents '{creds[1].name}' with a certificate "
                       "other than the one"):
        listed.check_member(creds[1].name, pki.cert_der(creds[2].cert))


def _write(path: Path, listed: MemberList) -> Path:
    path.write_bytes(listed.to_bytes())
    return path


def test_a_hospital_keeps_the_newest_list_and_refuses_an_older_one(fed5,
                                                                   tmp_path: Path) -> None:
    ca, creds = fed5
    me = creds[0].cert
    kit = _write(tmp_path / "kit.json", _listed(fed5, number=2))
    held = tmp_path / "state" / "members.json"
    assert held_lists.accept(ca.cert, None, kit=kit, held=held, me=me).number == 2
    newer = _listed(fed5, names={c.name for c in creds[:4]}, number=3)
    assert held_lists.accept(ca.cert, newer.to_bytes(), kit=kit, held=held, me=me).number == 3
    assert MemberList.load(held.read_bytes(), ca.cert).number == 3  # kept for next time
    # A server offering an older list (one that still names creds[4]) is refused, also
    # when the kit's own copy is the older one.
    for older in (1, 2):
        with pytest.raises(CryptoError, match=rf"older member list \(number {older}\) than "
                           r"this hospital holds \(number 3\)"):
            held_lists.accept(ca.cert, _listed(fed5, number=older).to_bytes(), kit=kit,
                              held=held, me=me)
    assert held_lists.accept(ca.cert, None, kit=kit, held=held, me=me).number == 3


def test_a_hospital_whose_own_certificate_is_not_listed_says_so(fed5, tmp_path: Path) -> None:
    ca, creds = fed5
    renewed = pki.issue(ca, pki.Role.HOSPITAL, creds[0].name)
    kit = _write(tmp_path / "kit.json", _listed(fed5, **{creds[0].name:
                                                         pki.cert_der(renewed.cert)}))
    with pytest.raises(CryptoError, match=f"certificate \\('{creds[0].name}'\\) is not the one"
                       ".*install hospital.pem and hospital.key from the current kit"):
        held_lists.accept(ca.cert, None, kit=kit, held=tmp_path / "h.json", me=creds[0].cert)
    with pytest.raises(ConfigError, match="holds no signed member list"):
        held_lists.accept(ca.cert, None, kit=tmp_path / "missing.json",
                          held=tmp_path / "h.json", me=creds[0].cert)


def _members_only(r: Round, listed: MemberList) -> None:
    """Give every hospital of the round the list, as HospitalSession does from its kit."""
    for i, c in enumerate(r.creds):
        r.clients[i] = ClientRound(cert=c.cert, signing_key=c.key, ca_cert=r.ca.cert,
                                   round_id=1, base_version=0, update=r.updates[i],
                                   weight=10 + i, members=listed)


def test_a_round_with_a_ca_issued_hospital_not_on_the_list_is_refused(fed5) -> None:
    """The server enrols a fifth hospital whose certificate the CA issued (so its round keys
    verify) but which the operator never made a member: every member refuses the roster,
    so no key share — let alone a masked input — ever leaves."""
    r = Round(fed5)
    outsider = r.creds[4].name
    _members_only(r, _listed(fed5, names={c.name for c in r.creds[:4]}))
    roster = r.enrol()
    assert outsider in [a.name for a in roster.participants]
    answers = []
    for client in r.clients[:4]:
        with pytest.raises(CryptoError, match=f"the round names '{outsider}', who is not a "
                           "member"):
            answers.append(client.receive(roster))
    assert answers == []


def test_a_round_presenting_a_member_with_an_old_certificate_is_refused(fed5) -> None:
    """A renewed hospital's old certificate stays CA-valid until it expires; the member
    list pins the new one, so a server holding the old key cannot stand in for it."""
    r = Round(fed5)
    ca, creds = fed5
    renewed = pki.issue(ca, pki.Role.HOSPITAL, creds[2].name)
    _members_only(r, _listed(fed5, **{creds[2].name: pki.cert_der(renewed.cert)}))
    roster = r.enrol()  # creds[2]'s round keys are signed with the old certificate
    for i, client in enumerate(r.clients):
        if i == 2:
            continue
        with pytest.raises(CryptoError, match=f"presents '{creds[2].name}' with a certificate "
                           "other than"):
            client.receive(roster)
    # The same round passes with a list naming exactly these certificates.
    r2 = Round(fed5)
    _members_only(r2, _listed(fed5))
    roster2 = r2.enrol()
    assert all(c.receive(roster2).sender == c.me for c in r2.clients)
