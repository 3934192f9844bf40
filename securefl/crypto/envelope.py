"""AES-256-GCM envelopes carrying a pair of Shamir shares from one hospital to another.

Bonawitz et al. 2017 round 1: hospital u encrypts ``(u, v, share of b_u, share of s_sk_u)``
for neighbour v under a key both derive from ``X25519(c_sk_u, c_pk_v)`` through labelled
HKDF.  The server routes the envelopes and can read none of them.

The associated data binds round, base version, sender and recipient, and the plaintext
repeats sender and recipient: an envelope replayed from another round, or delivered to the
wrong hospital, or with a flipped bit, fails authentication.  Wire form: 12-byte random
nonce || ciphertext || 16-byte tag.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securefl.crypto.messages import SHARE_BYTES
from securefl.errors import CryptoError

NONCE_BYTES = 12
_PLAIN = struct.Struct(f">II{SHARE_BYTES}s{SHARE_BYTES}s")
ENVELOPE_BYTES = NONCE_BYTES + _PLAIN.size + 16


def _aad(round_id: int, base_version: int, sender: int, recipient: int) -> bytes:
    return b"securefl/v1/envelope\x00" + struct.pack(
        ">QQII", round_id, base_version, sender, recipient
    )


def seal(
    key: bytes,
    *,
    round_id: int,
    base_version: int,
    sender: int,
    recipient: int,
    b_share: bytes,
    s_share: bytes,
    nonce: bytes | None = None,
) -> bytes:
    """The envelope; ``nonce`` is drawn here unless given (test vectors fix it)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise CryptoError(f"an envelope nonce is {NONCE_BYTES} bytes")
    plain = _PLAIN.pack(sender, recipient, b_share, s_share)
    aad = _aad(round_id, base_version, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def open_envelope(
    key: bytes, envelope: bytes, *, round_id: int, base_version: int, sender: int, recipient: int
) -> tuple[bytes, bytes]:
    """``(b_share, s_share)``; ``CryptoError`` if tampered, misrouted or replayed."""
    if len(envelope) != ENVELOPE_BYTES:
        raise CryptoError(f"share envelope from participant {sender} has the wrong size")
    nonce, body = envelope[:NONCE_BYTES], envelope[NONCE_BYTES:]
    try:
        plain = AESGCM(key).decrypt(nonce, body, _aad(round_id, base_version, sender, recipient))
    except InvalidTag as exc:
        raise CryptoError(
            f"share envelope from participant {sender} failed authentication "
            "(tampered, misrouted or from another round)"
        ) from exc
    got_sender, got_recipient, b_share, s_share = _PLAIN.unpack(plain)
    if (got_sender, got_recipient) != (sender, recipient):
        raise CryptoError(f"share envelope from participant {sender} names other parties")
    return b_share, s_share
