"""Training in a child process, supervised by the train screen's thread worker.

Why a process and not only a thread: TensorFlow holds the GIL for long stretches (import,
graph tracing, model saving).  Measured on the 2-core machine under load, a training thread
in the UI process stalled the event loop 300-900 ms at times; the UI must never freeze.  A
child process has its own interpreter and GIL, so the UI's event loop only waits for the OS
scheduler.  The child runs exactly ``Hospital.train`` (same files, same bookkeeping).

Why ``subprocess`` with JSON lines and not ``multiprocessing``: inside a Textual app the
standard streams are replaced, and ``multiprocessing``'s spawn start method then fails
("bad value(s) in fds_to_keep").  The protocol is tiny: the child prints one JSON object per
line on its stdout (``progress``, then ``done`` or ``error``); the parent writes ``cancel``
on the child's stdin, which the training callback checks after every batch.

This module imports no Textual.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from securefl.errors import SecureFLError
from securefl.ml.train import Progress, TrainResult

#: How long a child asked to stop may take to finish its batch before it is killed (s).
STOP_GRACE = 30.0
#: The trainer yields the CPU to the interactive UI (2 cores: they compete otherwise).
#: Measured: at nice 5 the UI still missed frames by 100-190 ms at times; at 15, 13-26 ms.
CHILD_NICE = 15


class TrainingFailed(SecureFLError):
    """Training in the child process failed; the message is the child's own."""

    code = "training-failed"


def _child(config: str, overrides: dict[str, Any]) -> int:
    """The child: train, reporting on a private copy of stdout (anything else goes to
    stderr, so a stray print cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)
    cancel = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancel.set()
        cancel.set()  # the parent went away: stop too

    threading.Thread(target=watch_stdin, daemon=True).start()

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")

    from securefl.client.hospital import Hospital

    try:
        hospital = Hospital.from_file(config)
        hospital.ml = hospital.ml.model_copy(update=overrides)
        result = hospital.train(
            progress=lambda p: say({"progress": asdict(p)}), cancel=cancel)
    except SecureFLError as exc:
        say({"error": exc.message})
        return 1
    except Exception as exc:  # reported to the UI, never a silent death
        say({"error": f"training failed unexpectedly ({type(exc).__name__}: {exc})"})
        return 1
    say({"done": asdict(result)})
    return 0


def train_in_child(config: Path, overrides: dict[str, Any], progress: Callable[[Progress], object],
                   cancel: threading.Event) -> TrainResult:
    """Blocking: run ``Hospital.train`` in a child process; ``progress`` hears every batch.

    ``cancel`` (set by the UI) is forwarded to the child, which stops after its batch.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "securefl.tui.hospital.trainer", str(config),
         json.dumps(overrides)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        bufsize=1)
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    def forward_cancel() -> None:
        cancel.wait()
        if proc.poll() is None:
            try:
                stdin.write("cancel\n")
                stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    threading.Thread(target=forward_cancel, daemon=True).start()
    try:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "progress" in msg:
                progress(Progress(**msg["progress"]))
            elif "done" in msg:
                return TrainResult(**msg["done"])
            elif "error" in msg:
                raise TrainingFailed(str(msg["error"]))
        raise TrainingFailed(f"the training process stopped unexpectedly (exit code "
                             f"{proc.wait()}): check the scans and the [ml] settings")
    finally:
        cancel.set()  # releases the forwarding thread; the child stops if still running
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with_closed = [s for s in (proc.stdin, proc.stdout) if s is not None]
        for stream in with_closed:
            with contextlib.suppress(OSError):
                stream.close()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], json.loads(sys.argv[2])))
