"""Round keys: X25519 agreement through labelled HKDF, and signed key advertisements.

Bonawitz et al. 2017 §4 round 0: each hospital makes two fresh key pairs per round,
``(c_sk, c_pk)`` for encrypting Shamir shares to its neighbours and ``(s_sk, s_pk)`` for the
pairwise masks.  The raw X25519 output is never used directly: it always passes through
HKDF with a purpose label (pyca's guidance), so the envelope key and the mask seed of the
same pair are independent.

The advertisement ``(round, base version, name, c_pk, s_pk)`` is signed with the private key
of the hospital's TLS certificate and carries that certificate, so every hospital can check
every other hospital's keys against the federation CA (§6.2's "active adversary" variant
with a PKI): a curious server cannot slip in keys of its own and open envelopes.
"""

from __future__ import annotations

import datetime as dt
import hmac
import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from securefl.crypto import pki
from securefl.crypto.messages import KEY_BYTES, KeyAdvertisement
from securefl.crypto.prg import derive_seed
from securefl.errors import CryptoError

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class KeyPair:
    """A fresh X25519 pair; the private half never prints and never leaves the object."""

    SIZE = KEY_BYTES

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._sk = private or X25519PrivateKey.generate()
        self.public = self._sk.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        if len(raw) != KEY_BYTES:
            raise CryptoError(f"an X25519 private key is {KEY_BYTES} bytes, not {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Raw private key, only for Shamir-sharing ``s_sk`` (Bonawitz round 1)."""
        return self._sk.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def agree(self, peer_public: bytes, label: str, context: bytes = b"") -> bytes:
        """Shared 32-byte key with a peer for one purpose; low-order peer keys are refused."""
        if len(peer_public) != KEY_BYTES:
            raise CryptoError(f"an X25519 public key is {KEY_BYTES} bytes, not {len(peer_public)}")
        try:
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # all-zero output: a low-order point (RFC 7748 §6.1)
            raise CryptoError("peer sent a weak (low-order) X25519 public key") from exc
        return derive_seed(shared, label, context)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyPair):
            return NotImplemented
        return hmac.compare_digest(self.private_bytes(), other.private_bytes())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}..., private=<redacted>)"


def advertisement_bytes(
    round_id: int, base_version: int, name: str, c_pk: bytes, s_pk: bytes,
    base_sha256: bytes = bytes(32), graph_commit: bytes = bytes(32),
) -> bytes:
    """The exact bytes a hospital signs: fixed-width, length-prefixed, domain-separated.

    v3 added the sha256 of the base model bytes, so a server that shows different hospitals
    different models under one version number is caught at the roster (Pasquini et al.,
    CCS 2022, model inconsistency).  v4 adds the commitment to the hospital's share of the
    graph seed, so the server cannot swap it after seeing others' values."""
    if len(base_sha256) != 32 or len(graph_commit) != 32:
        raise CryptoError("the base model's sha256 and the graph commitment must be 32 bytes")
    raw_name = name.encode()
    return b"".join(
        [
            b"securefl/v4/advertise\x00",
            struct.pack(">QQH", round_id, base_version, len(raw_name)),
            base_sha256,
            graph_commit,
            raw_name,
            c_pk,
            s_pk,
        ]
    )


def sign_advertisement(
    key: SigningKey,
    cert: x509.Certificate,
    *,
    round_id: int,
    base_version: int,
    c_pk: bytes,
    s_pk: bytes,
    base_sha256: bytes = bytes(32),
    graph_commit: bytes = bytes(32),
) -> KeyAdvertisement:
    """Round 0 message: the round keys, signed under the hospital's certificate identity."""
    _, name = pki.identity_of(cert)
    data = advertisement_bytes(round_id, base_version, name, c_pk, s_pk, base_sha256,
                               graph_commit)
    signature = sign(key, data)
    return KeyAdvertisement(round_id, base_version, name, c_pk, s_pk, pki.cert_der(cert),
                            signature, base_sha256, graph_commit)


def verify_advertisement(
    adv: KeyAdvertisement, ca_cert: x509.Certificate, *, now: dt.datetime | None = None,
    revoked: frozenset[int] = frozenset(),
) -> None:
    """Raise ``CryptoError`` unless a hospital of this federation signed exactly these keys
    with a certificate that is not in ``revoked`` (serial numbers from the CA's list)."""
    cert = pki.load_cert(adv.cert_der)
    role, name = pki.verify_issued_by(cert, ca_cert, now=now)
    if cert.serial_number in revoked:
        raise CryptoError(f"the certificate of '{name}' is revoked: refusing round keys "
                          "signed with it")
    if role is not pki.Role.HOSPITAL:
        raise CryptoError(f"'{name}' is not a hospital certificate ({role.value})")
    if name != adv.name:
        raise CryptoError(f"keys claimed for '{adv.name}' are signed by '{name}'")
    if len(adv.c_pk) != KEY_BYTES or len(adv.s_pk) != KEY_BYTES:
        raise CryptoError(f"round keys of '{name}' have the wrong length")
    if len(adv.base_sha256) != 32 or len(adv.graph_commit) != 32:
        raise CryptoError(f"the round keys of '{name}' carry no base model sha256 or no "
                          "graph commitment")
    data = advertisement_bytes(adv.round_id, adv.base_version, adv.name, adv.c_pk, adv.s_pk,
                               adv.base_sha256, adv.graph_commit)
    if not verify(cert, adv.signature, data):
        raise CryptoError(f"the round keys of '{name}' carry a bad signature")


def sign(key: SigningKey, data: bytes) -> bytes:
    """Sign with a certificate's private key (ECDSA P-256/SHA-256 or Ed25519).

    ECDSA nonces follow RFC 6979 (deterministic): the same key and bytes give the same
    signature, so docs/PROTOCOL.md's test vectors can list signatures exactly, and no
    signature depends on the quality of a random generator at signing time.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return key.sign(data)


def verify(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made with the key of ``cert``."""
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def survivors_statement(round_id: int, base_version: int, base_sha256: bytes,
                        roster_digest: bytes, survivors: tuple[int, ...]) -> bytes:
    """The bytes each survivor signs in the consistency check (Bonawitz et al. 2017 §6).

    They bind the list to this round of this model (id, version and the model's sha256)
    and to one roster (its digest), so a signature can be replayed neither into another
    round nor under a roster the server changed for some hospitals.
    """
    if len(base_sha256) != 32 or len(roster_digest) != 32:
        raise CryptoError("the consistency statement needs 32-byte digests")
    return b"".join([
        b"securefl/v4/survivors\x00",
        struct.pack(">QQ", round_id, base_version),
        base_sha256,
        roster_digest,
        struct.pack(f">H{len(survivors)}H", len(survivors), *survivors),
    ])


def roster_statement(round_id: int, base_version: int, roster_digest: bytes) -> bytes:
    """The bytes each participant signs to acknowledge the roster it holds.

    Why: the graph seed's values are revealed only after every participant signed the same
    roster digest, so a server cannot learn some hospitals' values and then show others a
    roster with commitments it picked to suit them.
    """
    if len(roster_digest) != 32:
        raise CryptoError("the roster statement needs a 32-byte digest")
    return b"".join([b"securefl/v4/roster-ack\x00", struct.pack(">QQ", round_id, base_version),
                     roster_digest])
