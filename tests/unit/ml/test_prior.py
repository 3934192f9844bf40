"""Prior-corrected cross-entropy: the arithmetic, the prior set per training run, and models
trained with it saving and loading like any other."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from securefl.errors import DataError
from securefl.ml.model import compile_model, load_model, make_model, save_model, weight_spec
from securefl.ml.prior import class_prior, loss_class, set_prior
from securefl.ml.train import train

from .conftest import SIZE

PROBS = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]], np.float32)
LABELS = np.array([1, 3], np.int32)


def _plain_ce(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(-np.log(probs[np.arange(len(labels)), labels])))


def test_class_prior_is_smoothed_so_an_unseen_class_stays_finite():
    prior = class_prior([366, 15, 0, 146])
    assert prior.dtype == np.float32 and prior.sum() == pytest.approx(1.0)
    assert prior[2] > 0
    np.testing.assert_allclose(prior, np.array([367, 16, 1, 147]) / 531, rtol=1e-6)


def test_a_uniform_prior_is_plain_cross_entropy_and_a_skewed_one_factors_the_mix_out():
    loss = loss_class()(4)
    assert float(loss(LABELS, PROBS)) == pytest.approx(_plain_ce(PROBS, LABELS), rel=1e-5)
    prior = np.array([0.7, 0.1, 0.1, 0.1], np.float32)
    loss.prior.assign(prior)
    adjusted = PROBS * prior
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    assert float(loss(LABELS, PROBS)) == pytest.approx(_plain_ce(adjusted, LABELS), rel=1e-5)


def test_train_sets_the_prior_of_its_data_and_leaves_plain_models_alone(train_set):
    model = make_model((SIZE, SIZE, 1), 4, kind="seed", seed=0)
    assert not set_prior(model, [1, 2, 3, 4])  # compiled with plain cross-entropy
    compile_model(model, prior_correction=True)
    train(model, train_set, epochs=1, batch_size=16)
    np.testing.assert_allclose(np.asarray(model.loss.prior),
                               class_prior(list(train_set.counts().values())), rtol=1e-6)
    with pytest.raises(DataError, match="3 classes"):
        set_prior(model, [1, 2, 3])
    # The prior is the loss's, not the model's: it is never part of the update sent.
    plain = make_model((SIZE, SIZE, 1), 4, kind="seed", seed=0)
    assert [w.name for w in weight_spec(model).layers] == \
        [w.name for w in weight_spec(plain).layers]


def test_a_model_trained_with_it_reloads_in_a_fresh_process(train_set, tmp_path):
    model = make_model((SIZE, SIZE, 1), 4, kind="seed", seed=0)
    compile_model(model, prior_correction=True)
    train(model, train_set, epochs=1, batch_size=16)
    path = save_model(model, tmp_path / "model.keras")
    expected = model.predict(train_set.images[:4], verbose=0)
    np.save(tmp_path / "images.npy", train_set.images[:4])
    code = ("import sys, numpy as np; from securefl.ml.model import load_model; "
            "m = load_model(sys.argv[1]); print(type(m.loss).__name__); "
            "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "p.npy"),
                          str(tmp_path / "images.npy")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PriorCorrectedCrossentropy" in out.stdout
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=1e-6)
    assert type(load_model(path).loss).__name__ == "PriorCorrectedCrossentropy"


def test_hospitals_train_with_it_by_default_and_the_setting_is_honoured(tmp_path):
    from securefl.ml.local import load_or_create_model
    from securefl.ml.model import uses_prior_correction
    from securefl.ml.settings import MLSettings

    on = MLSettings(scans_dir=tmp_path, model_dir=tmp_path, image_size=SIZE)
    assert on.prior_correction
    model = load_or_create_model(on)
    assert uses_prior_correction(model)
    save_model(model, on.model_path)
    off = on.model_copy(update={"prior_correction": False})
    assert not uses_prior_correction(load_or_create_model(off))  # recompiled on load
    assert uses_prior_correction(load_or_create_model(on))
