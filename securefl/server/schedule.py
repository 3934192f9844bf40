"""Server-driven rounds (``[schedule] mode = "auto"``, issue 17): open, close, publish.

Why a module beside the coordinator and not inside it: the coordinator already decides
everything *within* a secure-aggregation round; the schedule decides only when a round
opens, when enrolment may close (the training deadline, or every registered hospital
accounted for), and when the masked inputs are all in so the survivor-list / unmask /
publish steps run -- the same steps the administrator's ``aggregate`` runs
(``AdminActions._aggregate``), called here without an administrator.  It watches the
coordinator's state a few times a second instead of hooking every branch of it, so the
round code stays as it was and manual mode is untouched.

A *scheduled round* (``schedule_round``) is not a secure-aggregation round (``round_id``):
it may hold several of them (a retry after a dropout opens a fresh one on the same base
version).  Its state lives in ``schedule.json`` beside ``state.json`` and is written,
fsynced, whenever a scheduled round opens or ends and whenever the administrator pauses or
resumes, so a restarted server resumes the schedule: an open round whose deadline has not
passed stays open (hospitals hear it again after ``welcome``); the secure-aggregation round
that was in flight follows the coordinator's restart rules (abandoned, its hospitals told to
send again, a signed survivor list still binding them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from typing import TYPE_CHECKING

from securefl.config import ScheduleSettings
from securefl.crypto.pki import Role
from securefl.crypto.secagg import ServerRound, ServerState
from securefl.errors import SecureFLError
from securefl.fsutil import replace_file
from securefl.protocol import messages as wm
from securefl.server.audit import clip
from securefl.server.plain import PlainRound
from securefl.server.rounds import ActiveRound, Peer, RoundBusyError

if TYPE_CHECKING:
    from securefl.server.coordinator import Coordinator

log = logging.getLogger("securefl.server")

#: How often the schedule looks at the coordinator (seconds).
TICK = 0.2
#: With "after-publish", a round that ended without a version is followed by the next one
#: after this pause, so a federation with no hospitals online does not spin.
RETRY_PAUSE = 5.0


class NoScheduleError(SecureFLError):
    code = "no-schedule"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _iso_up(t: dt.datetime) -> str:
    """A deadline is written in whole seconds: rounded up, so the hospitals never get less
    time than the configured training deadline (truncating closed a "3s" round after 2.7 s)."""
    return _iso(t + dt.timedelta(microseconds=-t.microsecond % 1_000_000) if t.microsecond
                else t)


def _parse(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


class Scheduler:
    """The schedule of one server; every method runs on the coordinator's event loop."""

    def __init__(self, coordinator: Coordinator, settings: ScheduleSettings) -> None:
        self.c = coordinator
        self.cfg = settings
        self.path = coordinator.store.root / "schedule.json"
        try:
            self._restore(self._load(), settings)
        except (ValueError, TypeError, AttributeError):  # pydantic's errors are ValueErrors
            # Valid JSON holding what no schedule wrote (walking it: a traceback at start).
            log.warning("%s holds values that are not a saved schedule: the schedule starts "
                        "afresh", self.path)
            self._restore({}, settings)
        #: Secure-aggregation rounds run for the open scheduled round.  Read back empty:
        #: the one in flight when the server stopped was abandoned by the restart (its
        #: hospitals are told to send again), and the scheduled round stays open for them.
        self.rounds: list[int] = []
        self._collecting: tuple[int, float] | None = None
        self._aggregating: asyncio.Task | None = None
        self._wake = asyncio.Event()
        if self.open is not None:
            self._arm_coordinator()

    # -- persistence -------------------------------------------------------------------------
    def _restore(self, state: dict, settings: ScheduleSettings) -> None:
        if not isinstance(state, dict):
            raise TypeError("not an object")
        #: The last scheduled round number handed out (never repeats).
        self.counter: int = int(state.get("schedule_round", 0))
        self.paused: bool = bool(state.get("paused", settings.start == "paused"))
        self.next_open: dt.datetime | None = _parse(state.get("next_open"))
        opened = state.get("open_round")
        self.open: wm.OpenRound | None = wm.OpenRound(**opened) if opened else None
        #: Hospitals that said they will not join the open round: name -> reason code.
        self.failed: dict[str, str] = dict(state.get("failed", {}))
        #: Hospitals that downloaded the base version after the round opened (training).
        self.downloaded: set[str] = set(state.get("downloaded", []))

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is not valid JSON: the schedule starts afresh", self.path)
            return {}

    def _save(self) -> bool:
        """Written and fsynced at every opening, end, pause and resume; a storage fault is
        logged and the schedule goes on in memory (a restart then forgets the last change,
        never an already published version)."""
        data = {"schedule_round": self.counter, "paused": self.paused,
                "next_open": _iso(self.next_open) if self.next_open else None,
                "open_round": self.open.model_dump() if self.open else None,
                "failed": self.failed, "downloaded": sorted(self.downloaded),
                "rounds": self.rounds}
        try:
            replace_file(self.path, json.dumps(data).encode())
        except OSError as exc:
            log.warning("could not save the schedule to %s (%s)", self.path, exc.strerror)
            return False
        return True

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled: look at the coordinator, act, sleep a tick (a failure is logged
        and the next tick tries again: the schedule must never stop the server)."""
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("the schedule failed to act; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    def poke(self) -> None:
        self._wake.set()

    def tick(self) -> None:
        now = _now()
        if self.open is None:
            if self._due(now):
                self.open_round(now)
            return
        self._follow(now)

    def _due(self, now: dt.datetime) -> bool:
        c = self.c
        if self.paused or c.round is not None or c.held is not None:
            return False  # a round by hand (or a held result) finishes first
        return self.next_open is None or self.next_open <= now

    # -- opening ------------------------------------------------------------------------------
    def open_round(self, now: dt.datetime | None = None) -> wm.OpenRound:
        """Open the next scheduled round and tell every connected hospital."""
        c = self.c
        if self.open is not None:
            raise RoundBusyError(f"scheduled round {self.open.schedule_round} is still open "
                                 f"(until {self.open.deadline}): abort it first to open "
                                 "another now")
        if c.round is not None or c.held is not None:
            raise RoundBusyError("a round is in progress; a scheduled round opens once it "
                                 "has ended (or abort it)")
        if not c.audit.writable:
            raise RoundBusyError(f"the server cannot write its audit log ({c.audit.fault}), "
                                 "so it opens no round until the operator makes it writable",
                                 code="audit-unwritable")
        now = now or _now()
        self.counter += 1
        info = wm.OpenRound(schedule_round=self.counter, base_version=c.version,
                            opened=_iso(now),
                            deadline=_iso_up(now + dt.timedelta(seconds=self.cfg.deadline)))
        self.open, self.failed, self.downloaded, self.rounds = info, {}, set(), []
        interval = self.cfg.interval
        self.next_open = now + dt.timedelta(seconds=interval) if interval else None
        self._save()
        self._arm_coordinator()
        c.audit.record("schedule-open", schedule_round=info.schedule_round,
                       base_version=info.base_version, deadline=info.deadline, durable=True)
        push = wm.RoundOpen.of(info)
        for peer in list(c.peers):
            if peer.role is Role.HOSPITAL:
                c._push(peer, push)
        return info

    def _arm_coordinator(self) -> None:
        """What the coordinator needs to know of the open round: the enrolment deadline and
        the hospitals it should not wait for."""
        assert self.open is not None
        deadline = _parse(self.open.deadline)
        self.c.enrolment_until = deadline.timestamp() if deadline else None
        self.c.excused = set(self.failed)

    # -- following the open round ------------------------------------------------------------
    def _follow(self, now: dt.datetime) -> None:
        c, info = self.c, self.open
        assert info is not None
        if c.held is not None:
            return  # complete; publishes when the store is writable (the coordinator's timer)
        if c.version > info.base_version:
            self.close("published", c.version, f"version {c.version} is published")
            return
        deadline = _parse(info.deadline)
        assert deadline is not None
        passed = now >= deadline
        least = c.fewest_to_close()[0]
        rnd = c.round
        if rnd is None:
            if self.rounds:
                self.close("abandoned", None, "the round could not be finished; nothing "
                           "was published")
            elif passed:
                self.close("expired", None, f"fewer than {least} hospitals joined before "
                           "the training deadline; nothing was published")
            elif self._all_accounted(set()):
                self.close("expired", None, "every registered hospital declined or "
                           "failed to train; nothing was published")
            return
        if rnd.base_version != info.base_version:
            return
        if rnd.round_id not in self.rounds:
            self.rounds.append(rnd.round_id)
            self._save()
        eng = rnd.engine
        if eng.state is ServerState.ENROLLING:
            joined = set(eng.joined) if isinstance(eng, ServerRound) else set(
                eng.submitted_names())
            accounted = self._all_accounted(joined)
            if isinstance(eng, PlainRound):  # the unmasked baseline takes inputs at once
                if (accounted or passed) and len(joined) >= least:
                    self._aggregate(rnd)
                    return
                expire = passed or (accounted and len(joined) < least)
            else:  # the coordinator closes enrolment itself when it can (``_check_progress``)
                expire = (rnd.deadline_passed and passed) or (accounted and len(joined) < least)
            if expire:
                if len(joined) >= least:
                    why = ("the hospitals of the failed round's survivor list did not all "
                           "join before the deadline")
                elif passed:
                    why = (f"only {len(joined)} of the {least} hospitals needed joined before "
                           "the training deadline")
                else:  # closed early: nobody else will come
                    why = (f"only {len(joined)} of the {least} hospitals needed joined; every "
                           "other registered hospital declined or failed to train")
                c._abandon(rnd, "expired", f"{why}; nothing was published")
                self.close("expired", None, f"{why}; nothing was published")
        elif eng.state is ServerState.COLLECTING:
            if self._collecting is None or self._collecting[0] != rnd.round_id:
                self._collecting = (rnd.round_id, now.timestamp())
            members = {n for n in eng.joined if rnd.members.get(n) is not None
                       and rnd.members[n].open} if isinstance(eng, ServerRound) else set()
            waited = now.timestamp() - self._collecting[1]
            if members <= set(rnd.submitted()) or waited >= c.rs.step_timeout:
                self._aggregate(rnd)

    def _all_accounted(self, joined: set[str]) -> bool:
        """Every registered hospital joined, or said it will not."""
        registered = set(self.c.settings.hospitals)
        return bool(registered) and registered <= joined | set(self.failed)

    def _aggregate(self, rnd: ActiveRound) -> None:
        """The survivor list, unmask and publish steps, as ``aggregate`` runs them."""
        if self._aggregating is not None and not self._aggregating.done():
            return

        async def run() -> None:
            try:
                await self.c._aggregate(rnd, 0, None)
            except SecureFLError as exc:
                log.warning("scheduled round %s: round %d did not publish: %s",
                            self.open.schedule_round if self.open else "?", rnd.round_id,
                            exc.message)
            finally:
                self.poke()

        self._aggregating = asyncio.ensure_future(run())
        self._aggregating.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- closing ------------------------------------------------------------------------------
    def close(self, outcome: str, version: int | None, message: str) -> None:
        """End the open scheduled round and tell every connected hospital."""
        c, info = self.c, self.open
        if info is None:
            return
        self.open = None
        c.excused = set()
        c.enrolment_until = None
        if self.cfg.interval is None:  # after-publish: the next one now (or after a pause)
            pause = 0.0 if outcome == "published" else RETRY_PAUSE
            self.next_open = _now() + dt.timedelta(seconds=pause)
        until = self.cfg.until_version
        # Only the round that reaches the target pauses: after `admin resume` the rounds
        # go on unattended as before.
        finished = (outcome == "published" and version is not None and until is not None
                    and info.base_version < until <= version and not self.paused)
        if finished:  # saved with the close: a restart does not open another round
            self.paused = True
        self._save()
        c.audit.record("schedule-closed", schedule_round=info.schedule_round,
                       outcome=outcome, version=version if version is not None else -1,
                       message=clip(message), durable=True)
        if finished:
            c.audit.record("schedule-paused", reason="until-version", version=version,
                           durable=True)
            log.info("version %d reached [schedule] until_version = %d: the schedule is "
                     "paused and opens no further round (`securefl admin resume` goes on)",
                     version, until)
        push = wm.RoundClosed(schedule_round=info.schedule_round, outcome=outcome,  # type: ignore[arg-type]
                              version=version, message=message[:1000])
        for peer in list(c.peers):
            if peer.role is Role.HOSPITAL:
                c._push(peer, push)
        self.poke()

    # -- hospitals ----------------------------------------------------------------------------
    def welcome(self) -> wm.WelcomeSchedule:
        return wm.WelcomeSchedule(paused=self.paused, open_round=self.open)

    def after_welcome(self, peer: Peer) -> None:
        """A hospital that (re)connects while a round is open hears of it, unless it is in."""
        rnd, info = self.c.round, self.open
        if info is None or peer.role is not Role.HOSPITAL:
            return
        if rnd is not None and peer.name in rnd.members:
            return
        if _now() >= (_parse(info.deadline) or _now()):
            return
        self.c._push(peer, wm.RoundOpen.of(info))

    def got_global(self, name: str) -> None:
        if self.open is not None:
            self.downloaded.add(name)

    def training_failed(self, peer: Peer, msg: wm.TrainingFailed) -> None:
        """Audited with the coarse reason only, once per hospital and open round (the first
        reason stands); the round
        stops waiting for this hospital.  About any other round (closed, never opened) it
        changes nothing and is not recorded: a hospital repeating it, or making up round
        numbers, grew the audit log and the console by a line each (adversary review)."""
        c = self.c
        current = self.open is not None and self.open.schedule_round == msg.schedule_round
        if not current or peer.name in self.failed:
            # Once per hospital and open round, whatever the reason: cycling through the
            # reason codes recorded a line per frame (the adversary's re-check).
            return
        c.audit.record("training-failed", name=peer.name, schedule_round=msg.schedule_round,
                       reason=msg.reason)
        self.failed[peer.name] = msg.reason
        c.excused.add(peer.name)
        self._save()
        if c.round is not None:
            c._check_progress(c.round)
        self.poke()

    def check_join(self, name: str) -> None:
        """In auto mode a hospital joins the open scheduled round before its deadline (or a
        retry round the server opened for it); anything else is ``round-busy``."""
        rnd = self.c.round
        if rnd is not None and rnd.attempt > 0 and rnd.engine.state is ServerState.ENROLLING:
            return  # a retry of this scheduled round: its members rejoin
        info = self.open
        if info is None:
            nxt = "when the administrator resumes it" if self.paused else (
                f"at {_iso(self.next_open)}" if self.next_open else "soon")
            raise RoundBusyError(f"this server opens rounds on its schedule and none is open "
                                 f"now; the next opens {nxt}: join after its round_open")
        if _now() >= (_parse(info.deadline) or _now()):
            raise RoundBusyError(f"the training deadline of scheduled round "
                                 f"{info.schedule_round} passed at {info.deadline}; join the "
                                 "next scheduled round")
        if name in self.failed:  # it said it would not, and then did: welcome after all
            del self.failed[name]
            self.c.excused.discard(name)

    # -- the administrator --------------------------------------------------------------------
    def pause(self) -> int:
        self.paused = True
        self._save()
        self.c.audit.record("schedule-paused", durable=True)
        return self.counter

    def resume(self) -> int:
        self.paused = False
        self._save()
        self.c.audit.record("schedule-resumed", durable=True)
        self.poke()
        return self.counter

    def abort(self) -> int | None:
        """End the open scheduled round (the coordinator aborts its secure-aggregation round
        first); None when none is open."""
        if self.open is None:
            return None
        number = self.open.schedule_round
        self.close("aborted", None, "the administrator aborted the round; nothing was "
                   "published")
        return number

    def view(self) -> wm.ScheduleView:
        c, info = self.c, self.open
        rnd_view = None
        if info is not None:
            rnd = c.round if c.round is not None and c.round.base_version == \
                info.base_version else None
            phase = ("publishing" if c.held is not None else
                     rnd.phase if rnd is not None else "enrolling")
            rnd_view = wm.ScheduledRound(**info.model_dump(), phase=phase,
                                         hospitals=self.hospital_status(rnd))
        return wm.ScheduleView(
            mode="auto", paused=self.paused, every=self.cfg.every,
            training_deadline=self.cfg.training_deadline,
            next_open=_iso(self.next_open) if self.next_open and not self.paused
            and not (info is not None and self.cfg.interval is None) else None,
            round=rnd_view, stalled=stalled(c, self.failed))

    def hospital_status(self, rnd: ActiveRound | None) -> dict[str, str]:
        c = self.c
        online = set(c.online())
        names = sorted(set(c.settings.hospitals) | online | set(self.failed))
        submitted = set(rnd.submitted()) if rnd is not None else set()
        joined = set(rnd.members) if rnd is not None else set()
        out = {}
        for name in names:
            reason = self.failed.get(name)
            if reason is not None:
                out[name] = "declined" if reason == "declined" else f"failed:{reason}"
            elif name in submitted:
                out[name] = "submitted"
            elif name in joined:
                out[name] = "joined"
            elif name not in online:
                out[name] = "offline"
            elif name in self.downloaded:
                out[name] = "training"
            else:
                out[name] = "waiting"
        return out


def stalled(c: Coordinator, failed: dict[str, str]) -> wm.Stalled | None:
    """The current base version, when the cross-round rule holds it up, and why."""
    version = c.version
    b = c.binding
    if b is not None and b["base_version"] == version:
        offline = [n for n in b["names"] if n not in c.online()]
        return wm.Stalled(base_version=version, reason=(
            f"a round on version {version} failed after its survivor list went out, so "
            f"its next round may combine only {', '.join(b['names'])}"
            + (f"; offline: {', '.join(offline)}" if offline else "")
            + ": each sends its update only into a round of exactly them")[:1000])
    withheld = c.withheld.get(str(version))
    if withheld:
        return wm.Stalled(base_version=version, reason=(
            f"{', '.join(withheld)} stopped a round on version {version} by not answering "
            "its roster step and take part again from the next version")[:1000])
    sent = sorted(n for n, r in failed.items() if r == "already-sent")
    if sent:
        return wm.Stalled(base_version=version, reason=(
            f"{', '.join(sent)} already sent a masked update on version {version} into a "
            "round that did not publish, so the cross-round rule keeps them out until a "
            "new version is published")[:1000])
    return None


def manual_view(settings: ScheduleSettings, c: Coordinator) -> wm.ScheduleView:
    return wm.ScheduleView(mode="manual", paused=False, every=settings.every,
                           training_deadline=settings.training_deadline,
                           stalled=stalled(c, {}))
