"""``securefl demo``: show secure aggregation doing its job, in plain words.

Until the networked federation lands, the demo runs one secure-aggregation round in this
process with simulated hospitals (random model updates and sample counts), loses some of
them mid-round on purpose, and prints what the server learned next to the true weighted
mean — and what it saw of one hospital's update (nothing useful).
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np

from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg.policy import split_view_threshold
from securefl.crypto.simulate import STAGES, run_round

#: Hospitals in ``securefl demo --secagg-only`` when none are asked for: the fewest for which
#: the round can lose one hospital before sending and one after (three hospitals assuming
#: one colluder need all three, see ``split_view_threshold``).
DEFAULT_HOSPITALS = 6
#: The colluders the demo's hospitals assume, as a hospital.toml's [policy] does by default.
COLLUDERS = 1


def run_demo(*, hospitals: int, params: int, dropout: float, seed: int) -> int:
    if hospitals < 3:
        print("securefl demo: use at least 3 hospitals", file=sys.stderr)
        return 2
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    updates = [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(hospitals)]
    weights = [int(w) for w in rng.integers(200, 3000, hospitals)]
    # The threshold the server uses and every hospital demands (not n // 2 + 1: with that,
    # the demo printed "threshold 2 of 3" and then failed for want of a third hospital).
    threshold = split_view_threshold(hospitals, COLLUDERS)
    asked = round(dropout * hospitals)
    n_drop = min(asked, hospitals - threshold)
    lost = pick.sample(range(hospitals), n_drop)
    half = (n_drop + 1) // 2
    plan = {"input": set(lost[:half]), "unmask": set(lost[half:])}
    encoding = Encoding.auto(max_clients=max(hospitals, 2), max_weight=max(weights))

    print(f"securefl demo: {hospitals} simulated hospitals, a model of {params:,} parameters")
    print(f"  secure aggregation: threshold {threshold} of {hospitals}, up to "
          f"{hospitals - threshold} may leave")
    print(f"  {encoding.ring_bits}-bit ring, fixed-point scale {encoding.scale:g}")
    if asked > n_drop:
        print(f"  dropout {dropout:g} would lose {asked} hospital(s), but the round needs "
              f"{threshold} of {hospitals}:\n  {n_drop} will leave (--hospitals "
              f"{DEFAULT_HOSPITALS} or more shows hospitals leaving)")
    for i in plan["input"]:
        print(f"  hospital-{i:03d} will disconnect before sending its update")
    for i in plan["unmask"]:
        print(f"  hospital-{i:03d} will disconnect after sending its update")

    def progress(stage: str) -> None:
        step = STAGES.index(stage) + 1
        print(f"  [{step}/{len(STAGES)}] {stage:<9}", flush=True)

    started = time.perf_counter()
    result, timings = run_round(updates, weights, encoding=encoding, drop=plan,
                                threshold=threshold, colluders=COLLUDERS, on_stage=progress)
    elapsed = time.perf_counter() - started
    contributors = [i for i in range(hospitals) if i not in plan["input"]]
    true_mean = np.average(np.stack([updates[i] for i in contributors]).astype(np.float64),
                           axis=0, weights=[weights[i] for i in contributors])
    error = float(np.abs(result.mean_update - true_mean).max())
    bound = encoding.error_bound(len(contributors), result.total_weight)

    print()
    print(f"  round finished in {elapsed:.2f} s; upload per hospital "
          f"{timings.upload_bytes / 1e6:.2f} MB ({encoding.ring_bytes} bytes per parameter)")
    print(f"  the server combined {len(result.contributors)} hospitals, "
          f"{result.total_weight:,} samples in total")
    print("  first parameters, weighted mean the server learned vs the true weighted mean:")
    for j in range(3):
        print(f"    [{j}] {result.mean_update[j]: .7f}   {true_mean[j]: .7f}")
    # two lines: one was 84 columns, and the demo's lines fit an 80-column terminal
    print(f"  largest difference over all parameters: {error:.2e} -> "
          f"{'OK' if error <= bound else 'TOO LARGE'}\n    (the documented bound is "
          f"{bound:.2e})")
    print("  no single hospital's update or sample count was ever visible to the server.")
    return 0 if error <= bound else 1
