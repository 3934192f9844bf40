"""Validation discipline, early stopping, calibrated probabilities and the intensity window,
with real training on the tiny synthetic hospital."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from securefl.errors import DataError
from securefl.ml.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from securefl.ml.data import ImageSet, load_image, split_validation
from securefl.ml.model import from_vector, make_model, to_vector, weight_spec
from securefl.ml.train import balanced_nll, predict_proba, train

from .conftest import SIZE


@pytest.fixture(scope="module")
def split(train_set, synth_root):
    return split_validation(train_set, fraction=0.15, min_per_class=5, seed=0,
                            root=synth_root / "Training")


def test_split_is_stratified_disjoint_and_independent_of_listing_order(train_set, split,
                                                                       synth_root):
    tr, val = split
    assert len(tr) + len(val) == len(train_set)
    assert not set(tr.paths) & set(val.paths)
    assert set(tr.paths) | set(val.paths) == set(train_set.paths)
    # every class: 15 % (rounded), at least 5
    for name, n in train_set.counts().items():
        assert val.counts()[name] == max(5, round(0.15 * n)), name
    # the same scans whatever order the files came in, and wherever the folder is
    shuffled = train_set.subset(np.random.default_rng(5).permutation(len(train_set)))
    _, again = split_validation(shuffled, fraction=0.15, min_per_class=5, seed=0,
                                root=synth_root / "Training")
    assert set(again.paths) == set(val.paths)
    _, other = split_validation(train_set, fraction=0.15, min_per_class=5, seed=1,
                                root=synth_root / "Training")
    assert set(other.paths) != set(val.paths)  # the seed decides, not the listing
    assert val.skipped == tr.skipped == train_set.skipped  # the folder's unused files


def test_a_class_with_too_few_scans_is_named(train_set, tmp_path):
    keep = [i for i in range(len(train_set))
            if train_set.labels[i] != 3 or i in set(np.flatnonzero(train_set.labels == 3)[:5])]
    few = train_set.subset(keep)
    with pytest.raises(DataError, match=r"class 'pituitary' has 5 training scans in "
                                        r".*pituitary but needs at least 6 .*"
                                        r"min_validation_per_class"):
        split_validation(few, min_per_class=5, class_dirs=[tmp_path / c for c in
                                                            train_set.classes])
    tr, val = split_validation(few, min_per_class=4)  # in-memory: split by pixels
    assert val.counts()["pituitary"] == 4 and tr.counts()["pituitary"] == 1


def test_early_stopping_stops_and_restores_the_best_epoch(split):
    """Validation labels shifted by one class: the more the model learns, the worse its
    validation loss, so the first epoch is the best, training stops after ``patience``
    more, and the model ends with the first epoch's weights."""
    tr, val = split
    tr = tr.subset(range(0, len(tr), 2))  # fast enough
    wrong = ImageSet(val.images, (val.labels + 1) % 4, val.classes)
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=0, augment=False)
    result = train(model, tr, validation=wrong, epochs=8, patience=2, batch_size=32)
    losses = result.history["val_loss"]
    assert result.best_epoch == 1 and result.stopped_early and result.epochs_run == 3
    assert len(losses) == 3 and min(losses) == losses[0]
    # the kept weights are epoch 1's: their validation loss is the one measured then (the
    # training set is smaller than the batch-norm reference sample, so statistics agree)
    now = balanced_nll(predict_proba(model, wrong.images), wrong.labels)
    assert now == pytest.approx(losses[0], rel=1e-4)
    assert now < losses[-1]


def test_temperature_scaling_calibrates_an_overconfident_model(split):
    tr, val = split
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=2)
    train(model, tr.subset(range(0, len(tr), 2)), epochs=2, batch_size=32)
    # Overconfident on purpose: every logit five times larger.
    vec = to_vector(model)
    last = weight_spec(model).layers[-2:]  # the Dense kernel and bias
    start = vec.size - sum(layer.size for layer in last)
    vec[start:] *= 5.0
    from_vector(model, vec)
    probs = predict_proba(model, val.images)
    cal = calibrate(probs, val.labels, "x")
    assert cal.temperature > 2.0
    assert cal.nll_after < cal.nll_before
    assert cal.ece_after < cal.ece_before
    assert (apply_temperature(probs, cal.temperature).argmax(1) == probs.argmax(1)).all()


def test_fitting_a_temperature_never_raises_the_nll():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(0, rng.uniform(0.1, 6), (60, 4))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = rng.integers(0, 4, 60)
        t = fit_temperature(probs, labels)
        assert nll(apply_temperature(probs, t), labels) <= nll(probs, labels) + 1e-12
    # ECE: 15 bins; a model that says 0.9 and is right 9 times in 10 is calibrated
    p = np.tile([0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3], (10, 1))
    assert expected_calibration_error(p, np.array([0] * 9 + [1])) == pytest.approx(0.0)
    assert expected_calibration_error(p, np.array([1] * 10)) == pytest.approx(0.9)


def test_output_is_invariant_to_a_global_brightness_scale():
    """Dividing by 255 made the network see each scanner's brightness; the percentile
    window gives the same answer for a scan and a darker (or brighter) export of it."""
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=4)
    rng = np.random.default_rng(3)
    from_vector(model, to_vector(model) + rng.normal(0, 0.05, to_vector(model).size)
                .astype(np.float32))
    images = rng.uniform(0, 200, (6, SIZE, SIZE, 1)).astype(np.float32)
    images[:, :8] = 0  # a black border, as MRI backgrounds are
    base = model.predict(images, verbose=0)
    for scale in (0.3, 1.25):
        np.testing.assert_allclose(model.predict(images * scale, verbose=0), base, atol=1e-5)
    assert np.abs(base - base.mean(0)).max() > 1e-3  # the output does depend on the image


def test_eight_and_sixteen_bit_files_reach_the_model_alike(tmp_path):
    rng = np.random.default_rng(1)
    img8 = (np.outer(np.hanning(40), np.hanning(40)) * 220).astype(np.uint8)
    img8 = np.clip(img8 + rng.integers(0, 20, img8.shape), 0, 255).astype(np.uint8)
    img16 = img8.astype(np.uint16) * 257
    img16[3, 3] = 65535  # one hot pixel used to crush the rest into a few grey levels
    Image.fromarray(img8).save(tmp_path / "a8.png")
    Image.fromarray(img16).save(tmp_path / "a16.png")
    window = make_model((40, 40, 1), 4, augment=False).get_layer("intensity_window")
    a = np.asarray(window(load_image(tmp_path / "a8.png", 40)[None].astype(np.float32)))
    b = np.asarray(window(load_image(tmp_path / "a16.png", 40)[None].astype(np.float32)))
    assert np.abs(a - b).mean() < 0.01


def test_intensity_augmentation_acts_only_in_training():
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=0)
    aug = model.get_layer("aug_intensity")
    x = np.random.default_rng(0).uniform(0, 1, (4, SIZE, SIZE, 1)).astype(np.float32)
    assert np.array_equal(np.asarray(aug(x, training=False)), x)
    assert np.abs(np.asarray(aug(x, training=True)) - x).mean() > 1e-3
