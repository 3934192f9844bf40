"""A hospital's local ML jobs from its settings: train, evaluate, classify.

This is the seam the CLI and the hospital TUI call.  It knows files (the data folder, the
model file, the metrics history) but nothing of the network or the federation: the client
layer moves weights in and out with :func:`securefl.ml.model.to_vector` /
:func:`~securefl.ml.model.from_vector` around these calls.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from securefl.errors import DataError
from securefl.ml.settings import MLSettings

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from securefl.ml.data import ImageSet
    from securefl.ml.train import EvalReport, ProgressFn, TrainResult


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


def load_or_create_model(settings: MLSettings) -> keras.Model:
    """The hospital's current model file, or a fresh one if none was saved yet.  A saved
    model compiled with the other loss than ``prior_correction`` asks is recompiled."""
    from securefl.ml.model import compile_model, load_model, uses_prior_correction

    if not settings.model_path.is_file():
        return new_model(settings)
    model = load_model(settings.model_path)
    shape = tuple(int(d) for d in model.input_shape[1:])
    if shape != settings.input_shape or int(model.output_shape[-1]) != len(settings.classes):
        raise DataError(
            f"{settings.model_path} takes {shape} images and {model.output_shape[-1]} classes "
            f"but the settings say {settings.input_shape} and {len(settings.classes)}: "
            "fix the settings or move the old model file away"
        )
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


def run_train(
    settings: MLSettings,
    *,
    model: keras.Model | None = None,
    data: ImageSet | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train on ``scans_dir/Training``, save the model (unless cancelled), log the metrics.

    The result's ``skipped`` lists the files that were not used; callers show them with
    :func:`securefl.ml.data.describe_skipped` (the history keeps the count and the first few).

    ``model`` and ``data`` let a long-lived caller (the TUI, the demo) keep both in memory
    between rounds instead of reloading and re-decoding them every time.
    """
    from securefl.ml.data import skipped_record
    from securefl.ml.model import save_model
    from securefl.ml.train import append_history, train

    data = data if data is not None else load_data(settings, "Training")
    model = model if model is not None else load_or_create_model(settings)
    result = train(
        model, data, epochs=settings.epochs, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, progress=progress, cancel=cancel,
        seed=settings.seed,
    )
    if not result.cancelled:
        save_model(model, settings.model_path)
    append_history(
        settings.history_path,
        {
            "event": "train",
            "cancelled": result.cancelled,
            "num_samples": result.num_samples,
            **skipped_record(data, settings.scans_dir),
            "seconds": round(result.seconds, 2),
            "history": result.history,
        },
    )
    return result


def load_data(settings: MLSettings, split: str) -> ImageSet:
    """One split of the hospital's scans, decoded and resized for this model."""
    from securefl.ml.data import load_split

    return load_split(settings.scans_dir, split, classes=settings.classes,
                      size=settings.image_size, channels=settings.channels,
                      folders=settings.folders)


def run_evaluate(settings: MLSettings, *, model: keras.Model | None = None,
                 data: ImageSet | None = None) -> EvalReport:
    """Score the model on ``scans_dir/Testing`` and log the metrics.

    The model is not saved: evaluating changes nothing in it, and a model file written here
    would stand in for a trained or downloaded one that does not exist.
    """
    from securefl.ml.data import skipped_record
    from securefl.ml.train import append_history, evaluate

    model = model if model is not None else load_saved_model(settings)
    data = data if data is not None else load_data(settings, "Testing")
    report = evaluate(model, data)
    append_history(
        settings.history_path,
        {"event": "evaluate", **report.to_dict(), **skipped_record(data, settings.scans_dir)},
    )
    return report


def run_classify(
    settings: MLSettings, image: str | Path, *, model: keras.Model | None = None
) -> dict[str, float]:
    """Class probabilities for one scan with the hospital's current model."""
    from securefl.ml.train import classify

    if model is None:
        model = load_saved_model(settings)
    return classify(model, image, settings.classes)
