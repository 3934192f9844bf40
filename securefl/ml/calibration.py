"""Calibrated probabilities: temperature scaling fitted on validation scans.

Why: a CNN trained with cross-entropy is overconfident — ``classify`` said 99.5 % for wrong
answers.  Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks")
divides the logits by one number ``T`` chosen to minimise the negative log-likelihood on
held-out scans.  It never changes which class wins (accuracy stays), only how sure the
model says it is.  Our models end in a softmax, so the logits are recovered as ``log p``
(equal to the logits up to a per-image constant, which the softmax ignores).

``T`` belongs to one model: the file ``calibration.json`` beside ``model.keras`` records the
sha256 of the weights it was fitted for, and :func:`load_calibration` returns nothing for
any other model (after ``get`` or ``train`` until it is fitted again).

Expected calibration error (ECE) is measured with :data:`ECE_BINS` equal-width bins of the
top-class probability: the sample-weighted mean gap between the bin's accuracy and its mean
confidence.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Equal-width confidence bins for the expected calibration error.
ECE_BINS = 15
#: Temperatures searched (log-uniformly), and the golden-section steps to find the best.
T_MIN, T_MAX = 0.05, 20.0
SEARCH_STEPS = 80
#: Probabilities are floored here before the log (a float32 softmax can round to 0).
P_FLOOR = 1e-12


def weights_sha256(vector: np.ndarray) -> str:
    """sha256 of a weight vector as float32 little-endian bytes (as the client records it)."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").data).hexdigest()


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of ``softmax(log p / T)``, row by row (``T = 1`` returns them as they are)."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    z = np.log(np.maximum(probs, P_FLOOR)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.maximum(p, P_FLOOR))))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins of the top-class probability (0 = calibrated)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total / len(labels))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of ``labels`` (golden-section search over
    ``log T``; the NLL is convex in ``1/T``, so the search finds the minimum).  ``T = 1`` is
    kept unless another temperature lowers the NLL, so fitting never makes it worse."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 1.0
    logp = np.log(np.maximum(probs, P_FLOOR))

    def loss(u: float) -> float:
        z = logp / math.exp(u)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(lse - z[np.arange(len(labels)), labels]))

    a, b = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(SEARCH_STEPS):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    u = (a + b) / 2
    return float(math.exp(u)) if loss(u) < loss(0.0) else 1.0


@dataclass(frozen=True)
class Calibration:
    """The temperature of one model, how it was fitted, and what it changed on validation."""

    temperature: float
    model_sha256: str  # the weights it belongs to (:func:`weights_sha256`)
    scans: int  # validation scans it was fitted on
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def calibrate(probs: np.ndarray, labels: np.ndarray, model_sha256: str) -> Calibration:
    """Fit the temperature on validation predictions and measure its effect there."""
    t = fit_temperature(probs, labels)
    after = apply_temperature(probs, t)
    return Calibration(t, model_sha256, len(labels), nll(probs, labels),
                       nll(after, labels), expected_calibration_error(probs, labels),
                       expected_calibration_error(after, labels))


def save_calibration(path: str | Path, calibration: Calibration) -> None:
    """Write ``calibration.json`` (beside the model file) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(calibration), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def load_calibration(path: str | Path, model_sha256: str) -> Calibration | None:
    """The calibration saved for exactly this model, or ``None`` (none saved, unreadable, or
    fitted for other weights: a stale temperature would be a wrong one)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        cal = Calibration(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if cal.model_sha256 != model_sha256 or not (cal.temperature > 0):
        return None
    return cal
