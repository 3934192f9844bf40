"""The hospital's durable send record and class checks, without a network.

What a ``send`` may do next is decided from ``state/send.json`` alone; these tests write the
record exactly as the round writes it at each stage (``Hospital``'s journal) and ask.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.hospital import Hospital, LocalState
from securefl.client.outbox import SendRecord
from securefl.errors import ConfigError, DataError, UpdateAlreadySentError
from securefl.ml.settings import MLSettings


def _hospital(tmp_path: Path, classes: tuple[str, ...] = ("a", "b")) -> Hospital:
    settings = config.ClientSettings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                     ca=tmp_path / "ca.pem", state_dir=tmp_path / "state")
    ml = MLSettings(scans_dir=tmp_path / "scans", model_dir=tmp_path / "model", classes=classes)
    return Hospital(settings, ml)


def test_nothing_sent_yet_or_another_version_allows_sending(tmp_path: Path) -> None:
    h = _hospital(tmp_path)
    h.check_can_send(0)
    h.outbox.save(SendRecord(0, 5, "x", stage="published", round_id=1,
                                   published_version=1))
    h.check_can_send(1)  # trained on the new version: a new update


@pytest.mark.parametrize("stage", ["joining", "joined", "keys-shared"])
def test_before_the_masked_input_left_sending_again_is_allowed(tmp_path: Path,
                                                              stage: str) -> None:
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage=stage, round_id=7))
    h.check_can_send(3)


def test_a_crash_after_recording_errs_on_the_side_of_it_left(tmp_path: Path) -> None:
    """The record says 'masked-input' before the bytes go: a crash in between still counts
    as sent, so the same version never gets a second masked update from this hospital."""
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage="masked-input", round_id=7,
                                   masked_rounds=(7,)))
    with pytest.raises(UpdateAlreadySentError, match=r"already left in round 7.*if it fails"):
        h.check_can_send(3)
    # A fresh object (another process) reads the same decision from disk.
    with pytest.raises(UpdateAlreadySentError):
        _hospital(tmp_path).check_can_send(3)


def test_an_abandoned_round_may_be_retried_only_with_the_signed_survivors(
        tmp_path: Path) -> None:
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage="signed", round_id=7, masked_rounds=(7,),
                             abandoned_rounds=(7,), signed_survivors=("a", "b", "c")))
    assert h.check_can_send(3).survivors == frozenset({"a", "b", "c"})


def test_an_abandoned_round_with_no_signed_list_locks_the_base_version(
        tmp_path: Path) -> None:
    """The masked input left but no survivor list was signed: the update may be in a sum
    the server holds, so it goes into no other round on that base."""
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage="masked-input", round_id=7,
                             masked_rounds=(7,), abandoned_rounds=(7,),
                             unlisted_exposed=True))
    with pytest.raises(UpdateAlreadySentError, match="no other round on version 3"):
        h.check_can_send(3)
    assert h.check_can_send(4) is None  # the next version is free


def test_with_t_above_n_minus_1_an_unsigned_update_may_be_resent(tmp_path: Path) -> None:
    """Three hospitals, c = 1, t = 3: no list with this update in it can gather t
    signatures without this hospital's own, so having signed none it is in no sum."""
    h = _hospital(tmp_path)
    journal, bound = h.outbox.begin(3, 5, np.ones(4, np.float32), max_attempts=3)
    assert bound is None
    journal("masked-input", 7, others_can_sign=False)
    journal("abandoned", 7)
    assert h.check_can_send(3) is None
    journal2, _ = h.outbox.begin(3, 5, np.ones(4, np.float32), max_attempts=3)
    journal2("masked-input", 8, others_can_sign=True)
    journal2("abandoned", 8)
    with pytest.raises(UpdateAlreadySentError, match="no other round on version 3"):
        h.check_can_send(3)


def test_published_says_which_version_holds_the_update(tmp_path: Path) -> None:
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage="published", round_id=7,
                                   masked_rounds=(7,), published_version=4))
    with pytest.raises(UpdateAlreadySentError, match="already in global version 4"):
        h.check_can_send(3)


def test_a_damaged_record_is_read_as_it_may_have_left(tmp_path: Path) -> None:
    h = _hospital(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "send.json").write_text('{"base_version": 3, "samp')
    with pytest.raises(DataError, match=r"damaged.*wait for the next global version"):
        h.send_record()


def test_a_model_trained_with_another_class_order_is_refused(tmp_path: Path) -> None:
    h = _hospital(tmp_path, classes=("a", "b"))
    h._set_local_state(LocalState(0, True, 5, "sha", ("b", "a")))
    with pytest.raises(DataError, match=r"trained with the classes \[b, a\].*now \[a, b\]"):
        h.check_classes()


def test_ml_commands_without_an_ml_table_say_what_to_add(tmp_path: Path) -> None:
    settings = config.ClientSettings(cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                     ca=tmp_path / "ca.pem")
    h = Hospital(settings, None)
    with pytest.raises(ConfigError, match=r"no \[ml\] table"):
        h.evaluate()


def test_a_round_abandoned_by_a_server_restart_may_be_resent(tmp_path: Path) -> None:
    """The server's welcome names the round its restart abandoned: the record takes note,
    so `send` does not contradict the 'send your update again' the user was just told."""
    h = _hospital(tmp_path)
    h.outbox.save(SendRecord(3, 5, "x", stage="signed", round_id=7,
                             masked_rounds=(7,), signed_survivors=("a", "b", "c")))
    h.note_abandoned(6)  # another round: changes nothing
    with pytest.raises(UpdateAlreadySentError):
        h.check_can_send(3)
    h.note_abandoned(7)
    assert h.check_can_send(3).survivors == frozenset({"a", "b", "c"})


def test_a_resend_bound_to_a_signed_list_must_be_the_identical_update(tmp_path: Path) -> None:
    """The same hospitals with another update (retrained) or another count would give a
    sum that differs from the first by exactly this hospital's change (found by an
    adversary run: a corrected --samples recovered the update from the two sums)."""
    h = _hospital(tmp_path)
    first = np.linspace(-1, 1, 8).astype(np.float32)
    journal, bound = h.outbox.begin(3, 100, first, max_attempts=3)
    journal("masked-input", 7)
    journal("signed", 7, survivors=("a", "b", "c"))
    journal("abandoned", 7)
    with pytest.raises(UpdateAlreadySentError, match=r"only that same update.*send --update"):
        h.outbox.begin(3, 200, first, max_attempts=3)  # another count
    with pytest.raises(UpdateAlreadySentError, match="only that same update"):
        h.outbox.begin(3, 100, first * 1.01, max_attempts=3)  # retrained
    _, bound = h.outbox.begin(3, 100, first.copy(), max_attempts=3)
    assert bound is not None and bound.survivors == {"a", "b", "c"}


HUNG_SEND = """
import argparse, asyncio, os, sys
from pathlib import Path
from securefl.client import commands

commands.STOP_GRACE = 2.0

async def hung(args):
    # A send whose clean-up never ends: the cancellation is lost and it waits on.
    if os.environ.get("HIDE_STDERR"):  # as while TensorFlow is imported (securefl.ml._tf)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    print("ready", flush=True)  # (the SIGTERM handler is in place by now)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancel lost", flush=True)

args = argparse.Namespace(client_action="send", config=Path(sys.argv[1]))
sys.exit(commands.run(hung, args))
"""


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_send_whose_clean_up_hangs_still_ends_with_its_code_and_the_note(
        tmp_path: Path, stop: signal.Signals, code: int) -> None:
    """SIGTERM or Ctrl-C cancels the send; should the cancellation be lost (Python 3.11's
    wait_for can drop one) or the clean-up hang, the command still ends after STOP_GRACE
    seconds, with 143 or 130 and the one-sentence note: a service stop must stop it, and a
    person's Ctrl-C too (CI runs saw a terminated and an interrupted send that never
    exited)."""
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SEND, str(tmp_path / "none.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(stop)
        assert proc.stdout.readline().strip() == "cancel lost"
        assert proc.wait(timeout=60) == code
        err = proc.stderr.read() if proc.stderr else ""
        assert "send interrupted" in err and "run send again" in err, err
        assert "did not finish within 2 s" in err, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_note_reaches_the_terminal_while_stderr_is_redirected(tmp_path: Path) -> None:
    """While TensorFlow is imported, fd 2 points at a temporary file: the watchdog's note
    still reaches the person's terminal."""
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SEND, str(tmp_path / "none.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HIDE_STDERR": "1"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.terminate()
        assert proc.wait(timeout=60) == 143
        err = proc.stderr.read() if proc.stderr else ""
        assert "run send again" in err and "did not finish within 2 s" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_send_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """A shell script's background ``send &`` ignores Ctrl-C (the shell set SIGINT to
    ignore); a Ctrl-C meant for the script must not stop it, a stop signal still does."""
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SEND, str(tmp_path / "none.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)  # taken, it would end the send with 130
        proc.terminate()
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_twice_stops_a_hung_send_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SEND.replace("2.0", "600.0"),
                             str(tmp_path / "none.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "cancel lost"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # not after the 600 s grace
        err = proc.stderr.read() if proc.stderr else ""
        assert "run send again" in err and "stopped at once on a second Ctrl-C" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_clip_notice_says_whether_anyone_needs_to_act() -> None:
    """A few clipped values are normal (batch-norm statistics); a large share loses part of
    the hospital's training and names who can change the clip."""
    from securefl.client.session import clip_notice

    few = clip_notice(30, 98388, 2.38, 1.0)
    assert few.startswith("30 of 98388 values of this update (0.03%; largest 2.38) are "
                          "beyond the round's clip of 1 and go into the sum clipped to it")
    assert "nothing to do" in few and "operator" not in few
    many = clip_notice(2000, 98388, 12.4, 1.0)
    assert "(2.03%; largest 12.4)" in many
    assert "nothing to do" not in many
    assert "tell the federation operator (the server's [round] clip may be too small" in many
