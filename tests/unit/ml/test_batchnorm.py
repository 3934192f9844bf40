"""Batch-norm calibration: exact statistics over the data, done by train() by default."""

from __future__ import annotations

import threading

import numpy as np

from securefl.ml.batchnorm import calibrate_batch_norm
from securefl.ml.model import make_model, to_vector
from securefl.ml.train import train

from .conftest import SIZE


def _bn_input_moments(model, images):
    """Reference: each batch-norm layer's input over all images at once, in inference mode."""
    from securefl.ml._tf import keras

    k = keras()
    out = {}
    for i in range(1, 5):
        layer = model.get_layer(f"block{i}_bn")
        x = np.asarray(k.Model(model.input, layer.input)(images, training=False), np.float64)
        out[layer.name] = (x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)))
    return out


def test_calibration_sets_the_exact_mean_and_variance(train_set):
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=3)
    train(model, train_set, epochs=1, batch_size=32, calibrate=False)
    assert calibrate_batch_norm(model, train_set) == 4
    expected = _bn_input_moments(model, train_set.images)
    for name, (mean, var) in expected.items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), var, rtol=1e-4,
                                   atol=1e-6)


def test_train_calibrates_by_default(train_set):
    a = make_model((SIZE, SIZE, 1), 4, kind="small", seed=4)
    b = make_model((SIZE, SIZE, 1), 4, kind="small", seed=4)
    seen = []
    train(a, train_set, epochs=1, batch_size=32, seed=1, progress=seen.append)
    train(b, train_set, epochs=1, batch_size=32, seed=1, calibrate=False)
    # The progress line goes on while the statistics are measured: one pass per layer.
    assert [p.stage for p in seen[:-4]] == ["training"] * (len(seen) - 4)
    assert [(p.stage, p.batch, p.batches) for p in seen[-4:]] == [
        ("calibrating", k, 4) for k in range(1, 5)]
    before = to_vector(b)
    calibrate_batch_norm(b, train_set)
    assert not np.array_equal(before, to_vector(b))  # calibration changed the statistics
    np.testing.assert_allclose(to_vector(a), to_vector(b), rtol=1e-5, atol=1e-6)


def test_a_cancelled_run_is_not_calibrated(train_set, monkeypatch):
    import securefl.ml.train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "calibrate_batch_norm", lambda m, d, **kw: calls.append(d))
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=4)
    cancel = threading.Event()
    cancel.set()
    assert train(model, train_set, epochs=1, batch_size=32, cancel=cancel).cancelled
    assert calls == []
    train(model, train_set, epochs=1, batch_size=32)
    assert calls == [train_set]


def test_models_without_batch_norm_are_left_alone(train_set):
    model = make_model((SIZE, SIZE, 1), 4, kind="seed", seed=0)
    before = to_vector(model)
    assert calibrate_batch_norm(model, train_set) == 0
    assert np.array_equal(before, to_vector(model))
