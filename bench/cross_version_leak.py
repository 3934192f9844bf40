"""How much two versions' sums tell a server about one hospital (a limit of secure aggregation).

Secure aggregation hides each update inside one round's sum.  It cannot stop a server that
controls versions from collecting two sums over different sets of hospitals whose updates are
alike: publish version v+1 with the same weights as v (or nearly), let the hospitals train
again, run the round without the target hospital, and subtract.  What comes out is the
target's update plus the difference between the other hospitals' two trainings.  This bench
measures how close that gets, on the synthetic data, with the product's own training
(``securefl.ml.local.run_train``, as ``client train`` runs it):

* round on version v: all hospitals, sum S1;
* version v+1 = the same weights; every hospital but the target trains again from them;
* the server's estimate of the target's update: S1 - S2.

The masked sum equals the plain sum up to fixed-point rounding (docs/PROTOCOL.md A.4), so
plain sums are used.  Prints one JSON line: the cosine similarity and relative error of the
estimate against the target's true update, for each number of hospitals.

    .venv/bin/python bench/cross_version_leak.py                 # 2 and 4 hospitals, ~3 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from securefl.ml.local import load_or_create_model, run_train
from securefl.ml.model import from_vector, to_vector
from securefl.ml.settings import MLSettings
from securefl.ml.synth import synthesize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hospitals", default="2,4", help="numbers of hospitals to measure")
    p.add_argument("--train", type=int, default=160, help="training images per hospital")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    counts = [int(n) for n in args.hospitals.split(",")]
    root = Path(tempfile.mkdtemp(prefix="securefl-leak-"))
    synthesize(root / "data", hospitals=max(counts), seed=0,
               train_per_hospital=args.train, test_per_hospital=8, size=args.size)

    def settings(h: int) -> MLSettings:
        return MLSettings(scans_dir=root / "data" / f"hospital_{h + 1}",
                          model_dir=root / f"model_{h + 1}", image_size=args.size,
                          epochs=args.epochs, batch_size=16, min_validation_per_class=2)

    w0 = to_vector(load_or_create_model(settings(0))).copy()

    def update(h: int) -> np.ndarray:
        """One training of hospital ``h`` from ``w0`` (its own saved model, the global
        weights loaded into it, as after ``get``)."""
        model = load_or_create_model(settings(h))
        from_vector(model, w0)
        run_train(settings(h), model=model)
        return to_vector(model) - w0

    first = [update(h) for h in range(max(counts))]
    again = [update(h) for h in range(1, max(counts))]  # version v+1, without hospital 1
    out = {}
    for n in counts:
        s1 = np.sum(first[:n], axis=0)
        s2 = np.sum(again[:n - 1], axis=0)
        estimate, truth = s1 - s2, first[0]
        out[str(n)] = {
            "cosine": round(float(estimate @ truth / np.linalg.norm(estimate)
                                  / np.linalg.norm(truth)), 4),
            "relative_error": round(float(np.linalg.norm(estimate - truth)
                                          / np.linalg.norm(truth)), 4)}
    print(json.dumps({"hospitals": out, "epochs": args.epochs, "train": args.train,
                      "size": args.size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
