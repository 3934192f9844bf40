"""The CLI's one progress line fits the terminal it is drawn on.

A line wider than the terminal wraps, and the carriage return then rewrites only its last
row: walking ``get`` in an 80-column terminal left two new rows per batch.  Drawn on a real
pseudo-terminal of 80 and of 60 columns here; a log file (not a terminal) keeps every word.
"""

from __future__ import annotations

import fcntl
import io
import os
import struct
import sys
import termios

import pytest

from securefl.client.commands import training_printer
from securefl.ml.train import Progress


def _drawn(columns: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(slave, "w", closefd=True) as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        show = training_printer("fine-tuning on this hospital's scans: ")
        for batch in (1, 2, 3):
            show(Progress(1, 1, batch, 7, 1.3052, 0.4375))
        show(Progress(1, 1, 4, 4, 1.0, 0.5, stage="calibrating"))
        tty.flush()
    # One read returns what the terminal has passed on so far, which on a loaded machine
    # can be the first redraw only: read until the closed end says there is no more.
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    out = b"".join(chunks).decode()
    return [line.rstrip() for line in out.split("\r") if line]


@pytest.mark.parametrize("columns", [80, 60])
def test_each_redraw_fits_the_terminal_and_keeps_the_batch(
        columns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _drawn(columns, monkeypatch)
    assert len(lines) == 4
    assert all(len(line) < columns for line in lines), lines
    assert "\n" not in "".join(lines)
    assert lines[1].startswith("fine-tuning on this hospital's scans: epoch 1/1  batch 2/7")
    if columns == 80:  # room for the loss, not for the accuracy
        assert lines[1].endswith("loss 1.3052"), lines[1]
    assert lines[3].startswith("recalibrating batch-norm statistics: layer 4/4"[:columns - 1])


def test_a_log_file_gets_a_whole_line_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A script's ``2> train.log`` holds one readable line per finished epoch: no carriage
    returns, no per-batch redraws (before, every batch was appended after a ``\\r``)."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    show = training_printer("training: ")
    for epoch in (1, 2):
        for batch in range(1, 8):
            show(Progress(epoch, 15, batch, 7, 0.5, 0.75))
    for layer in (1, 2, 3):
        show(Progress(2, 15, layer, 3, 0.5, 0.75, stage="calibrating"))
    show.done()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [
        "training: epoch 1/15  batch 7/7  loss 0.5000  accuracy 0.750",
        "training: epoch 2/15  batch 7/7  loss 0.5000  accuracy 0.750",
        "recalibrating batch-norm statistics: layer 3/3",
    ]
