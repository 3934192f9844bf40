"""Synthetic-data generation speed: ``securefl data synth`` for N hospitals, in one process.

Each repeat runs :func:`securefl.ml.synth.synthesize` in a fresh Python process (so the
template read and the per-slice caches are paid once per run, as the CLI pays them) into a
temporary folder, and times that call.  With ``--against CHECKOUT`` the same run alternates
with another checkout's code (e.g. the main branch) so a shared, noisy machine disturbs both
arms alike; the best run of each arm counts.

Prints one line per run, then, last, one JSON line: ``ms_per_image``, ``images_per_s`` and
``cpu_ms_per_image`` (process CPU time, less disturbed by other jobs than wall time), plus
the other arm's figures and ``speedup`` (other / this, wall) when ``--against`` is given.

    .venv/bin/python bench/synth_bench.py                        # 3 hospitals, 1200 images, 128 px
    .venv/bin/python bench/synth_bench.py --size 64 --format jpg
    .venv/bin/python bench/synth_bench.py --against ../main      # before/after, side by side
    .venv/bin/python bench/synth_bench.py --tmp /dev/shm         # leave the disk out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs in the child process: import the checkout on PYTHONPATH, time one synthesize().
CHILD = """
import json, shutil, sys, tempfile, time
import securefl.ml.synth
from securefl.ml.synth import synthesize
kw = json.loads(sys.argv[1])
out = tempfile.mkdtemp(prefix="securefl-synthbench-", dir=sys.argv[2] or None)
try:
    wall, cpu = time.perf_counter(), time.process_time()
    synthesize(out, **kw)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
finally:
    shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "module": securefl.ml.synth.__file__}))
"""


def _run(checkout: Path, kw: dict, tmp: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # ``python -c`` puts the working directory first on sys.path: run in the checkout too
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw), str(tmp or "")],
                         env=env, cwd=checkout, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(r["module"]).resolve().is_relative_to(checkout):
        return r
    raise SystemExit(f"{checkout}: the child imported {r['module']} instead")


def _figures(best_wall: float, best_cpu: float, images: int) -> dict:
    return {"ms_per_image": round(best_wall / images * 1e3, 3),
            "images_per_s": round(images / best_wall, 1),
            "cpu_ms_per_image": round(best_cpu / images * 1e3, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--train", type=int, default=300, help="training images per hospital")
    p.add_argument("--test", type=int, default=100, help="testing images per hospital")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--format", choices=("jpg", "png"), default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--against", type=Path, help="another checkout to time alternately")
    p.add_argument("--tmp", type=Path, help="where to write the images (default: the system "
                   "temp folder; /dev/shm leaves the disk out)")
    args = p.parse_args()

    kw = {"hospitals": args.hospitals, "seed": args.seed, "train_per_hospital": args.train,
          "test_per_hospital": args.test, "size": args.size, "image_format": args.format}
    images = args.hospitals * (args.train + args.test)
    arms = {"this": HERE} | ({"other": args.against.resolve()} if args.against else {})
    best = {name: [float("inf"), float("inf")] for name in arms}
    for rep in range(args.repeats):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for name in order:
            r = _run(arms[name], kw, args.tmp)
            best[name][0] = min(best[name][0], r["wall_s"])
            best[name][1] = min(best[name][1], r["cpu_s"])
            print(f"{name:5s} {arms[name]}: {r['wall_s'] / images * 1e3:.3f} ms/image wall, "
                  f"{r['cpu_s'] / images * 1e3:.3f} ms/image CPU", flush=True)
    result = {"images": images, "size": args.size, "format": args.format,
              **_figures(*best["this"], images)}
    if args.against:
        result["other"] = {"checkout": str(arms["other"]), **_figures(*best["other"], images)}
        result["speedup"] = round(best["other"][0] / best["this"][0], 2)
        result["cpu_speedup"] = round(best["other"][1] / best["this"][1], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
