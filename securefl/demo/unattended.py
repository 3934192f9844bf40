"""A federation nobody attends: the server opens rounds on its schedule, each hospital's agent
takes part by itself, and whoever started them only reads files.

Why this lives in the product: ``securefl demo`` runs its hospitals this way, so the first
command people try goes down the path a real federation uses (``[schedule] mode = "auto"``
on the server, ``securefl client ... agent`` with ``participation = "auto"`` at each
hospital), and ``bench/unattended_bench.py`` measures that path.  Both only *watch*: the
server's store (the published versions), its log, and each agent's record (``agent.json``:
the rounds it took part in and the validation balanced accuracy of each published version
there).  Nothing here talks to the server or to an agent, so a run that needs a person
shows up as a run that stalls, with the logs named in the error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from securefl.client.agent.rules import AgentRecord, RoundEntry
from securefl.errors import SecureFLError
from securefl.server.store import ModelStore

if TYPE_CHECKING:  # pragma: no cover
    from securefl.ml.data import ImageSet
    from securefl.ml.settings import MLSettings

T = TypeVar("T")

#: How often the watcher looks at the files (seconds).
POLL = 0.25


class UnattendedError(SecureFLError):
    """The unattended federation stopped making progress (a process died, or nothing was
    published for too long); the message names the log to read."""

    code = "unattended"


def schedule_table(training_deadline: str = "10m", until_version: int | None = None
                   ) -> dict[str, object]:
    """server.toml's ``[schedule]``: a round opens as soon as the previous one published
    (and none after ``until_version`` is published, when given)."""
    table: dict[str, object] = {"mode": "auto", "every": "after-publish",
                                "training_deadline": training_deadline}
    if until_version is not None:
        table["until_version"] = until_version
    return table


def agent_table(max_rounds_per_day: int | None = None) -> dict[str, object]:
    """hospital.toml's ``[agent]``: take part without asking, at most so many rounds a day
    (the demo's way of stopping after its last round without a word to the agents)."""
    table: dict[str, object] = {"participation": "auto"}
    if max_rounds_per_day is not None:
        table["max_rounds_per_day"] = max(1, min(1000, max_rounds_per_day))
    return table


class Processes:
    """The server's and the agents' processes, each writing to its own log file."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._files: dict[str, IO[bytes]] = {}

    def start(self, name: str, args: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._close_log(name)
        out = log.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "securefl", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        self.procs[name], self.logs[name], self._files[name] = proc, log, out
        return proc

    def server(self, server_toml: Path, log: Path, timeout: float = 120.0) -> subprocess.Popen:
        """``securefl server``, started and listening (read from its log, not asked)."""
        offset = log.stat().st_size if log.exists() else 0
        proc = self.start("server", ["server", "--config", str(server_toml)], log)

        def listening() -> bool:
            with log.open("rb") as fh:
                fh.seek(offset)
                return b"listening on" in fh.read()

        wait_for("the server to start", listening, self, timeout)
        return proc

    def agent(self, name: str, kit: Path, log: Path) -> subprocess.Popen:
        return self.start(name, ["client", "--config", str(kit), "agent"], log)

    def check(self) -> None:
        """Raise when a process that should be running has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise UnattendedError(f"{name} stopped unexpectedly (exit status "
                                      f"{proc.returncode}): see {self.logs[name]}")

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service manager's way), then SIGKILL after ``timeout`` seconds."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log(name)
        return proc.returncode

    def stop_all(self, timeout: float = 30.0) -> None:
        """Agents first (they may be in a round), the server last."""
        for name in sorted(self.procs, key=lambda n: n == "server"):
            self.stop(name, timeout)

    def _close_log(self, name: str) -> None:
        out = self._files.pop(name, None)
        if out is not None:
            out.close()


def wait_for(what: str, check: Callable[[], T | bool | None], procs: Processes,
             timeout: float) -> T:
    """Poll ``check`` until it returns something true; a dead process or the timeout is an
    ``UnattendedError`` naming the logs."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found  # type: ignore[return-value]
        procs.check()
        if time.monotonic() > deadline:
            logs = ", ".join(str(p) for p in procs.logs.values())
            raise UnattendedError(f"nothing happened for {timeout:.0f} s while waiting for "
                                  f"{what}: the logs say why ({logs})")
        time.sleep(POLL)


def watch_store(store_dir: Path) -> ModelStore:
    """The server's store, read beside the running server (never tidied from here)."""
    return ModelStore(store_dir, tidy=False)


def agent_entry(state_dir: Path, version: int) -> RoundEntry | None:
    """The agent's record of the round that published ``version`` with its update, if any."""
    try:
        record = AgentRecord.load(state_dir)
    except SecureFLError:
        return None  # being replaced (atomic, so only ever for an instant) or not there yet
    for entry in reversed(record.rounds):
        if entry.outcome == "published" and entry.version == version:
            return entry
    return None


#: One model per architecture for :func:`score_version`: building one (and tracing its
#: prediction) each round cost the watcher seconds a round.
_SCORERS: dict[tuple[Any, ...], Any] = {}


def score_version(weights: np.ndarray, ml: MLSettings, scans: ImageSet) -> float:
    """Balanced accuracy of a published version as downloaded (no hospital's personalisation)
    on ``scans``; ``ml`` is any hospital's ``MLSettings`` (they all build the same model)."""
    from securefl.ml.local import new_model
    from securefl.ml.model import from_vector
    from securefl.ml.train import evaluate

    key = (ml.input_shape, len(ml.classes), ml.model_kind)
    model = _SCORERS.get(key)
    if model is None:
        model = _SCORERS[key] = new_model(ml)
    from_vector(model, np.asarray(weights, np.float32))
    return float(evaluate(model, scans).balanced_accuracy)
