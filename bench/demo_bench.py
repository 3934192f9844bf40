"""The demo's default run, timed: does the README's first command do its job in time?

    python bench/demo_bench.py [--hospitals 3 --rounds 4 ...]   (same options as the demo)

Prints the demo's own output, then, last, one JSON line with wall_s, rounds, and balanced
accuracy on Testing scans after the last round: final_global_acc (all hospitals' test scans,
mean over the hospitals' copies of the shared model), best_local_acc and mean_local_acc (the
hospitals trained alone for the same epochs, same scans), own_local_acc and own_shared_acc
(per hospital, on its own test scans: trained alone, and this hospital's copy of the shared
model, personalised as its [ml] personalise says).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefl.demo.federated import DemoSettings, run


def main() -> None:
    defaults = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=defaults.hospitals)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    a = p.parse_args()
    result = run(DemoSettings(hospitals=a.hospitals, rounds=a.rounds, epochs=a.epochs,
                              image_size=a.image_size, seed=a.seed))
    print(json.dumps({
        "wall_s": round(result.wall_s, 1),
        "rounds": len(result.rows),
        "final_global_acc": round(result.final_global_acc, 4),
        "best_local_acc": round(result.best_local_acc, 4),
        "mean_local_acc": round(result.mean_local_acc, 4),
        "own_local_acc": {n: round(a, 4) for n, a in result.own_local_acc.items()},
        "own_shared_acc": {n: round(a, 4) for n, a in result.own_shared_acc.items()},
    }))


if __name__ == "__main__":
    main()
