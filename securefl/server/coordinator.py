"""The round coordinator: drives the crypto core's ``ServerRound`` from network events.

Why it is separate from the connection code: connections only turn frames into messages
and messages into frames; this class decides what a message means for the round, when
enrolment closes (every registered hospital joined / ``min_clients`` and the deadline / the
admin), when a silent hospital counts as dropped, and when a version is published.  All of it
runs on one event loop, so state changes between two ``await`` points are atomic.

Names come from the TLS certificate (``Peer.name``), never from a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securefl.config import ServerSettings
from securefl.crypto.messages import MaskedInput
from securefl.crypto.pki import Role
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ServerRound, ServerState
from securefl.errors import (
    DataError,
    RemoteProtocolError,
    SecureFLError,
    StaleVersionError,
)
from securefl.fedopt import NO_STATISTICS, STATE_NAMES, StatisticsLayout
from securefl.protocol import mapping
from securefl.protocol import messages as wm
from securefl.server import testhook, views
from securefl.server.admin import AdminActions, HeldResult
from securefl.server.audit import AuditLog
from securefl.server.audit import last_round as audit_last_round
from securefl.server.audit import last_version as audit_last_version
from securefl.server.optimiser import OptimiserState
from securefl.server.plain import PlainRound
from securefl.server.rounds import ActiveRound, Peer, RoundBusyError
from securefl.server.schedule import Scheduler
from securefl.server.store import ModelStore, StorageError, fault_reason

log = logging.getLogger("securefl.server")

class Coordinator(AdminActions):
    #: (the CRL file's mtime, its DER), set by the first ``_crl_der`` (read with getattr).
    _crl_cache: tuple[float, bytes]

    def __init__(
        self, settings: ServerSettings, store: ModelStore, audit: AuditLog,
        ca_cert: x509.Certificate, *, statistics: StatisticsLayout = NO_STATISTICS,
    ) -> None:
        self.settings, self.store, self.audit, self.ca_cert = settings, store, audit, ca_cert
        #: Applies each round's mean update (FedAvgM by default), its state beside the store.
        self.optimiser = OptimiserState(settings.server_opt, store.root, statistics)
        if STATE_NAMES[settings.server_opt.kind] and (
                why := self.optimiser.why_it_will_restart(store.latest()[0].version)):
            log.warning("the server optimiser's saved state will not be used (%s): its "
                        "momentum starts again from zero at the next round; no model version "
                        "is affected", why)
        self.rs = settings.round
        self.encoding = Encoding.auto(clip=self.rs.clip, max_clients=self.rs.max_clients,
                                      max_weight=self.rs.max_weight)
        self.peers: set[Peer] = set()
        #: The server is shutting down: connections close because of it, and no hospital
        #: is said to have left a round (walking it, Ctrl-C blamed one, with advice).
        self.stopping = False
        self.round: ActiveRound | None = None
        #: For the admin dashboard: when each hospital was last heard from, and when the
        #: certificate it connected with expires.
        self.last_seen: dict[str, str] = {}
        self.cert_expires: dict[str, str] = {}
        self._state_path = store.root / "state.json"
        state = self._load_state()
        # Round numbers never repeat (hospitals refuse a reused one as a server's trick):
        # a state file lost or restored from an older backup must not start them over.
        audited_round = audit_last_round(audit.path)
        self.next_round_id: int = max(state.get("next_round", 1), (audited_round or 0) + 1)
        if audited_round is not None and not self._state_path.exists():
            # Said, not only handled: the operator should know a file went missing.
            log.warning("%s is missing although the audit log records rounds up to %d: "
                        "round numbers continue from the audit log (next: round %d); a "
                        "round that was in flight is not resumed, and its hospitals' next "
                        "send joins a new one", self._state_path, audited_round,
                        self.next_round_id)
        abandoned = state.get("in_flight")
        #: Names to tell, when they next say hello, that a round of theirs was abandoned
        #: (by a restart, or while they were away): their ``send`` may then join a new one.
        self.resend: dict[str, int] = {k: int(v) for k, v in state.get("resend", {}).items()}
        #: After a round failed once its survivor list was out: the base version and the
        #: hospitals on the list.  They resend that update only into a round of exactly
        #: them, so until a version publishes every round on that base is theirs alone.
        self.binding: dict | None = state.get("binding")
        #: SecAgg+ only: hospitals that stopped a round on a base version by never
        #: confirming the roster or revealing their graph-seed value.  Each such stop costs
        #: every other hospital one of its max_attempts for that version, so one hostile
        #: hospital could otherwise halt the federation for good; they wait for the next.
        self.withheld: dict[str, list[str]] = state.get("withheld", {})
        #: Names to tell, when they next say hello, that a round of theirs published while
        #: they were not there to hear it: {name: [round id, version]}.
        self.published: dict[str, list[int]] = {
            k: [int(r), int(v)] for k, (r, v) in state.get("published", {}).items()}
        #: A round's result the store could not take (``AdminActions._hold``).
        self.held: HeldResult | None = None
        self._publishing = asyncio.Lock()
        #: While a version is being written: its round, number and contributors, so a
        #: server stopped right after the rename knows at its next start whose it was.
        self.publishing: dict | None = None
        #: The survivor list of the round in flight, once it went out to be signed:
        #: {round_id, base_version, names}.  Saved before the list leaves, so a server
        #: stopped after that still binds those hospitals at its next start (their sum may
        #: have been unmasked in memory: a round of a subset would expose the difference).
        self.listed: dict | None = None
        listed = state.get("listed")
        publishing = state.get("publishing")
        if self._reconcile(publishing):
            abandoned = None  # the round in flight is the one that published
        if abandoned:
            for name in abandoned["members"]:
                self.resend[name] = abandoned["round_id"]
            audit.record("round-abandoned", round_id=abandoned["round_id"],
                         reason="server restarted", members=abandoned["members"], durable=True)
            if listed and listed["round_id"] == abandoned["round_id"] \
                    and listed["base_version"] == self.store.latest()[0].version:
                self.binding = {"base_version": listed["base_version"],
                                "names": sorted(listed["names"])}
                audit.record("round-bound", round_id=listed["round_id"],
                             names=self.binding["names"], base_version=listed["base_version"],
                             durable=True)
        if abandoned or publishing:
            self._save_state(None)
        #: Auto mode (``[schedule]``): hospitals that said they will not join the open
        #: scheduled round, and when its enrolment closes (epoch seconds); set by it.
        self.excused: set[str] = set()
        self.enrolment_until: float | None = None
        self.schedule: Scheduler | None = (
            Scheduler(self, settings.schedule) if settings.schedule.mode == "auto" else None)

    def _reconcile(self, publishing: dict | None) -> bool:
        """At start, make the audit log agree with the store; True when the round in
        flight is one whose version the store holds (it is closed as published).

        Why: the server may stop between renaming a version into place and recording it.
        The store is the truth about what was published: a version the log does not
        account for gets its ``aggregated`` entry now (marked ``reconciled``), and the
        hospitals of that round hear, when they come back, that the version is out --
        never "send again" for an update that is already in a published model.
        """
        info = self.store.latest()[0]
        audited = audit_last_version(self.audit.path)
        if audited is not None:
            for version in range(audited + 1, info.version + 1):
                try:
                    v = self.store.info(version)
                except DataError:
                    continue  # a gap in the store (restored from a backup): nothing to say
                own = publishing is not None and publishing.get("version") == version
                # Without the round state naming it, the round is not known, nor whether
                # the server stopped or an older copy of the log was put back: not guessed.
                why = ("the server stopped after storing this version and before recording "
                       "it" if own else "this version is in the store but not in the audit "
                       "log (the server stopped after storing it, or the log is an older "
                       "copy put back from a backup)")
                self.audit.record(
                    "aggregated",
                    round_id=int(publishing["round_id"]) if own and publishing is not None else 0,
                    version=version, contributors=v.contributors, sha256=v.sha256,
                    reconciled=True, reason=f"{why}; recorded at the next start",
                    durable=True)
                log.warning("version %d: %s; recorded now (audit 'aggregated', reconciled)",
                            version, why)
        if publishing is None or publishing.get("version", -1) > info.version:
            return False
        # That round's version is in the store: closed as published, its hospitals told.
        round_id, version = int(publishing["round_id"]), int(publishing["version"])
        for name in publishing.get("members", ()):
            self.published[name] = [round_id, version]
            self.resend.pop(name, None)
        if self.binding is not None and self.binding["base_version"] < version:
            self.binding = None  # a new base version: no earlier list binds anyone
        return True

    def _crl_der(self) -> bytes:
        """The CA's revocation list as the server holds it (read again when it changes; a
        file that went bad since start-up is not handed out, the last good one is -- the
        same list the handshakes still use, see ``Server.context``)."""
        path = Path(self.settings.crl)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = -2.0
        if getattr(self, "_crl_cache", (None, b""))[0] != mtime:
            try:
                der = x509.load_pem_x509_crl(path.read_bytes()).public_bytes(
                    serialization.Encoding.DER)
            except (OSError, ValueError):
                if not getattr(self, "_crl_cache", (None, b""))[1]:
                    raise
                der = self._crl_cache[1]
            self._crl_cache = (mtime, der)
        return self._crl_cache[1]

    def _members(self) -> bytes | None:
        """The signed member list as the server holds it (read again when it changes; a
        file that went bad since start-up is not handed out, the last good one is)."""
        from securefl.server.tls import read_members

        if self.settings.members is None:
            return None
        try:
            mtime = Path(self.settings.members).stat().st_mtime
            if getattr(self, "_members_cache", (None, None))[0] != mtime:
                self._members_cache = (mtime, read_members(self.settings.members, self.ca_cert))
        except (OSError, SecureFLError) as exc:
            log.warning("member list not reloaded: %s", exc)
        return getattr(self, "_members_cache", (None, None))[1]

    # -- persistence of the round counter ---------------------------------------------------
    def _load_state(self) -> dict:
        """The saved round state; a damaged file stops the start-up.

        Why not start afresh: the file says which hospitals' update a round still holds or
        already published, and which survivor list binds whom; dropped silently, a restart
        would tell hospitals to send again what is already in a model."""
        path = self._state_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(self._damaged_state(f"it cannot be read: {fault_reason(exc)}"
                                                if isinstance(exc, OSError) else
                                                "it is not text")) from exc
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise DataError(self._damaged_state("it is not valid JSON")) from exc
        if not isinstance(state, dict) or not _state_is_sound(state):
            raise DataError(self._damaged_state("its contents are not a round state"))
        return state

    def _damaged_state(self, why: str) -> str:
        return (f"the server's round state {self._state_path} is damaged ({why}): restore it "
                f"from a backup, or rename it (e.g. to state.json.damaged) to start without "
                "it -- round numbers then continue from the audit log, and hospitals whose "
                "round was in flight are told nothing and may need to send again")

    def _save_state(self, in_flight: dict | None, *, durable: bool = True,
                    required: bool = False) -> bool:
        """Round counter and the round in flight.  Fsynced when a round opens or ends (round
        ids must never repeat); a member joining only needs to survive a killed process.

        On a storage fault (read-only, not permitted, full disk): ``required`` saves (a new
        round id, a version about to be published) raise ``StorageError``; the others are
        logged and skipped (False), so ending a round never fails for it -- a restart then
        at worst abandons a round that had ended anyway.
        """
        tmp = self._state_path.with_suffix(".tmp")
        try:
            testhook.fail_write("store", tmp, "open")  # test-only; see its module
            with open(tmp, "w") as f:
                f.write(json.dumps({
                    "next_round": self.next_round_id, "in_flight": in_flight,
                    "resend": self.resend, "binding": self.binding, "withheld": self.withheld,
                    "published": self.published, "publishing": self.publishing,
                    "listed": self.listed}))
                testhook.fail_write("store", tmp, "write")
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if required:
                raise StorageError(f"could not write {self._state_path} "
                                   f"({fault_reason(exc)})", reason=fault_reason(exc)) from exc
            log.warning("could not save %s (%s)", self._state_path, fault_reason(exc))
            return False
        return True

    # -- connections -----------------------------------------------------------------------
    def connected(self, peer: Peer) -> None:
        self.peers.add(peer)
        if peer.role is Role.HOSPITAL:
            self.last_seen[peer.name] = views.now_iso()
            self.cert_expires[peer.name] = views.cert_expiry(peer.cert_der)

    def disconnected(self, peer: Peer) -> None:
        peer.open = False
        self.peers.discard(peer)
        if peer.role is Role.HOSPITAL:
            self.last_seen[peer.name] = views.now_iso()
        rnd = self.round
        if rnd is None or rnd.members.get(peer.name) is not peer:
            return
        self.audit.record("member-left", round_id=rnd.round_id, name=peer.name,
                          phase=rnd.phase)
        if rnd.engine.state is ServerState.ENROLLING:
            self._withdraw(rnd, peer.name)
        elif not self.stopping and (doomed := rnd.cannot_finish()) is not None \
                and not rnd.doomed:
            # Said the moment it happens: `admin status` still looks like a round collecting.
            rnd.doomed = True
            self.audit.record("round-doomed", round_id=rnd.round_id, reason=doomed,
                              resend=rnd.may_all_send_again(), durable=True)
        self._check_progress(rnd)

    def _withdraw(self, rnd: ActiveRound, name: str) -> None:
        """A member that left while the round enrols is out of it, and may join it again
        (an interrupted ``send`` must not lock a hospital out of the round)."""
        if isinstance(rnd.engine, PlainRound) and name in rnd.engine.submitted_names():
            return  # the benchmark's unmasked round already holds its input: it stays
        rnd.members.pop(name).conversation.leave()
        if isinstance(rnd.engine, ServerRound):
            rnd.engine.withdraw(name)
        self._save_state({"round_id": rnd.round_id, "members": sorted(rnd.members)},
                         durable=False)

    def online(self) -> list[str]:
        return sorted({p.name for p in self.peers if p.role is Role.HOSPITAL})

    def in_round(self, name: str) -> bool:
        """Whether ``name`` is a member of the live round (and so may wait in silence)."""
        return self.round is not None and name in self.round.members

    @property
    def version(self) -> int:
        return self.store.latest()[0].version

    # -- dispatch --------------------------------------------------------------------------
    def admit(self, peer: Peer, msg: wm.Message) -> None:
        """The connection's wire order (``securefl.protocol.conversation``) decides whether
        ``msg`` may come now, before anything acts on it; refusals carry their error code."""
        try:
            peer.conversation.receive(msg)
        except RemoteProtocolError as exc:
            if exc.code == "not-joined" and isinstance(msg, wm.Advertise):
                self._member_round(peer, msg.round_id)  # enrolment-closed when it is that
            if exc.code == "forbidden" and isinstance(msg, wm.AdminCommand):
                self.audit.record("refused", name=peer.name, action=msg.action,
                                  reason="admin action without the admin role")
            raise

    async def handle(
        self, peer: Peer, msg: wm.Message, array: np.ndarray | None
    ) -> tuple[wm._Wire, np.ndarray | None]:
        """One request (already admitted) -> its reply (or a ``SecureFLError`` the
        connection turns into one)."""
        if peer.role is Role.HOSPITAL:
            self.last_seen[peer.name] = views.now_iso()
        handler = _HANDLERS.get(msg.kind)
        if handler is None:  # upload_slot is the connection's (app.Server._grant)
            raise RemoteProtocolError(f"'{msg.kind}' is not a request", code="bad-message")
        return await handler(self, peer, msg, array)

    async def _on_hello(self, peer: Peer, msg: wm.Hello,
                        array: None) -> tuple[wm._Wire, None]:
        if msg.protocol != wm.PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"this server speaks protocol {wm.PROTOCOL_VERSION}, not {msg.protocol}",
                code="unsupported-protocol")
        resend = self.resend.pop(peer.name, None)
        published = self.published.pop(peer.name, None)
        if resend is not None or published is not None:
            rnd = self.round
            self._save_state({"round_id": rnd.round_id, "members": sorted(rnd.members)}
                             if rnd is not None else None, durable=False)
        return wm.Welcome(rid=msg.rid, name=peer.name, role=peer.role.value,
                          version=self.version, resend_round=resend,
                          published_round=published[0] if published else None,
                          published_version=published[1] if published else None,
                          crl=self._crl_der(), members=self._members(),
                          schedule=self.schedule.welcome() if self.schedule else None), None

    def after_welcome(self, peer: Peer) -> None:
        """Called once the welcome is out: a scheduled round open now is announced."""
        if self.schedule is not None:
            self.schedule.after_welcome(peer)

    async def _on_keepalive(self, peer: Peer, msg: wm.Keepalive,
                            array: None) -> tuple[wm._Wire, None]:
        rnd = self.round
        return wm.Ack(rid=msg.rid, collected=rnd.engine.collected if rnd else 0), None

    async def _on_training_failed(self, peer: Peer, msg: wm.TrainingFailed,
                                  array: None) -> tuple[wm._Wire, None]:
        # Rounds by hand: no scheduled round exists for it to be about, so nothing is
        # recorded (a hospital sending these in a loop grew the audit log and the console
        # by a line each; found by the adversary review).
        if self.schedule is not None:
            self.schedule.training_failed(peer, msg)
        return wm.Ack(rid=msg.rid), None

    async def _on_status(self, peer: Peer, msg: wm.Status,
                         array: None) -> tuple[wm._Wire, None]:
        return self._status(msg.rid), None

    async def _on_get_global(self, peer: Peer, msg: wm.GetGlobal,
                             array: None) -> tuple[wm._Wire, np.ndarray]:
        info, weights = self.store.latest()
        if self.schedule is not None and peer.role is Role.HOSPITAL:
            self.schedule.got_global(peer.name)
        return wm.GlobalModel(
            rid=msg.rid, version=info.version, sha256=info.sha256,
            contributors=info.contributors, total_samples=info.total_samples,
            created=info.created, classes=list(info.classes),
            array=wm.ArraySpec.of(weights),
        ), weights

    async def _on_admin(self, peer: Peer, msg: wm.AdminCommand,
                        array: None) -> tuple[wm._Wire, None]:
        return await self._admin(peer, msg), None

    async def _on_admin_query(self, peer: Peer, msg: wm.AdminQuery,
                              array: None) -> tuple[wm._Wire, None]:
        return self._query(msg), None

    async def _on_join(self, peer: Peer, msg: wm.Join, array: None) -> tuple[wm._Wire, None]:
        return self._join(peer, msg), None

    async def _on_advertise(self, peer: Peer, msg: wm.Advertise,
                            array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        adv = mapping.advertisement_from_wire(
            msg, name=peer.name, base_version=rnd.base_version, cert_der=peer.cert_der)
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(adv, from_name=peer.name)
        self.audit.record("join", round_id=rnd.round_id, name=peer.name)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    async def _on_ack_roster(self, peer: Peer, msg: wm.AckRoster,
                             array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        ack = mapping.roster_ack_from_wire(msg, sender=rnd.index_of(peer.name))
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(ack, from_name=peer.name)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    async def _on_reveal_seed(self, peer: Peer, msg: wm.RevealSeed,
                              array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        rev = mapping.seed_reveal_from_wire(msg, sender=rnd.index_of(peer.name))
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(rev, from_name=peer.name)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    async def _on_share_keys(self, peer: Peer, msg: wm.ShareKeysMsg,
                             array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        sk = mapping.share_keys_from_wire(msg, sender=rnd.index_of(peer.name))
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(sk, from_name=peer.name)
        rnd.shared.add(peer.name)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    async def _on_masked_input(self, peer: Peer, msg: wm.MaskedInputMsg,
                               array: np.ndarray | None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        assert array is not None
        sender = rnd.index_of(peer.name) if isinstance(rnd.engine, ServerRound) else 0
        rnd.engine.receive(MaskedInput(msg.round_id, sender, array), from_name=peer.name)
        self.audit.record("submission", round_id=rnd.round_id, name=peer.name,
                          collected=rnd.engine.collected)
        if self.schedule is not None:
            self.schedule.poke()
        return self._ack(msg, rnd), None

    async def _on_sign_survivors(self, peer: Peer, msg: wm.SignSurvivors,
                                 array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        sig = mapping.signature_from_wire(msg, sender=rnd.index_of(peer.name))
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(sig, from_name=peer.name)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    async def _on_unmask_response(self, peer: Peer, msg: wm.UnmaskResponseMsg,
                                  array: None) -> tuple[wm._Wire, None]:
        rnd = self._member_round(peer, msg.round_id)
        resp = mapping.unmask_response_from_wire(msg, sender=rnd.index_of(peer.name))
        assert isinstance(rnd.engine, ServerRound)  # plain rounds: admit() refused this
        rnd.engine.receive(resp, from_name=peer.name)
        rnd.answered.add(peer.name)
        self._report_unmask(rnd)
        self._check_progress(rnd)
        return self._ack(msg, rnd), None

    @staticmethod
    def _ack(msg: wm._Wire, rnd: ActiveRound) -> wm.Ack:
        return wm.Ack(rid=msg.rid, collected=rnd.engine.collected)

    def waiting_for(self) -> list[str]:
        """Hospitals a round bound to a signed survivor list still needs (else [])."""
        rnd, b = self.round, self.binding
        if b is None or b["base_version"] != self.version:
            return []
        joined = set(rnd.members) if rnd is not None else set()
        return sorted(set(b["names"]) - joined)

    def fewest_to_close(self) -> tuple[int, str]:
        """The fewest joined hospitals a round's enrolment closes with -- by itself, by the
        schedule, or by the administrator's ``close`` -- and the server.toml setting that
        sets the figure (``[round] colluders`` when its c + 2 is the larger).

        One figure for every place that decides or tells it: the admin app once offered to
        close with 1 of the 3 a round needed and only said so after the confirmation."""
        rs = self.rs
        if rs.colluders + 2 > rs.min_clients:
            return rs.colluders + 2, "[round] colluders"
        return rs.min_clients, "[round] min_clients"

    def _status(self, rid: int) -> wm.StatusReply:
        rnd = self.round
        if rnd is None and self.held is not None:
            # Complete, its version waiting for the store: "publish-pending" until written.
            h = self.held
            return wm.StatusReply(
                rid=rid, version=self.version, round_id=h.rnd.round_id,
                phase="publish-pending", online=self.online(), joined=sorted(h.rnd.members),
                submitted=list(h.contributors), collected=len(h.contributors))
        least, setting = self.fewest_to_close()
        return wm.StatusReply(
            waiting_for=self.waiting_for(),
            rid=rid, version=self.version, round_id=rnd.round_id if rnd else 0,
            phase=rnd.phase if rnd else "idle", online=self.online(),
            joined=sorted(rnd.members) if rnd else [],
            submitted=sorted(rnd.submitted()) if rnd else [],
            collected=rnd.engine.collected if rnd else 0,
            min_joined=least, min_joined_by=setting,
        )

    def check_upload(self, peer: Peer, msg: wm.UploadSlot) -> None:
        """Refuse an upload-slot request that could not be followed by a valid masked input,
        so no slot is ever held for one (the connection grants the slot itself).  This
        connection's own order (envelopes first, nothing sent yet) was checked on arrival;
        this is the round's: still this connection's, and collecting."""
        rnd = self._member_round(peer, msg.round_id)
        accepting = (ServerState.COLLECTING,) if isinstance(rnd.engine, ServerRound) else (
            ServerState.ENROLLING, ServerState.COLLECTING)
        if rnd.engine.state not in accepting:
            raise RemoteProtocolError(f"round {rnd.round_id} is not collecting updates "
                                      f"({rnd.phase})", code="wrong-phase")

    def _member_round(self, peer: Peer, round_id: int) -> ActiveRound:
        rnd = self.round
        if rnd is not None and round_id == rnd.round_id and rnd.late.get(peer.name) is peer:
            # The join race: its `joined` crossed the closing of enrolment (issue 14).
            raise RemoteProtocolError(
                f"round {rnd.round_id} closed its enrolment before this hospital's keys "
                "arrived, so nothing of its update was used; it can join the next round: "
                "send again once this one has ended", code="enrolment-closed")
        if rnd is None or rnd.members.get(peer.name) is not peer:
            raise RemoteProtocolError("this connection has not joined the current round",
                                      code="not-joined")
        if round_id != rnd.round_id:
            raise RemoteProtocolError(f"message for round {round_id}; the round is "
                                      f"{rnd.round_id}", code="wrong-round")
        return rnd

    # -- joining -----------------------------------------------------------------------------
    def _join(self, peer: Peer, msg: wm.Join) -> wm.Joined:
        if msg.base_version > self.version:
            # Only a server whose store went back (an older backup restored) sees this:
            # "download and retrain" cannot help, since hospitals never go back.
            self.audit.record(
                "refused", name=peer.name, base_version=msg.base_version, version=self.version,
                reason=f"it already holds version {msg.base_version}, newer than this "
                f"server's newest version {self.version}: the model store has gone back (an "
                "older backup restored?); restore the newest backup, one that holds every "
                "published version")
            raise StaleVersionError(
                f"this hospital already holds global version {msg.base_version}, but this "
                f"server's newest version is {self.version}: its model store has gone back "
                "(restored from an older backup?), so nothing was sent; tell the federation "
                "operator")
        if msg.base_version != self.version:
            self.audit.record("refused", name=peer.name, reason="stale base version",
                              base_version=msg.base_version, version=self.version)
            raise StaleVersionError(
                f"your update was trained on global version {msg.base_version}, the current "
                f"version is {self.version}: download it, retrain and send again")
        if peer.name in self.withheld.get(str(self.version), ()):
            raise RoundBusyError(
                f"this hospital stopped a round on version {self.version} by not answering "
                "its roster step (a SecAgg+ graph needs every hospital's value), so it takes "
                "part again from the next version: get that version once it is published, "
                "then train and send")
        if not self.audit.writable:  # also into a round already open (e.g. a retry)
            raise RoundBusyError(
                f"the server cannot write its audit log ({self.audit.fault}), so it takes "
                "no hospital into a round until the operator makes it writable: send again "
                "later", code="audit-unwritable")
        if self.held is not None:
            h = self.held
            raise RoundBusyError(
                f"round {h.rnd.round_id} is complete and its version {h.version} waits for "
                "the server's store to be writable again (the operator is told); join once "
                f"version {h.version} is published", code="publish-deferred")
        if self.schedule is not None:
            self.schedule.check_join(peer.name)
        rnd = self.round
        opened = rnd is None
        if rnd is None:
            rnd = self._open_round()
        elif rnd.engine.state is not ServerState.ENROLLING:
            raise RoundBusyError(f"round {rnd.round_id} is past enrolment; send again after "
                                 "it publishes")
        if rnd.exact and peer.name not in rnd.invited:
            raise RoundBusyError(
                f"round {rnd.round_id} may combine only {', '.join(sorted(rnd.invited))}, "
                "the hospitals on the survivor list of a failed round on this version: send "
                "again after it publishes")
        if peer.name in rnd.members:
            earlier = rnd.members[peer.name]
            if earlier is peer:
                raise RemoteProtocolError(f"'{peer.name}' already joined round {rnd.round_id}",
                                          code="already-joined")
            # The same hospital on a new connection (its earlier one was interrupted and
            # not yet seen closed): nothing of the round used its keys yet, so the new
            # connection takes its place.
            self.audit.record("member-replaced", round_id=rnd.round_id, name=peer.name)
            earlier.open = False
            self._withdraw(rnd, peer.name)
        rnd.members[peer.name] = peer
        self._save_state({"round_id": rnd.round_id, "members": sorted(rnd.members)},
                         durable=opened)
        if isinstance(rnd.engine, PlainRound):
            self.audit.record("join", round_id=rnd.round_id, name=peer.name)
        e = self.encoding
        return wm.Joined(
            rid=msg.rid, round_id=rnd.round_id, base_version=rnd.base_version,
            vector_len=rnd.engine.vector_len, masking=self.rs.masking,
            ring_bits=e.ring_bits, clip=e.clip, scale=e.scale, max_clients=e.max_clients,
            max_weight=e.max_weight,
        )

    def _open_round(self) -> ActiveRound:
        """A new round; refused (nothing changed) when the audit log or the store cannot be
        written: a round nobody could account for, or whose id could repeat after a
        restart, must not start."""
        if not self.audit.writable:
            raise RoundBusyError(
                f"the server cannot write its audit log ({self.audit.fault}), so it opens no "
                "round until the operator makes it writable: send again later",
                code="audit-unwritable")
        info, weights = self.store.latest()
        round_id = self.next_round_id
        self.next_round_id += 1
        try:
            self._save_state(None, required=True)  # the id is spent before anyone hears it
        except StorageError as exc:
            self.next_round_id -= 1
            raise StorageError(
                f"the server cannot write its store ({exc.reason}), so it opens no round "
                "until the operator makes it writable: send again later",
                reason=exc.reason) from exc
        engine: ServerRound | PlainRound
        if self.rs.masking == "plain":
            engine = PlainRound(round_id=round_id, vector_len=int(weights.shape[0]),
                                encoding=self.encoding, min_contributors=self.rs.min_clients)
        else:
            engine = ServerRound(
                round_id=round_id, base_version=info.version, vector_len=int(weights.shape[0]),
                base_sha256=bytes.fromhex(info.sha256),
                encoding=self.encoding, ca_cert=self.ca_cert, sparse=self.rs.sparse,
                corrupt_fraction=self.rs.corrupt_fraction,
                dropout_fraction=self.rs.dropout_fraction,
                min_contributors=2, colluders=self.rs.colluders,
            )
        rnd = ActiveRound(round_id, info.version, engine)
        if self.binding is not None and self.binding["base_version"] == info.version:
            rnd.invited, rnd.exact = frozenset(self.binding["names"]), True
        self.round = rnd
        self.audit.record("round-open", round_id=round_id, base_version=info.version)
        loop = asyncio.get_running_loop()
        delay = self.rs.enrolment_timeout
        if self.enrolment_until is not None and self.enrolment_until > time.time():
            delay = self.enrolment_until - time.time()  # a scheduled round's deadline
        rnd.timer = loop.call_later(delay, self._enrolment_deadline, rnd)
        return rnd

    def _enrolment_deadline(self, rnd: ActiveRound) -> None:
        rnd.deadline_passed = True
        self._check_progress(rnd)

    # -- progress ----------------------------------------------------------------------------
    def _check_progress(self, rnd: ActiveRound) -> None:
        """Advance the round when its current step has all it will get."""
        if self.round is not rnd:
            return
        eng = rnd.engine
        try:
            if eng.state is ServerState.ENROLLING and isinstance(eng, ServerRound):
                joined = set(eng.joined)
                expected = (rnd.invited or set(self.settings.hospitals)) - set(
                    self.withheld.get(str(rnd.base_version), ())) - self.excused
                least = self.fewest_to_close()[0]
                everyone = bool(expected) and expected <= joined and (
                    self.schedule is None or len(joined) >= least)
                # A round bound to a signed list waits for all of it: a subset would be
                # refused by every hospital on the list.
                enough = len(joined) >= least and rnd.deadline_passed and not rnd.exact
                if everyone or enough:
                    self._close_enrolment(rnd)
            elif eng.state in (ServerState.CONFIRMING, ServerState.REVEALING) and isinstance(
                    eng, ServerRound):
                have = eng.acked if eng.state is ServerState.CONFIRMING else eng.revealed
                # Gone before revealing: its value will never come.
                gone = [n for n in eng.joined if not rnd.members[n].open
                        and rnd.index_of(n) not in eng.revealed]
                if len(have) == len(eng.joined) or gone:
                    # Complete, or someone left who never will answer: no need to wait for
                    # the deadline to know the graph cannot be drawn without it.
                    self._all_or_nothing_deadline(rnd, deadline=False)
            elif eng.state is ServerState.SHARING:
                waiting = [n for n in eng.joined if n not in rnd.shared and rnd.members[n].open]
                if not waiting:
                    self._close_shares(rnd)
            elif eng.state is ServerState.CHECKING and isinstance(eng, ServerRound):
                waiting = [n for n in rnd.submitted() if rnd.members[n].open
                           and rnd.index_of(n) not in eng.signed]
                if not waiting:
                    rnd.step_done.set()
            elif eng.state is ServerState.UNMASKING:
                asked = rnd.submitted() if isinstance(eng, PlainRound) else sorted(
                    eng.name_of(i) for i in eng.signed)
                waiting = [n for n in asked if n not in rnd.answered and rnd.members[n].open]
                if not waiting:
                    rnd.step_done.set()
        except SecureFLError as exc:
            self._abandon(rnd, exc.code, exc.message)

    def _restart_timer(self, rnd: ActiveRound, fire: Callable[[], None]) -> None:
        if rnd.timer:
            rnd.timer.cancel()
        rnd.timer = asyncio.get_running_loop().call_later(self.rs.step_timeout, fire)

    def _close_enrolment(self, rnd: ActiveRound) -> None:
        assert isinstance(rnd.engine, ServerRound)
        roster = rnd.engine.close_enrolment()
        for name in [n for n in rnd.members if n not in rnd.engine.joined]:
            # Joined but its keys had not arrived: not in this round.  Its advertise, when
            # it comes, is answered ``enrolment-closed`` (the join race, issue 14).
            rnd.late[name] = rnd.members.pop(name)
            rnd.late[name].conversation.leave()
        self.audit.record("enrolment-closed", round_id=rnd.round_id,
                          members=list(rnd.engine.joined), left_out=sorted(rnd.late))
        wire = mapping.roster_to_wire(roster)
        for peer in rnd.members.values():
            self._push(peer, wire)
        self._restart_timer(rnd, lambda: self._all_or_nothing_deadline(rnd))

    def _all_or_nothing_deadline(self, rnd: ActiveRound, *, deadline: bool = True) -> None:
        """A hospital that never confirmed the roster or revealed its seed value stops the
        round (the graph needs every value); the others are invited to a fresh one.
        Also called as soon as the step is complete, or a member left."""
        eng = rnd.engine
        if self.round is not rnd or eng.state not in (ServerState.CONFIRMING,
                                                      ServerState.REVEALING):
            return
        assert isinstance(eng, ServerRound)
        have = eng.acked if eng.state is ServerState.CONFIRMING else eng.revealed
        # At the deadline every member that has not answered is silent; before it (a member
        # left), only those gone without answering are: the others may still be checking.
        silent = frozenset(n for n in eng.joined if rnd.index_of(n) not in have
                           and (deadline or not rnd.members[n].open))
        try:
            if eng.state is ServerState.CONFIRMING:
                self._close_acks(rnd)
            else:
                self._close_reveals(rnd)
        except SecureFLError as exc:
            roster = eng.roster
            if silent and roster is not None and roster.config.neighbours < len(
                    roster.participants) - 1:
                names = sorted(set(self.withheld.get(str(rnd.base_version), [])) | silent)
                self.withheld = {str(rnd.base_version): names}  # older versions are over
                self.audit.record("withheld", round_id=rnd.round_id, names=sorted(silent),
                                  base_version=rnd.base_version, durable=True)
            self._abandon(rnd, exc.code, exc.message, retry=True, silent=silent)

    def _close_acks(self, rnd: ActiveRound) -> None:
        assert isinstance(rnd.engine, ServerRound)
        wire = mapping.roster_acks_to_wire(rnd.engine.close_acks())
        for peer in rnd.members.values():
            self._push(peer, wire)
        self._restart_timer(rnd, lambda: self._all_or_nothing_deadline(rnd))

    def _close_reveals(self, rnd: ActiveRound) -> None:
        assert isinstance(rnd.engine, ServerRound)
        wire = mapping.seed_reveals_to_wire(rnd.engine.close_reveals())
        assert rnd.engine.roster is not None  # made when enrolment closed, before the reveals
        self.audit.record("graph-drawn", round_id=rnd.round_id,
                          neighbours=rnd.engine.roster.config.neighbours)
        for peer in rnd.members.values():
            self._push(peer, wire)
        self._restart_timer(rnd, lambda: self._sharing_deadline(rnd))

    def _sharing_deadline(self, rnd: ActiveRound) -> None:
        if self.round is rnd and rnd.engine.state is ServerState.SHARING:
            try:
                self._close_shares(rnd)
            except SecureFLError as exc:
                self._abandon(rnd, exc.code, exc.message)

    def _close_shares(self, rnd: ActiveRound) -> None:
        assert isinstance(rnd.engine, ServerRound)
        if rnd.timer:
            rnd.timer.cancel()
        bundles = rnd.engine.close_shares()
        for index, bundle in bundles.items():
            peer = rnd.members.get(rnd.engine.name_of(index))
            if peer is not None:
                self._push(peer, mapping.bundle_to_wire(bundle))

    def _push(self, peer: Peer, msg: wm._Wire, array: np.ndarray | None = None) -> None:
        """Send without waiting: a slow hospital must not stall the round for the others."""
        if peer.open:
            task = asyncio.ensure_future(peer.push(msg, array))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _abandon(self, rnd: ActiveRound, code: str, message: str, *,
                 retry: bool = False, silent: frozenset[str] = frozenset()
                 ) -> ActiveRound | None:
        """Give the round up; every member is told to send again.

        With ``retry`` (the round could not be unmasked), a fresh round opens at once for
        the members still online, and they are told to rejoin it with the same update: a
        federation never halts on dropouts, but retries are bounded and audited.
        """
        if rnd.timer:
            rnd.timer.cancel()
        rnd.engine.fail()
        rnd.step_done.set()
        self.round = None
        self.listed = None  # the binding below takes over from it
        self._save_state(None)
        self.audit.record("round-failed" if retry else "round-abandoned",
                          round_id=rnd.round_id, reason=code, durable=True)
        # ``silent``: connected but unanswering members; a retry waiting for them would
        # only wait again.
        online = frozenset(n for n, p in rnd.members.items() if p.open) - silent
        eng = rnd.engine
        if isinstance(eng, ServerRound) and eng.listed is not None:
            # The list went out: its hospitals now resend only into a round of exactly them.
            bound = frozenset(eng.name_of(u) for u in eng.listed)
            self.binding = {"base_version": rnd.base_version, "names": sorted(bound)}
            self._save_state(None)
            self.audit.record("round-bound", round_id=rnd.round_id, names=sorted(bound),
                              base_version=rnd.base_version, durable=True)
            invite, exact = (bound, True) if bound <= online else (None, True)
        else:
            invite, exact = online, rnd.exact
        again: ActiveRound | None = None
        # As many as enrolment needs (``_check_progress``): with fewer, the retry was
        # abandoned the moment it opened, after the admin was told to aggregate it.
        least = self.fewest_to_close()[0]
        if (retry and invite is not None and rnd.attempt < self.rs.max_retries
                and len(invite) >= least):
            try:
                again = self._open_round()
            except SecureFLError as exc:  # storage or audit fault: no retry, said why
                message += f"; no new round was opened ({exc.message})"
            else:
                again.invited, again.exact, again.attempt = invite, exact, rnd.attempt + 1
                self.audit.record("round-retry", round_id=again.round_id,
                                  failed_round=rnd.round_id, attempt=again.attempt,
                                  invited=sorted(invite or ()), durable=True)
        if self.binding is not None and self.binding["base_version"] == rnd.base_version \
                and again is None:
            message += (f"; the next round on this version may combine only "
                        f"{', '.join(self.binding['names'])}: run send again once all of "
                        "them are connected")
        done = wm.RoundDone(round_id=rnd.round_id, version=self.version, resend=True,
                            retry_round=again.round_id if again else 0, code=code,
                            message=message)
        for name, peer in rnd.members.items():
            if peer.open:
                self._push(peer, done)
            else:  # gone before it heard: told when it next connects
                self.resend[name] = rnd.round_id
        if any(not p.open for p in rnd.members.values()):
            self._save_state(None)
        return again


#: The coordinator's requests by kind (``upload_slot`` is granted by the connection).
_HANDLERS: dict[str, Callable[..., Awaitable[tuple[wm._Wire, np.ndarray | None]]]] = {
    "hello": Coordinator._on_hello,
    "status": Coordinator._on_status,
    "get_global": Coordinator._on_get_global,
    "admin": Coordinator._on_admin,
    "admin_query": Coordinator._on_admin_query,
    "keepalive": Coordinator._on_keepalive,
    "training_failed": Coordinator._on_training_failed,
    "join": Coordinator._on_join,
    "advertise": Coordinator._on_advertise,
    "ack_roster": Coordinator._on_ack_roster,
    "reveal_seed": Coordinator._on_reveal_seed,
    "share_keys": Coordinator._on_share_keys,
    "masked_input": Coordinator._on_masked_input,
    "sign_survivors": Coordinator._on_sign_survivors,
    "unmask_response": Coordinator._on_unmask_response,
}


def _state_is_sound(state: dict) -> bool:
    """The saved state has the shapes ``Coordinator.__init__`` reads (written by
    ``_save_state``; anything else is damage or a foreign file)."""
    nxt = state.get("next_round", 1)
    if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 1:
        return False
    for key in ("resend", "withheld", "published"):
        if not isinstance(state.get(key, {}), dict):
            return False
    for key in ("in_flight", "binding", "publishing", "listed"):
        if not isinstance(state.get(key), dict | None):
            return False
    try:
        {k: int(v) for k, v in state.get("resend", {}).items()}
        {k: [int(r), int(v)] for k, (r, v) in state.get("published", {}).items()}
    except (TypeError, ValueError):
        return False
    return True
