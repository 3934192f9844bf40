"""Local training, evaluation and single-scan classification.

Training is plain ``model.fit`` on the prefetching pipeline of :mod:`securefl.ml.data` with one
light callback that reports progress per batch and honours cancellation, and — given
validation scans — one that stops when the validation loss stops improving and puts back
the best epoch's weights.  Nothing else is in the loop, so it runs as fast as Keras does
(``bench/train_bench.py`` measures it).  Callers get the number of local samples back for
sample-weighted FedAvg.
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
from securefl.ml.calibration import ECE_BINS, apply_temperature, expected_calibration_error
from securefl.ml.data import ImageSet, load_image, make_dataset
from securefl.ml.model import DEFAULT_LEARNING_RATE, compile_model, save_model
from securefl.ml.prior import set_prior
from securefl.ml.settings import clinical_name

if TYPE_CHECKING:  # pragma: no cover
    import keras

EVAL_BATCH = 64
#: Epochs without a lower validation loss before training stops (``[ml] patience``).
DEFAULT_PATIENCE = 2
#: Training scans the batch-norm statistics are measured on before each epoch's validation
#: (all of them when there are fewer); the kept weights are then measured on every scan.
REFERENCE_SAMPLE = 512


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
    history: dict[str, list[float]]  # per-epoch loss and accuracy (val_loss, val_accuracy too)
    cancelled: bool
    seconds: float
    skipped: Skipped = ()
    #: With validation scans: the epoch whose weights were kept (1-based; 0 = no validation),
    #: and whether training stopped before the most epochs allowed.
    best_epoch: int = 0
    stopped_early: bool = False
    validation_samples: int = 0
    #: The temperature fitted on the validation scans afterwards (``securefl.ml.local``).
    temperature: float | None = None
    #: sha256 of the model file this run saved (``securefl.ml.model.save_model_digest``).
    model_file_sha256: str | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))

    def __post_init__(self) -> None:  # lists after a JSON round trip
        object.__setattr__(self, "skipped", _as_skipped(self.skipped))


def _progress_callback(
    epochs: int, batches: int, progress: ProgressFn | None, cancel: threading.Event | None
) -> Any:
    from securefl.ml._tf import keras as _keras

    k: Any = _keras()  # Any: mypy takes no base class from a module attribute

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


def balanced_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of each class's mean negative log-likelihood: the
    validation loss early stopping watches.  Class-balanced like the model's output (prior
    correction) and like balanced accuracy, so a site's case mix does not decide the epoch."""
    p = np.maximum(probs[np.arange(len(labels)), labels], 1e-12)
    per_class = [float(-np.log(p[labels == c]).mean()) for c in np.unique(labels)]
    return float(np.mean(per_class))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall over the classes present: a site's case mix cannot flatter a
    model (the figure docs/RESULTS.md reports and personalisation is chosen on)."""
    hits = probs.argmax(axis=1) == labels
    return float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))


def choose_on_validation(candidates: dict[str, np.ndarray], labels: np.ndarray) -> str:
    """The name of the candidate model whose validation probabilities read ``labels`` best.

    Highest balanced accuracy first, because that is what a hospital is told its model
    scores; a tie (frequent on a few dozen validation scans) goes to the lower
    class-balanced loss, and a tie on both to the earlier name, so the caller lists its
    candidates in order of preference.  Why choose at all: after a round the global model
    as downloaded can read a hospital's own scans better than the copy re-measured or
    fine-tuned on them (docs/RESULTS.md, "Personalisation"), and which one is better changes
    from version to version.
    """
    if not candidates:
        raise ValueError("no candidate to choose from")
    def key(item: tuple[int, tuple[str, np.ndarray]]) -> tuple[float, float, int]:
        i, (_, p) = item
        if not np.all(np.isfinite(p)):  # a diverged model is never the choice
            return (np.inf, np.inf, i)
        return (-balanced_accuracy(p, labels), balanced_nll(p, labels), i)

    return min(enumerate(candidates.items()), key=key)[1][0]


def _best_on_validation(validation: ImageSet, reference: ImageSet, patience: int,
                        cancel: threading.Event | None) -> Any:
    """Early stopping on the validation loss that always ends with the best epoch's weights.

    Why not Keras' ``validation_data`` and ``EarlyStopping``: Keras scores validation with
    the batch-norm moving averages (momentum 0.5, a few augmented batches), and measured on
    the synthetic hospitals that loss rose while validation accuracy rose too, so it stopped
    training after the first epochs at random.  Here every epoch ends by measuring the
    batch-norm statistics exactly over ``reference`` (a fixed sample of the training scans,
    ``securefl.ml.batchnorm``) and then scoring the validation scans as inference will —
    :func:`balanced_nll`, kept in the history as ``val_loss`` beside ``val_accuracy``
    (balanced).  A run that uses every epoch also ends on its best one.
    """
    from securefl.ml._tf import keras as _keras

    k: Any = _keras()  # Any: mypy takes no base class from a module attribute

    class BestOnValidation(k.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf")
            self.best_epoch = 0
            self.best_weights: list[np.ndarray] | None = None
            self.wait = 0
            self.last_epoch = 0
            self.stopped = False
            self.history: dict[str, list[float]] = {"val_loss": [], "val_accuracy": []}

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if cancel is not None and cancel.is_set():
                return
            self.last_epoch = epoch + 1
            calibrate_batch_norm(self.model, reference)
            probs = predict_proba(self.model, validation.images)
            loss = balanced_nll(probs, validation.labels)
            self.history["val_loss"].append(loss)
            self.history["val_accuracy"].append(balanced_accuracy(probs, validation.labels))
            if np.isfinite(loss) and loss < self.best:
                self.best, self.best_epoch, self.wait = loss, epoch + 1, 0
                self.best_weights = self.model.get_weights()
                return
            self.wait += 1
            if self.wait >= patience:
                self.stopped = True
                self.model.stop_training = True

        def on_train_end(self, logs: dict | None = None) -> None:
            if cancel is not None and cancel.is_set():
                return
            if self.best_weights is not None and self.best_epoch != self.last_epoch:
                self.model.set_weights(self.best_weights)

    return BestOnValidation()


def train(
    model: keras.Model,
    data: ImageSet,
    *,
    validation: ImageSet | None = None,
    epochs: int = 1,
    patience: int = DEFAULT_PATIENCE,
    batch_size: int = 32,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    seed: int = 0,
    calibrate: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``data``.

    With ``validation`` scans and more than one epoch, ``epochs`` is a maximum: after each
    epoch the validation loss is measured (:func:`_best_on_validation`), training stops once
    it has not improved for ``patience`` epochs, and the model ends with the weights of its
    best epoch (``TrainResult.best_epoch``).

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
    callbacks = [_progress_callback(epochs, batches, progress, cancel)]
    best = None
    if validation is not None and len(validation) and epochs > 1:  # one epoch: no choice
        pick = np.random.default_rng(seed).permutation(len(data))[:REFERENCE_SAMPLE]
        best = _best_on_validation(validation, data.subset(np.sort(pick), skipped=False),
                                   patience, cancel)
        callbacks.append(best)
    start = time.perf_counter()
    hist = model.fit(ds, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=False)
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
    if best is not None:
        history.update(best.history)
    return TrainResult(len(data), history, cancelled, seconds, _as_skipped(data.skipped),
                       best_epoch=best.best_epoch if best is not None else 0,
                       stopped_early=bool(best is not None and best.stopped),
                       validation_samples=len(validation)
                       if best is not None and validation is not None else 0)


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
    #: Mean per-class recall over the classes present: a site's case mix cannot flatter it.
    balanced_accuracy: float = 0.0
    #: Which scans were scored: "validation" (held out of Training) or "testing".
    split: str = ""
    #: Expected calibration error (:data:`ECE_BINS` bins) of the model's own probabilities
    #: and, when a temperature was fitted for this model, of the calibrated ones.
    ece_before: float | None = None
    ece_after: float | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", _as_skipped(self.skipped))

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A small table for people."""
        names = [clinical_name(n) for n in self.per_class]
        w = max(len(n) for n in names) + 2
        where = {"validation": "validation scans (held out of Training)",
                 "testing": "Testing scans"}.get(self.split, "scans")
        lines = [
            f"{where}: accuracy {self.accuracy:.3f}   balanced accuracy "
            f"{self.balanced_accuracy:.3f}   macro F1 {self.macro_f1:.3f}   "
            f"({self.num_samples} scans)",
        ]
        if self.ece_before is not None:
            cal = (f"{self.ece_after:.3f} with temperature {self.temperature:.2f}"
                   if self.ece_after is not None and self.temperature is not None else
                   "no temperature fitted for this model yet")
            lines.append(f"expected calibration error ({ECE_BINS} bins): "
                         f"{self.ece_before:.3f} uncalibrated -> {cal}")
        lines += [
            f"{'class':<{w}}precision  recall(sensitivity)  F1     n",
        ]
        for n, m in zip(names, self.per_class.values(), strict=True):
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
    recalls = [m.recall for m in per_class.values() if m.support]
    return EvalReport(
        accuracy=float(np.trace(confusion) / total) if total else 0.0,
        macro_f1=float(np.mean(f1s)),
        per_class=per_class,
        confusion=confusion.tolist(),
        num_samples=total,
        balanced_accuracy=float(np.mean(recalls)) if recalls else 0.0,
    )


def predict_proba(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 images (N, H, W, C)."""
    from securefl.ml._tf import tensorflow

    tf = tensorflow()
    ds = tf.data.Dataset.from_tensor_slices(images).batch(EVAL_BATCH).prefetch(tf.data.AUTOTUNE)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64)


def evaluate(
    model: keras.Model, data: ImageSet, *, save_to: str | Path | None = None,
    temperature: float | None = None, split: str = "",
) -> EvalReport:
    """Score ``model`` on ``data``; with ``save_to``, then save the model there (``testModel``).

    The report has the expected calibration error of the model's probabilities and, given
    the ``temperature`` fitted for this model, of the calibrated ones (the predicted class,
    and so every other figure, is the same with or without it).  ``split`` names the scans.
    """
    if len(data) == 0:
        raise DataError("no test images: nothing to evaluate on")
    probs = predict_proba(model, data.images)
    report = replace(metrics_from_predictions(data.labels, probs.argmax(axis=1), data.classes),
                     skipped=_as_skipped(data.skipped), split=split,
                     ece_before=expected_calibration_error(probs, data.labels))
    if temperature is not None:
        report = replace(report, temperature=float(temperature), ece_after=(
            expected_calibration_error(apply_temperature(probs, temperature), data.labels)))
    if save_to is not None:
        save_model(model, save_to)
    return report


@dataclass(frozen=True)
class Classification:
    """One scan's answer, as a clinician-facing front end shows it."""

    probabilities: dict[str, float]  # calibrated when ``calibrated``, in class order
    calibrated: bool
    temperature: float
    threshold: float  # below this top-class probability the answer is low-confidence
    model: str  # which model answered, e.g. "global version 7"

    @property
    def predicted(self) -> str:
        return max(self.probabilities, key=lambda c: self.probabilities[c])

    @property
    def confidence(self) -> float:
        return self.probabilities[self.predicted]

    @property
    def low_confidence(self) -> bool:
        return self.confidence < self.threshold

    def notices(self) -> list[str]:
        """Plain sentences for a clinician about how far to trust this answer."""
        out = []
        if self.low_confidence:
            out.append(
                f"LOW CONFIDENCE: the model's most likely class, {clinical_name(self.predicted)}"
                f", has only "
                f"{self.confidence:.0%} probability (below the {self.threshold:.0%} "
                "threshold): treat this answer as inconclusive and rely on the radiologist's "
                "reading.")
        if not self.calibrated:
            out.append(
                "These probabilities are not calibrated for this model (no temperature was "
                "fitted on validation scans yet: train, or evaluate with the scans in place) "
                "and overstate how sure the model is.")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "predicted": self.predicted, "confidence": self.confidence,
                "low_confidence": self.low_confidence}


def classify(
    model: keras.Model, image_path: str | Path, classes: tuple[str, ...], *,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Probability of each class for one scan, read and fitted exactly as in training, with
    the logits divided by ``temperature`` (``securefl.ml.calibration``)."""
    _, h, w, c = model.input_shape
    if h != w:
        raise DataError(f"the model expects {h}x{w} images; only square inputs are supported")
    if int(model.output_shape[-1]) != len(classes):
        raise DataError(
            f"the model predicts {model.output_shape[-1]} classes but the settings list "
            f"{len(classes)}: use the class list the model was trained with"
        )
    image = load_image(image_path, int(h), int(c), as_scan=True)
    probs = apply_temperature(predict_proba(model, image[None]), temperature)[0]
    return {name: float(p) for name, p in zip(classes, probs, strict=True)}


def append_history(path: str | Path, record: dict) -> None:
    """Add one JSON line (with a UTC timestamp) to a hospital's metrics history."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with path.open("a+b") as fh:
        size = fh.seek(0, 2)
        if size:
            fh.seek(size - 1)
            torn = fh.read(1) != b"\n"
        else:
            torn = False
        # After a cut-off last line (a full disk, a killed write) the record starts a line
        # of its own, or it would be glued to the damaged one and lost with it.
        fh.write((b"\n" if torn else b"") + json.dumps(line).encode() + b"\n")


def read_history(path: str | Path) -> list[dict]:
    """Every readable record, oldest first; see :func:`read_history_checked`."""
    return read_history_checked(path)[0]


def read_history_checked(path: str | Path) -> tuple[list[dict], int]:
    """The readable records and how many lines were damaged (cut off, not JSON, not an
    object).  Damaged lines are skipped, never fatal: the History screen and ``client
    history`` show the rest and say how many were left out."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, damaged = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged += 1
    return records, damaged
