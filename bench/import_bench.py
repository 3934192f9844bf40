"""What a hospital command pays before it does anything: importing TensorFlow and Keras.

Every CLI command that loads the model (``train``, ``get``, ``evaluate``, ``classify``) and
every app training run starts a Python process that imports TensorFlow and Keras through
``securefl.ml._tf``.  This bench starts fresh processes, alternating the two ways side by
side in one run so that a busy machine affects both alike, and prints the CPU seconds and
wall seconds of each:

* ``securefl`` -- ``securefl.ml._tf.keras()`` as the product imports it (Keras' probes for
  scikit-learn and pandas find nothing);
* ``plain``    -- ``import tensorflow, keras`` as a plain script would.

    .venv/bin/python bench/import_bench.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = (
    "import resource, sys, time, json\n"
    "t = time.perf_counter()\n"
    "{body}\n"
    "r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(json.dumps({{'cpu': r.ru_utime + r.ru_stime, 'wall': time.perf_counter() - t,"
    " 'sklearn': 'sklearn' in sys.modules, 'pandas': 'pandas' in sys.modules}}))\n"
)
WAYS = {
    "securefl": "from securefl.ml._tf import keras\nkeras()",
    "plain": "import tensorflow, keras",
}


def measure(way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=WAYS[way])],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="fresh processes per way (alternating)")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    for i in range(args.runs):
        for way in WAYS:
            runs[way].append(measure(way))
            print(f"run {i + 1}/{args.runs} {way}: {runs[way][-1]['cpu']:.2f} s CPU",
                  file=sys.stderr, flush=True)
    summary = {}
    for way, rs in runs.items():
        summary[way] = {"cpu_median_s": round(statistics.median(r["cpu"] for r in rs), 2),
                        "wall_median_s": round(statistics.median(r["wall"] for r in rs), 2),
                        "loads_sklearn_or_pandas": any(r["sklearn"] or r["pandas"] for r in rs)}
        print(f"{way:<9} median {summary[way]['cpu_median_s']:5.2f} s CPU, "
              f"{summary[way]['wall_median_s']:5.2f} s wall; scikit-learn/pandas loaded: "
              f"{summary[way]['loads_sklearn_or_pandas']}")
    ratio = summary["securefl"]["cpu_median_s"] / summary["plain"]["cpu_median_s"]
    print(f"securefl / plain CPU: {ratio:.2f}")
    print(json.dumps({"runs": args.runs, **summary, "cpu_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
