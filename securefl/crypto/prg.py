"""Mask expansion: a 32-byte seed -> a long vector of ring elements, with AES-256-CTR.

Why AES-CTR and not ``numpy.random``: masks are the only thing hiding a hospital's update,
so they must be unpredictable to anyone without the seed.  A keyed block cipher in counter
mode is a standard PRG; numpy's generators are not cryptographic (and Flower's SecAgg+ seeds
a Mersenne Twister with a 32-bit fold of the key).  AES is hardware-accelerated on x86-64
and ARMv8, which makes a 1M-element mask cost about a millisecond.

Every seed is derived through labelled HKDF (``derive_seed``) so that a seed for one purpose
(self mask, pair mask, neighbour graph) can never be replayed as another.  The CTR nonce is
therefore fixed at zero: a key is never used twice for different streams.

Speed: the keystream is written in place into a small reusable scratch buffer
(``MaskBuffer``), avoiding a fresh multi-megabyte ``bytes`` object per mask, which is ten
times slower.
"""

from __future__ import annotations

import sys

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
    view = raw.data  # memoryview(raw); numpy's stubs give ndarray __buffer__ only on 3.12+
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    encryptor.update_into(view, view)
    if out.dtype.itemsize > 1 and not _is_little(out.dtype):
        # Ring elements are the keystream read as little-endian words on every machine:
        # a big-endian hospital's masks must cancel with everyone else's.
        out.byteswap(inplace=True)
    return out


def _is_little(dtype: np.dtype) -> bool:
    return dtype.byteorder == "<" or (dtype.byteorder in "=|" and sys.byteorder == "little")


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """A fresh mask vector of ``length`` ring elements (convenience; hot paths use MaskBuffer)."""
    return keystream_into(seed, np.empty(length, dtype=dtype))


#: Ring elements per step of ``MaskBuffer``: 256 KiB of scratch, which stays in cache.
CHUNK = 1 << 16


class MaskBuffer:
    """Adds and subtracts PRG masks into a target vector through one small reused scratch.

    Why chunked: the keystream of one seed is produced ``CHUNK`` elements at a time by the
    same CTR encryptor (so the mask is exactly ``expand(seed, ...)``) and added before the
    next piece is made.  A model-sized scratch vector was the largest thing the server
    allocated while unmasking; this one is 256 KiB whatever the model.

    Arithmetic is numpy's unsigned wrap-around, i.e. exactly the ring Z_2^k.
    """

    def __init__(self, length: int, dtype: type[np.unsignedinteger]) -> None:
        self._length = length
        self._dtype = np.dtype(dtype)
        # The keystream is read as little-endian words on every host (PROTOCOL.md A.2):
        # on a big-endian machine numpy converts while adding, so masks still cancel.
        self._scratch = np.empty(min(length, CHUNK), dtype=self._dtype.newbyteorder("<"))

    def _apply(self, target: np.ndarray, seed: bytes, op: np.ufunc) -> None:
        if len(seed) != SEED_BYTES:
            raise CryptoError(f"a PRG seed must be {SEED_BYTES} bytes, not {len(seed)}")
        if target.shape != (self._length,) or target.dtype != self._dtype:
            raise CryptoError("mask target has the wrong shape or type for this buffer")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
        raw = self._scratch.view(np.uint8)
        for start in range(0, self._length, CHUNK):
            stop = min(start + CHUNK, self._length)
            piece = raw[: (stop - start) * self._scratch.itemsize]
            piece[:] = 0
            view = piece.data  # memoryview(piece), as numpy's stubs type it on 3.11
            encryptor.update_into(view, view)
            op(target[start:stop], self._scratch[: stop - start], out=target[start:stop])

    def add(self, target: np.ndarray, seed: bytes) -> None:
        self._apply(target, seed, np.add)

    def subtract(self, target: np.ndarray, seed: bytes) -> None:
        self._apply(target, seed, np.subtract)
