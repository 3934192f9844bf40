"""Mask expansion: a 32-byte seed -> a long vector of ring elements, with AES-256-CTR.

Why AES-CTR and not ``numpy.random``: masks are the only thing hiding a hospital's update,
so they must be unpredictable to anyone without the seed.  A keyed block cipher in counter
mode is a standard PRG; numpy's generators are not cryptographic (and Flower's SecAgg+ seeds
a Mersenne Twister with a 32-bit fold of the key).  AES is hardware-accelerated on x86-64
and ARMv8, which makes a 1M-element mask cost about a millisecond.

Every seed is derived through labelled HKDF (``derive_seed``) so that a seed for one purpose
(self mask, pair mask, neighbour graph) can never be replayed as another.  The CTR nonce is
therefore fixed at zero: a key is never used twice for different streams.

Speed: the keystream is written in place into a reusable scratch buffer (``MaskBuffer``),
avoiding a fresh multi-megabyte ``bytes`` object per mask, which is ten times slower.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefl.errors import CryptoError

SEED_BYTES = 32
LABEL_PREFIX = b"securefl/v1/"
_ZERO_NONCE = bytes(16)


def derive_seed(key_material: bytes, label: str, context: bytes = b"") -> bytes:
    """HKDF-SHA256 with an ``info`` of ``securefl/v1/<label>|<context>``: one key per purpose."""
    if not label or "|" in label:
        raise CryptoError(f"bad HKDF label {label!r}")
    info = LABEL_PREFIX + label.encode() + b"|" + context
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(
        key_material
    )


def keystream_into(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Overwrite ``out`` (any contiguous numeric array) with the AES-256-CTR keystream."""
    if len(seed) != SEED_BYTES:
        raise CryptoError(f"a PRG seed must be {SEED_BYTES} bytes, not {len(seed)}")
    if not out.flags.c_contiguous:
        raise CryptoError("PRG output buffer must be contiguous")
    raw = out.view(np.uint8).reshape(-1)
    raw[:] = 0
    view = memoryview(raw)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    encryptor.update_into(view, view)
    return out


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """A fresh mask vector of ``length`` ring elements (convenience; hot paths use MaskBuffer)."""
    return keystream_into(seed, np.empty(length, dtype=dtype))


class MaskBuffer:
    """Adds and subtracts PRG masks into a target vector through one reused scratch buffer.

    Arithmetic is numpy's unsigned wrap-around, i.e. exactly the ring Z_2^k.
    """

    def __init__(self, length: int, dtype: type[np.unsignedinteger]) -> None:
        self._scratch = np.empty(length, dtype=dtype)

    def add(self, target: np.ndarray, seed: bytes) -> None:
        np.add(target, keystream_into(seed, self._scratch), out=target)

    def subtract(self, target: np.ndarray, seed: bytes) -> None:
        np.subtract(target, keystream_into(seed, self._scratch), out=target)
