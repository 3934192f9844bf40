"""The administrator's actions on the coordinator: queries, close, abort, aggregate.

Split from ``coordinator.py`` along its natural seam: these run on behalf of the admin
certificate, use the coordinator's round and store, and are the only place a version is
published.  A mixin, so they share the coordinator's state without another indirection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl.crypto.secagg import ServerRound, ServerState
from securefl.errors import CryptoError, DataError, NotEnoughSurvivorsError
from securefl.fedopt import StepReport
from securefl.protocol import mapping
from securefl.protocol import messages as wm
from securefl.server import schedule, views
from securefl.server.plain import PlainRound
from securefl.server.rounds import ActiveRound, Peer, RoundBusyError
from securefl.server.store import StorageError, VersionInfo

log = logging.getLogger("securefl.server")


def too_few_next_step(least: int, setting: str) -> str:
    """What to do when fewer than ``least`` hospitals joined (``setting`` sets ``least``)."""
    wait = "wait for more hospitals to join (enrolment also closes by itself once they have)"
    if least <= 2:  # the protocol's own floor: no setting goes lower
        return wait
    if setting == "[round] colluders":
        return (f"{wait}, or lower [round] colluders in server.toml (a round needs c + 2; "
                "each hospital's [policy] colluders must not be higher) and restart the "
                "server")
    return f"{wait}, or lower {setting} in server.toml and restart the server"


@dataclass(eq=False)
class HeldResult:
    """A round's result the store could not take (read-only, not permitted, disk full).

    Kept in memory and published once the store is writable again -- on a timer
    (``[round] publish_retry``) and at the next admin action -- so its hospitals are never
    asked to send the same update into another sum.  Lost if the server stops first (the
    first stop signal is refused with a warning, ``securefl.server.main``): the
    round is then abandoned at the next start as any round in flight is.
    """

    rnd: ActiveRound
    #: The round's mean update, untouched (each attempt publishes from a copy, since the
    #: optimiser step turns its input into the new weights in place).
    mean_update: np.ndarray
    contributors: tuple[str, ...]
    total: int
    #: The version it becomes.
    version: int
    reason: str
    timer: asyncio.TimerHandle | None = None


class AdminActions:
    """Mixed into ``Coordinator``; every attribute used here is the coordinator's."""

    # Provided by Coordinator.
    round: ActiveRound | None
    store: Any
    audit: Any
    optimiser: Any
    settings: Any
    rs: Any
    binding: dict | None
    held: HeldResult | None
    publishing: dict | None
    published: dict[str, list[int]]
    _publishing: asyncio.Lock
    listed: dict | None
    waiting_for: Any
    last_seen: dict[str, str]
    cert_expires: dict[str, str]
    schedule: Any

    if TYPE_CHECKING:  # Coordinator's methods used here (declared for mypy only)
        def online(self) -> list[str]: ...
        @property
        def version(self) -> int: ...
        def _save_state(self, in_flight: dict | None, *, durable: bool = True,
                        required: bool = False) -> bool: ...
        def _check_progress(self, rnd: ActiveRound) -> None: ...
        def fewest_to_close(self) -> tuple[int, str]: ...
        def _close_enrolment(self, rnd: ActiveRound) -> None: ...
        def _push(self, peer: Peer, msg: wm._Wire, array: np.ndarray | None = None
                  ) -> None: ...
        def _abandon(self, rnd: ActiveRound, code: str, message: str, *,
                     retry: bool = False, silent: frozenset[str] = frozenset()
                     ) -> ActiveRound | None: ...

    # -- admin -------------------------------------------------------------------------------
    def _query(self, msg: wm.AdminQuery) -> wm.AdminQueryReply:
        reply = wm.AdminQueryReply(rid=msg.rid, what=msg.what)
        if msg.what == "hospitals":
            rnd = self.round
            rows = views.hospital_rows(
                self.settings.hospitals, self.online(), sorted(rnd.members) if rnd else [],
                rnd.submitted() if rnd else [], self.last_seen, self.cert_expires)
            return reply.model_copy(update={"hospitals": rows})
        if msg.what == "schedule":
            view = (self.schedule.view() if self.schedule is not None
                    else schedule.manual_view(self.settings.schedule, self))  # type: ignore[arg-type]
            return reply.model_copy(update={"schedule": view})
        if msg.what == "history":
            return reply.model_copy(update={"versions": views.version_rows(self.store,
                                                                           msg.limit)})
        return reply.model_copy(update={"audit": views.audit_rows(self.audit.path, msg.limit)})

    async def _admin(self, peer: Peer, msg: wm.AdminCommand) -> wm.AdminResult:
        action, rnd = msg.action, self.round
        if action in ("pause", "resume", "open"):
            return self._schedule_action(peer, msg)
        if action in ("aggregate", "close", "abort"):  # queries are not actions
            self.audit.record("admin", name=peer.name, action=action, durable=True)
            if self.held is not None:  # every admin action first tries to publish it
                held = self.held
                published = await self._retry_publish()
                if published is not None and action == "aggregate":
                    return self._aggregate_result(msg.rid, published, held)
                if self.held is not None:
                    raise self._deferred(self.held, action)
                rnd = self.round
        if action == "version":
            return wm.AdminResult(rid=msg.rid, action=action, value=self.version)
        if action == "count":
            return wm.AdminResult(rid=msg.rid, action=action,
                                  value=rnd.engine.collected if rnd else 0)
        if action == "abort" and self.schedule is not None and self.schedule.open is not None:
            # A scheduled round ends whether or not its masked round has started.
            if rnd is not None:
                self._abandon(rnd, "round-aborted", "the administrator aborted the round")
            number = self.schedule.abort()
            return wm.AdminResult(rid=msg.rid, action=action, value=number or 0)
        if rnd is None:
            raise RoundBusyError(self._no_round(action), code="no-round")
        if action == "abort":
            self._abandon(rnd, "round-aborted", "the administrator aborted the round")
            return wm.AdminResult(rid=msg.rid, action=action, value=rnd.round_id)
        if action == "close":
            if rnd.engine.state is not ServerState.ENROLLING:
                raise RoundBusyError(
                    f"enrolment of round {rnd.round_id} is already closed (the round is "
                    f"{rnd.phase}): nothing to close; `securefl admin aggregate` combines "
                    "the updates once they are in (`securefl admin status` counts them)")
            if isinstance(rnd.engine, ServerRound):
                missing = sorted(rnd.invited - set(rnd.engine.joined)) if rnd.exact else []
                if missing:
                    raise RoundBusyError(
                        f"round {rnd.round_id} may only combine exactly "
                        f"{', '.join(sorted(rnd.invited))} (the survivor list of a round "
                        f"that failed); still missing: {', '.join(missing)} — ask them to "
                        "connect and send", code="round-not-ready")
                joined = len(rnd.engine.joined)
                least, setting = self.fewest_to_close()
                if joined < least:
                    # Refused before the engine is asked, in words that say what to do; the
                    # round stays open for more hospitals to join.
                    raise NotEnoughSurvivorsError(
                        f"only {joined} hospital(s) joined round {rnd.round_id}; closing "
                        f"enrolment needs at least {least}, so it stays open: "
                        + too_few_next_step(least, setting))
                self._close_enrolment(rnd)
            return wm.AdminResult(rid=msg.rid, action=action, value=rnd.round_id)
        return await self._aggregate(rnd, msg.rid, peer)

    def _no_round(self, action: str) -> str:
        """Why ``action`` finds nothing to act on, and what opens a round (walking it:
        "the server refused: no round is in progress", and then nothing to go on)."""
        what = {"aggregate": "nothing to aggregate", "close": "no enrolment to close",
                "abort": "nothing to abort"}.get(action, "nothing to act on")
        sched = self.schedule
        if sched is not None and sched.open is not None:
            info = sched.open
            return (f"scheduled round {info.schedule_round} is open but its hospitals are "
                    f"still training (they join until {info.deadline}), so there is {what} "
                    "yet: the server closes enrolment and combines the updates itself "
                    "(`securefl admin schedule` shows each hospital's part)")
        if sched is None:
            opens = ("a round opens when a hospital sends its update (`securefl client "
                     "send`, or s in the hospital's app)")
        elif sched.paused:
            opens = ("the schedule is paused: `securefl admin resume` opens rounds again as "
                     "scheduled, `securefl admin open` opens one now")
        else:
            view = sched.view()
            nxt = (f"at {view.next_open}" if view.next_open else "as scheduled")
            opens = (f"the schedule opens the next round {nxt} (`securefl admin schedule` "
                     "shows it), or `securefl admin open` opens one now")
        then = {"aggregate": "; aggregate once its updates are in",
                "close": "; close its enrolment once enough hospitals have joined"}.get(
                    action, "")
        return f"no round is in progress, so there is {what}: {opens}{then}"

    def _schedule_action(self, peer: Peer, msg: wm.AdminCommand) -> wm.AdminResult:
        """``pause``, ``resume``, ``open``: the schedule's, refused in manual mode."""
        sched = self.schedule
        if sched is None:
            raise schedule.NoScheduleError(
                f"'{msg.action}' acts on the server's schedule, and this server runs rounds "
                "by hand: set [schedule] mode = \"auto\" in server.toml and restart it")
        self.audit.record("admin", name=peer.name, action=msg.action, durable=True)
        if msg.action == "pause":
            value = sched.pause()
        elif msg.action == "resume":
            value = sched.resume()
        else:
            value = sched.open_round().schedule_round
        return wm.AdminResult(rid=msg.rid, action=msg.action, value=value)

    def _publish(self, new: np.ndarray, contributors: int,
                 total: int) -> tuple[VersionInfo, StepReport]:
        """Apply the mean update through the server optimiser and store the new version.

        ``new`` (the mean update) becomes the new weights in place: no third model-sized
        array.  The optimiser's next state is written beside the store first and kept only
        once the version is stored, so a failure at any point leaves the previous version and
        its state as they were.  Runs in a worker thread (file I/O on model-sized data).
        """
        latest, weights = self.store.latest()
        report = self.optimiser.step(weights, new, latest.version)
        try:
            info = self.store.write(new, contributors=contributors, total_samples=total)
        except BaseException:
            self.optimiser.discard()
            raise
        try:
            self.optimiser.commit()
        except OSError as exc:  # the version is published; only the momentum is lost
            self.optimiser.discard()
            report = report._replace(restarted=f"the new state could not be saved ({exc})")
        return info, report

    def _unmask_progress(self, rnd: ActiveRound) -> wm.AggregateProgress | None:
        eng = rnd.engine
        if rnd.watcher is None or not isinstance(eng, ServerRound) or eng.roster is None:
            return None
        return wm.AggregateProgress(round_id=rnd.round_id, asked=len(eng.signed),
                                    answered=len(rnd.answered),
                                    needed=eng.roster.config.threshold)

    def _audit_bad_sharers(self, rnd: ActiveRound) -> None:
        """Name every hospital caught returning a share its dealer did not deal (or dealing
        shares that do not fit together), whether or not the round could still finish:
        the operator must know who to talk to, and a repeat offender shows in the log."""
        eng = rnd.engine
        for name, what in sorted(getattr(eng, "bad_sharers", {}).items()):
            log.warning("round %d: '%s' %s", rnd.round_id, name, what)
            self.audit.record("bad-shares", round_id=rnd.round_id, name=name, reason=what,
                              durable=True)

    def _report_unmask(self, rnd: ActiveRound) -> None:
        """Tell the waiting admin how many hospitals have answered the unmask step."""
        if (msg := self._unmask_progress(rnd)) is not None and rnd.watcher is not None:
            self._push(rnd.watcher, msg)

    async def _wait_step(self, rnd: ActiveRound) -> None:
        """Until every hospital still connected has answered this step, or the timeout."""
        rnd.step_done.clear()
        self._check_progress(rnd)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rnd.step_done.wait(), self.rs.step_timeout)
        if self.round is not rnd:
            raise NotEnoughSurvivorsError("the round was abandoned while unmasking")

    async def _aggregate(self, rnd: ActiveRound, rid: int,
                         admin: Peer | None) -> wm.AdminResult:
        """Survivor list, unmask, publish: for the administrator's ``aggregate``, or for the
        schedule (``admin`` None: no one to tell of the unmask step's progress)."""
        eng = rnd.engine
        if isinstance(eng, PlainRound) and eng.state is ServerState.ENROLLING:
            eng.close_enrolment()
        if eng.state is not ServerState.COLLECTING:
            if rnd.exact and (missing := self.waiting_for()):
                raise RoundBusyError(
                    f"round {rnd.round_id} may only combine exactly "
                    f"{', '.join(sorted(rnd.invited))} (the survivor list of a round that "
                    f"failed on this version); still missing: {', '.join(missing)} — ask "
                    "them to connect and send, then aggregate", code="round-not-ready")
            nxt = ("; `close` ends enrolment with the hospitals that joined (or wait for "
                   "the others)" if rnd.phase == "enrolling" else "")
            raise RoundBusyError(f"the round is {rnd.phase}; aggregate once updates are "
                                 f"being collected{nxt}", code="round-not-ready")
        try:
            if (doomed := rnd.cannot_finish()) is not None and rnd.may_all_send_again():
                # Before the list goes out: ended like a round too few could unmask, with
                # nobody bound to a list naming a hospital that may never come back.
                raise NotEnoughSurvivorsError(doomed)
            listed = eng.close_inputs()
            if isinstance(eng, ServerRound):
                assert listed is not None
                # Recorded before the list leaves: if the server stops from here on, its
                # next start binds exactly these hospitals.  A store that cannot be written
                # does not stop the round (its result is held, see ``_hold``): the binding
                # then lives in memory and in each hospital's own send record only.
                self.listed = {"round_id": rnd.round_id, "base_version": rnd.base_version,
                               "names": sorted(eng.name_of(u) for u in listed.survivors)}
                if not self._save_state({"round_id": rnd.round_id,
                                         "members": sorted(rnd.members)}):
                    log.warning("round %d: the survivor list could not be recorded in the "
                                "store; a restart before the store is writable would forget "
                                "which hospitals it binds", rnd.round_id)
                # Round 3: every survivor signs the one survivor list ...
                wire: wm._Wire = mapping.survivor_list_to_wire(listed)
                for name in rnd.submitted():
                    if rnd.members[name].open:
                        self._push(rnd.members[name], wire)
                await self._wait_step(rnd)
                # ... round 4: those that signed get the list with t+ signatures, and only
                # then reveal shares.
                requests = eng.close_check()
                for index, request in sorted(requests.items()):
                    peer = rnd.members.get(eng.name_of(index))
                    if peer is not None and peer.open:
                        self._push(peer, mapping.unmask_request_to_wire(request))
                rnd.watcher = admin
                self._report_unmask(rnd)
                await self._wait_step(rnd)
                if (last := self._unmask_progress(rnd)) is not None and admin is not None:
                    # Awaited, so the final count reaches the admin before the result.
                    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                        await admin.push(last, None)
            try:
                result = eng.finish()
            finally:
                self._audit_bad_sharers(rnd)
        except (NotEnoughSurvivorsError, CryptoError, DataError) as exc:
            # Also a sum that cannot be right (a wrong share, or a hospital whose masked
            # input is not an update): the round ends like any that could not be unmasked
            # -- hospitals told, audited, the cross-round rule applied -- instead of staying
            # "failed" and blocking joins.
            rnd.watcher = None
            again = self._abandon(rnd, exc.code, exc.message, retry=True) \
                if self.round is rnd else None
            # The admin hears the failure's own kind (an impossible sum is a cryptographic
            # check, exit 5, not "too few hospitals", exit 8: the adversary's re-check), and
            # "nothing was published" once.
            kind = type(exc)
            why = exc.message.removesuffix("; nothing was published")
            if again is not None:
                raise kind(
                    f"round {rnd.round_id} could not be unmasked ({why}); nothing was "
                    f"published.  A new round {again.round_id} has started with the "
                    f"{len(again.invited)} hospitals still online: aggregate again once they "
                    "have sent") from exc
            if self.binding is not None and self.binding["base_version"] == rnd.base_version:
                names = ", ".join(self.binding["names"])
                raise kind(
                    f"round {rnd.round_id} could not be unmasked ({why}); nothing was "
                    f"published.  {names} are on its survivor list, so to keep each one's "
                    "update hidden they send it again only into a round of exactly them: "
                    "ask all of them to connect and send, then aggregate") from exc
            raise kind(
                f"round {rnd.round_id} could not be unmasked ({why}); nothing was "
                "published and too few hospitals are online to retry: ask the hospitals to "
                "connect and send again") from exc
        if not np.any(result.mean_update):
            # Every contribution was zero (an untrained model sent by mistake): publishing
            # would make a new version number for an unchanged model and tell every
            # hospital its work is in it.
            self.audit.record("refused-publish", round_id=rnd.round_id, reason="zero update",
                              contributors=len(result.contributors), durable=True)
            rnd.watcher = None
            self._abandon(rnd, "zero-update", "the combined update of the round was all "
                          "zeros, so nothing was published")
            raise DataError(
                f"round {rnd.round_id}'s combined update is all zeros (no hospital's model "
                f"changed), so nothing was published and version {self.version} stays "
                "current: ask the hospitals to train, then send again")
        rnd.watcher = None
        held = HeldResult(rnd, result.mean_update, tuple(result.contributors),
                          result.total_weight, self.version + 1, "")
        async with self._publishing:
            try:
                info = await self._publish_held(held)
            except StorageError as exc:
                self._hold(held, exc.reason)
                raise self._deferred(held, "aggregate") from exc
            except DataError as exc:  # not a storage fault: the round cannot publish
                self._abandon(rnd, exc.code, "the server could not store the new version")
                raise
        return self._aggregate_result(rid, info, held)

    # -- publishing, and a result the store could not take ------------------------------
    async def _publish_held(self, held: HeldResult) -> VersionInfo:
        """Store ``held`` as the next version and close its round as published; raises
        ``StorageError`` with nothing changed when the store cannot take it."""
        rnd = held.rnd
        # Written first: a server stopped right after the version's rename knows at its
        # next start which round published it, and tells that round's hospitals.
        self.publishing = {"round_id": rnd.round_id, "version": held.version,
                           "members": sorted(held.contributors)}
        try:
            self._save_state({"round_id": rnd.round_id, "members": sorted(rnd.members)},
                             required=True)
            info, report = await asyncio.to_thread(self._publish, held.mean_update.copy(),
                                                   len(held.contributors), held.total)
        finally:
            if self.store.latest()[0].version < held.version:
                self.publishing = None  # not written: nothing to reconcile
        if report.restarted is not None:
            log.warning("server optimiser state restarted from zero: %s", report.restarted)
            self.audit.record("optimiser-restarted", version=info.version,
                              reason=report.restarted, durable=True)
        deferred = self.held is held
        if deferred:
            if held.timer is not None:
                held.timer.cancel()
            self.held = None
        if self.round is rnd:
            self.round = None
        self.binding = None  # a new base version: no earlier list binds anyone
        self.audit.record("aggregated", round_id=rnd.round_id, version=info.version,
                          contributors=len(held.contributors), sha256=info.sha256,
                          **({"deferred": True} if deferred else {}), durable=True)
        done = wm.RoundDone(round_id=rnd.round_id, version=info.version, sha256=info.sha256)
        for name, peer in rnd.members.items():
            if deferred or not peer.open:
                # Their round already ended on the wire (told it was pending), or they
                # are gone: told when they next say hello.
                self.published[name] = [rnd.round_id, info.version]
            else:
                self._push(peer, done)
        self.publishing = None
        self.listed = None
        self._save_state(None)
        return info

    def _hold(self, held: HeldResult, reason: str) -> None:
        """Keep a result the store refused, say so to everyone, and retry on a timer."""
        held.reason = reason
        self.held = held
        rnd = held.rnd
        if self.round is rnd:
            self.round = None
        log.error("could not store version %d (%s): round %d's result is held in memory and "
                  "published as soon as %s is writable again", held.version, reason,
                  rnd.round_id, self.store.root)
        self.audit.record("publish-deferred", round_id=rnd.round_id, version=held.version,
                          contributors=len(held.contributors), reason=reason, durable=True)
        pending = wm.RoundDone(
            round_id=rnd.round_id, version=held.version, pending=True,
            code="publish-deferred",
            message=f"the server could not store version {held.version} yet ({reason}); it "
            "holds the round's result, with this hospital's update in it, and publishes it "
            "once its storage is writable again: nothing to send again")
        for peer in rnd.members.values():
            self._push(peer, pending)
        self._arm_retry(held)

    def _arm_retry(self, held: HeldResult) -> None:
        def fire() -> None:
            task = asyncio.ensure_future(self._retry_publish())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

        held.timer = asyncio.get_running_loop().call_later(self.rs.publish_retry, fire)

    async def _retry_publish(self) -> VersionInfo | None:
        """Try the held result again; the new version, or None (still held, or nothing)."""
        async with self._publishing:
            held = self.held
            if held is None:
                return None
            try:
                return await self._publish_held(held)
            except StorageError as exc:
                held.reason = exc.reason
                if held.timer is not None:
                    held.timer.cancel()
                self._arm_retry(held)
                return None

    def _deferred(self, held: HeldResult, action: str) -> StorageError:
        """One sentence for the admin: what happened, and what to do."""
        what = {"aggregate": "",
                "abort": "it cannot be aborted, since its hospitals' updates are in it and "
                "must not go into another sum; ",
                "close": "no new round starts before it is published; "}[action]
        return StorageError(
            f"the server could not write version {held.version} to its store "
            f"{self.store.root} ({held.reason}); it holds round {held.rnd.round_id}'s result "
            f"in memory and publishes it as soon as the store is writable again (it retries "
            f"every {self.rs.publish_retry:g} s and at every admin action); {what}make the "
            "store writable, then run aggregate to publish it now -- the hospitals need not "
            "send again", reason=held.reason, code="publish-deferred")

    def _aggregate_result(self, rid: int, info: VersionInfo,
                          held: HeldResult) -> wm.AdminResult:
        return wm.AdminResult(rid=rid, action="aggregate", value=info.version,
                              sha256=info.sha256, contributors=len(held.contributors),
                              total_samples=held.total)
