"""The administrator's actions on the coordinator: queries, close, abort, aggregate.

Split from ``coordinator.py`` along its natural seam: these run on behalf of the admin
certificate, use the coordinator's round and store, and are the only place a version is
published.  A mixin, so they share the coordinator's state without another indirection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np

from securefl.crypto.secagg import ServerRound, ServerState
from securefl.errors import CryptoError, DataError, NotEnoughSurvivorsError
from securefl.fedopt import StepReport
from securefl.protocol import mapping
from securefl.protocol import messages as wm
from securefl.server import views
from securefl.server.plain import PlainRound
from securefl.server.rounds import ActiveRound, Peer, RoundBusyError
from securefl.server.store import VersionInfo

log = logging.getLogger("securefl.server")


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
    waiting_for: Any
    last_seen: dict[str, str]
    cert_expires: dict[str, str]

    # -- admin -------------------------------------------------------------------------------
    def _query(self, msg: wm.AdminQuery) -> wm.AdminQueryReply:
        reply = wm.AdminQueryReply(rid=msg.rid, what=msg.what)
        if msg.what == "hospitals":
            rnd = self.round
            rows = views.hospital_rows(
                self.settings.hospitals, self.online(), sorted(rnd.members) if rnd else [],
                rnd.submitted() if rnd else [], self.last_seen, self.cert_expires)
            return reply.model_copy(update={"hospitals": rows})
        if msg.what == "history":
            return reply.model_copy(update={"versions": views.version_rows(self.store,
                                                                           msg.limit)})
        return reply.model_copy(update={"audit": views.audit_rows(self.audit.path, msg.limit)})

    async def _admin(self, peer: Peer, msg: wm.AdminCommand) -> wm.AdminResult:
        action, rnd = msg.action, self.round
        if action in ("aggregate", "close", "abort"):  # queries are not actions
            self.audit.record("admin", name=peer.name, action=action, durable=True)
        if action == "version":
            return wm.AdminResult(rid=msg.rid, action=action, value=self.version)
        if action == "count":
            return wm.AdminResult(rid=msg.rid, action=action,
                                  value=rnd.engine.collected if rnd else 0)
        if rnd is None:
            raise RoundBusyError("no round is in progress", code="no-round")
        if action == "abort":
            self._abandon(rnd, "round-aborted", "the administrator aborted the round")
            return wm.AdminResult(rid=msg.rid, action=action, value=rnd.round_id)
        if action == "close":
            if rnd.engine.state is not ServerState.ENROLLING:
                raise RoundBusyError("enrolment is already closed")
            if isinstance(rnd.engine, ServerRound):
                missing = sorted(rnd.invited - set(rnd.engine.joined)) if rnd.exact else []
                if missing:
                    raise RoundBusyError(
                        f"round {rnd.round_id} may only combine exactly "
                        f"{', '.join(sorted(rnd.invited))} (the survivor list of a round "
                        f"that failed); still missing: {', '.join(missing)} — ask them to "
                        "connect and send", code="round-not-ready")
                self._close_enrolment(rnd)
            return wm.AdminResult(rid=msg.rid, action=action, value=rnd.round_id)
        return await self._aggregate(rnd, msg.rid, peer)

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

    async def _aggregate(self, rnd: ActiveRound, rid: int, admin: Peer) -> wm.AdminResult:
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
            raise RoundBusyError(f"the round is {rnd.phase}; aggregate once updates are "
                                 "being collected", code="round-not-ready")
        try:
            listed = eng.close_inputs()
            if isinstance(eng, ServerRound):
                assert listed is not None
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
                if (last := self._unmask_progress(rnd)) is not None:
                    # Awaited, so the final count reaches the admin before the result.
                    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                        await admin.push(last, None)
            try:
                result = eng.finish()
            finally:
                self._audit_bad_sharers(rnd)
        except (NotEnoughSurvivorsError, CryptoError, DataError) as exc:
            # Also a sum that cannot be right (a hospital returned a wrong share): the
            # round ends like any that could not be unmasked -- hospitals told, audited, the
            # cross-round rule applied -- instead of staying "failed" and blocking joins.
            rnd.watcher = None
            again = self._abandon(rnd, exc.code, exc.message, retry=True) \
                if self.round is rnd else None
            if again is not None:
                raise NotEnoughSurvivorsError(
                    f"round {rnd.round_id} could not be unmasked ({exc.message}); nothing was "
                    f"published.  A new round {again.round_id} has started with the "
                    f"{len(again.invited)} hospitals still online: aggregate again once they "
                    "have sent") from exc
            if self.binding is not None and self.binding["base_version"] == rnd.base_version:
                names = ", ".join(self.binding["names"])
                raise NotEnoughSurvivorsError(
                    f"round {rnd.round_id} could not be unmasked ({exc.message}); nothing was "
                    f"published.  {names} are on its survivor list, so to keep each one's "
                    "update hidden they send it again only into a round of exactly them: "
                    "ask all of them to connect and send, then aggregate") from exc
            raise NotEnoughSurvivorsError(
                f"round {rnd.round_id} could not be unmasked ({exc.message}); nothing was "
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
        try:
            info, report = await asyncio.to_thread(self._publish, result.mean_update,
                                                   len(result.contributors),
                                                   result.total_weight)
        except DataError as exc:
            self._abandon(rnd, exc.code, "the server could not store the new version")
            raise
        if report.restarted is not None:
            log.warning("server optimiser state restarted from zero: %s", report.restarted)
            self.audit.record("optimiser-restarted", version=info.version,
                              reason=report.restarted, durable=True)
        rnd.watcher = None
        self.round = None
        self.binding = None  # a new base version: no earlier list binds anyone
        self._save_state(None)
        self.audit.record("aggregated", round_id=rnd.round_id, version=info.version,
                          contributors=len(result.contributors), sha256=info.sha256,
                          durable=True)
        done = wm.RoundDone(round_id=rnd.round_id, version=info.version, sha256=info.sha256)
        for peer in rnd.members.values():
            self._push(peer, done)
        return wm.AdminResult(rid=rid, action="aggregate", value=info.version,
                              sha256=info.sha256, contributors=len(result.contributors),
                              total_samples=result.total_weight)
