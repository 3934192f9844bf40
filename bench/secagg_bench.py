"""Secure-aggregation cost in one process, no network: hospitals + server, side by side
with a plain float sum of the same vectors.

    python bench/secagg_bench.py                       # the full grid
    python bench/secagg_bench.py --clients 10 --params 1000000 --dropout 0

Prints a readable table, then, last, one JSON line per configuration with
clients, params, dropout, neighbours, client_s (median per hospital), client_max_s,
server_s, total_s (all hospitals + server), plain_s, upload_bytes (per hospital,
masked input payload), and wall_s.  Dropouts happen after key sharing and before the masked
input: the costly case for the server, which must rebuild the lost hospitals' keys and
remove their pairwise masks.

With --flower, each configuration is also run by Flower 1.42's SecAgg+ (bench/flower_ref.py,
in Flower's own venv bench/.flower-venv, made by bench/flower_env.sh if missing), and the JSON
row gains flower_total_s, flower_upload_bytes and speedup_vs_flower (flower_total_s / total_s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefl.crypto.quantize import Encoding
from securefl.crypto.simulate import federation, run_round

GRID_CLIENTS = (5, 10, 20, 50, 100)
GRID_PARAMS = (100_000, 1_000_000)
GRID_DROPOUT = (0.0, 0.1, 0.3)
BENCH = Path(__file__).resolve().parent
FLOWER_PYTHON = BENCH / ".flower-venv" / "bin" / "python"


def measure(clients: int, params: int, dropout: float, neighbours: int | None,
            repeats: int) -> dict:
    rng = np.random.default_rng(clients * 7 + params)
    updates = [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(clients)]
    weights = [int(w) for w in rng.integers(100, 5000, clients)]
    lost = set(range(round(dropout * clients)))
    encoding = Encoding.auto(max_clients=clients, max_weight=5000)
    federation(clients)  # make certificates outside the timing
    best = None
    for _ in range(repeats):
        wall = time.perf_counter()
        result, timings = run_round(updates, weights, encoding=encoding, neighbours=neighbours,
                                    drop={"input": lost})
        wall = time.perf_counter() - wall
        per_client = list(timings.client_s.values())
        row = {
            "clients": clients,
            "params": params,
            "dropout": dropout,
            "neighbours": neighbours or clients - 1,
            "client_s": round(statistics.median(per_client), 4),
            "client_max_s": round(max(per_client), 4),
            "server_s": round(timings.server_s, 4),
            "total_s": round(sum(per_client) + timings.server_s, 4),
            "upload_bytes": timings.upload_bytes,
            "wall_s": round(wall, 4),
        }
        if best is None or row["total_s"] < best["total_s"]:
            best = row
    keep = [i for i in range(clients) if i not in lost]
    t0 = time.perf_counter()
    plain = np.zeros(params, np.float64)
    for i in keep:
        plain += updates[i] * weights[i]
    plain /= sum(weights[i] for i in keep)
    best["plain_s"] = round(time.perf_counter() - t0, 4)
    assert np.abs(result.mean_update - plain).max() <= encoding.error_bound(
        len(keep), result.total_weight
    ), "secure aggregate differs from the plain weighted mean"
    return best


def flower(clients: int, params: int, dropout: float, neighbours: int | None) -> dict:
    """Flower 1.42's SecAgg+ on the same configuration: bench/flower_ref.py's JSON row."""
    if not FLOWER_PYTHON.exists():
        subprocess.run(["bash", str(BENCH / "flower_env.sh")], check=True,
                       stdout=sys.stderr)
    cmd = [str(FLOWER_PYTHON), str(BENCH / "flower_ref.py"), "--clients", str(clients),
           "--params", str(params), "--dropout", str(dropout)]
    k = neighbours or clients - 1
    if k < clients - 1:  # the same graph degree and threshold as our round
        cmd += ["--num-shares", str(k + 1), "--threshold", str((k + 1) // 2 + 1)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*")
    parser.add_argument("--params", type=int, nargs="*")
    parser.add_argument("--dropout", type=float, nargs="*")
    parser.add_argument("--neighbours", type=int, help="SecAgg+ degree k (default n-1)")
    parser.add_argument("--repeats", type=int, default=1, help="keep the fastest of R runs")
    parser.add_argument("--flower", action="store_true",
                        help="also run Flower 1.42's SecAgg+ (bench/flower_ref.py) on each "
                             "configuration and print the speedup")
    args = parser.parse_args()
    grid = itertools.product(args.clients or GRID_CLIENTS, args.params or GRID_PARAMS,
                             args.dropout if args.dropout is not None else GRID_DROPOUT)
    rows = []
    print(f"{'N':>4} {'D':>9} {'drop':>5} {'k':>4} {'client_s':>9} {'server_s':>9} "
          f"{'total_s':>8} {'plain_s':>8} {'upload':>10}"
          + (f" {'flower_s':>9} {'speedup':>8}" if args.flower else ""))
    for clients, params, dropout in grid:
        row = measure(clients, params, dropout, args.neighbours, args.repeats)
        extra = ""
        if args.flower:
            ref = flower(clients, params, dropout, args.neighbours)
            row["flower_total_s"] = ref["total_s"]
            row["flower_upload_bytes"] = ref["upload_bytes"]
            row["speedup_vs_flower"] = round(ref["total_s"] / row["total_s"], 2)
            extra = f" {row['flower_total_s']:>9.3f} {row['speedup_vs_flower']:>7.1f}x"
        rows.append(row)
        print(f"{clients:>4} {params:>9} {dropout:>5} {row['neighbours']:>4} "
              f"{row['client_s']:>9.3f} {row['server_s']:>9.3f} {row['total_s']:>8.3f} "
              f"{row['plain_s']:>8.4f} {row['upload_bytes']:>10}{extra}", flush=True)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
