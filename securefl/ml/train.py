"""Local training, evaluation and single-scan classification.

Training is plain ``model.fit`` on the prefetching pipeline of :mod:`securefl.ml.data` with one
light callback that reports progress per batch and honours cancellation — nothing else in the
loop, so it runs as fast as Keras does (``bench/train_bench.py`` measures it).  Callers get
the number of local samples back for sample-weighted FedAvg.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl.errors import DataError
from securefl.ml.batchnorm import calibrate_batch_norm
from securefl.ml.data import ImageSet, load_image, make_dataset
from securefl.ml.model import DEFAULT_LEARNING_RATE, compile_model, save_model
from securefl.ml.prior import set_prior

if TYPE_CHECKING:  # pragma: no cover
    import keras

EVAL_BATCH = 64


@dataclass(frozen=True)
class Progress:
    """Where training is: sent after every batch (1-based counters)."""

    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    accuracy: float
    #: "training", or "calibrating" once the epochs are done: then ``batch`` of ``batches``
    #: counts the batch-norm layers being measured over the training data.
    stage: str = "training"

    @property
    def fraction(self) -> float:
        return ((self.epoch - 1) * self.batches + self.batch) / (self.epochs * self.batches)


ProgressFn = Callable[[Progress], None]


#: (file, reason) of every file of the data that was not used, as plain strings so a result
#: travels as JSON (the app's training child); :func:`securefl.ml.data.describe_skipped`
#: words it for people.
Skipped = tuple[tuple[str, str], ...]


def _as_skipped(items: Iterable[Sequence[object]]) -> Skipped:
    return tuple((str(path), str(reason)) for path, reason in items)


@dataclass(frozen=True)
class TrainResult:
    num_samples: int  # local examples: the FedAvg weight
    history: dict[str, list[float]]  # per-epoch loss and accuracy
    cancelled: bool
    seconds: float
    skipped: Skipped = ()

    def __post_init__(self) -> None:  # lists after a JSON round trip
        object.__setattr__(self, "skipped", _as_skipped(self.skipped))


def _progress_callback(
    epochs: int, batches: int, progress: ProgressFn | None, cancel: threading.Event | None
) -> Any:
    from securefl.ml._tf import keras as _keras

    k = _keras()

    class ProgressCallback(k.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if progress is not None:
                logs = logs or {}
                progress(
                    Progress(
                        self.epoch, epochs, batch + 1, batches,
                        float(logs.get("loss", float("nan"))),
                        float(logs.get("accuracy", float("nan"))),
                    )
                )
            if cancel is not None and cancel.is_set():
                self.model.stop_training = True

    return ProgressCallback()


def train(
    model: keras.Model,
    data: ImageSet,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    seed: int = 0,
    calibrate: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``data``.

    As in Flower's Keras quickstart, a compiled model keeps its optimizer (and its compiled
    training step) from one call to the next — recompiling every round would retrace the
    graph each time; only the learning rate is updated.  An uncompiled model is compiled
    with Adam.

    With ``calibrate`` (the default) a completed run ends by recomputing the batch-norm
    statistics over ``data`` (:func:`securefl.ml.batchnorm.calibrate_batch_norm`), so the
    model — and the update a hospital sends — carries statistics that describe its trained
    weights rather than a running average over the last few batches (docs/RESULTS.md).
    Models without batch norm are unaffected.
    """
    if len(data) == 0:
        raise DataError("no training images: nothing to learn from")
    if epochs < 1 or batch_size < 1:
        raise DataError("epochs and batch size must be at least 1")
    if getattr(model, "compiled", False) and getattr(model, "optimizer", None) is not None:
        model.optimizer.learning_rate = learning_rate
    else:
        compile_model(model, learning_rate)
    set_prior(model, list(data.counts().values()))  # prior-corrected loss only
    batches = -(-len(data) // batch_size)
    ds = make_dataset(data, batch_size, shuffle=True, seed=seed)
    callback = _progress_callback(epochs, batches, progress, cancel)
    start = time.perf_counter()
    hist = model.fit(ds, epochs=epochs, callbacks=[callback], verbose=0, shuffle=False)
    cancelled = cancel is not None and cancel.is_set()
    if calibrate and not cancelled:
        last = {key: float(values[-1]) for key, values in hist.history.items() if values}

        def calibrating(k: int, n: int) -> None:
            if progress is not None:
                progress(Progress(epochs, epochs, k, n, last.get("loss", float("nan")),
                                  last.get("accuracy", float("nan")), stage="calibrating"))

        calibrate_batch_norm(model, data, on_layer=calibrating)
    seconds = time.perf_counter() - start
    history = {key: [float(x) for x in values] for key, values in hist.history.items()}
    return TrainResult(len(data), history, cancelled, seconds, _as_skipped(data.skipped))


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float  # sensitivity: the share of this class's scans that were found
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    num_samples: int
    skipped: Skipped = ()  # test files that were not used

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", _as_skipped(self.skipped))

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A small table for people."""
        names = list(self.per_class)
        w = max(len(n) for n in names) + 2
        lines = [
            f"accuracy {self.accuracy:.3f}   macro F1 {self.macro_f1:.3f}   "
            f"({self.num_samples} scans)",
            f"{'class':<{w}}precision  recall(sensitivity)  F1     n",
        ]
        for n, m in self.per_class.items():
            lines.append(
                f"{n:<{w}}{m.precision:9.3f}  {m.recall:19.3f}  {m.f1:.3f}  {m.support:4d}"
            )
        lines.append("confusion (rows true, columns predicted): " + ", ".join(names))
        lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in self.confusion]
        return "\n".join(lines)


def metrics_from_predictions(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> EvalReport:
    """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix."""
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    per_class = {}
    f1s = []
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        pred = int(confusion[:, i].sum())
        true = int(confusion[i, :].sum())
        precision = tp / pred if pred else 0.0
        recall = tp / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = ClassMetrics(precision, recall, f1, true)
        f1s.append(f1)
    total = int(confusion.sum())
    return EvalReport(
        accuracy=float(np.trace(confusion) / total) if total else 0.0,
        macro_f1=float(np.mean(f1s)),
        per_class=per_class,
        confusion=confusion.tolist(),
        num_samples=total,
    )


def predict_proba(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 images (N, H, W, C)."""
    from securefl.ml._tf import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices(images).batch(EVAL_BATCH).prefetch(tf.data.AUTOTUNE)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64)


def evaluate(
    model: keras.Model, data: ImageSet, *, save_to: str | Path | None = None
) -> EvalReport:
    """Score ``model`` on ``data``; with ``save_to``, then save the model there (``testModel``)."""
    if len(data) == 0:
        raise DataError("no test images: nothing to evaluate on")
    predicted = predict_proba(model, data.images).argmax(axis=1)
    report = replace(metrics_from_predictions(data.labels, predicted, data.classes),
                     skipped=_as_skipped(data.skipped))
    if save_to is not None:
        save_model(model, save_to)
    return report


def classify(
    model: keras.Model, image_path: str | Path, classes: tuple[str, ...]
) -> dict[str, float]:
    """Probability of each class for one scan, read and fitted exactly as in training."""
    _, h, w, c = model.input_shape
    if h != w:
        raise DataError(f"the model expects {h}x{w} images; only square inputs are supported")
    if int(model.output_shape[-1]) != len(classes):
        raise DataError(
            f"the model predicts {model.output_shape[-1]} classes but the settings list "
            f"{len(classes)}: use the class list the model was trained with"
        )
    image = load_image(image_path, int(h), int(c))
    probs = predict_proba(model, image[None])[0]
    return {name: float(p) for name, p in zip(classes, probs, strict=True)}


def append_history(path: str | Path, record: dict) -> None:
    """Add one JSON line (with a UTC timestamp) to a hospital's metrics history."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
