"""``securefl demo --tui`` in a real terminal: the administrator's app opens on the demo's
federation, sees the version the rounds publish, still works after the last round (the
server stays up until the app is closed), and the demo's table is printed on the way out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.tui.test_tmux import TMUX, Tmux


def test_demo_with_the_admin_app(tmp_path: Path) -> None:
    tmux = Tmux(tmp_path / "tmux.sock")
    root = Path(__file__).resolve().parents[2]
    fed = tmp_path / "fed"
    demo = (f"env TERM=xterm-256color {sys.executable} -m securefl demo --tui --hospitals 2 "
            f"--rounds 1 --image-size 32 --train-images 70 --test-images 16 --keep {fed}; "
            "echo DEMO-EXIT=$?; sleep 120")
    tmux("-f", os.devnull, "new-session", "-d", "-s", "demo", "-x", "120", "-y", "40",
         "-c", str(root), demo)
    try:
        tmux.wait("demo", "Connected to", 120)
        log = tmp_path / "fed-demo.log"
        tmux.wait("demo", "Global version: 1", 180)  # the round published, live on screen
        deadline = time.monotonic() + 120  # the demo evaluates, then holds the server
        while "stays up" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the demo never finished its rounds"
            time.sleep(0.5)
        tmux.keys("demo", "v")  # the version history still loads: the server is up
        tmux.wait("demo", "Fingerprint", 30)
        # Each key once the one before showed on screen: on a loaded machine Escape, q and
        # y sent on a timer were read together and the app stayed on the version history.
        tmux.keys("demo", "Escape")
        tmux.wait_gone("demo", "Fingerprint")
        tmux.keys("demo", "q")  # log out, which asks first
        tmux.wait("demo", "Yes (y)", 30)
        tmux.keys("demo", "y")
        screen = tmux.wait("demo", "DEMO-EXIT=0", 60)
        assert "summary:" in screen and str(fed) in screen
        # what the demo printed fits an 80-column terminal, as without --tui
        assert [line for line in log.read_text().splitlines() if len(line) > 80] == []
    finally:
        subprocess.run([TMUX or "tmux", "-S", str(tmp_path / "tmux.sock"), "kill-server"],
                       capture_output=True, check=False)
