"""What a hospital command pays before it does anything: importing TensorFlow and Keras.

Every CLI command that loads the model (``train``, ``get``, ``evaluate``, ``classify``) and
every app training run starts a Python process that imports TensorFlow and Keras through
``securefl.ml._tf``.  This bench starts fresh processes, alternating the two ways side by
side in one run so that a busy machine affects both alike, and prints the CPU seconds and
wall seconds of each:

* ``securefl`` -- ``securefl.ml._tf.keras()`` as the product imports it (Keras' probes for
  scikit-learn and pandas find nothing);
* ``plain``    -- ``import tensorflow, keras`` as a plain script would.

``--gc`` measures what comes after the import instead: the same allocation-heavy work (the
syntax trees of securefl's own sources, built three times) in a process that imported
TensorFlow through ``securefl.ml._tf``, with the objects of the import frozen out of the
garbage collector's way (``securefl``, as the product does) and unfrozen again (``unfrozen``).

    .venv/bin/python bench/import_bench.py --runs 5
    .venv/bin/python bench/import_bench.py --runs 5 --gc
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
#: After the import, outside the measured part: ``{unfreeze}`` is "" or "gc.unfreeze()".
GC_SETUP = ("import gc, ast, pathlib, securefl\n"
            "from securefl.ml._tf import keras\nkeras()\n{unfreeze}\n"
            "files = sorted(pathlib.Path(securefl.__file__).parent.rglob('*.py'))\n"
            "texts = [f.read_text() for f in files]\n")
GC_WORK = "trees = [[ast.parse(t) for t in texts] for _ in range(3)]"
GC_PROBE = (
    "import resource, sys, time, json\n"
    "{setup}"
    "r0 = resource.getrusage(resource.RUSAGE_SELF)\n"
    "t = time.perf_counter()\n"
    "{work}\n"
    "r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(json.dumps({{'cpu': r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime,"
    " 'wall': time.perf_counter() - t}}))\n"
)
GC_WAYS = {"securefl": "", "unfrozen": "gc.unfreeze()"}


def measure(way: str, gc_mode: bool = False) -> dict:
    code = (GC_PROBE.format(setup=GC_SETUP.format(unfreeze=GC_WAYS[way]), work=GC_WORK)
            if gc_mode else PROBE.format(body=WAYS[way]))
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="fresh processes per way (alternating)")
    p.add_argument("--gc", action="store_true",
                   help="time allocation-heavy work after the import, frozen vs unfrozen")
    args = p.parse_args()
    ways = GC_WAYS if args.gc else WAYS
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for i in range(args.runs):
        for way in ways:
            runs[way].append(measure(way, args.gc))
            print(f"run {i + 1}/{args.runs} {way}: {runs[way][-1]['cpu']:.2f} s CPU",
                  file=sys.stderr, flush=True)
    summary = {}
    for way, rs in runs.items():
        summary[way] = {"cpu_median_s": round(statistics.median(r["cpu"] for r in rs), 2),
                        "wall_median_s": round(statistics.median(r["wall"] for r in rs), 2)}
        if not args.gc:
            summary[way]["loads_sklearn_or_pandas"] = any(r["sklearn"] or r["pandas"]
                                                          for r in rs)
        loaded = "" if args.gc else (f"; scikit-learn/pandas loaded: "
                                      f"{summary[way]['loads_sklearn_or_pandas']}")
        print(f"{way:<9} median {summary[way]['cpu_median_s']:5.2f} s CPU, "
              f"{summary[way]['wall_median_s']:5.2f} s wall{loaded}")
    other = "unfrozen" if args.gc else "plain"
    ratio = summary["securefl"]["cpu_median_s"] / summary[other]["cpu_median_s"]
    print(f"securefl / {other} CPU: {ratio:.2f}")
    print(json.dumps({"runs": args.runs, "measured": "work after the import" if args.gc
                      else "the import", **summary, "cpu_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
