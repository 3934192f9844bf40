"""Personalisation after ``get``: the hospital's own model from the global weights.

Real (tiny) training and real files; no network: ``Hospital.apply_global`` is what ``get``
ends with, given the weights ``get`` saved to ``global.npy``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.hospital import Hospital
from securefl.fedopt import statistics_layout
from securefl.ml.batchnorm import calibrate_batch_norm
from securefl.ml.data import ImageSet
from securefl.ml.local import (
    calibration_for,
    load_saved_model,
    new_model,
    personalise,
    split_training,
)
from securefl.ml.model import from_vector, load_model, to_vector, weight_spec
from securefl.ml.settings import MLSettings
from securefl.ml.train import evaluate, train

from .conftest import SIZE


def _ml(tmp_path: Path, scans: Path, **kw: object) -> MLSettings:
    return MLSettings(scans_dir=scans, model_dir=tmp_path / "model", image_size=SIZE,
                      epochs=1, **kw)


def _hospital(tmp_path: Path, ml: MLSettings) -> Hospital:
    settings = config.ClientSettings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                     ca=tmp_path / "ca.pem", state_dir=tmp_path / "state")
    return Hospital(settings, ml)


def _downloaded(h: Hospital, weights: np.ndarray, version: int, **apply: object) -> None:
    """What ``get`` does before ``apply_global``: keep the global model as downloaded."""
    h.state_dir.mkdir(parents=True, exist_ok=True)
    np.save(h.state_dir / "global.npy", weights)
    (h.state_dir / "global.json").write_text(json.dumps(
        {"version": version, "sha256": "x", "classes": list(h.ml.classes)}))
    h.apply_global(weights, version, **apply)  # type: ignore[arg-type]


def _statistics_mask(model) -> np.ndarray:
    layout = statistics_layout((layer.name, layer.size) for layer in weight_spec(model).layers)
    mask = np.zeros(to_vector(model).size, dtype=bool)
    for start, stop in layout.ranges:
        mask[start:stop] = True
    return mask


def test_get_personalises_the_model_evaluate_and_classify_use_and_send_uses_the_global(
        tmp_path: Path, synth_root: Path) -> None:
    ml = _ml(tmp_path, synth_root, personalise="recalibrate")
    h = _hospital(tmp_path, ml)
    g = to_vector(new_model(ml))  # version 0 as the server makes it
    _downloaded(h, g, 0)

    state = h.local_state()
    train_part, validation = split_training(ml, h.scans("Training"))
    assert state.personalisation == "recalibrate"
    assert state.personalised_scans == len(train_part)
    assert h.model_label() == "global version 0, recalibrated on this hospital's scans"

    # The saved model: the global weights, with this hospital's exact statistics.
    saved = load_model(ml.model_path)
    mine = to_vector(saved)
    stats = _statistics_mask(saved)
    np.testing.assert_array_equal(mine[~stats], g[~stats])
    assert np.abs(mine[stats] - g[stats]).max() > 0.01
    reference = new_model(ml)
    from_vector(reference, g)
    calibrate_batch_norm(reference, train_part)
    np.testing.assert_allclose(mine, to_vector(reference), rtol=1e-5, atol=1e-6)
    assert calibration_for(ml, saved) is not None  # its temperature, fitted on validation

    # Evaluate and classify answer with it, and say so.
    report = h.evaluate()
    expected = evaluate(reference, validation)
    assert report.balanced_accuracy == pytest.approx(expected.balanced_accuracy)
    scan = next((synth_root / "Testing" / "glioma").iterdir())
    answer = h.classify(scan)
    assert answer.model == "global version 0, recalibrated on this hospital's scans"
    assert answer.calibrated

    # Train, then send: the update is the trained model minus the model as downloaded
    # (global.npy), never minus the personalised one; computed here from the saved files.
    h.train()
    update, samples, base = h.local_update()
    trained = to_vector(load_model(ml.model_path))
    downloaded = np.load(h.state_dir / "global.npy")
    np.testing.assert_array_equal(downloaded, g)
    np.testing.assert_array_equal(update, trained - downloaded)
    assert not np.array_equal(update[stats], trained[stats] - mine[stats])
    assert (samples, base) == (len(train_part), 0)
    assert h.model_label() == "the local model trained here from global version 0"


def test_recalibration_recovers_accuracy_on_a_hospitals_shifted_scanner(
        tmp_path: Path, train_set: ImageSet, test_set: ImageSet) -> None:
    """The outcome a hospital cares about: a global model trained elsewhere reads this
    hospital's scans (another scanner: here every scan blurred and inverted in contrast)
    better once its statistics are measured on this hospital's own training scans."""
    def scanner(s: ImageSet) -> ImageSet:
        x = s.images.astype(np.float32)
        x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
        x = 255.0 * (x / 255.0) ** 0.4  # another contrast curve than the training sites'
        return ImageSet(np.clip(x, 0, 255).astype(np.uint8), s.labels, s.classes)

    ml = _ml(tmp_path, tmp_path / "unused")
    model = new_model(ml)
    train(model, train_set, epochs=3, batch_size=32, seed=1)  # "the federation's" model
    g = to_vector(model)
    here_train, here_test = scanner(train_set), scanner(test_set)
    before = evaluate(model, here_test).balanced_accuracy
    calibrate_batch_norm(model, here_train)
    after = evaluate(model, here_test).balanced_accuracy
    from_vector(model, g)
    at_home = evaluate(model, test_set).balanced_accuracy
    assert after > before + 0.05, (before, after, at_home)


def test_without_usable_scans_or_when_switched_off_the_global_model_is_kept_as_is(
        tmp_path: Path, synth_root: Path) -> None:
    empty = tmp_path / "no-scans"
    empty.mkdir()
    h = _hospital(tmp_path / "a", _ml(tmp_path / "a", empty))
    g = to_vector(new_model(h.ml))
    _downloaded(h, g, 3)
    state = h.local_state()
    assert state.personalisation == "" and "Training" in state.personalisation_note
    np.testing.assert_array_equal(to_vector(load_saved_model(h.ml)), g)
    assert h.model_label() == "global version 3"

    off = _hospital(tmp_path / "b", _ml(tmp_path / "b", synth_root, personalise="none"))
    _downloaded(off, g, 3)
    assert off.local_state().personalisation == ""
    assert off.local_state().personalisation_note == ""
    np.testing.assert_array_equal(to_vector(load_saved_model(off.ml)), g)
    assert off.model_label() == "global version 3"


def test_finetune_is_kept_only_if_validation_improves_and_training_starts_from_the_global(
        tmp_path: Path, synth_root: Path) -> None:
    ml = _ml(tmp_path, synth_root, personalise="finetune")
    h = _hospital(tmp_path, ml)
    g = to_vector(new_model(ml))
    _downloaded(h, g, 0)
    state = h.local_state()
    mine = to_vector(load_saved_model(ml))
    stats = _statistics_mask(new_model(ml))
    if state.personalisation == "finetune":  # the epoch lowered the validation loss
        assert h.model_label() == "global version 0, fine-tuned on this hospital's scans"
        assert np.abs(mine[~stats] - g[~stats]).max() > 0
    else:
        assert state.personalisation == "recalibrate" and "not kept" in \
            state.personalisation_note
        np.testing.assert_array_equal(mine[~stats], g[~stats])

    # Training starts from the downloaded weights.  The reference goes through the same
    # personalisation first (its fine-tuning epoch moves the augmentation's random streams),
    # then trains from the downloaded weights.
    h.train()
    trained = to_vector(load_model(ml.model_path))
    reference = new_model(ml)
    from_vector(reference, g)
    personalise(ml.model_copy(update={"model_dir": tmp_path / "ref"}), reference,
                h.scans("Training"), seed=0)
    from_vector(reference, g)
    train_part, validation = split_training(ml, h.scans("Training"))
    train(reference, train_part, validation=validation, epochs=1, batch_size=ml.batch_size,
          learning_rate=ml.learning_rate, seed=ml.seed)
    np.testing.assert_allclose(trained, to_vector(reference), rtol=1e-4, atol=1e-5)
    update, _, _ = h.local_update()
    np.testing.assert_array_equal(update, trained - g)


def test_finetuning_after_get_reports_every_batch_so_get_never_looks_stuck(
        tmp_path: Path, synth_root: Path) -> None:
    ml = _ml(tmp_path, synth_root, personalise="finetune")
    h = _hospital(tmp_path, ml)
    g = to_vector(new_model(ml))
    h.state_dir.mkdir(parents=True, exist_ok=True)
    np.save(h.state_dir / "global.npy", g)
    (h.state_dir / "global.json").write_text(json.dumps(
        {"version": 0, "sha256": "x", "classes": list(h.ml.classes)}))
    seen = []
    h.apply_global(g, 0, progress=seen.append)
    train_part, _ = split_training(ml, h.scans("Training"))
    batches = -(-len(train_part) // ml.batch_size)
    steps = [p for p in seen if p.stage == "training"]
    # One epoch, every batch in order, ending at the whole epoch.
    assert [(p.epoch, p.epochs, p.batch) for p in steps] == [
        (1, 1, b) for b in range(1, batches + 1)]
    assert steps[-1].fraction == 1.0
    # Without a fine-tuning epoch there is nothing long to report.
    quiet = []
    h.ml = ml.model_copy(update={"personalise": "recalibrate"})
    h.apply_global(g, 0, progress=quiet.append)
    assert [p for p in quiet if p.stage == "training"] == []


def test_a_download_trained_on_at_once_is_not_fine_tuned_and_training_starts_from_it(
        tmp_path: Path, synth_root: Path) -> None:
    """The agent downloads a round's version and trains on it straight away: the
    fine-tuning epoch would be replaced by the training, so it is not run; the model on
    file is the download as is, labelled so, and the update is trained minus downloaded."""
    ml = _ml(tmp_path, synth_root)  # personalise = "finetune", the default
    h = _hospital(tmp_path, ml)
    g = to_vector(new_model(ml))
    seen: list[object] = []
    _downloaded(h, g, 0, progress=seen.append, personalise=False)
    assert seen == []  # no fine-tuning epoch ran
    state = h.local_state()
    assert state.personalisation == "" and state.base_version == 0 and not state.trained
    np.testing.assert_array_equal(to_vector(load_saved_model(ml)), g)
    assert h.holds_untrained(0) and not h.holds_untrained(1)
    h.train()
    update, _, base = h.local_update()
    assert base == 0
    np.testing.assert_allclose(update, to_vector(load_saved_model(ml)) - g, atol=1e-6)
    assert not h.holds_untrained(0)  # trained on: a new round on 0 downloads afresh


def test_a_stopping_agent_ends_the_fine_tuning_epoch_within_a_batch_and_keeps_the_recalibrated(
        tmp_path: Path, synth_root: Path) -> None:
    """The fine-tuning epoch runs in a thread that a cancelled task does not stop: a
    stopping agent sets ``cancel`` and the epoch ends at the next batch (SIGTERM waited for
    the whole epoch before, and a service manager kills what overstays)."""
    ml = _ml(tmp_path, synth_root, personalise="finetune", batch_size=8)
    h = _hospital(tmp_path, ml)
    g = to_vector(new_model(ml))
    train_part, _ = split_training(ml, h.scans("Training"))
    batches = -(-len(train_part) // ml.batch_size)
    assert batches >= 4
    cancel = threading.Event()
    seen: list[int] = []

    def progress(p: object) -> None:
        if p.stage == "training":  # type: ignore[attr-defined]
            seen.append(p.batch)  # type: ignore[attr-defined]
            cancel.set()  # asked to stop during the first batch

    _downloaded(h, g, 0, progress=progress, cancel=cancel)
    assert len(seen) <= 2 < batches, seen
    state = h.local_state()
    assert state.personalisation == "recalibrate"
    assert "stopped" in state.personalisation_note
    mine = to_vector(load_saved_model(ml))
    stats = _statistics_mask(new_model(ml))
    np.testing.assert_array_equal(mine[~stats], g[~stats])  # no half epoch kept
