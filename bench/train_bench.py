"""Training throughput: our training path versus plain ``model.fit`` on the same data and model.

Ours is :func:`securefl.ml.train.train` (``tf.data`` pipeline with shuffling and prefetch, the
per-batch progress/cancel callback the hospital UI uses).  The reference is Keras on its
own: ``model.fit(x, y, batch_size=..., shuffle=True)`` on the same uint8 arrays with the same
compiled model.  Each arm gets an untimed warm-up epoch (graph tracing), then the arms
alternate ``--repeats`` times (swapping which goes first) and the best time of each counts.

Prints one JSON line: ``{"ours_img_s": ..., "keras_img_s": ..., "ratio": ...}`` (target
ratio >= 0.95), plus the best CPU time per image of each arm, which other processes on a
shared machine disturb less than wall time.

    .venv/bin/python bench/train_bench.py                 # seed CNN, 128x128, ~2-3 minutes
    .venv/bin/python bench/train_bench.py --kind small
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from securefl.ml.data import load_split
from securefl.ml.model import from_vector, make_model, to_vector
from securefl.ml.synth import synthesize
from securefl.ml.train import Progress, train


def main() -> int:
    p = argparse.ArgumentParser(description="training throughput: ours vs plain model.fit")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--kind", choices=("seed", "small"), default="seed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat")
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="securefl-trainbench-"))
    synthesize(root, hospitals=1, seed=0, train_per_hospital=args.images, test_per_hospital=4,
               size=args.size)
    data = load_split(root / "hospital_1", "Training", size=args.size)
    model = make_model((args.size, args.size, 1), 4, kind=args.kind, seed=0)
    w0 = to_vector(model)
    seen = []

    cpu = {"ours": float("inf"), "keras": float("inf")}

    def timed(name, fn) -> float:
        from_vector(model, w0)
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpu[name] = min(cpu[name], time.process_time() - c)
        return time.perf_counter() - t

    def ours() -> float:
        return timed("ours", lambda: train(model, data, epochs=args.epochs,
                                           batch_size=args.batch, progress=seen.append))

    def keras_fit() -> float:
        return timed("keras", lambda: model.fit(data.images, data.labels,
                                                batch_size=args.batch, epochs=args.epochs,
                                                shuffle=True, verbose=0))

    ours()  # warm-up: tracing and first-epoch costs, both paths
    keras_fit()
    best = {"ours": float("inf"), "keras": float("inf")}
    for i in range(args.repeats):  # alternate which arm goes first: load drifts on a shared box
        order = (("ours", ours), ("keras", keras_fit))
        for name, arm in order if i % 2 == 0 else order[::-1]:
            best[name] = min(best[name], arm())
    n = len(data) * args.epochs
    assert seen and isinstance(seen[-1], Progress)
    out = {
        "ours_img_s": round(n / best["ours"], 1),
        "keras_img_s": round(n / best["keras"], 1),
        "ratio": round(best["keras"] / best["ours"], 3),
        # CPU seconds per image (all threads): steadier than wall time on a shared machine
        "ours_cpu_ms_img": round(1000 * cpu["ours"] / n, 2),
        "keras_cpu_ms_img": round(1000 * cpu["keras"] / n, 2),
    }
    print(f"{args.kind} CNN {args.size}x{args.size}, batch {args.batch}, {len(data)} images",
          file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
