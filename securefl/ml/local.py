"""A hospital's local ML jobs from its settings: train, evaluate, classify.

The Training folder is split once into train and validation scans (:func:`split_training`);
training stops early on the validation loss, the calibration temperature is fitted on the
validation scans, and ``evaluate`` scores them unless told to use Testing.

This is the seam the CLI and the hospital TUI call.  It knows files (the data folder, the
model file, the metrics history) but nothing of the network or the federation: the client
layer moves weights in and out with :func:`securefl.ml.model.to_vector` /
:func:`~securefl.ml.model.from_vector` around these calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from securefl.errors import DataError
from securefl.ml.settings import MLSettings

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from securefl.ml.calibration import Calibration
    from securefl.ml.data import ImageSet
    from securefl.ml.train import Classification, EvalReport, ProgressFn, TrainResult


def new_model(settings: MLSettings) -> keras.Model:
    """The deterministic initial model for these settings (same everywhere for one seed)."""
    from securefl.ml.model import make_model

    return make_model(
        settings.input_shape,
        len(settings.classes),
        kind=settings.model_kind,
        seed=settings.seed,
        augment=settings.augment,
        learning_rate=settings.learning_rate,
        prior_correction=settings.prior_correction,
    )


def _architecture(model: keras.Model) -> tuple[tuple[str, str], ...]:
    """The model's layers by name and kind, augmentation left out (it only acts in training)."""
    return tuple((layer.name, type(layer).__name__) for layer in model.layers
                 if not layer.name.startswith("aug_"))


_ARCHITECTURES: dict[tuple, tuple[tuple[str, str], ...]] = {}


def expected_architecture(settings: MLSettings) -> tuple[tuple[str, str], ...]:
    """What ``new_model(settings)`` builds (computed once per process and model spec)."""
    key = (settings.input_shape, len(settings.classes), settings.model_kind)
    if key not in _ARCHITECTURES:
        _ARCHITECTURES[key] = _architecture(new_model(settings))
    return _ARCHITECTURES[key]


def load_or_create_model(settings: MLSettings, *, replace_other: bool = False) -> keras.Model:
    """The hospital's current model file, or a fresh one if none was saved yet.  A saved
    model compiled with the other loss than ``prior_correction`` asks is recompiled.

    A saved model whose layers are not what the settings build (an older securefl's model,
    or one made with another ``model_kind``) is refused — training or sending it would mix
    two models in one federation — unless ``replace_other``: ``get`` replaces every weight
    anyway, so it starts from the model the settings build.
    """
    from securefl.ml.model import compile_model, load_model, uses_prior_correction

    if not settings.model_path.is_file():
        return new_model(settings)
    model = load_model(settings.model_path)
    shape = tuple(int(d) for d in model.input_shape[1:])
    if shape != settings.input_shape or int(model.output_shape[-1]) != len(settings.classes):
        if replace_other:
            return new_model(settings)
        raise DataError(
            f"{settings.model_path} takes {shape} images and {model.output_shape[-1]} classes "
            f"but the settings say {settings.input_shape} and {len(settings.classes)}: "
            "fix the settings or move the old model file away"
        )
    if _architecture(model) != expected_architecture(settings):
        if replace_other:
            return new_model(settings)
        raise DataError(
            f"{settings.model_path} is not the model the [ml] settings build (model_kind "
            f"'{settings.model_kind}'; it was made by an older securefl or with another "
            "model_kind): a federation's model is fixed when its version 0 is made, so get "
            "the global model of your federation (get --replace-trained), or move the old "
            "model file away")
    if uses_prior_correction(model) != settings.prior_correction:
        compile_model(model, settings.learning_rate, prior_correction=settings.prior_correction)
    return model


def load_saved_model(settings: MLSettings) -> keras.Model:
    """The model file for evaluating or classifying: never a fresh one, whose answers would
    look like a trained model's."""
    if not settings.model_path.is_file():
        raise DataError(f"there is no local model yet ({settings.model_path} is missing): "
                        "get the global model or train first")
    return load_or_create_model(settings)


def split_training(settings: MLSettings, data: ImageSet) -> tuple[ImageSet, ImageSet]:
    """``(train, validation)`` of the scans in ``scans_dir/Training``: stratified, the same
    every run (``securefl.ml.data.split_validation``), sized by ``validation_fraction`` and
    ``min_validation_per_class``."""
    from securefl.ml.data import split_validation

    root = settings.scans_dir / "Training"
    return split_validation(
        data, fraction=settings.validation_fraction,
        min_per_class=settings.min_validation_per_class, seed=settings.seed, root=root,
        class_dirs=[root / folder for folder in settings.folders])


def fit_calibration(settings: MLSettings, model: keras.Model,
                    validation: ImageSet) -> Calibration:
    """Fit the temperature of ``model`` on the validation scans and keep it beside the model
    file (``calibration.json``, tied to these exact weights).  Call it whenever the model's
    weights change for good: after training, after loading a global or personalised model."""
    from securefl.ml.calibration import calibrate, save_calibration, weights_sha256
    from securefl.ml.model import to_vector
    from securefl.ml.train import predict_proba

    probs = predict_proba(model, validation.images)
    cal = calibrate(probs, validation.labels, weights_sha256(to_vector(model)))
    save_calibration(settings.calibration_path, cal)
    return cal


def calibration_for(settings: MLSettings, model: keras.Model,
                    validation: ImageSet | None = None) -> Calibration | None:
    """The temperature saved for exactly this model; if there is none and ``validation``
    scans are given, it is fitted now (and saved).  ``None``: uncalibrated."""
    from securefl.ml.calibration import load_calibration, weights_sha256
    from securefl.ml.model import to_vector

    cal = load_calibration(settings.calibration_path, weights_sha256(to_vector(model)))
    if cal is None and validation is not None and len(validation):
        cal = fit_calibration(settings, model, validation)
    return cal


#: How each personalisation is named to people (``client get``, ``evaluate``, ``classify``,
#: the app): "global version 7, fine-tuned on this hospital's scans".
PERSONALISATION_LABELS = {
    "recalibrate": "recalibrated on this hospital's scans",
    "finetune": "fine-tuned on this hospital's scans",
    "downloaded": "as downloaded, chosen on this hospital's validation scans",
    # the setting, not a result: what the demo's table says it shows
    "best": "as downloaded, recalibrated or fine-tuned on this hospital's scans, whichever "
            "read its validation scans best",
}
#: How the candidates of ``[ml] personalise = "best"`` are named in its note.
_CANDIDATE_WORDS = {"downloaded": "as downloaded", "recalibrate": "recalibrated",
                    "finetune": "fine-tuned"}
#: The fine-tuning epoch's learning rate, as a share of ``[ml] learning_rate``: a short,
#: gentle step (the value measured in docs/RESULTS.md, 1e-4 at the default 1e-3).
FINETUNE_LR_FACTOR = 0.1


@dataclass(frozen=True)
class Personalised:
    """What :func:`personalise` made of a downloaded global model."""

    #: The personalisation applied ("recalibrate", "finetune"), "downloaded" (the global
    #: model as downloaded, chosen by ``"best"``), or "none" (as downloaded, not asked for
    #: or not possible).
    kind: str
    #: Training scans it was measured on (0 for "none").
    scans: int = 0
    #: The temperature fitted on the validation scans for the personalised model.
    temperature: float | None = None
    #: Why the asked-for personalisation was not (fully) applied, and under ``"best"`` each
    #: candidate's validation figure; "" when there is nothing to say.
    note: str = ""

    @property
    def label(self) -> str:
        return PERSONALISATION_LABELS.get(self.kind, "")


def personalise(settings: MLSettings, model: keras.Model,
                data: ImageSet | None = None, *, seed: int = 0,
                progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> Personalised:
    """Make the global weights just loaded into ``model`` this hospital's own model, and
    save it as the hospital's model file (``settings.model_path``).

    Why: the global model's batch-norm statistics are an average over every hospital's
    scanner, and its weights a compromise between every hospital's case mix and scanner;
    what the federation learned is in the weights.  ``[ml] personalise``:

    * ``"recalibrate"``: each batch-norm layer's mean and variance are measured exactly over
      this hospital's training scans (``securefl.ml.batchnorm``);
    * ``"finetune"``: that, then one epoch on the training scans at
      ``FINETUNE_LR_FACTOR`` x ``learning_rate`` with a fresh optimiser state, kept only if
      the validation loss went down (early stopping on validation; otherwise the
      recalibrated model is kept and ``note`` says so);
    * ``"best"`` (the default: docs/RESULTS.md, "Personalisation"): the global model as
      downloaded, recalibrated and fine-tuned are all scored on the validation scans and
      the best is kept (:func:`securefl.ml.train.choose_on_validation`); ``note`` gives
      each candidate's figure (two when the fine-tuning epoch was not kept or was stopped).
      Why: re-measured statistics can read a hospital's own scans worse than the averaged
      ones when its training scans are few or unlike its validation scans, and which is
      better changes from version to version.  The kept model's validation figure is the
      best of the candidates on those same scans, so it reads a little high; the Testing
      scans give the unbiased one.

    A model without batch-norm layers (``model_kind = "seed"``) is kept as downloaded
    whatever ``personalise`` says, with a note: there are no statistics to re-measure, and
    the fine-tuning epoch is defined on top of them.

    Then the temperature is fitted on the validation scans.  The optimiser state the model
    carries from round to round is put back afterwards, so federated training is the same
    with or without this step; the caller trains from the downloaded global weights, and
    the update it sends is computed against them.

    ``data`` is the whole Training folder (:func:`load_data` when not given); ``seed`` varies
    the fine-tuning epoch's shuffling (the caller passes the version).  A data problem (no
    scans, a class with too few) is a ``DataError``; the caller keeps the global model.
    ``progress`` hears every batch of the fine-tuning epoch: on a real Training folder it
    takes a minute or more, and ``get`` should not look stuck meanwhile.  ``cancel`` set (a
    stopping agent: its service manager allows it seconds, not minutes) ends that epoch
    within a batch and drops it, as when the epoch did not help: the recalibrated model is
    kept (under ``"best"``: the better of it and the download).
    """
    from securefl.ml.batchnorm import calibrate_batch_norm
    from securefl.ml.model import save_model
    from securefl.ml.train import predict_proba

    if settings.personalise == "none":
        save_model(model, settings.model_path)
        return Personalised("none")
    data = data if data is not None else load_data(settings, "Training")
    train_set, validation = split_training(settings, data)
    best = settings.personalise == "best"
    kept: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}  # "best": weights, val probs

    def keep(name: str) -> None:
        if best:
            kept[name] = model.get_weights(), predict_proba(model, validation.images)

    downloaded = model.get_weights()
    if calibrate_batch_norm(model, train_set) == 0:
        save_model(model, settings.model_path)
        return Personalised("none", note=f"the '{settings.model_kind}' model has no batch-norm "
                                         "statistics to recalibrate")
    if best:
        recalibrated = model.get_weights()
        model.set_weights(downloaded)
        keep("downloaded")
        model.set_weights(recalibrated)
    kind, note, why_not = "recalibrate", "", ""
    keep("recalibrate")
    if settings.personalise in ("finetune", "best"):
        if _finetune(settings, model, train_set, validation, seed, progress, cancel):
            kind = "finetune"
            keep("finetune")
        else:
            why_not = ("the fine-tuning epoch was stopped" if cancel is not None
                       and cancel.is_set() else "the fine-tuning epoch was not kept: it did "
                       "not lower the validation loss")
            note = f"{why_not}, so the recalibrated model is used"
    if best:
        kind, note = _choose(kept, validation.labels, why_not)
        model.set_weights(kept[kind][0])
    save_model(model, settings.model_path)
    cal = fit_calibration(settings, model, validation)
    return Personalised(kind, len(train_set), cal.temperature, note)


def _choose(kept: dict[str, tuple[list[np.ndarray], np.ndarray]], labels: np.ndarray,
            why_not: str) -> tuple[str, str]:
    """``[ml] personalise = "best"``: the candidate that reads the validation scans best,
    and a note with every candidate's figure, so the hospital sees why."""
    from securefl.ml.train import balanced_accuracy, choose_on_validation

    order = [k for k in ("finetune", "recalibrate", "downloaded") if k in kept]  # on a tie
    choice = choose_on_validation({k: kept[k][1] for k in order}, labels)

    def figure(k: str) -> str:
        probs = kept[k][1]
        if not np.all(np.isfinite(probs)):
            return "not finite"
        return f"{balanced_accuracy(probs, labels):.1%}"

    figures: dict[str, str] = {
        k: figure(k) for k in ("downloaded", "recalibrate", "finetune") if k in kept}
    why = "balanced accuracy on the validation scans: " + ", ".join(
        f"{_CANDIDATE_WORDS[k]} {v}" for k, v in figures.items())
    if list(figures.values()).count(figures[choice]) > 1:
        why += f" ({_CANDIDATE_WORDS[choice]} kept on the lower validation loss)"
    return choice, f"{why}; {why_not}" if why_not else why


def _finetune(settings: MLSettings, model: keras.Model, train_set: ImageSet,
              validation: ImageSet, seed: int, progress: ProgressFn | None = None,
              cancel: threading.Event | None = None) -> bool:
    """One gentle epoch on this hospital's scans, kept only if the class-balanced
    validation loss went down; the optimiser state is restored either way."""
    from securefl.ml.train import balanced_nll, predict_proba, train

    before = balanced_nll(predict_proba(model, validation.images), validation.labels)
    weights = model.get_weights()
    opt = getattr(model, "optimizer", None)
    state = [np.array(v) for v in opt.variables] if opt is not None else []
    if opt is not None:
        for v in opt.variables:
            v.assign(np.zeros_like(np.array(v)))
    lr = float(np.array(opt.learning_rate)) if opt is not None else settings.learning_rate
    stopped = train(model, train_set, epochs=1, batch_size=settings.batch_size,
                    learning_rate=settings.learning_rate * FINETUNE_LR_FACTOR, seed=seed,
                    progress=progress, cancel=cancel).cancelled
    after = float("nan") if stopped else balanced_nll(predict_proba(model, validation.images),
                                                        validation.labels)
    kept = bool(np.isfinite(after) and after < before)
    if not kept:
        model.set_weights(weights)
    if opt is not None:
        for i, v in enumerate(opt.variables):  # built by this epoch: back to fresh
            v.assign(state[i] if i < len(state) else np.zeros_like(np.array(v)))
        opt.learning_rate = lr
    return kept


def run_train(
    settings: MLSettings,
    *,
    model: keras.Model | None = None,
    data: ImageSet | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train on the training part of ``scans_dir/Training`` with early stopping on its
    validation part, save the model (unless cancelled) with its fitted temperature, and log
    the metrics.

    ``data`` is the whole Training folder (:func:`load_data`); it is split here
    (:func:`split_training`).  The result's ``skipped`` lists the files that were not used;
    callers show them with :func:`securefl.ml.data.describe_skipped` (the history keeps the
    count and the first few).

    ``model`` and ``data`` let a long-lived caller (the TUI, the demo) keep both in memory
    between rounds instead of reloading and re-decoding them every time.
    """
    from dataclasses import asdict, replace

    from securefl.ml.data import skipped_record
    from securefl.ml.model import save_model_digest
    from securefl.ml.train import append_history, train

    data = data if data is not None else load_data(settings, "Training")
    train_set, validation = split_training(settings, data)
    model = model if model is not None else load_or_create_model(settings)
    result = train(
        model, train_set, validation=validation, epochs=settings.epochs,
        patience=settings.patience, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, progress=progress, cancel=cancel,
        seed=settings.seed,
    )
    cal = None
    if not result.cancelled:
        digest = save_model_digest(model, settings.model_path)
        cal = fit_calibration(settings, model, validation)
        result = replace(result, temperature=cal.temperature, model_file_sha256=digest)
    append_history(
        settings.history_path,
        {
            "event": "train",
            "cancelled": result.cancelled,
            "num_samples": result.num_samples,
            "validation_samples": result.validation_samples,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            **skipped_record(data, settings.scans_dir),
            "seconds": round(result.seconds, 2),
            "history": result.history,
            "calibration": asdict(cal) if cal is not None else None,
        },
    )
    return result


def load_data(settings: MLSettings, split: str) -> ImageSet:
    """One folder of the hospital's scans (``Training`` or ``Testing``), decoded and resized
    for this model."""
    from securefl.ml.data import load_split

    return load_split(settings.scans_dir, split, classes=settings.classes,
                      size=settings.image_size, channels=settings.channels,
                      folders=settings.folders)


def run_evaluate(settings: MLSettings, *, model: keras.Model | None = None,
                 data: ImageSet | None = None, split: str = "validation",
                 validation: ImageSet | None = None) -> EvalReport:
    """Score the model on its validation scans (``split="validation"``, the default: what a
    hospital looks at every round) or on ``scans_dir/Testing`` (``"testing"``: figures to
    report, never used to choose anything), and log the metrics.

    The calibration error is reported before and after the temperature saved for this
    model; a model without one (just downloaded) gets it fitted on ``validation`` first.
    The model itself is not saved: a model file written here would stand in for a trained
    or downloaded one that does not exist.
    """
    from securefl.ml.data import skipped_record
    from securefl.ml.train import append_history, evaluate

    if split not in ("validation", "testing"):
        raise DataError(f"evaluate on 'validation' or 'testing' scans, not {split!r}")
    model = model if model is not None else load_saved_model(settings)
    if data is None or (split == "validation" and validation is None):
        folder = load_data(settings, "Training")
        validation = split_training(settings, folder)[1]
        if data is None:
            data = validation if split == "validation" else load_data(settings, "Testing")
    cal = calibration_for(settings, model, validation)
    report = evaluate(model, data, split=split,
                      temperature=cal.temperature if cal is not None else None)
    append_history(
        settings.history_path,
        {"event": "evaluate", **report.to_dict(), **skipped_record(data, settings.scans_dir)},
    )
    return report


def run_classify(
    settings: MLSettings, image: str | Path, *, model: keras.Model | None = None,
    validation: ImageSet | None = None, model_label: str = "the local model",
) -> Classification:
    """One scan's calibrated class probabilities with the hospital's current model, marked
    low-confidence below ``confidence_threshold``; ``model_label`` says which model it is
    (the client layer knows its version).  Without a temperature for this model, one is
    fitted on ``validation`` if given, otherwise the answer says it is uncalibrated."""
    from securefl.ml.data import load_image
    from securefl.ml.train import Classification, classify

    load_image(image, settings.image_size, settings.channels, as_scan=True)  # say so first
    if model is None:
        model = load_saved_model(settings)
    cal = calibration_for(settings, model, validation)
    t = cal.temperature if cal is not None else 1.0
    probs = classify(model, image, settings.classes, temperature=t)
    return Classification(probs, cal is not None, t, settings.confidence_threshold,
                          model_label)
