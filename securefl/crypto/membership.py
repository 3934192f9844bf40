"""The federation's member list: which hospitals, with which certificates, the operator let in.

Why a list of its own when the CA already vouches for every hospital certificate: the CA
vouches for *every certificate it ever issued* — a renewed hospital's old one (valid until
it expires), a test certificate, one minted by mistake.  A server could put any of them in
a round's roster and every hospital would take it for a member; with enough of them it
could fill a round around one real hospital.  The operator therefore signs, with the CA
key, the exact list of members: hospital name -> sha256 of its *current* certificate.  A
hospital refuses a roster naming anyone else, or anyone with another certificate.

Format: one JSON file, ``{"body": {...}, "signature": "<base64>"}``.  The signature (ECDSA
with the CA key, SHA-256) covers ``DOMAIN`` followed by the body serialised canonically
(sorted keys, no spaces, ASCII): the body is checked exactly as it is used, and the
pretty-printed file stays readable.  ``number`` grows with every list the operator issues,
so a hospital can refuse an older list offered by a server that would hide a removal.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from securefl.crypto import pki
from securefl.crypto.messages import KeyAdvertisement
from securefl.errors import ConfigError, CryptoError

#: Signed before the body: a member-list signature can be taken for nothing else the CA signs.
DOMAIN = b"securefl member list v1\n"
FORMAT = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fingerprint(cert_der: bytes) -> str:
    """sha256 of the DER certificate, lowercase hex (what ``sha256sum`` prints for it)."""
    return hashlib.sha256(cert_der).hexdigest()


def _canonical(body: Mapping[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class MemberList:
    """One signed member list; build it with :meth:`issue`, read it with :meth:`load`."""

    number: int
    issued: str
    federation: str
    members: Mapping[str, str] = field(default_factory=dict)
    signature: bytes = b""

    # -- making and writing (the operator's side) ---------------------------------------
    @classmethod
    def issue(cls, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              members: Mapping[str, bytes], *, number: int,
              now: dt.datetime | None = None) -> MemberList:
        """Sign a list of ``members`` (name -> DER certificate) with the CA key."""
        if number < 1:
            raise ConfigError(f"a member list number starts at 1, not {number}")
        for name in members:
            pki.check_name(name)
        federation = ca_cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        now = now or dt.datetime.now(dt.UTC)
        unsigned = cls(number=number, issued=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       federation=str(federation[0].value) if federation else "",
                       members=MappingProxyType({n: fingerprint(members[n])
                                                 for n in sorted(members)}))
        signature = ca_key.sign(DOMAIN + _canonical(unsigned.body()), ec.ECDSA(hashes.SHA256()))
        return cls(unsigned.number, unsigned.issued, unsigned.federation, unsigned.members,
                   signature)

    def body(self) -> dict[str, object]:
        return {"format": FORMAT, "number": self.number, "issued": self.issued,
                "federation": self.federation, "members": dict(self.members)}

    def to_bytes(self) -> bytes:
        """The file's bytes: readable JSON, one member per line."""
        doc = {"body": self.body(), "signature": base64.b64encode(self.signature).decode()}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    # -- reading and checking (everyone else) -------------------------------------------
    @classmethod
    def load(cls, data: bytes, ca_cert: x509.Certificate) -> MemberList:
        """A list this federation's CA signed, or ``CryptoError`` saying why not."""
        try:
            doc = json.loads(data)
            body, sig = doc["body"], base64.b64decode(doc["signature"], validate=True)
            number, issued, federation = body["number"], body["issued"], body["federation"]
            members = body["members"]
            ok = (isinstance(doc, dict) and len(doc) == 2 and isinstance(body, dict)
                  and set(body) == {"format", "number", "issued", "federation", "members"}
                  and body["format"] == FORMAT and type(number) is int and number >= 1
                  and isinstance(issued, str) and isinstance(federation, str)
                  and isinstance(members, dict)
                  and all(isinstance(n, str) and isinstance(f, str) and _HEX64.match(f)
                          for n, f in members.items()))
        except (ValueError, TypeError, KeyError, binascii.Error):
            ok = False
        if not ok:
            raise CryptoError("the member list cannot be read (not a securefl member list): "
                              "ask the federation operator for members.json")
        listed = cls(number, issued, federation, MappingProxyType(dict(members)), sig)
        listed.verify(ca_cert)
        return listed

    def verify(self, ca_cert: x509.Certificate) -> None:
        """Raise ``CryptoError`` unless the federation CA signed exactly this list."""
        public = ca_cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise CryptoError("the federation CA's key type cannot sign member lists")
        try:
            public.verify(self.signature, DOMAIN + _canonical(self.body()),
                          ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CryptoError(
                f"the member list (number {self.number}) was not signed by this federation's "
                "CA, or was altered after signing: refusing it") from None

    def check_member(self, name: str, cert_der: bytes) -> None:
        """Raise ``CryptoError`` unless ``name`` is a member and ``cert_der`` its listed
        certificate."""
        listed = self.members.get(name)
        if listed is None:
            raise CryptoError(
                f"the round names '{name}', who is not a member of this federation as the "
                f"operator's signed member list (number {self.number}) says: refusing the "
                "round, nothing was sent")
        if fingerprint(cert_der) != listed:
            raise CryptoError(
                f"the round presents '{name}' with a certificate other than the one the "
                f"operator's signed member list (number {self.number}) names for it: "
                "refusing the round, nothing was sent")

    def check_roster(self, participants: Sequence[KeyAdvertisement]) -> None:
        """Every participant must be on the list with its listed certificate."""
        for adv in participants:
            self.check_member(adv.name, adv.cert_der)
