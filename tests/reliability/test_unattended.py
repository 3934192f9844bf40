"""Five hospital agents and a server on an automatic schedule, three rounds, nobody acting.

What issue 17 promises: a federation runs without someone watching a terminal, and the
failures an unattended service meets are handled by the schedule.  A real ``securefl
server`` process (``[schedule] mode = "auto"``, ``every = "after-publish"``) and five real
``securefl client ... agent`` processes (``participation = "auto"``) on the demo's synthetic
scans (32 px, one epoch); this test never sends a command to either.  In the second round
one agent is killed (SIGKILL) once its masked update has left, and started again; after the
second version the server is stopped (SIGTERM) and started again on the same store.  Every
published version is then checked against what the agents' own saved updates imply: the
FedAvgM step (``tests/outcome.py``) from the previous version, with the server's momentum
carried across its restart.
"""

from __future__ import annotations

import json
import signal
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.demo.federated import DemoSettings, build_federation
from securefl.demo.unattended import (
    Processes,
    agent_entry,
    agent_table,
    schedule_table,
    wait_for,
    watch_store,
)
from securefl.server.store import ModelStore
from tests.outcome import (
    assert_published,
    fedavgm_step,
    keras_weight_names,
    statistics_masks,
    tolerance,
    weighted_mean,
)

HOSPITALS = 5
FIVE = DemoSettings(hospitals=HOSPITALS, rounds=3, epochs=1, image_size=32, train_images=70,
                    test_images=4, seed=0, min_validation_per_class=1)
#: The agent killed mid-round (hospital_4).
KILLED = 3
#: hospital_4's epochs (no early stopping): a few seconds of training at 32 px.
SLOW_EPOCHS = 30
#: Generous: two cores shared with other work; a healthy round takes well under a minute.
STEP = 150.0


def _names() -> list[str]:
    return [f"hospital_{i + 1}" for i in range(HOSPITALS)]


def _send_record(state: Path) -> dict:
    try:
        return json.loads((state / "send.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _check_version(store: ModelStore, version: int, states: list[Path], samples: list[int],
                   contributors: int, momentum: np.ndarray | None, bound: float,
                   masks: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float, list[int]]:
    """The published ``version`` is the FedAvgM step of exactly ``contributors`` of the
    agents' saved updates on ``version - 1``; returns the momentum after, the error bound
    carried by it, and which hospitals' updates it holds."""
    base = version - 1
    previous = store.read(base)[1]
    published = store.read(version)[1]
    parts = {i: (np.load(s / "sent" / f"v{base:08d}.npy"), samples[i])
             for i, s in enumerate(states) if (s / "sent" / f"v{base:08d}.npy").is_file()}
    stats, variances = masks
    best: tuple[float, list[int]] | None = None
    for who in combinations(sorted(parts), contributors):
        chosen = [parts[i] for i in who]
        expected, _ = fedavgm_step(previous, weighted_mean(chosen), momentum,
                                   statistics=stats, variances=variances)
        worst = float(np.abs(published.astype(np.float64) - expected).max())
        if best is None or worst < best[0]:
            best = (worst, list(who))
    assert best is not None, f"no agent kept an update on version {base}"
    who = best[1]
    chosen = [parts[i] for i in who]
    expected, after = fedavgm_step(previous, weighted_mean(chosen), momentum,
                                   statistics=stats, variances=variances)
    bound = tolerance(chosen) + 0.3 * bound  # the last round's error rides the momentum
    assert_published(published, expected, bound, previous)
    return after, bound, who


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_five_agents_three_rounds_unattended_through_a_kill_and_a_server_restart(
        tmp_path: Path) -> None:
    server_toml, kits, _ = build_federation(
        FIVE, tmp_path, lambda _: None, schedule=schedule_table("120s"),
        agent={**agent_table(), "keepalive": 5.0})
    data = config.read_toml(server_toml)
    data["round"].update(step_timeout=15.0)
    config.write_toml(server_toml, data)
    for i, kit in enumerate(kits):  # the rounds are the point, not the personalisation
        data = config.read_toml(kit)
        data["ml"]["personalise"] = "none"
        if i == KILLED:  # trains for seconds, not a fraction of one: the kill lands mid-round
            data["ml"].update(epochs=SLOW_EPOCHS, patience=SLOW_EPOCHS)
        config.write_toml(kit, data)
    names = _names()
    states = [config.load(k, config.ClientSettings).state_dir for k in kits]
    server_settings = config.load(server_toml, config.ServerSettings)
    store = watch_store(server_settings.store_dir)
    log = tmp_path / "server.log"
    procs = Processes()

    def agent(i: int) -> None:
        procs.agent(names[i], kits[i], tmp_path / f"{names[i]}.log")

    def text(name: str) -> str:
        path = procs.logs.get(name)
        return path.read_text() if path is not None and path.exists() else ""

    try:
        procs.server(server_toml, log)
        for i in range(HOSPITALS):
            agent(i)
        wait_for("version 1", lambda: 1 in store.versions(), procs, 2 * STEP)

        # The round on version 1: hospital_4's agent is killed while it trains (the others
        # have joined and wait for it), then started again.  It takes the round up again.
        wait_for("hospital_4 training on version 1", lambda: "training on version 1"
                 in text(names[KILLED]), procs, STEP)
        procs.procs[names[KILLED]].send_signal(signal.SIGKILL)
        procs.procs[names[KILLED]].wait()
        assert 2 not in store.versions()  # mid-round: the round cannot end without it
        assert not (states[KILLED] / "sent" / "v00000001.npy").exists()
        agent(KILLED)
        wait_for("version 2", lambda: 2 in store.versions(), procs, 2 * STEP)
        assert "taking it up again" in text(names[KILLED])

        # Between two rounds (every agent got version 2 and evaluated it; the next round
        # opened at once): the server is stopped and started again on the same store.
        wait_for("every agent's record of version 2",
                 lambda: all(agent_entry(s, 2) is not None for s in states), procs, STEP)
        assert procs.stop("server", timeout=30) == 0, log.read_text()[-3000:]
        assert 3 not in store.versions()
        procs.server(server_toml, log)
        wait_for("version 3", lambda: 3 in store.versions(), procs, 2 * STEP)
        # Every agent that took part saw its round published and evaluated it itself.
        wait_for("every agent's record of version 3",
                 lambda: all(agent_entry(s, 3) is not None for s in states), procs, STEP)
    finally:
        procs.stop_all(timeout=10)

    # Nobody acted: the audit log has no administrator's command in it.
    audit = [json.loads(x) for x in server_settings.audit_log.read_text().splitlines()]
    assert not [e for e in audit if e["event"] == "admin" or e.get("role") == "admin"]
    assert [e["event"] for e in audit].count("server-start") == 2
    assert "optimiser-restarted" not in [e["event"] for e in audit]
    assert text(names[KILLED]).count("agent: started for hospital_4") == 2

    samples = [int(_send_record(s)["samples"]) for s in states]
    masks = statistics_masks(keras_weight_names(str(
        config.load(kits[0], config.ClientSettings).ml.model_path)))  # type: ignore[union-attr]
    momentum, bound = None, 0.0
    for version in (1, 2, 3):
        info = store.read(version)[0]
        momentum, bound, who = _check_version(store, version, states, samples,
                                              info.contributors, momentum, bound, masks)
        assert info.total_samples == sum(samples[i] for i in who)
        # Every hospital is in every version: the killed one too, after its restart.
        assert who == list(range(HOSPITALS)), (version, who)
        for i in who:
            entry = agent_entry(states[i], version)
            assert entry is not None and entry.base_version == version - 1, (i, version)
            assert entry.balanced_accuracy is not None and 0 <= entry.balanced_accuracy <= 1
