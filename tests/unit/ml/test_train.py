"""Training, evaluation and classification on the tiny synthetic hospital."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from securefl.ml.model import make_model, to_vector
from securefl.ml.train import (
    Progress,
    classify,
    evaluate,
    metrics_from_predictions,
    train,
)

from .conftest import SIZE

BATCH = 16


@pytest.fixture(scope="module")
def trained(train_set):
    """The small CNN after 3 epochs; its progress reports and result."""
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=0)
    reports: list[Progress] = []
    result = train(model, train_set, epochs=3, batch_size=BATCH, learning_rate=1e-3,
                   progress=reports.append)
    return model, result, reports


def test_loss_decreases_and_samples_are_counted(trained, train_set):
    _, result, _ = trained
    loss = result.history["loss"]
    assert len(loss) == 3 and loss[-1] < loss[0]
    assert result.num_samples == len(train_set) and not result.cancelled


def test_progress_is_reported_per_batch(trained, train_set):
    _, _, seen = trained
    batches = -(-len(train_set) // BATCH)
    reports = [r for r in seen if r.stage == "training"]
    # then one report per batch-norm layer measured (the small CNN has 4)
    assert [(r.stage, r.batch, r.batches) for r in seen[len(reports):]] == [
        ("calibrating", k, 4) for k in range(1, 5)]
    assert len(reports) == 3 * batches
    assert (reports[0].epoch, reports[0].batch) == (1, 1)
    assert (reports[-1].epoch, reports[-1].batch, reports[-1].batches) == (3, batches, batches)
    assert reports[-1].fraction == 1.0
    assert all(np.isfinite(r.loss) for r in reports)


def test_generated_classes_are_learnable(trained, test_set):
    """A short run beats chance (25 %) clearly on held-out synthetic scans."""
    model, _, _ = trained
    report = evaluate(model, test_set)
    assert report.num_samples == len(test_set)
    assert report.accuracy > 0.45, report.format()


def test_cancel_stops_within_a_batch(train_set):
    model = make_model((SIZE, SIZE, 1), 4, kind="small", seed=1)
    cancel = threading.Event()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.batch == 2:
            cancel.set()

    result = train(model, train_set, epochs=5, batch_size=32, progress=progress, cancel=cancel)
    assert result.cancelled and len(seen) == 2


def test_classify_returns_a_distribution(trained, synth_root, test_set):
    model, _, _ = trained
    image = next((synth_root / "Testing" / "glioma").iterdir())
    probs = classify(model, image, test_set.classes)
    assert list(probs) == list(test_set.classes)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert abs(sum(probs.values()) - 1.0) < 1e-5


def test_evaluate_then_save_keeps_the_weights(trained, test_set, tmp_path):
    from securefl.ml.model import load_model

    model, _, _ = trained
    before = evaluate(model, test_set, save_to=tmp_path / "model.keras")
    again = load_model(tmp_path / "model.keras")
    assert np.array_equal(to_vector(again), to_vector(model))
    assert evaluate(again, test_set) == before


def test_metrics_from_known_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2])
    r = metrics_from_predictions(labels, pred, ("a", "b", "c"))
    assert r.confusion == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r.accuracy == 6 / 8
    assert r.per_class["a"].recall == 3 / 4 and r.per_class["a"].precision == 3 / 4
    assert r.per_class["b"].precision == 2 / 3 and r.per_class["b"].recall == 1.0
    assert r.per_class["c"].recall == 0.5 and r.per_class["c"].precision == 1.0
    f1 = [3 / 4, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert abs(r.macro_f1 - sum(f1) / 3) < 1e-12
    assert "sensitivity" in r.format()


def test_results_carry_the_skipped_files_through_json():
    """The app trains in a child process that sends its ``TrainResult`` as JSON: the skipped
    files must arrive (and read the same) on the other side."""
    import json
    from dataclasses import asdict

    from securefl.ml.data import describe_skipped
    from securefl.ml.train import TrainResult

    result = TrainResult(10, {"loss": [1.0]}, False, 2.0,
                         skipped=(("/scans/Training/glioma/x.jpg", "damaged image: y"),))
    back = TrainResult(**json.loads(json.dumps(asdict(result))))
    assert back == result
    assert describe_skipped(back.skipped, "/scans") == describe_skipped(result.skipped, "/scans")
    assert "Training/glioma/x.jpg (damaged image: y)" in describe_skipped(back.skipped, "/scans")
    assert metrics_from_predictions(np.array([0, 1]), np.array([0, 0]), ("a", "b")).skipped == ()
