"""Shamir t-of-n secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297.

Why this field: the secrets are 32-byte strings (self-mask seeds ``b_u`` and X25519 private
keys ``s_sk_u``); a prime just above 2^256 holds every one of them without reduction, and
a share value fits in 33 bytes.  Share x-coordinates are participant numbers 1..n, never 0
(x = 0 is the secret).  Coefficients come from ``secrets`` (the OS CSPRNG).

Any t shares reconstruct; t - 1 shares are consistent with every possible secret, so the
reconstruction refuses to run on fewer than t rather than return a wrong value.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from securefl.crypto.messages import SHARE_BYTES
from securefl.errors import CryptoError

PRIME = 2**256 + 297
SECRET_BYTES = 32


def split(secret: bytes, xs: Iterable[int], threshold: int,
          coefficients: Sequence[int] | None = None) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of a random degree-(t-1) polynomial with ``f(0) = secret``.

    ``coefficients`` (a_1..a_{t-1}) are drawn here unless given: test vectors fix them.
    """
    points = list(xs)
    if len(secret) != SECRET_BYTES:
        raise CryptoError(f"can only share {SECRET_BYTES}-byte secrets, not {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise CryptoError(f"threshold {threshold} impossible with {len(points)} share holders")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise CryptoError("share x-coordinates must be distinct and non-zero")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    if len(coefficients) != threshold - 1 or any(not 0 <= c < PRIME for c in coefficients):
        raise CryptoError(f"a threshold-{threshold} polynomial needs {threshold - 1} "
                          "coefficients below the field prime")
    coeffs = [int.from_bytes(secret, "big"), *coefficients]
    shares = {}
    for x in points:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i(0); cached because every secret of a round uses the same holders."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from any ``threshold`` shares (uses the lowest x-coordinates given)."""
    if len(shares) < threshold:
        raise CryptoError(
            f"only {len(shares)} share(s) for a secret that needs {threshold}: cannot rebuild it"
        )
    xs = tuple(sorted(shares)[:threshold])
    if any(not 0 < x < PRIME for x in xs):
        raise CryptoError("share x-coordinates must be non-zero field elements")
    total = 0
    for x, coeff in zip(xs, _lagrange_at_zero(xs), strict=True):
        y = shares[x]
        if not 0 <= y < PRIME:
            raise CryptoError("a share value lies outside the field")
        total = (total + y * coeff) % PRIME
    if total >= 2 ** (8 * SECRET_BYTES):
        raise CryptoError("shares are inconsistent: they do not encode a 32-byte secret")
    return total.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise CryptoError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise CryptoError("a share value lies outside the field")
    return value
