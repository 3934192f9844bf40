"""What a published version must be, computed from the hospitals' own records alone.

Why this module exists: a round's tests used to check version numbers, and a hospital whose
update never reached the model went unnoticed.  These functions take what each hospital
kept (the update it handed to the round, its sample count) and the previous version, and
apply the rules the documents state — not the code under test:

* encoding (docs/SECURITY.md, securefl.crypto.quantize's docstring): each update is clipped
  to [-clip, clip]; the server learns the sample-weighted mean, off by at most
  ``m / (2 * scale * W)`` per value for m contributors with W scans; ``scale`` is the largest
  power of two with ``max_clients * max_weight * (clip * scale + 1/2) < 2^(ring_bits-1)``;
* the server optimiser (docs/QUICKSTART.md ``[server_opt]``, docs/DECISIONS.md): FedAvgM,
  ``m = momentum * m + mean``, ``w += server_lr * m``; in the first step the batch-norm
  statistics are plainly averaged and their momentum stays zero (the first round's jump
  from Keras' placeholders is not carried forward, docs/DECISIONS.md), after it they move
  with the weights (momentum), and variances never go below zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def documented_scale(clip: float = 1.0, max_clients: int = 100, max_weight: int = 10_000,
                     ring_bits: int = 32) -> float:
    """The fixed-point scale the server settings imply (defaults: server.toml's)."""
    room = ((2 ** (ring_bits - 1) - 1) / (max_clients * max_weight) - 0.5) / clip
    return float(2 ** math.floor(math.log2(room)))


def weighted_mean(contributions: Sequence[tuple[np.ndarray, int]], clip: float = 1.0
                  ) -> np.ndarray:
    """The FedAvg mean of the clipped updates, in float64."""
    total = sum(n for _, n in contributions)
    acc = np.zeros(contributions[0][0].shape, np.float64)
    for update, n in contributions:
        acc += n * np.clip(update.astype(np.float64), -clip, clip)
    return acc / total


def tolerance(contributions: Sequence[tuple[np.ndarray, int]], clip: float = 1.0,
              scale: float | None = None) -> float:
    """The encoding's error bound per value, plus float32 rounding of the result."""
    scale = documented_scale(clip) if scale is None else scale
    total = sum(n for _, n in contributions)
    return len(contributions) / (2 * scale * total) + 1e-6


def fedavgm_step(previous: np.ndarray, mean: np.ndarray, momentum_before: np.ndarray | None,
                 *, variances: np.ndarray | None = None, statistics: np.ndarray | None = None,
                 beta: float = 0.3, lr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(next version, momentum after)`` for one round.

    ``momentum_before`` is None for the first step; ``statistics`` and ``variances`` are
    boolean masks over the vector (batch-norm running means and variances, both in
    ``statistics``).  In the first step statistics take the plain mean, momentum zero.
    """
    first = momentum_before is None
    m = mean.copy() if first else beta * momentum_before + mean
    new = previous.astype(np.float64) + lr * m
    if first and statistics is not None:
        new[statistics] = previous[statistics] + mean[statistics]
        m[statistics] = 0.0
    if not first and variances is not None:
        new[variances] = np.maximum(new[variances], 0.0)
    return new, m


def statistics_masks(weight_names: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the batch-norm statistics and of the variances, from Keras weight names."""
    size = sum(n for _, n in weight_names)
    stats, variances = np.zeros(size, bool), np.zeros(size, bool)
    at = 0
    for name, n in weight_names:
        if name.endswith(("moving_mean", "moving_variance")):
            stats[at:at + n] = True
        if name.endswith("moving_variance"):
            variances[at:at + n] = True
        at += n
    return stats, variances


def keras_weight_names(model_path: str) -> list[tuple[str, int]]:
    """``(path, size)`` of every weight of a saved model, in the vector's order."""
    import keras

    from securefl.ml.preprocess import layer_classes

    layer_classes()  # securefl's own preprocessing layers, registered for loading
    model = keras.saving.load_model(model_path, compile=False)
    return [(w.path, int(np.prod(w.shape))) for w in model.weights
            if str(w.dtype) == "float32"]


def assert_published(published: np.ndarray, expected: np.ndarray, atol: float,
                     previous: np.ndarray) -> None:
    """The published version equals the expected one within the bound, and moved."""
    diff = np.abs(published.astype(np.float64) - expected)
    worst = int(np.argmax(diff))
    assert diff[worst] <= atol, (
        f"published value {worst} is {published[worst]!r}, expected {expected[worst]!r} "
        f"(off by {diff[worst]:.3g}, bound {atol:.3g})")
    moved = np.abs(published.astype(np.float64) - previous).max()
    assert moved > 10 * atol, f"the published version hardly moved ({moved:.3g})"
