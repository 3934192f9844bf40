"""The real thing in a real terminal: tmux runs the server, the admin app and two hospital
apps as separate processes (the CLI entry points), and the test types into them.

Why tmux: pilot tests run the apps headless inside pytest; this one proves the commands
people type start apps that work in a terminal, end to end: get -> train -> send ->
aggregate -> get, with the new version number read off the captured panes.  Every wait is
bounded and the tmux server is killed in ``finally``.

The terminal is plain tmux as people have it: ``TERM=screen-256color`` and no
``COLORTERM``, so the apps draw in 256 colours.  The panes are read with ``capture-pane
-e`` (colours included): Textual's SVG snapshots are always truecolor and cannot show
whether a progress bar survives the reduction to 256 colours (issue 16, item 2).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl import config
from tests.outcome import assert_published, fedavgm_step, tolerance, weighted_mean
from tests.tui.conftest import Fed

TMUX = shutil.which("tmux")  # a required test tool: missing, these tests fail (never skip)


class Tmux:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> str:
        out = subprocess.run([TMUX or "tmux", "-S", str(self.socket), *args],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout

    def window(self, name: str, command: list[str], cwd: Path) -> None:
        line = " ".join(command)
        self("new-window", "-d", "-n", name, "-c", str(cwd), line)

    def keys(self, target: str, *keys: str) -> None:
        for key in keys:
            self("send-keys", "-t", target, key)
            # One key at a time, as a person types.  After Escape a pause longer than the
            # terminal's escape delay: a key that follows it at once reads as Alt+key (a
            # loaded machine delivered Escape and 's' together and the app stayed put).
            time.sleep(0.6 if key == "Escape" else 0.15)

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target)

    def colours(self, target: str) -> str:
        """The pane with its colour escapes (``capture-pane -e``)."""
        return self("capture-pane", "-e", "-p", "-t", target)

    def wait(self, target: str, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(target)
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{target!r} never showed {text!r}; it shows:\n{screen}")
            time.sleep(0.3)

    def wait_gone(self, target: str, text: str, timeout: float = 60.0) -> str:
        """Until ``text`` has left the screen: the key before took effect (a key sent on a
        timer can reach an app still busy with the one before, and be read with it)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(target)
            if text not in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{target!r} still shows {text!r}:\n{screen}")
            time.sleep(0.3)


ESCAPE = re.compile(r"\x1b\[[0-9;:]*m")


def bar_line(coloured: str, label: str, below: bool = False) -> str:
    """The captured line of the bar after ``label`` (``below``: on the next line), colour
    escapes kept."""
    lines = coloured.splitlines()
    for i, line in enumerate(lines):
        if ESCAPE.sub("", line).lstrip().startswith(label):
            return lines[i + 1] if below else line
    raise AssertionError(f"no {label!r} line in:\n{ESCAPE.sub('', coloured)}")


def assert_bar_draws(coloured: str, label: str, below: bool = False) -> None:
    """The bar is drawn (blocks, in a 256-colour escape), not only a floating "100%"."""
    line = bar_line(coloured, label, below)
    plain = ESCAPE.sub("", line)
    assert plain.count("█") >= 20 and "100%" in plain, plain
    assert "38;5;" in line, f"the bar has no 256-colour escape: {line!r}"
    assert "38;2;" not in coloured, "truecolor escapes in a 256-colour terminal"


def test_train_send_aggregate_get_in_tmux(fed: Fed, tmp_path: Path) -> None:
    tmux = Tmux(tmp_path / "tmux.sock")
    python = [sys.executable, "-m", "securefl"]
    env_line = "env -u COLORTERM TERM=screen-256color PYTHONUNBUFFERED=1 "
    root = Path(__file__).resolve().parents[2]
    tmux("-f", os.devnull, "new-session", "-d", "-s", "fed", "-x", "100", "-y", "30",
         "-c", str(root), env_line + "sh")
    try:
        tmux.window("server", [env_line, *python, "server", "--config", str(fed.server_toml),
                               "2>&1"], root)
        # As an operator would: the apps start once the server listens (a loaded machine
        # can take seconds to start it, and an app that finds no server waits for "r").
        tmux.wait("fed:server", "securefl server listening on", 90)
        tmux.window("admin", [env_line, *python, "admin", "--config", str(fed.admin_toml)],
                    root)
        for i, toml in enumerate(fed.hospital_tomls, start=1):
            tmux.window(f"h{i}", [env_line, *python, "client", "--config", str(toml),
                                  "--hospital", f"hospital_{i}"], root)
        tmux.wait("fed:admin", "Connected to", 60)
        hospitals = ["fed:h1", "fed:h2"]
        for h in hospitals:
            tmux.wait(h, "Connected to", 60)
            tmux.wait(h, "Global version on server: 0", 30)
        for h in hospitals:  # get version 0 and evaluate it
            tmux.keys(h, "g", "Enter")
        for h in hospitals:
            got = tmux.wait(h, "accuracy", 120)
            assert "Sensitivity" in got and "Next: press Escape" in got, got
            assert_bar_draws(tmux.colours(h), "Download")
            assert_bar_draws(tmux.colours(h), "Steps")
            tmux.keys(h, "Escape", "t", "Enter")  # Enter in the epochs field starts
        for h in hospitals:
            trained = tmux.wait(h, "Trained on 59 scans", 120)
            assert "Next: press Escape" in trained, trained
            assert_bar_draws(tmux.colours(h), "Epoch 1 of 1", below=True)
            tmux.keys(h, "Escape", "s", "Enter")
        for h in hospitals:  # each waits for the administrator, and says so
            sent = tmux.wait(h, "Update sent. Waiting for the administrator", 60)
            assert "✔ Masked update sent" in sent, sent
        states = [config.load(t, config.ClientSettings).state_dir for t in fed.hospital_tomls]
        v0 = np.load(states[0] / "global.npy")
        tmux.wait("fed:admin", "updates received: 2 of 2", 60)
        tmux.keys("fed:admin", "F1")  # help, then back
        tmux.wait("fed:admin", "Keys on this screen", 10)
        tmux.keys("fed:admin", "Escape", "a")
        asked = tmux.wait("fed:admin", "Yes (y)", 10)
        assert "Combine the 2 update(s) received in round 1" in asked, asked
        tmux.keys("fed:admin", "y")
        tmux.wait("fed:admin", "Published version 1", 60)
        for h in hospitals:
            done = tmux.wait(h, "published global version 1", 60)
            assert "Next: press Escape" in done, done
            tmux.keys(h, "Escape", "g", "Enter")
        for h in hospitals:
            screen = tmux.wait(h, "Global version 1,", 120)
            tmux.keys(h, "Escape", "r")
            dashboard = tmux.wait(h, "Global version on server: 1", 30)
            assert "based on global version 1" in dashboard, screen
        assert "Global version: 1" in tmux.wait("fed:admin", "Global version: 1", 30)
        # The outcome: version 1 is the weighted mean of the two apps' trained updates, as
        # each hospital kept them when it sent (59 scans each).
        parts = [(np.load(s / "sent" / "v00000000.npy"), 59) for s in states]
        expected, _ = fedavgm_step(v0, weighted_mean(parts), None)
        for s in states:
            assert_published(np.load(s / "global.npy"), expected, tolerance(parts), v0)
        # Log out of everything cleanly: the hospitals come back to sign-in.
        for target in [*hospitals, "fed:admin"]:
            tmux.keys(target, "q")
            tmux.wait(target, "Yes (y)", 10)
            tmux.keys(target, "y")
        for h in hospitals:
            tmux.wait(h, "Sign in to your hospital", 10)
    finally:
        subprocess.run([TMUX or "tmux", "-S", str(tmp_path / "tmux.sock"), "kill-server"],
                       capture_output=True, timeout=20)
