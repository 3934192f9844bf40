"""Compare the personalisation candidates of several ``federation_value.py`` runs.

    python bench/personalisation_table.py --choose 0,1,2 [--testing finetune] run0.out ...

Each file is the stdout of one ``bench/federation_value.py`` run (its last line is the JSON
line).  Prints, per candidate, the mean over hospitals of each hospital's personalised
model (secure arm) on its own **validation** scans against its local-only model there, for
the seeds named by ``--choose`` only (the choice is made on these figures and nothing
else), and names the best.  Then, for that pick on every run, the Testing figures against
the issue's targets: own_fed_acc[i] > own_local_acc[i] for every hospital, the mean gain
>= 3 points, secure_acc >= central_acc - 0.03, |secure_acc - fedavg_acc| <= 0.01 and
secure_acc > max(local_acc), where secure_acc / fedavg_acc are the mean over hospitals of
each personalised model on all hospitals' Testing scans (balanced accuracy, mean of the
last 3 checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{path} has no JSON line: is it the stdout of federation_value.py?")
    return json.loads(lines[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--choose", default="0,1,2", help="seeds whose validation figures choose")
    p.add_argument("--testing", default="",
                   help="comma-separated candidates whose Testing figures are printed beside "
                        "the pick's (reported, never chosen on)")
    a = p.parse_args()
    runs = sorted((load(f) for f in a.runs), key=lambda r: r["seed"])
    choose = {int(s) for s in a.choose.split(",")}
    cands = [c for c in runs[0]["candidates"]["secure"]  # those every run measured
             if all(c in r["candidates"]["secure"] for r in runs)]
    unknown = [c for c in a.testing.split(",") if c and c not in cands]
    if unknown:
        raise SystemExit(f"--testing {','.join(unknown)}: not measured in every run (these "
                         f"are: {', '.join(cands)})")

    print("validation (seeds " + ",".join(map(str, sorted(choose))) + "): mean over hospitals "
          "of balanced accuracy on each hospital's own validation scans, secure arm")
    print(f"  {'seed':>4}  {'local only':>10}  " + "  ".join(f"{c:>10}" for c in cands))
    score = {c: [] for c in cands}
    for r in runs:
        if r["seed"] not in choose:
            continue
        row = [float(np.mean(r["candidates"]["secure"][c]["val"])) for c in cands]
        for c, v in zip(cands, row, strict=True):
            score[c].append(v)
        print(f"  {r['seed']:>4}  {np.mean(r['own_local_val']):10.3f}  "
              + "  ".join(f"{v:10.3f}" for v in row))
    print(f"  {'mean':>4}  {np.mean([np.mean(r['own_local_val']) for r in runs if r['seed'] in choose]):10.3f}  "  # noqa: E501
          + "  ".join(f"{np.mean(score[c]):10.3f}" for c in cands))
    # 'best' is itself a choice made on these validation scans (per hospital and checkpoint,
    # among the product's candidates), so its figure here is the largest by construction:
    # the pick is among the single personalisations, and 'best' is judged on Testing only.
    pick = max((c for c in cands if c != "best"), key=lambda c: np.mean(score[c]))
    worst = {c: min(min(np.subtract(r["candidates"]["secure"][c]["val"], r["own_local_val"]))
                    for r in runs if r["seed"] in choose) for c in cands}
    print("  worst hospital's validation gain over local only: "
          + ", ".join(f"{c} {worst[c]:+.3f}" for c in cands))
    print(f"pick (best mean validation of a single personalisation): {pick}")

    if "best" in cands:
        print("  ('best' is chosen per hospital and checkpoint on these same validation scans, "
              "so its figure here is optimistic and not compared; --testing best shows it on "
              "Testing)")
    for name in [pick] + [c for c in a.testing.split(",") if c and c != pick]:
        testing(runs, name)
    return 0


def testing(runs: list[dict], pick: str) -> None:
    """The issue's targets on Testing for candidate ``pick``, every run."""
    print(f"\nTesting, personalisation '{pick}' (balanced accuracy, mean of the last 3 "
          "checkpoints):")
    print(f"  {'seed':>4}  {'own local -> own federated (per hospital)':<48} {'gain':>5}  "
          f"{'secure':>6} {'fedavg':>6} {'central':>7} {'max local':>9}")
    gains = []
    for r in runs:
        s = r["candidates"]["secure"][pick]
        f = r["candidates"].get("fedavg", {}).get(pick)
        own_fed, own_local = s["own"], r["own_local_acc"]
        g = np.subtract(own_fed, own_local)
        gains += list(g)
        secure = float(np.mean(s["pooled"]))
        fedavg = float(np.mean(f["pooled"])) if f else float("nan")
        cells = " ".join(f"{lo:.3f}->{fe:.3f}" for lo, fe in zip(own_local, own_fed,
                                                                 strict=True))
        central = r["central_acc"]
        checks = [all(g > 0), secure >= central - 0.03, abs(secure - fedavg) <= 0.01,
                  secure > max(r["local_acc"])]
        print(f"  {r['seed']:>4}  {cells:<48} {100 * g.mean():+5.1f}  {secure:6.3f} "
              f"{fedavg:6.3f} {central:7.3f} {max(r['local_acc']):9.3f}   "
              + " ".join("ok" if c else "MISSED" for c in checks))
    print(f"  mean gain over hospitals and seeds: {100 * np.mean(gains):+.1f} points "
          f"({'ok' if np.mean(gains) >= 0.03 else 'MISSED'}: >= 3); checks per seed: every "
          "hospital better, within 3 points of central, within 1 point of FedAvg, above "
          "every local model")


if __name__ == "__main__":
    sys.exit(main())
