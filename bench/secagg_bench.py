"""Secure-aggregation cost in one process, no network: hospitals + server, side by side
with a plain float sum of the same vectors.

    python bench/secagg_bench.py                       # the full grid
    python bench/secagg_bench.py --clients 10 --params 1000000 --dropout 0

Prints a readable table, then, last, one JSON line per configuration with
clients, params, dropout, neighbours, colluders, client_s (median per hospital),
client_max_s, server_s, total_s (all hospitals + server), plain_s, upload_bytes (per
hospital, masked input payload), sent_bytes (everything the busiest hospital sends in the
round, as protocol frames: signed keys, share envelopes, masked input, survivor-list
signature, unmask shares; TLS records and the join/upload-slot requests not counted),
extra_bytes (sent_bytes - 4 x params: keys, signatures and shares) and wall_s.  Dropouts
happen after key sharing and before the masked input: the costly case for the server, which
must rebuild the lost hospitals' keys and remove their pairwise masks.  A configuration the
protocol refuses (too few left for the threshold t = floor((k + 1 + c) / 2) + 1) prints
why instead of figures.

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

from securefl.crypto import messages as cm
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg.policy import split_view_threshold
from securefl.crypto.simulate import federation, run_round
from securefl.errors import NotEnoughSurvivorsError
from securefl.protocol import frames, mapping
from securefl.protocol import messages as wm

GRID_CLIENTS = (5, 10, 20, 50, 100)
GRID_PARAMS = (100_000, 1_000_000)
GRID_DROPOUT = (0.0, 0.1, 0.3)
BENCH = Path(__file__).resolve().parent
FLOWER_PYTHON = BENCH / ".flower-venv" / "bin" / "python"


def frame_bytes(msg: object) -> int:
    """Bytes of the protocol frame a hospital writes for one round message (rid 9)."""
    payload = 0
    if isinstance(msg, cm.KeyAdvertisement):
        wire: wm._Wire = mapping.advertisement_to_wire(msg, rid=9)
    elif isinstance(msg, cm.ShareKeys):
        wire = mapping.share_keys_to_wire(msg, rid=9)
    elif isinstance(msg, cm.MaskedInput):
        wire = wm.MaskedInputMsg(rid=9, round_id=msg.round_id, array=wm.ArraySpec.of(msg.y))
        payload = msg.y.nbytes
    elif isinstance(msg, cm.ConsistencySignature):
        wire = mapping.signature_to_wire(msg, rid=9)
    elif isinstance(msg, cm.UnmaskResponse):
        wire = mapping.unmask_response_to_wire(msg, rid=9)
    else:
        raise TypeError(f"a hospital does not send {type(msg).__name__}")
    return len(frames.encode_prefix(wm.encode_header(wire), payload)) + payload


def measure(clients: int, params: int, dropout: float, neighbours: int | None,
            repeats: int, colluders: int = 1) -> dict:
    rng = np.random.default_rng(clients * 7 + params)
    updates = [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(clients)]
    weights = [int(w) for w in rng.integers(100, 5000, clients)]
    lost = set(range(round(dropout * clients)))
    encoding = Encoding.auto(max_clients=clients, max_weight=5000)
    federation(clients)  # make certificates outside the timing
    best = None
    for _ in range(repeats):
        sent: dict[str, int] = {}

        def count(name: str, msg: object, sent: dict[str, int] = sent) -> None:
            sent[name] = sent.get(name, 0) + frame_bytes(msg)

        wall = time.perf_counter()
        result, timings = run_round(updates, weights, encoding=encoding, neighbours=neighbours,
                                    drop={"input": lost}, on_message=count,
                                    colluders=colluders)
        wall = time.perf_counter() - wall
        per_client = list(timings.client_s.values())
        row = {
            "clients": clients,
            "params": params,
            "dropout": dropout,
            "neighbours": neighbours or clients - 1,
            "colluders": colluders,
            "client_s": round(statistics.median(per_client), 4),
            "client_max_s": round(max(per_client), 4),
            "server_s": round(timings.server_s, 4),
            "total_s": round(sum(per_client) + timings.server_s, 4),
            "upload_bytes": timings.upload_bytes,
            "sent_bytes": max(sent.values()),
            "extra_bytes": max(sent.values()) - 4 * params,
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


def flower(clients: int, params: int, dropout: float, neighbours: int | None,
           colluders: int = 1) -> dict:
    """Flower 1.42's SecAgg+ on the same configuration: bench/flower_ref.py's JSON row."""
    if not FLOWER_PYTHON.exists():
        subprocess.run(["bash", str(BENCH / "flower_env.sh")], check=True,
                       stdout=sys.stderr)
    cmd = [str(FLOWER_PYTHON), str(BENCH / "flower_ref.py"), "--clients", str(clients),
           "--params", str(params), "--dropout", str(dropout)]
    k = neighbours or clients - 1
    t = min(k + 1, split_view_threshold(k + 1, colluders))  # our round's threshold
    if k < clients - 1:  # the same graph degree
        cmd += ["--num-shares", str(k + 1)]
    cmd += ["--threshold", str(t)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*")
    parser.add_argument("--params", type=int, nargs="*")
    parser.add_argument("--dropout", type=float, nargs="*")
    parser.add_argument("--neighbours", type=int, help="SecAgg+ degree k (default n-1)")
    parser.add_argument("--repeats", type=int, default=1, help="keep the fastest of R runs")
    parser.add_argument("--colluders", type=int, default=1,
                        help="colluding hospitals c the threshold is sized for, "
                             "t = floor((k + 1 + c) / 2) + 1 (default 1, the hospitals' default)")
    parser.add_argument("--flower", action="store_true",
                        help="also run Flower 1.42's SecAgg+ (bench/flower_ref.py) on each "
                             "configuration and print the speedup")
    args = parser.parse_args()
    grid = itertools.product(args.clients or GRID_CLIENTS, args.params or GRID_PARAMS,
                             args.dropout if args.dropout is not None else GRID_DROPOUT)
    rows = []
    print(f"{'N':>4} {'D':>9} {'drop':>5} {'k':>4} {'client_s':>9} {'server_s':>9} "
          f"{'total_s':>8} {'plain_s':>8} {'upload':>10} {'sent':>10} {'extra':>7}"
          + (f" {'flower_s':>9} {'speedup':>8}" if args.flower else ""))
    for clients, params, dropout in grid:
        try:
            row = measure(clients, params, dropout, args.neighbours, args.repeats,
                          args.colluders)
        except NotEnoughSurvivorsError as exc:
            # e.g. N = 5 with 30% lost: t = 4 with c = 1, and only 3 are left; by design.
            rows.append({"clients": clients, "params": params, "dropout": dropout,
                         "colluders": args.colluders, "refused": exc.message})
            print(f"{clients:>4} {params:>9} {dropout:>5}  refused: {exc.message}", flush=True)
            continue
        extra = ""
        if args.flower:
            ref = flower(clients, params, dropout, args.neighbours, args.colluders)
            row["flower_total_s"] = ref["total_s"]
            row["flower_upload_bytes"] = ref["upload_bytes"]
            row["speedup_vs_flower"] = round(ref["total_s"] / row["total_s"], 2)
            extra = f" {row['flower_total_s']:>9.3f} {row['speedup_vs_flower']:>7.1f}x"
        rows.append(row)
        print(f"{clients:>4} {params:>9} {dropout:>5} {row['neighbours']:>4} "
              f"{row['client_s']:>9.3f} {row['server_s']:>9.3f} {row['total_s']:>8.3f} "
              f"{row['plain_s']:>8.4f} {row['upload_bytes']:>10} {row['sent_bytes']:>10} "
              f"{row['extra_bytes']:>7}{extra}", flush=True)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
