"""A federation nobody attends, timed: does it publish round after round on its own?

    python bench/unattended_bench.py [--hospitals 3 --rounds 3 --image-size 64 ...]

Builds the demo's federation (certificates, synthetic scans) in a temporary folder, starts
the server with ``[schedule] mode = "auto"`` (a round opens as soon as the previous one
published) and one agent per hospital with ``participation = "auto"``, each its own process,
and from then on only watches: the server's store, its audit log and the agents' records
and logs.  It sends no command to the server or to an agent.  When the last round's version
is published it stops them (SIGTERM, as a service manager would) and prints one JSON line:

* ``rounds_published``: versions published after version 0;
* ``wall_s``: seconds from starting the server until the last version was published;
* ``final_global_acc``: balanced accuracy of that version as published (no hospital's
  personalisation) on every hospital's Testing scans, computed here from the stored version;
* ``person_actions``: what a person did meanwhile, counted from the evidence: administrator
  connections and commands in the server's audit log, and approvals, skips and stop
  requests the agents received over their local sockets.  It must be 0.

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefl import config
from securefl.demo.federated import DemoSettings, build_federation
from securefl.demo.unattended import (
    Processes,
    agent_table,
    schedule_table,
    score_version,
    wait_for,
    watch_store,
)

#: Lines an agent writes when a person reaches it over its local socket.
SOCKET_ACTIONS = ("over the local socket",)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def person_actions(audit_log: Path, agent_logs: list[Path]) -> int:
    """Administrator connections and commands, and local-socket decisions, that happened."""
    count = 0
    if audit_log.exists():
        for line in audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "admin" or event.get("role") == "admin":
                count += 1
    for log in agent_logs:
        if log.exists():
            count += sum(1 for line in log.read_text().splitlines()
                         if "agent: " in line and any(a in line for a in SOCKET_ACTIONS))
    return count


def main() -> None:
    defaults = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--train-images", type=int, default=defaults.train_images)
    p.add_argument("--test-images", type=int, default=defaults.test_images)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--keep", type=Path, help="build the federation in this (new) folder")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for each version before giving up (default 1800)")
    a = p.parse_args()
    root = (a.keep or Path(tempfile.mkdtemp(prefix="securefl-unattended-"))).resolve()
    settings = DemoSettings(hospitals=a.hospitals, rounds=a.rounds, epochs=a.epochs,
                            image_size=a.image_size, train_images=a.train_images,
                            test_images=a.test_images, seed=a.seed, keep=root)
    say(f"unattended bench: building a federation of {a.hospitals} hospitals in {root}")
    server_toml, kits, _ = build_federation(settings, root, say,
                                            schedule=schedule_table("30m"),
                                            agent=agent_table())
    server = config.load(server_toml, config.ServerSettings)
    ml = [config.load(k, config.ClientSettings).ml for k in kits]
    names = [m.scans_dir.name for m in ml]  # type: ignore[union-attr]
    logs = [root / "hospitals" / n / "agent.log" for n in names]
    procs = Processes()
    try:
        started = time.perf_counter()
        procs.server(server_toml, root / "server.log")
        say(f"  server up after {time.perf_counter() - started:.1f} s (schedule: auto, "
            "after-publish); starting the agents (participation: auto); watching only")
        for name, kit, log in zip(names, kits, logs, strict=True):
            procs.agent(name, kit, log)
        store = watch_store(server.store_dir)
        for version in range(1, a.rounds + 1):
            wait_for(f"version {version}", lambda v=version: v in store.versions(), procs,
                     a.timeout)
            info = store.info(version)
            say(f"  version {version} published at {time.perf_counter() - started:.1f} s "
                f"({info.contributors} hospitals, {info.total_samples} scans)")
        wall = time.perf_counter() - started
    finally:
        procs.stop_all(timeout=30)
    from securefl.ml.data import ImageSet
    from securefl.ml.local import load_data

    published = [v for v in store.versions() if v > 0]
    say("  scoring the last version on every hospital's Testing scans")
    tests = ImageSet.concat([load_data(m, "Testing") for m in ml])  # type: ignore[arg-type]
    final = score_version(store.read(published[-1])[1], ml[0], tests)
    print(json.dumps({
        "rounds_published": len(published),
        "wall_s": round(wall, 1),
        "final_global_acc": round(final, 4),
        "person_actions": person_actions(server.audit_log, logs),
    }))


if __name__ == "__main__":
    main()
