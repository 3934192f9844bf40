"""Batch-norm statistics recomputed exactly over a data set ("calibration").

Why: at inference a batch-norm layer normalises with its *moving* mean and variance.  During
training those are an exponential average over the last few batches (momentum 0.5, see
docs/ML.md): noisy, computed on augmented images, and describing weights that kept changing
while they were averaged.  In a federation it is worse: the server averages statistics that
each hospital measured on its own local model, and a server optimiser with momentum then
moves the weights past every local model.  Recomputing the statistics once after training —
the mean and variance of each batch-norm layer's input over the whole local training set,
in inference mode (no augmentation, no dropout) — makes them describe the trained weights
exactly; measured in docs/RESULTS.md.

The layers are done in order, each pass running the model up to one batch-norm layer with
the earlier layers already recalibrated, since a layer's input depends on them.  Each pass
returns per-image sums (a (N, C) array, not the activations), so memory stays small.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl.ml.data import ImageSet

if TYPE_CHECKING:  # pragma: no cover
    import keras

CALIBRATION_BATCH = 64

#: model -> [(batch-norm layer, probe model)], built once per model (building and tracing a
#: probe costs more than running it on a hospital's data set).
_PROBES: weakref.WeakKeyDictionary[Any, list[tuple[Any, Any]]] = weakref.WeakKeyDictionary()


def _probes(model: keras.Model) -> list[tuple[Any, Any]]:
    cached = _PROBES.get(model)
    if cached is not None:
        return cached
    from securefl.ml._tf import keras as _keras

    k = _keras()
    probes = []
    for layer in model.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            x = layer.input
            axes = tuple(range(1, len(x.shape) - 1))  # every axis but batch and channels
            probe = k.Model(model.input, [k.ops.sum(x, axis=axes), k.ops.sum(x * x, axis=axes)],
                            name=f"calibrate_{layer.name}")
            probes.append((layer, probe))
    _PROBES[model] = probes
    return probes


def calibrate_batch_norm(
    model: keras.Model, data: ImageSet, *, batch_size: int = CALIBRATION_BATCH,
    on_layer: Callable[[int, int], None] | None = None,
) -> int:
    """Set every batch-norm layer's moving mean and variance to their exact values over
    ``data`` (inference mode); returns the number of layers calibrated (0 without batch norm).

    ``on_layer(k, n)`` is called before layer ``k`` of ``n`` (1-based) is measured: each is
    one pass over the data, so the caller can show that work is going on.
    """
    probes = _probes(model)
    if not probes or len(data) == 0:
        return 0
    from securefl.ml._tf import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices(data.images).batch(batch_size) \
        .prefetch(tf.data.AUTOTUNE)
    for k, (layer, probe) in enumerate(probes, start=1):
        if on_layer is not None:
            on_layer(k, len(probes))
        sums, squares = probe.predict(ds, verbose=0)
        per_image = int(np.prod(layer.input.shape[1:-1]))
        n = per_image * len(data)
        mean = np.asarray(sums, dtype=np.float64).sum(axis=0) / n
        var = np.asarray(squares, dtype=np.float64).sum(axis=0) / n - mean * mean
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(np.maximum(var, 0.0).astype(np.float32))
    return len(probes)
