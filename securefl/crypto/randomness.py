"""Every random value a hospital draws in a round, behind one small interface.

Why: docs/PROTOCOL.md carries test vectors for a fixed round, computed by an independent
client (tests/conformance).  Our code reproduces them only if the values it would draw can
be fixed from outside; production always uses the operating system's generator.  The
methods are named after what the value is for, so a vector can list them by name rather
than by the order in which they happen to be drawn.
"""

from __future__ import annotations

import os
import secrets

from securefl.crypto.shamir import PRIME


class Randomness:
    """The operating system's generator (``os.urandom``, ``secrets``)."""

    def x25519_private(self, purpose: str) -> bytes:
        """32 bytes for the round key pair ``purpose`` (``"c"``: envelopes, ``"s"``: masks)."""
        return os.urandom(32)

    def graph_value(self) -> bytes:
        """This hospital's 32-byte share of the SecAgg+ graph seed (committed, then revealed)."""
        return os.urandom(32)

    def self_mask_seed(self) -> bytes:
        """b_u, the 32-byte seed of the self mask."""
        return os.urandom(32)

    def coefficients(self, secret: str, count: int) -> list[int]:
        """The random coefficients a_1..a_count of the Shamir polynomial of ``secret``
        (``"b"`` or ``"s"``), each below the field prime."""
        return [secrets.randbelow(PRIME) for _ in range(count)]

    def nonce(self, recipient: int) -> bytes:
        """The 12-byte AES-GCM nonce of the envelope for ``recipient``."""
        return os.urandom(12)


SYSTEM = Randomness()
