"""Which model kind and how many local epochs: chosen on validation scans only.

Each synthetic hospital trains alone from the seeded initial model, every kind for the same
number of epochs (no early stopping, so the whole curve is seen), with the product's
training path (``securefl.ml.local`` settings: prior correction, augmentation, exact
batch-norm statistics before each validation).  Printed per hospital and kind: the epoch of
the lowest validation loss, the balanced accuracy on validation there and at every epoch.
Testing scans are never read.

    securefl data synth --out /tmp/synth --hospitals 3 --seed 0 --size 64
    PYTHONPATH=$PWD .venv/bin/python bench/default_model.py --data /tmp/synth --size 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from securefl.ml.local import load_data, new_model, split_training
from securefl.ml.settings import MLSettings
from securefl.ml.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="output of `data synth`")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--kinds", default="seed,small")
    args = parser.parse_args()
    hospitals = sorted(p for p in args.data.iterdir() if (p / "Training").is_dir())
    summary: dict[str, list[dict]] = {}
    for root in hospitals:
        for kind in args.kinds.split(","):
            ml = MLSettings(scans_dir=root, model_dir=Path("/nonexistent"),
                            image_size=args.size, model_kind=kind, epochs=args.epochs,
                            patience=args.epochs)
            train_set, val = split_training(ml, load_data(ml, "Training"))
            model = new_model(ml)
            t = time.perf_counter()
            r = train(model, train_set, validation=val, epochs=args.epochs,
                      patience=args.epochs, batch_size=ml.batch_size,
                      learning_rate=ml.learning_rate, seed=ml.seed)
            vl, va = r.history["val_loss"], r.history["val_accuracy"]
            best = int(np.argmin(vl)) + 1
            row = {"hospital": root.name, "kind": kind, "best_epoch": best,
                   "val_bal_acc_at_best": round(va[best - 1], 4),
                   "val_loss": [round(x, 3) for x in vl],
                   "val_bal_acc": [round(x, 3) for x in va],
                   "train": len(train_set), "validation": len(val),
                   "seconds": round(time.perf_counter() - t, 1)}
            summary.setdefault(kind, []).append(row)
            print(json.dumps(row), flush=True)
    for kind, rows in summary.items():
        acc = np.mean([r["val_bal_acc_at_best"] for r in rows])
        curve = np.mean([r["val_bal_acc"] for r in rows], axis=0)
        loss = np.mean([r["val_loss"] for r in rows], axis=0)
        print(json.dumps({"kind": kind, "mean_val_bal_acc_at_best": round(float(acc), 4),
                          "best_epochs": [r["best_epoch"] for r in rows],
                          "mean_val_bal_acc_by_epoch": [round(float(x), 3) for x in curve],
                          "mean_val_loss_by_epoch": [round(float(x), 3) for x in loss]}))


if __name__ == "__main__":
    main()
