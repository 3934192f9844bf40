"""``securefl admin`` refusing an action with nothing to act on: each refusal says what to
do next (the README's promise), against a server process as the CLI tests run it.

Walking it: ``admin aggregate`` with no round open answered "the server refused: no round
is in progress" and nothing more."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl import config
from securefl.cli import EXIT_CODES
from securefl.errors import NotEnoughSurvivorsError

from .conftest import Federation
from .test_cli import D, _cli, _point_at
from .test_restart import free_port, start_server


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def send(path: Path) -> subprocess.Popen:
    """``securefl client send`` of the update saved beside the hospital's settings, left
    running (it returns once its round ends)."""
    return subprocess.Popen(
        [sys.executable, "-m", "securefl", "client", "--config", str(path), "send",
         "--update", str(path.parent / "update.npy"), "--samples", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_manual_refusals_say_how_a_round_opens_and_what_close_needs(fed: Federation) -> None:
    port = free_port()
    cfg = _point_at(fed, port)
    proc = start_server(fed.server_toml(port, params=D))  # manual mode, [round] colluders 1

    def admin(action: str) -> subprocess.CompletedProcess:
        return _cli("admin", "--config", cfg["admin"], action)

    try:
        for action, what, then in [
                ("aggregate", "nothing to aggregate", "; aggregate once its updates are in"),
                ("close", "no enrolment to close",
                 "; close its enrolment once enough hospitals have joined"),
                ("abort", "nothing to abort", "")]:
            said = admin(action)
            assert said.returncode != 0
            assert (f"no round is in progress, so there is {what}: a round opens when a "
                    "hospital sends its update (`securefl client send`, or s in the "
                    f"hospital's app){then}") in said.stderr, said.stderr
        # One hospital joins a round that needs three: close says so and what to do, and
        # the round stays open (walking it, only "a round needs at least 3").
        for n in "abc":
            assert _cli("client", "--config", cfg[n], "get").returncode == 0
            np.save(cfg[n].parent / "update.npy", np.full(D, 0.1, np.float32))
        lone = send(cfg["a"])
        try:
            deadline = time.monotonic() + 60
            while '"joined": ["a"]' not in _cli("admin", "--config", cfg["admin"], "status",
                                                "--json").stdout:
                assert lone.poll() is None, lone.communicate()
                assert time.monotonic() < deadline, "a never joined"
                time.sleep(0.1)
            few = admin("close")
            assert few.returncode == EXIT_CODES[NotEnoughSurvivorsError]
            assert ("only 1 hospital(s) joined round 1; closing enrolment needs at least 3, "
                    "so it stays open: wait for more hospitals to join (enrolment also closes "
                    "by itself once they have), or lower [round] colluders in server.toml (a "
                    "round needs c + 2; each hospital's [policy] colluders must not be "
                    "higher) and restart the server") in few.stderr, few.stderr
            assert '"joined": ["a"]' in _cli("admin", "--config", cfg["admin"], "status",
                                             "--json").stdout
            assert admin("abort").returncode == 0
            lone.wait(timeout=60)
        finally:
            lone.kill()
            lone.communicate()
        # All three join: enrolment closes by itself, and close says what comes next.
        senders = [send(cfg[n]) for n in "abc"]
        try:
            deadline = time.monotonic() + 60
            while _cli("admin", "--config", cfg["admin"], "count").stdout.strip() != \
                    "3 masked updates collected in the current round":
                assert time.monotonic() < deadline, "the updates never came"
                time.sleep(0.2)
            late = admin("close")
            assert late.returncode != 0
            assert ("enrolment of round 2 is already closed (the round is collecting masked "
                    "updates): nothing to close; `securefl admin aggregate` combines the "
                    "updates once they are in (`securefl admin status` counts them)"
                    ) in late.stderr, late.stderr
            assert admin("aggregate").returncode == 0
            assert [p.wait(timeout=60) for p in senders] == [0, 0, 0]
        finally:
            for p in senders:
                p.kill()
                p.communicate()
    finally:
        _stop(proc)


def test_scheduled_refusals_name_the_schedule(fed: Federation) -> None:
    port = free_port()
    cfg = _point_at(fed, port)
    toml = fed.server_toml(port, params=D)
    data = config.read_toml(toml)
    data["schedule"] = {"mode": "auto", "every": "after-publish", "training_deadline": "1h",
                        "start": "paused"}
    config.write_toml(toml, data)
    proc = start_server(toml)

    def admin(action: str) -> subprocess.CompletedProcess:
        return _cli("admin", "--config", cfg["admin"], action)

    try:
        paused = admin("aggregate")
        assert paused.returncode != 0
        assert ("no round is in progress, so there is nothing to aggregate: the schedule is "
                "paused: `securefl admin resume` opens rounds again as scheduled, `securefl "
                "admin open` opens one now") in paused.stderr, paused.stderr
        assert admin("open").returncode == 0
        training = admin("close")
        assert training.returncode != 0
        assert ("scheduled round 1 is open but its hospitals are still training (they join "
                "until ") in training.stderr, training.stderr
        assert ("so there is no enrolment to close yet: the server closes enrolment and "
                "combines the updates itself (`securefl admin schedule` shows each "
                "hospital's part)") in training.stderr
        again = admin("open")  # already said what to do: abort it first
        assert again.returncode != 0 and "abort it first" in again.stderr
        assert admin("abort").returncode == 0
    finally:
        _stop(proc)
