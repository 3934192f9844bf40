"""Does federation help each hospital?  Local-only vs personalised (secure) FedAvg vs central.

Three synthetic non-IID hospitals (``securefl.ml.synth``: each is short of one class and has
its own scanner contrast, noise and blur).  Each hospital's Training folder is split into
train and validation scans exactly as the product splits it (``securefl.ml.data.
split_validation``: stratified, deterministic, ``[ml] validation_fraction`` and
``min_validation_per_class`` defaults); every arm trains on the train part only, the
validation part is what personalisation choices are made on, and the Testing scans only give
the reported figures.  Every arm trains the same model from the same seeded initial weights
for the same total number of epochs:

* local   — each hospital alone, ``rounds x local_epochs`` epochs on its own data;
* fedavg  — ``rounds`` rounds of federated training: each hospital trains ``local_epochs``
            epochs from the global weights, and the server applies the sample-weighted mean
            of the deltas through its optimiser (``securefl.fedopt``; the default is FedAvgM,
            server momentum 0.3 with the batch-norm statistics following the weights);
* secure  — the same, but the weighted mean comes out of a full in-memory secure-aggregation
            round (``securefl.crypto.simulate.run_round``: real key agreement, Shamir shares,
            masks, unmasking) in **the product's encoding**: the server's default
            ``[round] clip``, ``max_clients`` and ``max_weight`` (``securefl.config.
            RoundSettings``) give the clip and the fixed-point scale, as the server's
            ``Encoding.auto`` does.  The share of update values beyond the clip (sent
            clipped) is reported, split into batch-norm statistics and trained weights;
* central — one model on the union of the training data, ``rounds x local_epochs`` epochs.

**Personalisation.**  After a federated round each hospital derives its own model from the
global weights; the candidates (``--personalise`` picks the headline one, by default
``best``, the product's ``[ml] personalise`` default; the single personalisations are
compared on the validation scans of seeds 0-2 with ``bench/personalisation_table.py``; all
are measured at the last ``--average`` checkpoints):

* ``global``   — the global model as the server holds it (no personalisation);
* ``recal``    — the global weights with the batch-norm statistics re-measured over the
                 hospital's own training scans (``securefl.ml.batchnorm``; what ``client
                 get`` does);
* ``prior``    — ``recal``, and the hospital's class mix re-applied to the probabilities at
                 inference (``p * prior``, renormalised) where the prior-corrected loss
                 factored it out;
* ``finetune`` — ``recal``, then one epoch on the hospital's training scans at
                 ``--finetune-lr`` (fresh Adam state), kept only if the validation loss
                 (class-balanced NLL) went down: early-stopped on validation;
* ``best``     — whichever of ``finetune``, ``recal`` and ``global`` has the highest
                 balanced accuracy on the hospital's validation scans (the lower
                 class-balanced NLL on a tie), chosen again at every checkpoint: the
                 product's ``[ml] personalise = "best"``.

FedBN-style statistics kept local are ``recal`` exactly in this set-up: a batch-norm layer
trains on batch statistics, and every training call ends by re-measuring them, so the
averaged statistics only ever reach the unpersonalised ``global`` model.

Metric: **balanced accuracy** (mean per-class recall) everywhere.  Headline of each arm: the
mean over its last ``--average`` (3) checkpoints.  Keys of the JSON line printed last:

* ``local_acc``      each hospital's local model on all hospitals' Testing scans;
* ``own_local_acc``  each hospital's local model on its own Testing scans;
* ``own_fed_acc``    each hospital's personalised model after secure federation on its own
                     Testing scans (``own_fedavg_acc``: after plain FedAvg);
* ``secure_acc`` / ``fedavg_acc``  the mean over hospitals of each personalised model on all
                     hospitals' Testing scans;
* ``central_acc``    the centrally trained model on them;
* ``candidates``     per arm and candidate: validation (``val``), own Testing (``own``) and
                     all-Testing (``pooled``) balanced accuracy per hospital;
  ``own_local_val``  the local models on their own validation scans;
* ``clipped``        the largest per-round share of sent values beyond the clip (all,
                     statistics, weights); plus the settings, ``final`` and ``curves``.

The data are synthetic: the numbers compare training set-ups, they say nothing about real
scans.

    .venv/bin/python bench/federation_value.py            # about 7 minutes on 2 cores
    .venv/bin/python bench/federation_value.py --seed 1   # other data, other initial weights
    .venv/bin/python bench/federation_value.py --arms local,secure --rounds 6  # screening
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

from securefl.config import RoundSettings
from securefl.crypto.quantize import Encoding
from securefl.fedopt import ServerOptimizer, ServerOptSettings, statistics_layout
from securefl.ml import model as model_mod
from securefl.ml.batchnorm import calibrate_batch_norm
from securefl.ml.data import ImageSet, load_split, make_dataset, split_validation
from securefl.ml.model import compile_model, from_vector, make_model, to_vector, weight_spec
from securefl.ml.prior import class_prior, set_prior
from securefl.ml.settings import MLSettings
from securefl.ml.synth import synthesize
from securefl.ml.train import (
    balanced_accuracy,
    balanced_nll,
    choose_on_validation,
    predict_proba,
    train,
)

CANDIDATES = ("global", "recal", "prior", "finetune", "best")
#: The candidates the product makes, in its order of preference on a tie.
PRODUCT_CHOICES = ("finetune", "recal", "global")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=600, help="Training images per hospital "
                   "(train and validation scans)")
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
    rs = RoundSettings()
    p.add_argument("--clip", type=float, default=rs.clip,
                   help="secure-aggregation clip bound (default: the server's [round] clip)")
    p.add_argument("--data", type=Path, help="reuse/keep generated data here")
    p.add_argument("--average", type=int, default=3,
                   help="report the mean of the last N checkpoints (rounds)")
    p.add_argument("--personalise", choices=CANDIDATES, default="best",
                   help="the personalisation the headline keys use (default: the product's "
                        "[ml] personalise default; docs/RESULTS.md)")
    p.add_argument("--finetune-lr", type=float, default=1e-4,
                   help="learning rate of the finetune candidate's one epoch")
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
    p.add_argument("--fresh-local-optimiser", action="store_true",
                   help="federated arms: every round's local training starts with a fresh "
                   "Adam state instead of the hospital's own from its last round")
    p.add_argument("--patience", type=int, default=0,
                   help="0: every training call runs --local-epochs epochs.  N > 0: as the "
                        "product trains ([ml] epochs and patience), --local-epochs is a "
                        "maximum and a call stops once the validation loss has not improved "
                        "for N epochs, ending on its best epoch; hospitals (local and "
                        "federated arms) stop on their own validation scans, the central "
                        "arm on all hospitals' validation scans")
    p.add_argument("--scaffold", action="store_true",
                   help="federated arms (experiment): SCAFFOLD control variates.  Every round "
                        "each hospital measures its mean gradient over its training scans at "
                        "the global weights (c_i), the mean c goes through the arm's "
                        "aggregation, and local training adds c - c_i to every gradient")
    p.add_argument("--prox", type=float, default=0.0, metavar="MU",
                   help="federated arms (experiment): FedProx proximal term.  Local training "
                        "minimises the loss plus MU/2 ||w - w_global||^2 over the trainable "
                        "weights (its gradient MU (w - w_global) is added to every gradient), "
                        "which holds each hospital's skewed training near the global model")
    p.add_argument("--fedbn", action="store_true",
                   help="federated arms (experiment): FedBN (Li et al. 2021).  Each hospital "
                        "keeps its own batch-norm layers (scale, offset and statistics): "
                        "they are never sent (the update is zero there), every round's "
                        "training starts from the global weights with the hospital's own "
                        "batch-norm layers, and so does every personalisation candidate")
    p.add_argument("--arms", default="local,fedavg,secure,central",
                   help="comma-separated subset of local,fedavg,secure,central (scouting)")
    return p.parse_args()


def _corrected_adam(model, lr: float, mu: float = 0.0):
    """Adam that adds a correction to every gradient it applies: a fixed one (SCAFFOLD's
    c - c_i) and FedProx's ``mu (w - anchor)``, the anchor being the round's global weights.
    Both live in variables, so the compiled training step reads each round's."""
    import keras

    class CorrectedAdam(keras.optimizers.Adam):
        def apply(self, grads, trainable_variables=None):
            variables = (trainable_variables if trainable_variables is not None
                         else model.trainable_variables)
            grads = [g + c + mu * (v - a) for g, c, v, a in
                     zip(grads, self._corr_vars, variables, self._anchor_vars, strict=True)]
            return super().apply(grads, trainable_variables)

        @staticmethod
        def _assign(targets, flat: np.ndarray) -> None:
            at = 0
            for v in targets:
                n = int(np.prod(v.shape))
                v.assign(flat[at:at + n].reshape(tuple(v.shape)))
                at += n

        def set_correction(self, flat: np.ndarray) -> None:
            self._assign(self._corr_vars, flat)

        def set_anchor(self) -> None:
            """The model's trainable weights now (the round's global ones) become the anchor."""
            for a, v in zip(self._anchor_vars, model.trainable_variables, strict=True):
                a.assign(v)

    opt = CorrectedAdam(learning_rate=lr)
    corr = [keras.Variable(np.zeros(tuple(v.shape), np.float32), trainable=False)
            for v in model.trainable_variables]
    anchor = [keras.Variable(np.asarray(v), trainable=False) for v in model.trainable_variables]
    object.__setattr__(opt, "_corr_vars", corr)  # kept out of the optimizer's variables
    object.__setattr__(opt, "_anchor_vars", anchor)
    return opt


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
    ml = MLSettings(scans_dir=root, model_dir=root)  # only for the split's defaults
    trains, vals = [], []
    for n in names:
        folder = load_split(root / n, "Training", size=args.size)
        tr, va = split_validation(folder, fraction=ml.validation_fraction,
                                  min_per_class=ml.min_validation_per_class, seed=args.seed,
                                  root=root / n / "Training")
        trains.append(tr)
        vals.append(va)
    tests = [load_split(root / n, "Testing", size=args.size) for n in names]
    pooled_test = ImageSet.concat(tests)
    bounds = np.cumsum([0] + [len(t) for t in tests])
    own = [slice(int(bounds[h]), int(bounds[h + 1])) for h in range(len(names))]
    pooled_train = ImageSet.concat(trains)
    pooled_val = ImageSet.concat(vals)
    epochs_run = [0]  # training epochs actually run (early stopping), for the log
    log(f"data ready in {time.perf_counter() - t0:.0f} s: "
        + "; ".join(f"{n} train {t.counts()} validation {len(v)}"
                    for n, t, v in zip(names, trains, vals, strict=True)))
    shape = (args.size, args.size, 1)
    total_epochs = args.rounds * args.local_epochs
    rs = RoundSettings()
    encoding = Encoding.auto(clip=args.clip, max_clients=rs.max_clients,
                             max_weight=rs.max_weight)

    def fresh(corrected: bool = False):
        model = make_model(shape, 4, kind=args.kind, seed=args.seed)
        compile_model(model, args.lr, prior_correction=args.prior_correction)
        if corrected:  # SCAFFOLD / FedProx: the same loss, Adam fed corrected gradients
            model.compile(optimizer=_corrected_adam(model, args.lr, args.prox), loss=model.loss,
                          metrics=["accuracy"])
        return model

    def lr_at(r: int) -> float:
        """The learning rate of round (or epoch block) ``r``: one schedule for every arm."""
        if args.schedule == "constant" or args.rounds == 1:
            return args.lr
        cos = 0.5 * (1 + math.cos(math.pi * r / (args.rounds - 1)))
        return args.lr * (args.lr_floor + (1 - args.lr_floor) * cos)

    def fit(model, data, epochs, seed, r, lr=None, validation=None):
        stop = args.patience > 0 and validation is not None
        res = train(model, data, epochs=epochs, batch_size=args.batch,
                    learning_rate=lr_at(r) if lr is None else lr, seed=seed,
                    calibrate=not args.no_calibrate, validation=validation if stop else None,
                    patience=max(args.patience, 1))
        epochs_run[0] += res.epochs_run
        return res

    def pooled_probs(model) -> np.ndarray:
        return predict_proba(model, pooled_test.images)

    def bal_pooled(probs) -> float:
        return balanced_accuracy(probs, pooled_test.labels)

    def bal_own(probs, h) -> float:
        return balanced_accuracy(probs[own[h]], tests[h].labels)

    # Each arm gets freshly built models: same initial weights *and* same augmentation and
    # dropout random streams, so plain and secure FedAvg differ only by the secure round.
    workers = [fresh() for _ in names]
    w0 = to_vector(workers[0])
    keep_from = args.rounds - args.average  # the checkpoints the headline averages

    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    unknown = arms - {"local", "fedavg", "secure", "central"}
    if unknown:
        raise SystemExit(f"unknown arm(s): {', '.join(sorted(unknown))}")
    opt_settings = ServerOptSettings(
        kind=args.server_opt, server_lr=args.server_lr, momentum=args.server_momentum,
        beta2=args.server_beta2, eps=args.server_eps, statistics=args.server_stats)
    layout = statistics_layout((layer.name, layer.size)
                               for layer in weight_spec(workers[0]).layers)
    is_stat = np.zeros(w0.size, dtype=bool)
    for start, stop in layout.ranges:
        is_stat[start:stop] = True
    is_bn = np.zeros(w0.size, dtype=bool)  # every batch-norm weight (FedBN keeps them local)
    offset = 0
    for layer in weight_spec(workers[0]).layers:
        if "_bn/" in layer.name:
            is_bn[offset:offset + layer.size] = True
        offset += layer.size
    own_bn: list[np.ndarray] = []  # FedBN: each hospital's own batch-norm weights

    def with_own_bn(g: np.ndarray, h: int) -> np.ndarray:
        """The weights hospital ``h`` trains and personalises from: the global ones, with
        its own batch-norm layers under FedBN."""
        if not args.fedbn:
            return g
        out = g.copy()
        out[is_bn] = own_bn[h][is_bn]
        return out

    # -- local arm: pooled and own Testing every checkpoint, own validation at the end ----
    local_curves: list[list[float]] = []
    own_local_curves: list[list[float]] = []
    own_local_val_curves: list[list[float]] = []
    if "local" in arms:
        for h, (name, data) in enumerate(zip(names, trains, strict=True)):
            from_vector(workers[h], w0)
            curve, own_curve, val_curve = [], [], []
            for r in range(args.rounds):
                fit(workers[h], data, args.local_epochs, seed=1000 * r + h, r=r,
                    validation=vals[h])
                probs = pooled_probs(workers[h])
                curve.append(bal_pooled(probs))
                own_curve.append(bal_own(probs, h))
                val_curve.append(balanced_accuracy(predict_proba(workers[h], vals[h].images),
                                                   vals[h].labels))
            local_curves.append(curve)
            own_local_curves.append(own_curve)
            own_local_val_curves.append(val_curve)
            log(f"local {name}: pooled " + " ".join(f"{a:.3f}" for a in curve)
                + " | own " + " ".join(f"{a:.3f}" for a in own_curve))

    # -- personalisation candidates ----------------------------------------------------------
    def reset_optimizer(model) -> None:
        opt = getattr(model, "optimizer", None)
        for v in getattr(opt, "variables", []) or []:
            v.assign(np.zeros(tuple(v.shape), dtype=str(v.dtype)))

    def personalise(pers, g: np.ndarray, r: int) -> dict[str, dict[str, list[float]]]:
        """Every candidate for every hospital from global weights ``g``: validation, own
        Testing and all-Testing balanced accuracy."""
        out = {c: {"val": [], "own": [], "pooled": []} for c in CANDIDATES}

        seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def score(c, h, model=None, val_probs=None, test_probs=None):
            if val_probs is None:
                val_probs = predict_proba(model, vals[h].images)
                test_probs = pooled_probs(model)
            out[c]["val"].append(balanced_accuracy(val_probs, vals[h].labels))
            out[c]["own"].append(bal_own(test_probs, h))
            out[c]["pooled"].append(bal_pooled(test_probs))
            seen[c] = val_probs, test_probs
            return val_probs, test_probs

        for h in range(len(names)):
            seen.clear()
            m = pers[h]
            from_vector(m, with_own_bn(g, h))
            score("global", h, m)
            calibrate_batch_norm(m, trains[h])
            val_p, test_p = score("recal", h, m)
            prior = class_prior(list(trains[h].counts().values())).astype(np.float64)

            def tilt(p, prior=prior):
                q = p * prior
                return q / q.sum(axis=1, keepdims=True)

            score("prior", h, val_probs=tilt(val_p), test_probs=tilt(test_p))
            recal_loss = balanced_nll(val_p, vals[h].labels)
            reset_optimizer(m)
            fit(m, trains[h], 1, seed=7000 + 100 * r + h, r=r, lr=args.finetune_lr)
            ft_val = predict_proba(m, vals[h].images)
            if balanced_nll(ft_val, vals[h].labels) < recal_loss:
                score("finetune", h, val_probs=ft_val, test_probs=pooled_probs(m))
            else:  # early-stopped: the epoch made validation worse, keep recal
                score("finetune", h, val_probs=val_p, test_probs=test_p)
            # what the product's [ml] personalise = "best" keeps (securefl.ml.local.
            # choose_on_validation): the best of the three on the validation scans
            choice = choose_on_validation({c: seen[c][0] for c in PRODUCT_CHOICES},
                                          vals[h].labels)
            score("best", h, val_probs=seen[choice][0], test_probs=seen[choice][1])
        return out

    def mean_gradient(model, data, seed) -> np.ndarray:
        """SCAFFOLD's c_i: the mean gradient of the training loss over ``data`` at the
        model's current weights, flattened in trainable-variable order."""
        import tensorflow as tf

        set_prior(model, list(data.counts().values()))
        tv = model.trainable_variables
        acc = [np.zeros(tuple(v.shape), np.float64) for v in tv]
        n = 0
        for x, y in make_dataset(data, args.batch, shuffle=True, seed=seed):
            with tf.GradientTape() as tape:
                loss = model.loss(y, model(x, training=True))
            b = int(x.shape[0])
            for a, g in zip(acc, tape.gradient(loss, tv), strict=True):
                a += np.asarray(g, np.float64) * b
            n += b
        return np.concatenate([a.ravel() / n for a in acc]).astype(np.float32)

    def federate(label, mean_fn):
        workers[:] = [fresh(corrected=args.scaffold or args.prox > 0) for _ in names]
        pers = [fresh() for _ in names]
        opt = ServerOptimizer(opt_settings, w0.size, statistics=layout)
        g = w0.copy()
        own_bn[:] = [w0.copy() for _ in names]
        clipped = {"all": 0.0, "statistics": 0.0, "weights": 0.0, "max_abs": 0.0}
        curve: list[float] = []  # the unpersonalised global model, every round
        checkpoints = []
        for r in range(args.rounds):
            deltas, weights = [], []
            before = epochs_run[0]
            if args.scaffold:
                grads = []
                for h, data in enumerate(trains):
                    from_vector(workers[h], g)
                    grads.append(mean_gradient(workers[h], data, seed=5000 + 100 * r + h))
                c = np.asarray(mean_fn(grads, [len(d) for d in trains]), dtype=np.float32)
                for h in range(len(trains)):
                    workers[h].optimizer.set_correction(c - grads[h])
            for h, data in enumerate(trains):
                from_vector(workers[h], with_own_bn(g, h))
                if args.fresh_local_optimiser:
                    reset_optimizer(workers[h])
                if args.prox > 0:
                    workers[h].optimizer.set_anchor()
                fit(workers[h], data, args.local_epochs, seed=1000 * r + h, r=r,
                    validation=vals[h])
                trained = to_vector(workers[h])
                if args.fedbn:  # kept, never sent
                    own_bn[h] = trained.copy()
                    trained[is_bn] = g[is_bn]
                deltas.append(trained - g)
                weights.append(len(data))
            stack = np.abs(np.stack(deltas))
            beyond = stack > encoding.clip
            clipped["all"] = max(clipped["all"], float(beyond.mean()))
            clipped["statistics"] = max(clipped["statistics"],
                                        float(beyond[:, is_stat].mean()) if is_stat.any()
                                        else 0.0)
            clipped["weights"] = max(clipped["weights"], float(beyond[:, ~is_stat].mean()))
            clipped["max_abs"] = max(clipped["max_abs"], float(stack.max()))
            g = opt.step(g, np.asarray(mean_fn(deltas, weights), dtype=np.float32))
            from_vector(workers[0], with_own_bn(g, 0))  # FedBN: hospital_1's view
            curve.append(bal_pooled(pooled_probs(workers[0])))
            msg = (f"{label} round {r + 1}/{args.rounds}: global {curve[-1]:.3f} "
                   f"(local epochs {epochs_run[0] - before})")
            if r >= keep_from:
                checkpoints.append(personalise(pers, g, r))
                c = checkpoints[-1]
                msg += " | " + "  ".join(
                    f"{k}: own {' '.join(f'{a:.3f}' for a in c[k]['own'])} "
                    f"val {np.mean(c[k]['val']):.3f}" for k in CANDIDATES)
            log(msg)
        # mean over the kept checkpoints, per candidate, per measure, per hospital
        summary = {c: {m: [float(np.mean([ck[c][m][h] for ck in checkpoints]))
                           for h in range(len(names))] for m in ("val", "own", "pooled")}
                   for c in CANDIDATES}
        final = checkpoints[-1]
        return curve, g, clipped, summary, final

    def plain_mean(deltas, weights):
        w = np.asarray(weights, dtype=np.float64)
        return (np.tensordot(w, np.stack(deltas).astype(np.float64), axes=1) / w.sum()) \
            .astype(np.float32)

    results: dict[str, tuple] = {}
    if "fedavg" in arms:
        results["fedavg"] = federate("fedavg", plain_mean)

    if "secure" in arms:
        from securefl.crypto.simulate import run_round  # the real secure round

        def secure_mean(deltas, weights):
            result, _ = run_round([np.ascontiguousarray(d, dtype=np.float32) for d in deltas],
                                  [int(w) for w in weights], encoding=encoding, colluders=0)
            return result.mean_update

        results["secure"] = federate("secure", secure_mean)

    central_curve = None
    if "central" in arms:
        central = fresh()
        central_curve = []
        central_epochs: list[int] = []
        for r in range(args.rounds):
            before = epochs_run[0]
            fit(central, pooled_train, args.local_epochs, seed=1000 * r + 7, r=r,
                validation=pooled_val)
            central_epochs.append(epochs_run[0] - before)
            central_curve.append(bal_pooled(pooled_probs(central)))
        log("central: " + " ".join(f"{a:.3f}" for a in central_curve)
            + f" | epochs per block {central_epochs}")

    def tail(curve):  # mean of the last checkpoints: one snapshot is noisy (see RESULTS.md)
        return float(np.mean(curve[-args.average:]))

    def r4(x):
        if x is None:
            return None
        if isinstance(x, (list, tuple)):
            return [r4(v) for v in x]
        if isinstance(x, dict):
            return {k: r4(v) for k, v in x.items()}
        return round(float(x), 4)

    pick = args.personalise
    fed = f"{args.rounds} rounds x {args.local_epochs} epoch(s)"
    print(f"balanced accuracy; Testing: {len(pooled_test)} synthetic scans "
          f"{pooled_test.counts()}; model {args.kind} {args.size}x{args.size}; {total_epochs} "
          f"epochs per arm; encoding clip {encoding.clip:g} scale {encoding.scale:g}; "
          f"server optimiser {opt_settings.model_dump()}; personalisation '{pick}'")
    print(f"  mean of the last {args.average} checkpoints")
    print(f"  {'arm':<44} {'all Testing':>11} {'own Testing':>12} {'own validation':>15}")
    for h, n in enumerate(names):
        if local_curves:
            print(f"  {'local only: ' + n:<44} {tail(local_curves[h]):11.3f} "
                  f"{tail(own_local_curves[h]):12.3f} {tail(own_local_val_curves[h]):15.3f}")
    for arm, (_, _, _, summary, _) in results.items():
        for c in CANDIDATES:
            for h, n in enumerate(names):
                print(f"  {f'{arm} {fed}, {c}: {n}':<44} {summary[c]['pooled'][h]:11.3f} "
                      f"{summary[c]['own'][h]:12.3f} {summary[c]['val'][h]:15.3f}")
    if central_curve:
        print(f"  {'centralised (union of the data)':<44} {tail(central_curve):11.3f}")
    for arm, (_, _, clipped, _, _) in results.items():
        print(f"  {arm}: values beyond the clip {encoding.clip:g} (largest share in a round): "
              f"{clipped['all']:.2%} (batch-norm statistics {clipped['statistics']:.2%}, "
              f"trained weights {clipped['weights']:.2%}); largest |delta| "
              f"{clipped['max_abs']:.2f}")
    if "fedavg" in results and "secure" in results:
        print(f"  secure vs plain final weights: max |diff| "
              f"{float(np.max(np.abs(results['secure'][1] - results['fedavg'][1]))):.2e}")
    print(f"  total {time.perf_counter() - t0:.0f} s")

    def arm_pick(arm, final=False):
        if arm not in results:
            return None, None
        summary = results[arm][4] if final else results[arm][3]
        return float(np.mean(summary[pick]["pooled"])), summary[pick]["own"]

    secure_acc, own_fed = arm_pick("secure")
    fedavg_acc, own_fedavg = arm_pick("fedavg")
    f_secure, f_own_fed = arm_pick("secure", final=True)
    f_fedavg, f_own_fedavg = arm_pick("fedavg", final=True)
    print(json.dumps({
        "local_acc": r4([tail(c) for c in local_curves]),
        "own_local_acc": r4([tail(c) for c in own_local_curves]),
        "own_fed_acc": r4(own_fed),
        "own_fedavg_acc": r4(own_fedavg),
        "fedavg_acc": r4(fedavg_acc),
        "secure_acc": r4(secure_acc),
        "central_acc": r4(tail(central_curve)) if central_curve else None,
        "metric": "balanced accuracy",
        "personalise": pick,
        "own_local_val": r4([tail(c) for c in own_local_val_curves]),
        "candidates": {arm: r4(res[3]) for arm, res in results.items()},
        "clipped": {arm: r4(res[2]) for arm, res in results.items()},
        "encoding": {"clip": encoding.clip, "scale": encoding.scale,
                     "ring_bits": encoding.ring_bits},
        "rounds": args.rounds,
        "averaged_checkpoints": args.average,
        "seed": args.seed,
        "local_epochs": args.local_epochs,
        "patience": args.patience,
        "server_opt": opt_settings.model_dump(),
        "norm": args.norm,
        "calibrate": not args.no_calibrate,
        "prior_correction": args.prior_correction,
        "finetune_lr": args.finetune_lr,
        "scaffold": args.scaffold,
        "prox": args.prox,
        "fedbn": args.fedbn,
        "schedule": args.schedule if args.schedule == "constant"
        else f"{args.schedule} {args.lr:g} -> {args.lr * args.lr_floor:g}",
        "final": {"local_acc": r4([c[-1] for c in local_curves]),
                  "own_local_acc": r4([c[-1] for c in own_local_curves]),
                  "own_fed_acc": r4(f_own_fed), "own_fedavg_acc": r4(f_own_fedavg),
                  "secure_acc": r4(f_secure), "fedavg_acc": r4(f_fedavg),
                  "central_acc": r4(central_curve[-1]) if central_curve else None},
        "curves": {"local": r4(local_curves), "own_local": r4(own_local_curves),
                   **{f"{arm}_global": r4(res[0]) for arm, res in results.items()},
                   **({"central": r4(central_curve)} if central_curve else {})},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
