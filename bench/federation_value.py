"""Does federation help?  Local-only vs FedAvg vs secure FedAvg vs centralised training.

Three synthetic non-IID hospitals (``securefl.ml.synth``: each is short of one class and has
its own scanner contrast, noise and blur).  Every arm trains the same model from the same
seeded initial weights for the same total number of epochs and is scored on the pooled test
set (every hospital's balanced Testing split):

* local   — each hospital alone, ``rounds x local_epochs`` epochs on its own data;
* fedavg  — ``rounds`` rounds of federated training: each hospital trains ``local_epochs``
            epochs from the global weights, and the server applies the sample-weighted mean
            of the deltas through its optimiser (``securefl.fedopt``; the default is FedAvgM,
            server momentum 0.3 with the batch-norm statistics following the weights;
            ``--server-opt fedavg`` is plain ``w += mean``);
* secure  — the same, but the weighted mean comes out of a full in-memory secure-aggregation
            round (``securefl.crypto.simulate.secure_weighted_mean``: real key agreement,
            Shamir shares, masks, fixed-point encoding, unmasking);
* central — one model on the union of the training data, ``rounds x local_epochs`` epochs.

Every training call (every arm) ends by recalibrating the batch-norm statistics over the data
it trained on, as ``securefl.ml.train.train`` does for the hospitals (``--no-calibrate``:
keep Keras' running averages, the behaviour before), and trains with the prior-corrected
cross-entropy hospitals use by default (``securefl.ml.prior``; ``--no-prior-correction``:
plain cross-entropy).

Every arm is scored on the pooled test set after each round (local and central arms: after
the same number of epochs), and the accuracies reported are the mean of the last ``--average``
checkpoints (3): with batch norm and non-IID sites a single snapshot moves by several points
from one round to the next.  The final snapshots are printed too.

The data are synthetic: the numbers compare training set-ups, they say nothing about real
scans.  Prints a table, then (last) one JSON line:
``{"local_acc": [...], "fedavg_acc": ..., "secure_acc": ..., "central_acc": ..., "rounds": R,
"averaged_checkpoints": 3, "seed": S, "server_opt": {...}, "norm": ..., "calibrate": ...,
"final": {...same keys, last snapshot...}, "curves": {...every checkpoint of every arm...}}``
(arms left out with ``--arms`` are ``null``).

    .venv/bin/python bench/federation_value.py            # about 6-7 minutes on 2 cores
    .venv/bin/python bench/federation_value.py --seed 1   # other data, other initial weights
    .venv/bin/python bench/federation_value.py --arms fedavg --server-lr 1.5  # scouting
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from securefl.fedopt import ServerOptimizer, ServerOptSettings, statistics_layout
from securefl.ml import model as model_mod
from securefl.ml.data import ImageSet, load_split
from securefl.ml.model import compile_model, from_vector, make_model, to_vector, weight_spec
from securefl.ml.synth import synthesize
from securefl.ml.train import evaluate, train


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=600, help="training images per hospital")
    p.add_argument("--test", type=int, default=200, help="testing images per hospital")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--kind", choices=("seed", "small"), default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate over the run, the same for every arm: cosine decays "
                        "from --lr to --lr-floor x --lr by the last round (epoch)")
    p.add_argument("--lr-floor", type=float, default=0.1)
    p.add_argument("--prior-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="every arm: prior-corrected cross-entropy (securefl.ml.prior), each "
                        "training set's class mix factored out of the loss, as hospitals "
                        "train by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=4.0, help="secure-aggregation clip bound")
    p.add_argument("--data", type=Path, help="reuse/keep generated data here")
    p.add_argument("--average", type=int, default=3,
                   help="report the mean accuracy of the last N checkpoints (rounds)")
    d = ServerOptSettings()
    p.add_argument("--server-opt", choices=("fedavg", "fedavgm", "fedadam"), default=d.kind,
                   help="server optimiser of both FedAvg arms (securefl.fedopt)")
    p.add_argument("--server-lr", type=float, default=d.server_lr)
    p.add_argument("--server-momentum", type=float, default=d.momentum,
                   help="fedavgm: momentum; fedadam: beta1")
    p.add_argument("--server-beta2", type=float, default=d.beta2, help="fedadam only")
    p.add_argument("--server-eps", type=float, default=d.eps, help="fedadam only")
    p.add_argument("--server-stats", choices=("follow", "plain"), default=d.statistics,
                   help="batch-norm running statistics: follow the weights' momentum after "
                        "the first round, or plainly averaged")
    p.add_argument("--no-calibrate", action="store_true",
                   help="every arm: keep the running-average batch-norm statistics instead of "
                        "recomputing them over the training data after each training call")
    p.add_argument("--norm", choices=("batch", "group", "none"), default=model_mod.SMALL_NORM,
                   help="normalisation layers of the small CNN, for every arm (experiments)")
    p.add_argument("--arms", default="local,fedavg,secure,central",
                   help="comma-separated subset of local,fedavg,secure,central (scouting)")
    return p.parse_args()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    args = parse()
    model_mod.SMALL_NORM = args.norm  # read by make_model: the same model for every arm
    t0 = time.perf_counter()
    root = args.data or Path(tempfile.mkdtemp(prefix="securefl-fedvalue-"))
    if not (root / "synth.json").is_file():
        synthesize(root, hospitals=args.hospitals, seed=args.seed,
                   train_per_hospital=args.train, test_per_hospital=args.test, size=args.size)
    names = [f"hospital_{h + 1}" for h in range(args.hospitals)]
    trains = [load_split(root / n, "Training", size=args.size) for n in names]
    pooled_test = ImageSet.concat([load_split(root / n, "Testing", size=args.size) for n in names])
    pooled_train = ImageSet.concat(trains)
    log(f"data ready in {time.perf_counter() - t0:.0f} s: "
        + "; ".join(f"{n} {t.counts()}" for n, t in zip(names, trains, strict=True)))
    shape = (args.size, args.size, 1)
    total_epochs = args.rounds * args.local_epochs

    def fresh():
        model = make_model(shape, 4, kind=args.kind, seed=args.seed)
        compile_model(model, args.lr, prior_correction=args.prior_correction)
        return model

    def lr_at(r: int) -> float:
        """The learning rate of round (or epoch block) ``r``: one schedule for every arm."""
        if args.schedule == "constant" or args.rounds == 1:
            return args.lr
        cos = 0.5 * (1 + math.cos(math.pi * r / (args.rounds - 1)))
        return args.lr * (args.lr_floor + (1 - args.lr_floor) * cos)

    def fit(model, data, epochs, seed, r):
        train(model, data, epochs=epochs, batch_size=args.batch, learning_rate=lr_at(r),
              seed=seed, calibrate=not args.no_calibrate)

    def acc(model) -> float:
        return evaluate(model, pooled_test).accuracy

    # Each arm gets freshly built models: same initial weights *and* same augmentation and
    # dropout random streams, so plain and secure FedAvg differ only by the secure round.
    workers = [fresh() for _ in names]
    w0 = to_vector(workers[0])

    def solo(model, data, label, seed):
        """Train alone for the same epochs, scored at the same checkpoints as the rounds."""
        curve = []
        for r in range(args.rounds):
            fit(model, data, args.local_epochs, seed=1000 * r + seed, r=r)
            curve.append(acc(model))
        log(f"{label}: " + " ".join(f"{a:.3f}" for a in curve))
        return curve

    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    unknown = arms - {"local", "fedavg", "secure", "central"}
    if unknown:
        raise SystemExit(f"unknown arm(s): {', '.join(sorted(unknown))}")
    opt_settings = ServerOptSettings(
        kind=args.server_opt, server_lr=args.server_lr, momentum=args.server_momentum,
        beta2=args.server_beta2, eps=args.server_eps, statistics=args.server_stats)
    layout = statistics_layout((layer.name, layer.size)
                               for layer in weight_spec(workers[0]).layers)

    local_curves = []
    if "local" in arms:
        for h, (name, data) in enumerate(zip(names, trains, strict=True)):
            from_vector(workers[h], w0)
            local_curves.append(solo(workers[h], data, f"local {name}", seed=h))

    def federate(label, mean_fn):
        workers[:] = [fresh() for _ in names]
        opt = ServerOptimizer(opt_settings, w0.size, statistics=layout)
        g = w0.copy()
        clipped = 0.0
        curve: list[float] = []
        for r in range(args.rounds):
            deltas, weights = [], []
            for h, data in enumerate(trains):
                from_vector(workers[h], g)
                fit(workers[h], data, args.local_epochs, seed=1000 * r + h, r=r)
                deltas.append(to_vector(workers[h]) - g)
                weights.append(len(data))
            clipped = max(clipped, float(np.mean(np.abs(np.stack(deltas)) > args.clip)))
            g = opt.step(g, np.asarray(mean_fn(deltas, weights), dtype=np.float32))
            from_vector(workers[0], g)
            curve.append(acc(workers[0]))
            log(f"{label} round {r + 1}/{args.rounds}: {curve[-1]:.3f}")
        return curve, g, clipped

    def plain_mean(deltas, weights):
        w = np.asarray(weights, dtype=np.float64)
        return (np.tensordot(w, np.stack(deltas).astype(np.float64), axes=1) / w.sum()) \
            .astype(np.float32)

    fedavg_curve = secure_curve = g_plain = g_secure = None
    if "fedavg" in arms:
        fedavg_curve, g_plain, _ = federate("fedavg", plain_mean)

    if "secure" in arms:
        from securefl.crypto.simulate import secure_weighted_mean  # the real secure round

        def secure_mean(deltas, weights):
            return secure_weighted_mean(deltas, weights, clip=args.clip)

        secure_curve, g_secure, clipped = federate("secure", secure_mean)

    central_curve = solo(fresh(), pooled_train, "central", seed=7) if "central" in arms else None

    def tail(curve):  # mean of the last checkpoints: one snapshot is noisy (see RESULTS.md)
        return float(np.mean(curve[-args.average:]))

    def r4(x):
        return None if x is None else round(x, 4)

    fed = f"{args.rounds} rounds x {args.local_epochs} epoch(s)"
    rows = [(f"local only: {n}", c) for n, c in zip(names, local_curves, strict=False)]
    rows += [(label, c) for label, c in ((f"FedAvg, {fed}", fedavg_curve),
                                          (f"secure FedAvg, {fed}", secure_curve),
                                          ("centralised (union of the data)", central_curve))
             if c is not None]
    print(f"pooled test set: {len(pooled_test)} synthetic scans {pooled_test.counts()}; "
          f"model {args.kind} {args.size}x{args.size}; {total_epochs} epochs per arm; "
          f"norm {args.norm}; batch-norm calibration {not args.no_calibrate}; "
          f"server optimiser {opt_settings.model_dump()}")
    print(f"  {'arm':<48} {'mean last ' + str(args.average):>12} {'final':>7}")
    for label, c in rows:
        print(f"  {label:<48} {tail(c):12.3f} {c[-1]:7.3f}")
    if g_plain is not None and g_secure is not None:
        print(f"  secure vs plain final weights: max |diff| "
              f"{float(np.max(np.abs(g_secure - g_plain))):.2e}; deltas beyond clip "
              f"{clipped:.2%}")
    print(f"  total {time.perf_counter() - t0:.0f} s")

    def summary(pick):
        return {"local_acc": [r4(pick(c)) for c in local_curves],
                "fedavg_acc": r4(pick(fedavg_curve)) if fedavg_curve else None,
                "secure_acc": r4(pick(secure_curve)) if secure_curve else None,
                "central_acc": r4(pick(central_curve)) if central_curve else None}

    print(json.dumps({
        **summary(tail),
        "rounds": args.rounds,
        "averaged_checkpoints": args.average,
        "seed": args.seed,
        "server_opt": opt_settings.model_dump(),
        "norm": args.norm,
        "calibrate": not args.no_calibrate,
        "prior_correction": args.prior_correction,
        "schedule": args.schedule if args.schedule == "constant"
        else f"{args.schedule} {args.lr:g} -> {args.lr * args.lr_floor:g}",
        "final": summary(lambda c: c[-1]),
        "curves": {"local": [[r4(a) for a in c] for c in local_curves],
                   **{k: [r4(a) for a in c] for k, c in (("fedavg", fedavg_curve),
                                                        ("secure", secure_curve),
                                                        ("central", central_curve)) if c}},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
