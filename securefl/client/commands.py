"""The headless ``securefl client`` and ``securefl admin`` commands over the session APIs.

Why files in ``state_dir``: ``get`` and ``send`` are separate processes, so the downloaded
global model and its version are kept next to the hospital's settings; ``send`` then knows
which version the update was trained on without being told.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from securefl import config
from securefl.client.hospital import Hospital
from securefl.client.session import AdminSession, RoundStep, UnmaskProgress
from securefl.errors import DataError, SecureFLError, ServerWentBackError

if TYPE_CHECKING:  # pragma: no cover
    from securefl.ml.train import Progress


def _settings(args: argparse.Namespace) -> config.ClientSettings:
    return config.load(args.config, config.ClientSettings)


def _load_vector(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read a weight vector from {path} (.npy expected)") from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive holds several arrays
        loaded.close()
        raise DataError(f"{path} is an archive of several arrays (.npz), not one weight "
                        "vector: save the update with numpy.save as .npy")
    return loaded.astype(np.float32).reshape(-1)


def _print_step(step: RoundStep) -> None:
    print(f"  - {step.detail}", flush=True)


def _unmask_printer(stream: TextIO) -> Callable[[UnmaskProgress], None]:
    """Print each new unmask count once (the server repeats the final one before the
    result)."""
    last: list[tuple[int, int, int]] = []

    def show(p: UnmaskProgress) -> None:
        key = (p.round_id, p.answered, p.asked)
        if last and last[-1] == key:
            return
        last.append(key)
        print(f"  - unmasking round {p.round_id}: {p.answered} of {p.asked} hospitals "
              f"answered ({p.needed} needed)", file=stream, flush=True)

    return show


def _fit(parts: list[str], width: int) -> str:
    """The longest prefix of ``parts`` (joined) that fits ``width``, cut if even one does not.

    Why: a line wider than the terminal wraps, and ``\r`` then rewrites only its last row,
    so an 80-column terminal filled with a new pair of rows at every batch."""
    line = parts[0]
    for part in parts[1:]:
        if len(line) + len(part) > width:
            break
        line += part
    return line[:width]


class TrainingPrinter:
    """A progress callback for long training (or the fine-tuning epoch of ``get``) on stderr,
    so it shows it is moving; ``doing`` names the work.

    Why two behaviours: on a terminal one line is redrawn in place after every batch and fits
    the terminal's width (the accuracy goes first, then the loss).  In a log file (a script's
    ``2> train.log``) carriage returns made one line of thousands of redraws, so there each
    finished epoch, and the recalibration once, gets a line of its own."""

    def __init__(self, doing: str = "") -> None:
        self.doing = doing
        self.drawn = False  # a terminal line is open and needs its newline at the end

    def __call__(self, p: Progress) -> None:
        parts = ([f"recalibrating batch-norm statistics: layer {p.batch}/{p.batches}"]
                 if p.stage == "calibrating" else
                 [f"{self.doing}epoch {p.epoch}/{p.epochs}  batch {p.batch}/{p.batches}",
                  f"  loss {p.loss:.4f}", f"  accuracy {p.accuracy:.3f}"])
        width, tty = 78, False
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if sys.stderr.isatty():
                width, tty = os.get_terminal_size(sys.stderr.fileno()).columns - 1, True
        if tty:
            self.drawn = True
            print(f"\r{_fit(parts, width):<{width}}", end="", file=sys.stderr, flush=True)
        elif p.batch == p.batches:
            print("".join(parts), file=sys.stderr, flush=True)

    def done(self) -> None:
        """End the redrawn terminal line, so what is printed next starts on a line of its own."""
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False


def training_printer(doing: str = "") -> TrainingPrinter:
    """The progress callback of ``train`` and ``get`` (see :class:`TrainingPrinter`)."""
    return TrainingPrinter(doing)


def personalisation_summary(hospital: Hospital) -> str:
    """What ``get`` made of the download for this hospital, in one or two sentences."""
    local = hospital.local_state()
    where = hospital.ml.model_path
    if local.personalisation:
        how = {"finetune": "batch-norm statistics measured on its {n} training scans, then "
                           "one fine-tuning epoch on them that lowered the validation loss",
               "recalibrate": "batch-norm statistics measured on its {n} training scans",
               "downloaded": "the copies personalised on its {n} training scans read its "
                             "validation scans no better"}.get(local.personalisation,
                                          "personalised on its {n} training scans")
        note = f"; {local.personalisation_note}" if local.personalisation_note else ""
        # Three short lines, not one of 500 characters (a walk's complaint).
        return (f"this hospital's model is now {hospital.model_label()}, saved to {where}\n"
                f"  how: {how.format(n=local.personalised_scans)}{note}\n"
                "  evaluate and classify use it; the next update is trained from and "
                "computed against the global model as downloaded")
    if local.personalisation_note:
        return (f"this hospital's model is now global version {local.base_version} as "
                f"downloaded, NOT personalised: {local.personalisation_note}; saved to {where}")
    return (f"this hospital's model is now global version {local.base_version} as downloaded "
            f"([ml] personalise = \"none\"), saved to {where}")


def _waiting_for(names: Sequence[str], me: str) -> str:
    """The status line's tail for a round bound to a survivor list.  Why not the list as
    is: walking it, a hospital read its own name among those "waited for" with nothing
    saying that it is the one to act."""
    if not names:
        return ""
    others = [n for n in names if n != me]
    if len(others) == len(names):
        return f"; waiting for {', '.join(names)}"
    return ("; waiting for this hospital" + (f" and {', '.join(others)}" if others else "")
            + ": the next round on this version may combine only its survivor list, which "
            "names this hospital: run send")


async def hospital(args: argparse.Namespace) -> int:
    hospital = Hospital.from_file(args.config, require_ml=False)
    state = hospital.state_dir
    if args.client_action in ("get", "send"):
        from securefl.client.agent.control import refuse_if_running

        await asyncio.to_thread(refuse_if_running, state, args.client_action)
    # Held from before the first word is printed: a second `send` of the same hospital
    # used to print "sending ..." and only then be refused (walking it).
    with (hospital.busy(args.client_action) if args.client_action in ("get", "send")
          else contextlib.nullcontext()):
        async with hospital.session() as session:
            for warning in session.conn.warnings:  # e.g. an expired revocation list
                print(f"securefl: warning: {warning}", file=sys.stderr)
            if session.resend_round is not None:
                hospital.note_abandoned(session.resend_round)
                # Not "while this hospital was away": a server restart ends the round too,
                # with every hospital still waiting in it (a walk).
                print(f"note: round {session.resend_round} ended without publishing anything (it "
                      "failed, was aborted, or the server restarted) before this hospital heard "
                      "its end; send your update again (`send` says if this version no longer "
                      "allows it)")
            out = session.published_round
            if out is not None and not hospital.note_published(*out):
                out = None  # a round this hospital's update did not go into
            action = args.client_action
            if out is not None and action == "send":
                # The send this one resumes has already done its job: the version is out.
                print(f"version {out[1]} is out: round {out[0]} published it with this "
                      "hospital's update in it while this hospital was not connected, so there "
                      "is nothing to send again; downloading it")
                model = await hospital.get(session)
                print(f"global version {model.version} downloaded: evaluate it, then train on "
                      "it for the next round")
                if hospital.has_ml:
                    print(personalisation_summary(hospital))
                return 0
            if out is not None:
                print(f"note: version {out[1]} is out: round {out[0]} published it with this "
                      "hospital's update in it while this hospital was not connected; get it")
            if action == "status":
                st = await session.status()
                print(f"version {st.version}; round {st.round_id or '-'} {st.phase}; online "
                      f"{', '.join(st.online) or '-'}; joined {len(st.joined)}; submitted "
                      f"{len(st.submitted)}"
                      + _waiting_for(st.waiting_for, session.name))
                try:
                    await hospital.check_server_not_behind(session, st.version)
                except ServerWentBackError as exc:  # status still shows what it can
                    print(f"warning: {exc.message}")
                return 0
            if action == "get":
                finetune = hospital.has_ml and hospital.ml.personalise in ("finetune", "best")
                try:  # only for the note below: a damaged record is what get repairs
                    before = await asyncio.to_thread(hospital.global_meta)
                except SecureFLError:
                    before = None
                printer = training_printer("fine-tuning on this hospital's scans: ")
                try:
                    model = await hospital.get(
                        session, replace_trained=args.replace_trained,
                        on_personalise=printer if finetune else None)
                finally:
                    printer.done()
                made = ("the starting model" if model.version == 0 else
                        f"from {model.contributors} hospitals, {model.total_samples} scans")
                print(f"global version {model.version} downloaded ({made}, "
                      f"{model.weights.size} parameters) and saved to {state / 'global.npy'}")
                if before is not None and before.get("version") == model.version:
                    # A second get is allowed (new scans, a lost copy) but was silent about
                    # it: a walk took the repeat for a new version.
                    print(f"note: this hospital already had global version {model.version}; "
                          "nothing new was published since the last get"
                          + (", and this hospital's own copy was made again from its current "
                             "scans" if hospital.has_ml else ""))
                if hospital.has_ml:
                    print(personalisation_summary(hospital))
                return 0
            # send
            if args.update is None and args.weights is None:
                if not hospital.has_ml:
                    raise DataError("give --update or --weights, or add an [ml] table so the "
                                    "trained local model is sent")
                update, samples, base = await asyncio.to_thread(hospital.local_update)
                what = f"the local model's update (trained from version {base} on {samples} scans)"
            else:
                if args.samples is None:
                    raise DataError("--samples is needed with --update or --weights")
                meta = hospital.global_meta()
                if meta is None:
                    raise DataError("no downloaded global model: run `securefl client get` first, "
                                    "then train")
                base = args.base_version if args.base_version is not None else meta["version"]
                if base != meta["version"]:
                    raise DataError(f"--base-version {base} is not the downloaded version "
                                    f"{meta['version']}: get the version the update was trained "
                                    "on first (its sha256 is signed with the round keys)")
                held = hospital.global_weights()
                given = _load_vector(args.weights if args.weights is not None else args.update)
                if given.size != held.size:
                    # Before joining: a hospital that joins and then refuses holds up the
                    # others' round first (adversary review).
                    raise DataError(
                        f"{args.weights or args.update} holds {given.size} values, but the "
                        f"downloaded global model (version {meta['version']}) has {held.size}: it "
                        "was made for another model, and nothing was sent")
                update = given - held if args.weights is not None else given
                samples = args.samples
                what = f"the update trained on version {base}"
            hospital.check_can_send(base)  # refused before anything says "sending"
            await hospital.check_server_not_behind(session)  # and this too
            print(f"sending {what}; masked here, so only the sum of several hospitals' updates "
                  "can be read.  This stays connected until the administrator aggregates the "
                  "round: keep it running.", flush=True)
            outcome = await hospital.send_update(session, update, samples, base,
                                                 on_step=_print_step)
            assert outcome is not None
            if outcome.pending:
                print(f"round {outcome.round_id} is complete: {outcome.message}; `status` shows "
                      f"when version {outcome.version} is out, then get it")
                return 0
            print(f"round {outcome.round_id} published global version {outcome.version} with "
                  "this hospital's update in it: get it to evaluate the shared model")
            return 0


def show_log(args: argparse.Namespace) -> int:
    """The newest entries of the hospital's own log, oldest first, one line each."""
    from securefl.client.hospital_log import HospitalLog

    log = HospitalLog(_settings(args).state_dir)
    entries, damaged = log.entries(args.limit)
    if not entries:
        print(f"the hospital's log {log.path} has no entries yet: it starts with the first "
              "get, train or send")
    for entry in entries:
        print(entry.format())
    if damaged:
        print(f"securefl: note: {damaged} damaged line(s) in {log.path} were skipped (a "
              "write cut short by a crash or a full disk)", file=sys.stderr)
    return 0


def interrupted_send_note(config: Path) -> str:
    """What a user whose ``send`` was interrupted should know, from the durable record."""
    try:
        record = Hospital.from_file(config, require_ml=False).send_record()
    except SecureFLError:
        record = None
    if record is None:
        return "send interrupted before it joined a round: run send again"
    if record.stage == "published":
        return (f"send interrupted after round {record.round_id} published version "
                f"{record.published_version} with this update in it")
    if record.pending_round is not None:
        return (f"send interrupted after the masked update left in round "
                f"{record.pending_round}: if that round publishes, the update is in it; if it "
                "fails, the server says so the next time this hospital connects, and send may "
                "then join a new round (`status` shows how the round is doing)")
    return ("send interrupted before the masked update left: nothing of it was used; run "
            "send again to join the round")


async def admin(args: argparse.Namespace) -> int:
    """One admin action: a table or sentence for people, or ``--json`` for scripts
    (``securefl.client.admin_text`` keeps the shapes)."""
    from securefl.client import admin_text as text

    as_json = getattr(args, "json", False)
    limit = getattr(args, "limit", 50)

    def out(lines: str | list[str]) -> None:
        print(lines if isinstance(lines, str) else "\n".join(lines), flush=True)

    async with AdminSession(_settings(args)) as session:
        action = args.action
        if action == "status":
            st = await session.status()
            out(text.status_json(st) if as_json else text.status_lines(st))
            if st.round_id and (why := text.doomed_reason(
                    st.round_id, await session.audit(limit=200))):
                print(f"note: round {st.round_id} cannot finish: {why} (the server's console "
                      "and `audit` say what happens next)", file=sys.stderr)
            if st.waiting_for:
                print(f"waiting for {', '.join(st.waiting_for)}: a round on version "
                      f"{st.version} failed after its survivor list went out, so the next "
                      "may combine only the hospitals on it; ask them to connect and send "
                      "(if their send refuses because the update already went into "
                      "max_attempts rounds, exit 13, no round on this version can publish: "
                      "find why the rounds failed with `securefl admin audit`, and once that "
                      "is fixed ask each of them to raise [policy] max_attempts by one in "
                      "hospital.toml)", file=sys.stderr)
        elif action == "aggregate":
            # With --json stdout carries only the JSON result; progress goes to stderr.
            progress = _unmask_printer(sys.stderr if as_json else sys.stdout)
            result = await session.aggregate(on_progress=progress)
            out(text.aggregate_json(result) if as_json else
                f"published version {result.version} from {result.contributors} hospitals "
                f"({result.total_samples} samples), sha256 {result.sha256}")
        elif action == "version":
            version = await session.version()
            out(json.dumps({"version": version}) if as_json else
                f"current global version: {version}")
        elif action == "count":
            count = await session.count()
            out(json.dumps({"collected": count}) if as_json else
                f"{count} masked update{'' if count == 1 else 's'} collected in the current "
                "round")
        elif action == "close":
            round_id = await session.close_enrolment()
            out(json.dumps({"round": round_id, "closed": True}) if as_json else
                f"enrolment of round {round_id} closed")
        elif action == "hospitals":
            rows = await session.hospitals()
            out(text.json_lines(rows) if as_json else text.hospitals_lines(rows))
        elif action == "history":
            versions = await session.history(limit)
            out(text.json_lines(versions) if as_json else text.history_lines(versions))
        elif action == "audit":
            entries = await session.audit(limit)
            out(text.json_lines(entries) if as_json else text.audit_lines(entries))
        elif action == "abort":
            round_id = await session.abort_round()
            out(json.dumps({"round": round_id, "aborted": True}) if as_json else
                f"round {round_id} aborted; hospitals will send again")
        elif action == "schedule":
            view = await session.schedule()
            out(text.schedule_json(view) if as_json else text.schedule_lines(view))
        elif action == "pause":
            await session.pause()
            out(json.dumps({"paused": True}) if as_json else
                "schedule paused: no further round opens until `admin resume` (a round "
                "already open runs on; `admin abort` ends it)")
        elif action == "resume":
            await session.resume()
            view = await session.schedule()
            out(json.dumps({"paused": False, "next_open": view.next_open}) if as_json else
                "schedule resumed: " + (f"the next round opens at {text.when(view.next_open)} "
                                        "UTC" if view.next_open else
                                        "the next round opens once the open one has ended"
                                        if view.round else "a round opens now"))
        elif action == "open":
            number = await session.open_round()
            out(json.dumps({"schedule_round": number, "opened": True}) if as_json else
                f"scheduled round {number} opened; the hospitals' agents train and join it")
    return 0


#: Seconds a terminated ``send`` is given to close its connection and records before it
#: ends without them (its durable send record is written whole or not at all either way).
STOP_GRACE = 10.0


def _stop_now(config: Path, code: int, why: str, err_fd: int) -> None:
    """A stopped send whose clean-up hung, or a second Ctrl-C: say so, then end.

    The note goes to ``err_fd``, a copy of the terminal's stderr taken when the command
    started: while TensorFlow is imported, fd 2 points at a temporary file (``ml._tf``),
    and a note written there would vanish with the process."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    note = f"securefl: {interrupted_send_note(config)} ({why})\n"
    with contextlib.suppress(OSError):
        os.write(err_fd, note.encode("utf-8", "replace"))
    os._exit(code)


def run(coro_fn: object, args: argparse.Namespace) -> int:
    """Run a command; an interrupted ``send`` ends with its one-sentence note.

    For ``send``, Ctrl-C and SIGTERM (a service stop) cancel the command's task on the event
    loop.  SIGTERM used to raise from a plain signal handler, at whatever point the loop was:
    inside its TLS or transport bookkeeping that could leave the clean-up waiting for ever
    (a CI run saw a terminated send that never exited).  Either signal also starts a
    watchdog (:data:`STOP_GRACE`), and Ctrl-C pressed again stops at once: Python 3.11's
    ``wait_for`` can drop a cancellation that lands as the awaited step completes, and a
    send that ignored one Ctrl-C would wait for a whole round (a CI run saw that too)."""
    sending = getattr(args, "client_action", None) == "send"
    stopped: int | None = None  # the exit status of the signal that stopped the send
    watchdog: threading.Timer | None = None
    err_fd = os.dup(2) if sending else 2
    # A send started in the background by a shell script ignores Ctrl-C (the shell set
    # SIGINT to "ignore" for it); that choice stays.
    take_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None

        loop = asyncio.get_running_loop()

        def on_signal(code: int) -> None:
            nonlocal stopped, watchdog
            if stopped is not None:
                if code == 130:  # Ctrl-C again: the person does not want to wait
                    _stop_now(args.config, 130, "stopped at once on a second Ctrl-C", err_fd)
                return
            stopped = code
            task.cancel()
            watchdog = threading.Timer(
                STOP_GRACE, _stop_now,
                args=(args.config, code, f"the clean-up did not finish within "
                                         f"{STOP_GRACE:.0f} s, so the command stopped "
                                         "without it", err_fd))
            watchdog.daemon = True
            watchdog.start()

        if sending:
            loop.add_signal_handler(signal.SIGTERM, on_signal, 143)
            if take_sigint:
                loop.add_signal_handler(signal.SIGINT, on_signal, 130)
        return await coro_fn(args)  # type: ignore[operator]

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        # A send stopped by a signal ends in the cancellation; Ctrl-C in other commands
        # (or before the loop ran) reaches here as KeyboardInterrupt.
        if sending and (stopped is not None or isinstance(exc, KeyboardInterrupt)):
            if watchdog is not None:  # the clean-up finished in time: one note, not two
                watchdog.cancel()
            with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C while it prints
                print(f"securefl: {interrupted_send_note(args.config)}", file=sys.stderr)
            return stopped or 130
        raise
    finally:
        if watchdog is not None:  # a send that finished anyway is not "interrupted"
            watchdog.cancel()
        if err_fd != 2:
            os.close(err_fd)
