"""Personalisation after ``get``: the hospital's own model from the global weights.

Real (tiny) training and real files; no network: ``Hospital.apply_global`` is what ``get``
ends with, given the weights ``get`` saved to ``global.npy``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.hospital import Hospital
from securefl.fedopt import statistics_layout
from securefl.ml.batchnorm import calibrate_batch_norm
from securefl.ml.data import ImageSet, load_split
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
        tmp_path: Path, train_set: ImageSet, test_set: ImageSet,
        trained_elsewhere: np.ndarray) -> None:
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
    g = trained_elsewhere  # "the federation's" model
    from_vector(model, g)
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
    ml = _ml(tmp_path, synth_root)  # personalise = "best", the default
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


def test_choose_on_validation_prefers_accuracy_then_loss_then_the_callers_order() -> None:
    from securefl.ml.train import choose_on_validation

    labels = np.array([0, 0, 1, 1])
    right = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
    unsure = np.array([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])  # right, less sure
    one_wrong = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9]])
    # Accuracy first: a confident model with one miss loses to an unsure one with none.
    assert choose_on_validation({"a": one_wrong, "b": unsure}, labels) == "b"
    # Same accuracy: the lower class-balanced loss.
    assert choose_on_validation({"a": unsure, "b": right}, labels) == "b"
    # Same on both: the first named (the caller's preference).
    assert choose_on_validation({"a": right, "b": right.copy()}, labels) == "a"
    # Balanced: the rare class counts as much as the common one.
    labels = np.array([0, 0, 0, 0, 1])
    common = np.tile([0.9, 0.1], (5, 1))  # 80 % accuracy, 50 % balanced
    both = np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9], [0.1, 0.9]])  # 80 %, 87.5 % balanced
    assert choose_on_validation({"a": common, "b": both}, labels) == "b"
    # A diverged model is never the choice, whatever its argmax says.
    broken = np.full((5, 2), np.nan)
    assert choose_on_validation({"a": broken, "b": common}, labels) == "b"
    with pytest.raises(ValueError):
        choose_on_validation({}, labels)


def _scanner(images: np.ndarray) -> np.ndarray:
    """Another scanner than the training sites': blurred, another contrast curve."""
    x = images.astype(np.float32)
    x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
    return np.clip(255.0 * (x / 255.0) ** 0.4, 0, 255).astype(np.uint8)


def _candidates_on_validation(ml: MLSettings, g: np.ndarray, data: ImageSet
                              ) -> dict[str, float]:
    """What the test itself measures: the model as downloaded and recalibrated on the
    hospital's training part, each on its validation part."""
    train_part, validation = split_training(ml, data)
    model = new_model(ml)
    from_vector(model, g)
    out = {"as downloaded": evaluate(model, validation).balanced_accuracy}
    calibrate_batch_norm(model, train_part)
    out["recalibrated"] = evaluate(model, validation).balanced_accuracy
    return out


@pytest.fixture(scope="module")
def trained_elsewhere(tmp_path_factory: pytest.TempPathFactory, synth_root: Path,
                      train_set: ImageSet) -> np.ndarray:
    """"The federation's" model: trained on the home scanner's scans (once for the module:
    three epochs are the slow part of the tests that use it)."""
    model = new_model(_ml(tmp_path_factory.mktemp("elsewhere"), synth_root))
    train(model, train_set, epochs=3, batch_size=32, seed=1)
    return to_vector(model)


def test_best_keeps_the_model_as_downloaded_when_its_own_statistics_read_its_scans_worse(
        tmp_path: Path, synth_root: Path, trained_elsewhere: np.ndarray) -> None:
    """The case the choice is for: re-measured statistics can make a hospital's model
    worse on its own scans (here its training scans come from another scanner than its
    validation scans).  ``best`` then keeps the download as is, says so with the
    figures, and the hospital evaluates with it."""
    ml = _ml(tmp_path, synth_root, personalise="best")
    g = trained_elsewhere
    data = load_split(synth_root, "Training", classes=ml.classes, size=SIZE)
    held_out = set(split_training(ml, data)[1].paths)
    shifted = np.array([img if p in held_out else _scanner(img[None])[0]
                        for img, p in zip(data.images, data.paths, strict=True)])
    data = replace(data, images=shifted)
    measured = _candidates_on_validation(ml, g, data)
    assert measured["as downloaded"] > measured["recalibrated"], measured

    model = new_model(ml)
    from_vector(model, g)
    made = personalise(ml, model, data, seed=0)
    assert made.kind == "downloaded", made
    np.testing.assert_array_equal(to_vector(load_saved_model(ml)), g)
    for name, acc in measured.items():
        assert f"{name} {acc:.1%}" in made.note, (name, acc, made.note)
    assert made.label == "as downloaded, chosen on this hospital's validation scans"


def test_best_keeps_the_recalibrated_or_fine_tuned_model_when_it_reads_the_scans_better(
        tmp_path: Path, synth_root: Path, trained_elsewhere: np.ndarray) -> None:
    """A hospital on another scanner than the federation's: its own statistics help, so
    ``best`` keeps a personalised model, and the one kept is the best of the figures it
    reports."""
    ml = _ml(tmp_path, synth_root, personalise="best")
    g = trained_elsewhere
    data = load_split(synth_root, "Training", classes=ml.classes, size=SIZE)
    data = replace(data, images=_scanner(data.images))
    measured = _candidates_on_validation(ml, g, data)
    assert measured["recalibrated"] > measured["as downloaded"], measured

    model = new_model(ml)
    from_vector(model, g)
    made = personalise(ml, model, data, seed=0)
    assert made.kind in ("recalibrate", "finetune"), made
    figures = dict(re.findall(r"(as downloaded|recalibrated|fine-tuned) ([\d.]+)%", made.note))
    assert set(figures) == ({"as downloaded", "recalibrated", "fine-tuned"}
                            if made.kind == "finetune" else {"as downloaded", "recalibrated"})
    kept = evaluate(load_saved_model(ml), split_training(ml, data)[1]).balanced_accuracy
    assert f"{kept:.1%}" == f"{max(map(float, figures.values())):.1f}%", (kept, made.note)
    assert not np.array_equal(to_vector(load_saved_model(ml)), g)


def test_best_says_why_on_a_tie_and_never_prints_a_figure_for_a_diverged_model() -> None:
    """What ``get`` prints under ``best``: equal figures say the loss decided; a model whose
    probabilities are not finite is named so, not given the accuracy its argmax fakes."""
    from securefl.ml.local import _choose

    labels = np.array([0, 0, 1, 1])
    sure = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
    unsure = np.array([[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])
    kind, note = _choose({"downloaded": ([], sure), "recalibrate": ([], unsure)}, labels,
                         "the fine-tuning epoch was stopped")
    assert kind == "downloaded"
    assert note == ("balanced accuracy on the validation scans: as downloaded 100.0%, "
                    "recalibrated 100.0% (as downloaded kept on the lower validation loss); "
                    "the fine-tuning epoch was stopped")
    broken = np.full((4, 2), np.nan)
    kind, note = _choose({"downloaded": ([], unsure), "recalibrate": ([], broken),
                          "finetune": ([], sure)}, labels, "")
    assert kind == "finetune"
    assert note == ("balanced accuracy on the validation scans: as downloaded 100.0%, "
                    "recalibrated not finite, fine-tuned 100.0% (fine-tuned kept on the "
                    "lower validation loss)")
