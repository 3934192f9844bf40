"""Where a secure-aggregation round's time goes: one round of bench/secagg_bench.py under
cProfile, attributed to each protocol step of the hospitals and of the server.

    python bench/secagg_profile.py --clients 1000 --params 100000 --dropout 0.1 --sparse

Prints, per step, the seconds per hospital that ran it (or the server's), and under each
step its most expensive direct callees (the calls the step makes itself, with their
cumulative time), then the functions with the most time of their own in the whole round.
cProfile adds a fixed cost to every Python call, so Python-heavy steps look somewhat
slower than in bench/secagg_bench.py; the ranking is what this is for.  As in the
benchmark, the cyclic garbage collector is off during the round (see run_round_timed).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.secagg_bench import run_round_timed
from securefl.crypto.quantize import Encoding
from securefl.crypto.simulate import federation

CLIENT_STEPS = ("advertise", "_on_roster", "_on_acks", "_on_reveals", "_on_envelopes",
                "_on_consistency", "_on_unmask")
SERVER_STEPS = ("_on_advert", "close_enrolment", "_on_ack", "close_acks", "_on_reveal",
                "close_reveals", "_on_shares", "close_shares", "_on_input", "close_inputs",
                "_on_signature", "close_check", "_on_unmask", "finish", "_strip_masks")

Func = tuple[str, int, str]


def _find(stats: dict, path_part: str, name: str) -> Func | None:
    for func in stats:
        if func[2] == name and path_part in func[0]:
            return func
    return None


def _callees(stats: dict, caller: Func) -> list[tuple[float, int, Func]]:
    """(cumulative seconds, calls, callee) of every function ``caller`` calls directly."""
    out = []
    for func, (_cc, _nc, _tt, _ct, callers) in stats.items():
        if caller in callers:
            _ecc, enc, _ett, ect = callers[caller]
            out.append((ect, enc, func))
    return sorted(out, reverse=True)


def _label(func: Func) -> str:
    path, line, name = func
    short = path.split("securefl/")[-1] if "securefl/" in path else Path(path).name
    return f"{name} ({short}:{line})" if line else name


def report(stats: dict, top: int) -> None:
    for title, part, steps in (("hospital", "secagg/client.py", CLIENT_STEPS),
                               ("server", "secagg/server.py", SERVER_STEPS)):
        print(f"\n{title}: step, calls, seconds per call (cumulative), then its callees")
        for name in steps:
            func = _find(stats, part, name)
            if func is None:
                continue
            _cc, nc, _tt, ct, _callers = stats[func]
            print(f"  {name:<16} {nc:>6} {ct / nc:>10.5f} s")
            for ect, enc, callee in _callees(stats, func)[:5]:
                if ect >= 0.05 * ct:
                    print(f"      {ect / nc:>10.5f} s  {enc / nc:>8.1f} calls  {_label(callee)}")
    print(f"\nwhole round: the {top} functions with the most time of their own")
    rows = sorted(((tt, nc, func) for func, (_cc, nc, tt, _ct, _c) in stats.items()),
                  reverse=True)[:top]
    for tt, nc, func in rows:
        print(f"  {tt:>9.3f} s {nc:>9} calls  {_label(func)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--sparse", action="store_true", help="SecAgg+ sized by the analysis")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(args.clients * 7 + args.params)
    updates = [rng.normal(0, 0.05, args.params).astype(np.float32)
               for _ in range(args.clients)]
    weights = [int(w) for w in rng.integers(100, 5000, args.clients)]
    lost = set(range(round(args.dropout * args.clients)))
    encoding = Encoding.auto(max_clients=args.clients, max_weight=5000)
    federation(args.clients)
    profiler = cProfile.Profile()
    profiler.enable()
    _result, timings, cfg = run_round_timed(updates, weights, lost, encoding,
                                             "sparse" if args.sparse else "full", 1,
                                             on_message=None)
    profiler.disable()
    per = sorted(timings.client_s.values())
    print(f"N = {args.clients}, D = {args.params}, {len(lost)} dropped, "
          f"{'sparse' if args.sparse else 'full'} graph: k = {cfg.neighbours}, "
          f"t = {cfg.threshold}; under the profiler: hospital median "
          f"{per[len(per) // 2]:.3f} s, max {per[-1]:.3f} s, server {timings.server_s:.3f} s")
    report(pstats.Stats(profiler).stats, args.top)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
