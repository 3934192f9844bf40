"""The hospital agent: ``securefl client --config hospital.toml agent``.

Why a service: secure aggregation needs every hospital of a round online through the unmask
step, and rounds now open on the server's schedule (``[schedule]`` in server.toml), at
night if the federation wants.  The agent keeps one connection to the server and, for each
``round_open``, does what a person did by hand: get the global model, train (validation
split and early stopping), take part in the masked round through the unmask step, download
the published version, evaluate it on the validation scans and write the result down.

The hospital decides (``[agent]``): a person approves each round (``participation =
"approve"``, the default; the app or ``securefl client ... approve``) or the agent goes on
its own (``"auto"``), within a time window, a number of rounds per day and of attempts per
version; the cross-round rule (``rules.cross_round``) is never relaxed.  When it will not or
cannot take part it tells the server with a coarse reason code (``training_failed``), so
the round does not wait for it.

Every change of state is one plain line on stderr (journalctl shows it).  SIGTERM and
Ctrl-C stop it between two durable writes: a training, or the fine-tuning epoch of the
get after a publication, is stopped at the next batch (after a stopped fine-tune the model
file is the global one, recalibrated or as downloaded, whichever read the validation scans
better), a round in progress is left (the
send record says how far it got), and the record files are only ever replaced whole.  A
killed agent, started again, reads its record: a round it was in counts as interrupted,
and the send record decides what may go out on that version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from securefl.client.agent import control, rules
from securefl.client.agent.rules import AgentRecord, RoundEntry
from securefl.client.hospital import Hospital
from securefl.client.session import HospitalSession, RoundAbandonedError, RoundStep
from securefl.errors import (
    CertificateRejectedError,
    ConfigError,
    DataError,
    SecureFLError,
    TransportError,
    UpdateAlreadySentError,
)
from securefl.protocol import messages as wm

#: Reconnection backoff: first wait, doubling up to the longest, each +-20 % (jitter, so
#: hospitals that lost the server together do not all come back in the same second).
BACKOFF_FIRST, BACKOFF_MAX, JITTER = 1.0, 60.0, 0.2


class _Stopped(Exception):
    """The agent was asked to stop (SIGTERM, Ctrl-C, ``agent-stop``)."""


def _say_default(line: str) -> None:
    """Every line carries its local time, except under systemd's journal (``JOURNAL_STREAM``
    is set there), which stamps lines itself: an agent's log is read after the fact, and
    "when did round 4 start training" is the first question about it."""
    if not os.environ.get("JOURNAL_STREAM"):
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S} {line}"
    print(line, file=sys.stderr, flush=True)


def _parse_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _round_fields(msg: Any) -> dict[str, Any]:
    """A ``round_open`` (message or dict) as the plain fields the socket shows."""
    get = msg.get if isinstance(msg, dict) else lambda k: getattr(msg, k, None)
    return {k: get(k) for k in ("schedule_round", "base_version", "opened", "deadline")}


def _failure_reason(exc: BaseException) -> str:
    """The coarse code for a training that failed (never its message: it may name data)."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "resourceexhausted" in type(exc).__name__.lower() \
            or "out of memory" in text or "oom" in text.split():
        return "out-of-memory"
    if isinstance(exc, DataError):
        if "no training images" in text or "no readable images" in text \
                or "has no training/" in text or "no training/ folder" in text:
            return "no-scans"
        return "too-few-scans" if "needs at least" in text or "too few" in text \
            else "training-error"
    return "training-error"


class Agent:
    """One hospital's agent; ``run()`` until stopped."""

    def __init__(self, hospital: Hospital, *, say: Callable[[str], None] = _say_default,
                 now: Callable[[], datetime] = datetime.now) -> None:
        self.hospital = hospital
        self.settings = hospital.settings.agent
        self.say, self.now = say, now
        self.state_dir = hospital.state_dir
        self.record = AgentRecord(self.state_dir / rules.RECORD_NAME)
        self.state, self.detail = "connecting", "starting"
        self.progress: float | None = None
        self.pending: dict[str, Any] | None = None
        self.paused = False
        self._decision: asyncio.Future[str] | None = None
        self._stop = asyncio.Event()
        self._cancel_training = threading.Event()
        self._closed_rounds: dict[int, str] = {}
        self._closed_event = asyncio.Event()
        #: While connected: the tasks whose end means the connection is gone (the keepalive
        #: and the reader of the server's schedule pushes); every wait watches them.
        self._watch: set[asyncio.Task] = set()
        self._opens: asyncio.Queue = asyncio.Queue()
        #: Rounds handled on this connection: the welcome names the open round and the
        #: server may push the same opening too; the second is not news to anyone.
        self._seen_here: set[int] = set()

    # -- state, in one line each ---------------------------------------------------------------
    def set_state(self, state: str, detail: str, progress: float | None = None) -> None:
        changed = (state, detail) != (self.state, self.detail)
        self.state, self.detail, self.progress = state, detail, progress
        if changed:
            self.say(f"agent: {state}: {detail}")

    def status(self) -> dict[str, Any]:
        return {"ok": True, "state": self.state, "detail": self.detail,
                "progress": self.progress, "pending": self.pending,
                "recent": self.record.recent(), "participation": self.settings.participation,
                "window": self.settings.window, "pid": os.getpid()}

    # -- the local socket ----------------------------------------------------------------------
    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "status":
            return self.status()
        if op == "history":
            return {"ok": True, "recent": self.record.recent(50)}
        if op == "stop":
            self.say("agent: asked to stop over the local socket")
            self.stop()
            return {"ok": True, "stopping": True}
        n = request["schedule_round"]
        if self.pending is None or self._decision is None or self._decision.done():
            return {"ok": False, "error": f"no round is waiting for approval (round {n} is "
                    "not pending): `agent-status` shows what the agent is doing"}
        if self.pending["schedule_round"] != n:
            return {"ok": False, "error": f"round {n} is not the pending one (round "
                    f"{self.pending['schedule_round']} is): approve or skip that one"}
        self._decision.set_result(op)
        return {"ok": True, "schedule_round": n, "decision": op}

    def stop(self) -> None:
        self._stop.set()
        self._cancel_training.set()

    # -- the service ---------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until stopped; the exit status for the service manager."""
        lock = control.AgentLock(self.state_dir)
        lock.acquire()
        server = control.ControlServer(self.state_dir, self.handle)
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                handled.append(sig)
        try:
            self.record = AgentRecord.load(self.state_dir)
            for entry in self.record.interrupted():
                self.say(f"agent: round {entry.schedule_round} (version {entry.base_version}) "
                         "was interrupted when the agent last stopped; the send record "
                         "decides what may still go out on that version")
            await server.start()
            s = self.hospital.settings
            self.say(f"agent: started for {self.hospital.name} (participation "
                     f"{self.settings.participation}"
                     + (f", window {self.settings.window}" if self.settings.window else "")
                     + f"); server {s.host}:{s.port}; local socket {server.path}")
            await self._connect_loop()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await server.close()
            lock.release()
        self.say("agent: stopped")
        return 0

    def _on_signal(self, sig: int) -> None:
        self.say(f"agent: {signal.Signals(sig).name} received: stopping")
        self.stop()

    async def _connect_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            s = self.hospital.settings
            self.set_state("connecting", f"connecting to {s.host}:{s.port}")
            session = self.hospital.session()
            try:
                await self._until_stopped(session.connect())
            except _Stopped:
                return
            except ConfigError:
                raise  # a broken kit: retrying cannot help, the service manager shows it
            except (TransportError, SecureFLError) as exc:
                attempt += 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
                delay *= 1 + random.uniform(-JITTER, JITTER)
                if isinstance(exc, CertificateRejectedError):
                    delay = max(delay, 10.0)
                self.set_state("connecting", f"connection attempt {attempt} failed "
                               f"({exc.message}); next attempt in {delay:.1f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            attempt = 0
            try:
                await self._serve(session)
            except _Stopped:
                return
            except TransportError as exc:
                self.set_state("connecting", f"connection lost ({exc.message}); reconnecting")
            finally:
                await session.close()

    async def _until_stopped(self, aw: Any) -> Any:
        """``aw``'s result; ``_Stopped`` once the agent is stopped, the connection's failure
        once it is lost (``aw`` cancelled either way)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper, *self._watch},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self._stop.is_set():
            raise _Stopped()
        for watched in self._watch:
            if watched.done() and not watched.cancelled() and watched.exception():
                raise watched.exception()  # type: ignore[misc]
        raise TransportError("the connection to the server was lost")

    async def _pump(self, session: HospitalSession) -> None:
        """Sort the server's schedule pushes: a closed round is noted at once (an approval
        waiting for it stops waiting), an opened one waits its turn."""
        while True:
            msg = await session.next_schedule_event()
            if isinstance(msg, wm.RoundClosed):
                self._closed(msg)
            else:
                self._opens.put_nowait(msg)

    async def _keepalive(self, session: HospitalSession) -> None:
        """Below the server's idle timeout whatever the agent does (training takes long)."""
        while True:
            await asyncio.sleep(self.settings.keepalive)
            await session.keepalive()

    async def _serve(self, session: HospitalSession) -> None:
        h = self.hospital
        for warning in session.conn.warnings:
            self.say(f"agent: warning: {warning}")
        if session.resend_round is not None:
            h.note_abandoned(session.resend_round)
            self.say(f"agent: round {session.resend_round} ended without publishing while "
                     "the agent was away")
        out = session.published_round
        if out is not None and h.note_published(*out):
            self.say(f"agent: round {out[0]} published version {out[1]} with this "
                     "hospital's update in it while the agent was away")
        schedule = session.schedule
        self.paused = bool(schedule and schedule.paused)
        if schedule is None:
            self.set_state("waiting", "connected; the server opens no rounds on a schedule "
                           "([schedule] mode = \"manual\"): waiting")
        elif self.paused:
            self.set_state("paused", "connected; the server's schedule is paused")
        else:
            self.set_state("waiting", "connected; waiting for the server to open a round")
        self._opens = asyncio.Queue()
        self._seen_here = set()
        self._watch = {asyncio.create_task(self._keepalive(session)),
                       asyncio.create_task(self._pump(session))}
        try:
            if schedule is not None and schedule.open_round is not None:
                await self._round(session, schedule.open_round)
            while True:
                await self._round(session, await self._until_stopped(self._opens.get()))
        finally:
            watched, self._watch = self._watch, set()
            for task in watched:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _closed(self, msg: Any) -> None:
        n = msg.schedule_round
        self._closed_rounds[n] = msg.outcome
        self._closed_event.set()
        entry = self.record.entry(n)
        if entry is not None and entry.outcome == "started" and msg.outcome != "published":
            self.record.put(replace(entry, outcome="abandoned", detail=msg.message))
        if self.state in ("waiting", "done", "failed", "paused"):
            what = (f"published version {msg.version}" if msg.outcome == "published"
                    else f"ended {msg.outcome}")
            self.say(f"agent: scheduled round {n} {what}")

    # -- one scheduled round -------------------------------------------------------------------
    async def _decline(self, session: HospitalSession, n: int, base: int, reason: str,
                       why: str, outcome: str = "declined") -> None:
        earlier = self.record.entry(n)  # a resumed round keeps the day it counted on
        self.record.put(replace(earlier, outcome=outcome, reason=reason, detail=why)
                        if earlier is not None else
                        RoundEntry(n, base, outcome=outcome, reason=reason, detail=why))
        self.set_state("waiting" if outcome == "declined" else "failed",
                       f"not taking part in round {n}: {why} [{reason}]")
        with contextlib.suppress(SecureFLError):
            await session.training_failed(n, reason)

    async def _round(self, session: HospitalSession, msg: Any) -> None:
        fields = _round_fields(msg)
        n, base = int(fields["schedule_round"]), int(fields["base_version"])
        if n in self._seen_here:
            return
        self._seen_here.add(n)
        earlier = self.record.entry(n)
        # A round the agent started and was cut off from (it was killed, or the connection
        # dropped) and that is still open is taken up again: it was counted and approved.
        resume = earlier is not None and earlier.outcome == "interrupted" \
            and earlier.reason != "cancelled"
        if earlier is not None and not resume:
            self.say(f"agent: round {n} already handled; waiting for the next one")
            return
        deadline = _parse_time(fields["deadline"] or "")
        self.say(f"agent: server opened round {n} on version {base}"
                 + (f", training deadline {deadline.astimezone():%Y-%m-%d %H:%M}"
                    if deadline else "") + ("; taking it up again" if resume else ""))
        ruled_out = None if resume else rules.refusal(self.settings, self.record, base,
                                                      self.now())
        if ruled_out is not None:
            await self._decline(session, n, base, *ruled_out)
            return
        try:
            resend = rules.cross_round(self.hospital.outbox, base)
        except UpdateAlreadySentError as exc:
            await self._decline(session, n, base, "already-sent", exc.message)
            return
        if self.settings.participation == "approve" and not resume:
            decision = await self._approval(fields, deadline)
            if decision == "skip":
                await self._decline(session, n, base, "declined", "skipped by a person")
                return
            if decision != "approve":
                self.record.put(RoundEntry(n, base, outcome="missed", detail=decision))
                self.set_state("waiting", f"round {n}: {decision}")
                return
        entry = self.record.put(replace(earlier, outcome="started", detail="taken up again")
                                if resume and earlier is not None else
                                RoundEntry(n, base, day=rules.local_day(self.now()),
                                           detail="started"))
        try:
            await self._take_part(session, entry, resend)
        except _Stopped:
            self.record.put(replace(self.record.entry(n) or entry, outcome="interrupted",
                                    reason="cancelled", detail="the agent was stopped"))
            with contextlib.suppress(SecureFLError, TimeoutError):
                await asyncio.wait_for(session.training_failed(n, "cancelled"), 2.0)
            raise
        except TransportError:
            self.record.put(replace(self.record.entry(n) or entry, outcome="interrupted",
                                    detail="the connection to the server was lost"))
            raise

    async def _approval(self, fields: dict[str, Any], deadline: datetime | None) -> str:
        """"approve", "skip", or why no decision came (the deadline passed, the round
        closed)."""
        n = fields["schedule_round"]
        summary = await asyncio.to_thread(self.hospital.data_summary) \
            if self.hospital.has_ml else {}
        ml = self.hospital.ml if self.hospital.has_ml else None
        counts = rules.pending_counts(summary, ml.validation_fraction,
                                      ml.min_validation_per_class) if ml else {}
        self.pending = {**fields, "scans": counts}
        self._decision = asyncio.get_running_loop().create_future()
        self.set_state("pending-approval", f"round {n} on version {fields['base_version']} "
                       "waits for a person's approval (app, or `approve`/`skip`)")
        try:
            while not self._decision.done():
                if n in self._closed_rounds:
                    return f"the round ended ({self._closed_rounds[n]}) before anyone approved"
                left = ((deadline - datetime.now(UTC)).total_seconds()
                        if deadline is not None else 3600.0)
                if left <= 0:
                    return "nobody approved it before its training deadline"
                self._closed_event.clear()
                waits: set[asyncio.Future[Any]] = {
                    self._decision, asyncio.ensure_future(self._closed_event.wait())}
                try:
                    await self._until_stopped(asyncio.wait(waits, timeout=min(left, 5.0),
                                                           return_when=asyncio.FIRST_COMPLETED))
                finally:
                    for w in waits:
                        if w is not self._decision:
                            w.cancel()
            decision = self._decision.result()
            self.say(f"agent: round {n}: {'approved' if decision == 'approve' else 'skipped'} "
                     "over the local socket")
            return decision
        finally:
            self.pending = None
            self._decision = None

    async def _take_part(self, session: HospitalSession, entry: RoundEntry,
                         resend: rules.Resend | None) -> None:
        h, n, base = self.hospital, entry.schedule_round, entry.base_version
        if resend is None and h.unsent_training(base) == base and h.global_meta() is not None:
            # Trained on this version before the agent was cut off, and nothing of it left:
            # that model goes, hours of training are not thrown away.
            self.set_state("in-round", f"round {n}: the model trained on version {base} "
                           "earlier was not sent yet; sending it")
        elif resend is None:
            if await asyncio.to_thread(h.holds_untrained, base):
                self.set_state("training", f"round {n}: global version {base} is already "
                               "here (got when it was published)")
            else:
                self.set_state("training", f"round {n}: downloading global version {base}")
                # Not fine-tuned: training starts from the download and replaces the model.
                model = await self._until_stopped(h.get(session, replace_trained=True,
                                                        personalise=False))
                if model.version != base:
                    await self._fail(session, entry, "training-error",
                                     f"the server holds version {model.version}, not the "
                                     f"round's version {base}")
                    return
            self._cancel_training.clear()
            self.set_state("training", f"round {n}: training on version {base}", 0.0)
            try:
                result = await asyncio.to_thread(h.train, self._train_progress(n),
                                                 self._cancel_training)
            except Exception as exc:  # any failure of training becomes a coded reason
                reason = _failure_reason(exc)
                said = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                # The sentence stays here (it may name classes or counts); the server
                # hears only the code.
                await self._fail(session, entry, reason, f"training failed: {said}")
                return
            if result.cancelled:
                raise _Stopped()
            self.set_state("training", f"round {n}: trained on version {base} "
                           f"(kept epoch {result.best_epoch or result.epochs_run})", 1.0)
        else:
            self.set_state("in-round", f"round {n}: sending again the update that went out "
                           f"on version {base} in a round the server abandoned")
        self.set_state("in-round", f"round {n}: joining the masked round")

        def step(s: RoundStep) -> None:
            self.set_state("in-round", f"round {n}: {s.detail}")

        try:
            if resend is None:
                outcome = await self._until_stopped(h.send(session, on_step=step))
            else:
                outcome = await self._until_stopped(h.send_update(
                    session, resend.update, resend.samples, base, on_step=step))
        except UpdateAlreadySentError as exc:
            await self._fail(session, entry, "already-sent", exc.message, tell=False)
            return
        except RoundAbandonedError as exc:
            self.record.put(replace(entry, outcome="abandoned", detail=exc.message))
            self.set_state("failed", f"round {n} was abandoned: {exc.message}")
            return
        except TransportError:
            raise
        except SecureFLError as exc:
            self.record.put(replace(entry, outcome="refused", detail=exc.message))
            self.set_state("failed", f"round {n}: {exc.message}")
            return
        assert outcome is not None
        if outcome.pending:
            self.record.put(replace(entry, outcome="pending", version=outcome.version,
                                    detail=outcome.message))
            self.set_state("done", f"round {n} is complete; the server publishes version "
                           f"{outcome.version} once it can store it")
            return
        self.set_state("in-round", f"round {n} published version {outcome.version}; "
                       "downloading and evaluating it")
        accuracy: float | None = None
        detail = f"published version {outcome.version}"
        try:
            # Its fine-tuning epoch runs in a thread that a cancelled task does not stop:
            # the event stops it, or SIGTERM would wait for the whole epoch.
            await self._until_stopped(h.get(session, cancel=self._cancel_training))
            if h.has_ml:
                report = await asyncio.to_thread(h.evaluate, "validation")
                accuracy = float(report.balanced_accuracy)
                detail += (f"; {h.model_label()}: balanced accuracy {accuracy:.3f} on "
                           f"{report.num_samples} validation scans")
        except _Stopped:
            raise
        except (SecureFLError, ValueError) as exc:
            detail += f"; not evaluated here ({getattr(exc, 'message', exc)})"
        self.record.put(replace(entry, outcome="published", version=outcome.version,
                                balanced_accuracy=accuracy, detail=detail))
        h.log.record("agent-round", f"scheduled round {n}: {detail}", round=outcome.round_id,
                     base_version=base, version=outcome.version, action="agent",
                     durable=True)
        self.set_state("done", f"round {n}: {detail}; waiting for the next round")

    def _train_progress(self, n: int) -> Callable[[Any], None]:
        def progress(p: Any) -> None:
            if getattr(p, "stage", "") == "calibrating" or not getattr(p, "epochs", 0):
                return
            done = ((p.epoch - 1) + p.batch / max(1, p.batches)) / p.epochs
            self.progress = max(0.0, min(1.0, done))
            self.detail = f"round {n}: training, epoch {p.epoch}/{p.epochs}"

        return progress

    async def _fail(self, session: HospitalSession, entry: RoundEntry, reason: str,
                    why: str, *, tell: bool = True) -> None:
        self.record.put(replace(entry, outcome="failed", reason=reason, detail=why))
        self.hospital.log.record("agent-round", f"scheduled round {entry.schedule_round}: "
                                 f"{why}", base_version=entry.base_version, action="agent",
                                 code=reason, by="hospital", durable=True)
        self.set_state("failed", f"round {entry.schedule_round}: {why}")
        if tell:
            with contextlib.suppress(SecureFLError):
                await session.training_failed(entry.schedule_round, reason)


def run_agent(hospital: Hospital) -> int:
    """``securefl client --config hospital.toml agent``: until SIGTERM or Ctrl-C."""
    return asyncio.run(Agent(hospital).run())
