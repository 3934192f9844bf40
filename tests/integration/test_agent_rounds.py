"""Hospital agents in a federation whose server opens rounds by itself.

A real ``securefl server`` process with ``[schedule] mode = "auto"`` (``every =
"after-publish"``) and three real ``securefl client ... agent`` processes on the demo's
synthetic scans (32 px, one epoch): nobody runs ``aggregate``, and with
``participation = "auto"`` nobody touches the agents either.  Every published version is
checked against what the agents' own saved updates imply (``tests/outcome.py``), not just
its number.  Real TLS, real training, nothing of ours mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.demo.federated import DemoSettings, build_federation
from securefl.server.store import ModelStore
from tests.outcome import (
    assert_published,
    fedavgm_step,
    keras_weight_names,
    statistics_masks,
    tolerance,
    weighted_mean,
)

TINY = DemoSettings(hospitals=3, rounds=1, epochs=1, image_size=32, train_images=70,
                    test_images=8, seed=0, min_validation_per_class=1)


class AgentFed:
    def __init__(self, root: Path, participation: dict[int, str]) -> None:
        self.root = root
        self.server_toml, self.kits, self.admin_toml = build_federation(TINY, root,
                                                                        lambda _: None)
        data = config.read_toml(self.server_toml)
        data["schedule"] = {"mode": "auto", "every": "after-publish",
                            "training_deadline": "150s"}
        data["round"].update(step_timeout=20.0)
        config.write_toml(self.server_toml, data)
        for i, kit in enumerate(self.kits):
            data = config.read_toml(kit)
            data["agent"] = {"participation": participation.get(i, "auto"), "keepalive": 5.0}
            data["ml"]["personalise"] = "none"  # the rounds are the point here
            config.write_toml(kit, data)
        self.settings = [config.load(k, config.ClientSettings) for k in self.kits]
        self.store = ModelStore(config.load(self.server_toml,
                                            config.ServerSettings).store_dir)
        self.procs: dict[str, subprocess.Popen] = {}

    def state(self, i: int) -> Path:
        return self.settings[i].state_dir

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        out = (self.root / f"{name}.log").open("a")
        proc = subprocess.Popen([sys.executable, "-m", "securefl", *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def agent(self, i: int) -> subprocess.Popen:
        return self.start(f"agent{i}", "client", "--config", self.kits[i], "agent")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stopped(self, name: str, timeout: float) -> int:
        """The exit status of a process asked to stop; a failure that shows its log when
        it overstays (a bare TimeoutExpired said nothing of where it was)."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not stop within {timeout:.0f} s of SIGTERM; its log "
                        f"ends:\n{self.log(name)[-3000:]}")

    def cli(self, i: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "securefl", "client", "--config",
                               str(self.kits[i]), *args], capture_output=True, text=True,
                              timeout=60)

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:9]) for p in self.store.root.glob("v*.sflm"))

    def record(self, i: int) -> dict[int, dict]:
        path = self.state(i) / "agent.json"
        if not path.exists():
            return {}
        return {r["schedule_round"]: r for r in json.loads(path.read_text())["rounds"]}


def wait_for(what: str, check: object, fed: AgentFed, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        for name, proc in fed.procs.items():
            if proc.poll() is not None and name == "server":
                raise AssertionError(f"the server exited:\n{fed.log('server')}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{fed.log(n)[-3000:]}" for n in fed.procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.3)


@contextmanager
def federation(tmp_path: Path, participation: dict[int, str] | None = None
               ) -> Iterator[AgentFed]:
    fed = AgentFed(tmp_path, participation or {})
    try:
        fed.start("server", "server", "--config", fed.server_toml)
        wait_for("the server", lambda: "listening on" in fed.log("server"), fed, 120)
        yield fed
    finally:
        for proc in fed.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def contributions(fed: AgentFed, base: int, who: list[int]) -> list[tuple[np.ndarray, int]]:
    """What each agent handed to the round on ``base``, from its own files."""
    out = []
    for i in who:
        sent = np.load(fed.state(i) / "sent" / f"v{base:08d}.npy")
        record = json.loads((fed.state(i) / "send.json").read_text())
        assert record["base_version"] == base
        out.append((sent, int(record["samples"])))
    return out


def check_version(fed: AgentFed, version: int, parts: list[tuple[np.ndarray, int]],
                  momentum: np.ndarray | None) -> np.ndarray:
    """The published ``version`` is the FedAvgM step of the agents' updates (batch-norm
    statistics as the documented first step treats them); returns the momentum after."""
    previous = fed.store.read(version - 1)[1]
    published = fed.store.read(version)[1]
    stats, variances = statistics_masks(keras_weight_names(
        str(config.load(fed.kits[0], config.ClientSettings).ml.model_path)))  # type: ignore[union-attr]
    expected, m = fedavgm_step(previous, weighted_mean(parts), momentum,
                               statistics=stats, variances=variances)
    assert_published(published, expected, tolerance(parts), previous)
    return m


def test_auto_agents_publish_with_no_person_and_a_killed_one_rejoins_without_resending(
        tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        for i in range(3):
            fed.agent(i)
        wait_for("version 1", lambda: 1 in fed.versions(), fed)
        # Round 2 (after-publish: opened by the server at once): hospital_3's agent is
        # killed once its masked update on version 1 has left, then started again.
        sent = fed.state(2) / "send.json"

        def left_on_1() -> bool:
            try:
                rec = json.loads(sent.read_text())
            except (FileNotFoundError, ValueError):
                return False
            return rec["base_version"] == 1 and bool(rec["masked_rounds"])

        wait_for("hospital_3's masked update on version 1", left_on_1, fed)
        fed.procs["agent2"].send_signal(signal.SIGKILL)
        fed.procs["agent2"].wait()
        kept = np.load(fed.state(2) / "sent" / "v00000001.npy")
        trained_before = fed.cli(2, "log", "--limit", "200").stdout.count(
            "trained from global version 1")
        fed.agent(2)
        # (Checked while it restarts: round 2 did not wait for these.)
        # 70 scans, 11 held out for validation: 59 trained on at each hospital.
        parts1 = [(np.load(fed.state(i) / "sent" / "v00000000.npy"), 59) for i in range(3)]
        assert all(np.abs(u).max() > 1e-4 for u, _ in parts1)
        momentum = check_version(fed, 1, parts1, None)
        wait_for("every agent's record of round 1", lambda: all(
            fed.record(i).get(1, {}).get("outcome") == "published" for i in range(3)), fed)
        for i in range(3):
            r1 = fed.record(i)[1]
            assert r1["version"] == 1 and 0 <= r1["balanced_accuracy"] <= 1, r1
            assert "published version 1; global version 1: balanced accuracy" in r1["detail"]
            said = fed.log(f"agent{i}")
            assert "agent: server opened round 1 on version 0" in said
            assert "agent: training: round 1: training on version 0" in said
            assert "agent: done: round 1: published version 1" in said
            # The welcome named round 1 and the server pushed its opening too: one story.
            assert said.count("agent: server opened round 1 ") == 1, said
            assert "round 1 already handled" not in said, said
        log = fed.cli(0, "log", "--limit", "50").stdout
        assert "scheduled round 1: published version 1; global version 1: balanced accuracy" in log
        # Round 2 trains on the version 1 the agent got when it was published: not
        # downloaded (and fine-tuned) a second time.
        wait_for("hospital_1 training in round 2", lambda: "agent: training: round 2: "
                 "training on version 1" in fed.log("agent0"), fed)
        assert "agent: training: round 2: global version 1 is already here" in fed.log("agent0")
        log = fed.cli(0, "log", "--limit", "50").stdout
        assert log.count("downloaded global version 1 ") == 1, log

        wait_for("version 3", lambda: 3 in fed.versions(), fed, 360)
        # Whatever round 2 became, hospital_3 never trained or sent a new update on
        # version 1: the update on file is the one that left before the kill.
        np.testing.assert_array_equal(np.load(fed.state(2) / "sent" / "v00000001.npy"), kept)
        story = fed.cli(2, "log", "--limit", "200").stdout
        assert story.count("trained from global version 1") == trained_before == 1, story
        said = fed.log("agent2")
        assert said.count("agent: started for hospital_3") == 2
        # Version 2 holds exactly the three updates that left on version 1 (round 2's, or
        # the same ones again in the round the server opened after round 2 failed).
        parts2 = [(np.load(fed.state(i) / "sent" / "v00000001.npy"), n)
                  for i, (_, n) in enumerate(parts1)]
        check_version(fed, 2, parts2, momentum)
        # ... and it took part again: in the version on 2 (or later), its update is in.
        wait_for("hospital_3 published after its restart", lambda: any(
            r.get("outcome") == "published" and r["base_version"] >= 2
            for r in fed.record(2).values()), fed, 240)
        for i in range(3):
            os.kill(fed.procs[f"agent{i}"].pid, signal.SIGTERM)
        for i in range(3):
            assert fed.stopped(f"agent{i}", 60) == 0, fed.log(f"agent{i}")
            assert not (fed.state(i) / "agent.sock").exists()


def test_an_approve_mode_agent_waits_then_joins_after_approve(tmp_path: Path) -> None:
    with federation(tmp_path, {0: "approve"}) as fed:
        for i in range(3):
            fed.agent(i)

        def pending() -> dict | None:
            out = fed.cli(0, "agent-status", "--json")
            return json.loads(out.stdout).get("pending") if out.returncode == 0 else None

        wait_for("hospital_1 waiting for approval", lambda: pending() is not None, fed)
        waiting = pending()
        assert waiting is not None and waiting["schedule_round"] == 1
        assert waiting["base_version"] == 0
        scans = waiting["scans"]
        assert sum(scans["train"].values()) + sum(scans["validation"].values()) == 70
        assert set(scans["train"]) == {"glioma", "meningioma", "notumor", "pituitary"}
        human = fed.cli(0, "agent-status").stdout
        assert "waiting for approval: round 1 on version 0" in human
        # The others trained and joined; nothing is published while hospital_1 waits.
        wait_for("hospital_2 in the round", lambda: "joining the masked round"
                 in fed.log("agent1"), fed)
        time.sleep(2)
        assert fed.versions() == [0]
        assert not (fed.state(0) / "local.json").exists() or not json.loads(
            (fed.state(0) / "local.json").read_text())["trained"]
        approved = fed.cli(0, "approve")
        assert approved.returncode == 0 and "round 1 approved" in approved.stdout, \
            approved.stderr
        wait_for("version 1", lambda: 1 in fed.versions(), fed)
        check_version(fed, 1, contributions(fed, 0, [0, 1, 2]), None)
        wait_for("hospital_1's record", lambda: fed.record(0).get(1, {}).get("outcome")
                 == "published", fed)
        assert "round 1: approved over the local socket" in fed.log("agent0")


if not hasattr(signal, "SIGKILL"):  # pragma: no cover
    pytest.skip("POSIX only", allow_module_level=True)
