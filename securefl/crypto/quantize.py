"""Fixed-point encoding of model updates into the ring Z_2^k, with a checked bit budget.

Why this shape:

* Masks only cancel exactly in a finite ring, so float updates become integers mod 2^k.
* Each hospital sends ``q_u = round(n_u * clip(delta_u, -c, c) * scale)`` — its update
  already multiplied by its sample count ``n_u`` — plus ``n_u`` itself as one extra element.
  The server's unmasked sum is then ``(sum q_u, sum n_u)`` and the FedAvg mean is
  ``sum q_u / (scale * sum n_u)``: it learns the weighted mean and the total count, never a
  single hospital's count.
* The sum of signed values must stay inside ``(-2^(k-1), 2^(k-1))`` or it wraps silently
  into garbage.  The worst case is every hospital at the clip bound with the largest sample
  count, so ``max_clients * max_weight * (clip * scale + 1/2) < 2^(k-1)`` is required and a
  configuration that breaks it is refused up front (``ConfigError`` naming the numbers).

Error bound (documented in docs/SECURITY.md and asserted by the tests): rounding moves each
``q_u`` by at most 1/2, so for ``m`` contributors with total count ``W`` the decoded mean
differs from the float64 weighted mean of the *clipped* updates by at most
``m / (2 * scale * W)`` per element, plus the float32 rounding of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securefl.errors import ConfigError, DataError

RING_BITS = (32, 64)
#: Elements decoded per step: the float64 intermediate stays small whatever the model size.
DECODE_CHUNK = 1 << 16
#: Elements encoded per step (a 512 KiB float64 scratch that stays in cache).
ENCODE_CHUNK = 1 << 16


@dataclass(frozen=True)
class Encoding:
    """Ring width, clip bound and fixed-point scale, with the bounds they were checked for."""

    ring_bits: int = 32
    clip: float = 1.0
    scale: float = 1024.0
    max_clients: int = 100
    max_weight: int = 10_000

    def __post_init__(self) -> None:
        if self.ring_bits not in RING_BITS:
            raise ConfigError(f"ring_bits must be 32 or 64, not {self.ring_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a positive number, not {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale must be a positive number, not {self.scale}")
        if self.max_clients < 1 or self.max_weight < 1:
            raise ConfigError("max_clients and max_weight must be at least 1")
        limit = 2 ** (self.ring_bits - 1) - 1
        worst = self.max_clients * self.max_weight * (self.clip * self.scale + 0.5)
        if worst > limit:
            raise ConfigError(
                f"this encoding could overflow: {self.max_clients} hospitals x "
                f"{self.max_weight} samples x (clip {self.clip} x scale {self.scale} + 0.5) "
                f"= {worst:.4g} exceeds the {self.ring_bits}-bit ring's {limit:.4g}; lower "
                "the scale, the clip or the limits, or use ring_bits=64"
            )

    @classmethod
    def auto(
        cls,
        *,
        ring_bits: int = 32,
        clip: float = 1.0,
        max_clients: int = 100,
        max_weight: int = 10_000,
    ) -> Encoding:
        """The finest power-of-two scale that cannot overflow (powers of two decode exactly)."""
        limit = 2 ** (ring_bits - 1) - 1
        room = limit / (max_clients * max_weight) - 0.5
        if room <= 0 or clip <= 0:
            raise ConfigError(
                f"no scale fits: {max_clients} hospitals x {max_weight} samples already fill "
                f"the {ring_bits}-bit ring; use ring_bits=64 or lower the limits"
            )
        exponent = math.floor(math.log2(room / clip))
        return cls(ring_bits, clip, 2.0**exponent, max_clients, max_weight)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.ring_bits == 32 else np.uint64

    @property
    def signed_dtype(self) -> type[np.signedinteger]:
        return np.int32 if self.ring_bits == 32 else np.int64

    @property
    def ring_bytes(self) -> int:
        return self.ring_bits // 8

    def error_bound(self, contributors: int, total_weight: int) -> float:
        """Largest per-element difference from the float64 weighted mean of clipped updates."""
        return contributors / (2.0 * self.scale * total_weight) + self.clip * 2.0**-23

    def encode(self, update: np.ndarray, weight: int) -> np.ndarray:
        """``[round(weight * clip(update) * scale)..., weight]`` as ring elements."""
        check_update(update)
        if not isinstance(weight, int | np.integer) or not 1 <= weight <= self.max_weight:
            raise DataError(
                f"sample count must be a whole number from 1 to {self.max_weight}, not {weight}"
            )
        # In chunks through one small float64 scratch (the same operations, so the same
        # bits): whole-model float64 and int temporaries made this 7 times slower, most of
        # it page faults on fresh 8 MB buffers, on every hospital's critical path.
        d = update.shape[0]
        out = np.empty(d + 1, dtype=self.dtype)
        signed = out[:-1].view(self.signed_dtype)
        factor = float(weight) * self.scale
        scratch = np.empty(min(d, ENCODE_CHUNK), np.float64)
        for start in range(0, d, ENCODE_CHUNK):
            stop = min(start + ENCODE_CHUNK, d)
            scaled = scratch[: stop - start]
            np.clip(update[start:stop], -self.clip, self.clip, out=scaled, dtype=np.float64)
            scaled *= factor
            np.rint(scaled, out=scaled)
            np.copyto(signed[start:stop], scaled, casting="unsafe")
        out[-1] = weight
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """Unmasked sum -> (weighted mean update as float32, total sample count)."""
        if total.dtype != self.dtype or total.ndim != 1 or total.shape[0] < 2:
            raise DataError("aggregate has the wrong type or shape for this encoding")
        signed = total.view(self.signed_dtype)
        total_weight = int(signed[-1])
        if total_weight < 1:
            raise DataError(f"aggregate total sample count is {total_weight}: masks did not cancel")
        # Chunked, straight into the float32 result: a whole-model float64 copy would double
        # the server's memory at the moment it holds the most.
        d = signed.shape[0] - 1
        mean = np.empty(d, np.float32)
        divisor = self.scale * total_weight
        for start in range(0, d, DECODE_CHUNK):
            stop = min(start + DECODE_CHUNK, d)
            mean[start:stop] = signed[start:stop].astype(np.float64) / divisor
        return mean, total_weight


def check_update(update: np.ndarray) -> None:
    """Refuse what would silently poison the aggregate: wrong shape, non-float, NaN or Inf."""
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise DataError("a model update must be a flat (1-D) numpy array")
    if update.dtype.kind != "f":
        raise DataError(f"a model update must hold floating-point numbers, not {update.dtype}")
    if update.size and not np.isfinite(update).all():
        bad = int(np.count_nonzero(~np.isfinite(update)))
        raise DataError(
            f"the model update contains {bad} NaN or infinite value(s): training diverged; "
            "retrain (e.g. with a lower learning rate) before sending"
        )
