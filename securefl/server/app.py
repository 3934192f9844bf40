"""The asyncio TLS server: accept, authenticate, pump frames, enforce deadlines and limits.

Why sockets are accepted by hand and TLS started on each (``connect_accepted_socket``): with
``start_server(ssl=...)`` a rejected client certificate calls no handler, so nothing could be
logged; here every refused handshake reaches the audit log with its reason.  (``start_tls``
on an accepted stream was measured to lose a ClientHello that arrived before the upgrade.)
Each connection runs in its own task and is closed in ``finally``; whatever one peer sends,
the worst it gets is its own connection closed with a typed error.  The coordinator never
sees bytes, and the peer never sees an exception's text (``SecureFLError`` messages are
ours; anything else becomes "internal").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from cryptography import x509

from securefl.config import ServerSettings
from securefl.crypto import pki
from securefl.errors import (
    ConfigError,
    CryptoError,
    DataError,
    LocalProtocolError,
    RemoteProtocolError,
    SecureFLError,
)
from securefl.fsutil import acquire, release
from securefl.protocol import frames
from securefl.protocol import messages as wm
from securefl.protocol.conversation import Conversation, Side
from securefl.server import console
from securefl.server.admission import Admission, RefusalSummary, Ticket, source_of
from securefl.server.audit import AuditLog, clip
from securefl.server.audit import last_version as audit_last_version
from securefl.server.coordinator import Coordinator
from securefl.server.initial import (
    check_spec,
    initial_model,
    model_layout,
    save_layers,
    save_spec,
)
from securefl.server.rounds import Peer
from securefl.server.store import ModelStore
from securefl.server.tls import (
    check_expiry,
    limit_tls_buffers,
    read_members,
    revoked_serials,
    server_context,
)

log = logging.getLogger("securefl.server")

#: Small per-connection read buffers: a StreamReader holds up to twice this before it
#: pauses the socket, and that is paid once per connection (payloads go straight into
#: their preallocated buffer, so a bigger chunk buys little).
READ_CHUNK = 1 << 16
#: Payloads above this size wait for the one slot, so memory stays O(model), not
#: O(hospitals x model): the others wait in their kernel socket buffers.
BIG_PAYLOAD = 1 << 20
BIG_SLOTS = 1
SEND_SLICE = 1 << 16
#: What one TLS connection buffers on the way in (see ``limit_tls_buffers``).
TLS_READ_BUFFER = 1 << 15
#: Free heap memory is handed back to the system at most this often, and only if a
#: connection closed since the last time (see ``trim_heap``).
TRIM_INTERVAL = 2.0


class _Slot:
    """One connection's hold on the upload slot (``Server._big_in``)."""

    __slots__ = ("admitted", "deadline", "granted", "spent")

    def __init__(self) -> None:
        self.granted = False   # holds the semaphore
        self.admitted = False  # a big frame is being read under it
        self.deadline = 0.0    # a granted slot unused by then is taken back (with the link)
        self.spent = False     # the frame just handled was the masked input

    def release(self, sem: asyncio.Semaphore) -> None:
        if self.granted:
            sem.release()
        self.granted = self.admitted = self.spent = False


def _release(keys: list[Path]) -> None:
    for key in keys:
        release(key)


def _lock_store_and_audit(settings: ServerSettings) -> list[Path]:
    """Hold the model store and the audit log for this server alone.

    Why: a second server started on a copy of server.toml (another port, the same store_dir)
    wrote its own version 4 over the first one's, and the two interleaved the audit log's
    hash chain (found walking it).  Taken before anything is read or written (a starting
    server records abandoned rounds and reconciles the store), each is locked
    (``.server.lock`` in the store, ``.lock`` beside the audit log) for as long as this
    server runs; the kernel drops the locks however it ends, so a crashed server never
    locks out its restart."""
    store = Path(settings.store_dir)
    audit = Path(settings.audit_log)
    if audit.is_dir():
        raise ConfigError(f"audit_log {audit} is a folder: give the path of the audit log "
                          f"file in server.toml, e.g. {audit / 'audit.jsonl'}")
    if store.exists() and not store.is_dir():
        raise ConfigError(f"store_dir {store} is a file, not a folder: give the folder that "
                          "holds (or will hold) the model versions in server.toml")
    held: list[Path] = []
    for what, folder, lock in (
            ("model store", store, store / ".server.lock"),
            ("audit log", audit, audit.with_name(audit.name + ".lock"))):
        try:
            held.append(acquire(lock))
        except BlockingIOError:
            _release(held)
            raise ConfigError(
                f"another securefl server is already using the {what} {folder} (it holds "
                f"{lock}): stop that server first, or give this one its own store_dir and "
                "audit_log in its server.toml") from None
        except OSError as exc:
            _release(held)
            raise ConfigError(f"cannot use the {what} {folder} ({exc.strerror}): give a "
                              "folder this server may write to in its server.toml") from None
    return held


def _check_store_is_not_behind(store: ModelStore, audit_log: Path) -> None:
    """Refuse to start from a store whose newest version is older than the audit log says
    was published.

    Why: with its newest version file deleted, the server started one version back and said
    only "at version 1"; hospitals holding version 2 then refused its model (they never go
    back) and were told to download it.  An empty store is a new federation (QUICKSTART,
    "Changing the model") and starts at version 0 whatever the old log says."""
    if store.empty:
        return
    audited = audit_last_version(audit_log)
    newest = store.latest()[0].version
    if audited is not None and audited > newest:
        missing = ", ".join(f"v{v:08d}.sflm" for v in range(newest + 1, audited + 1)[:3])
        raise DataError(
            f"the audit log {audit_log} records version {audited} as published, but the "
            f"model store {store.root} holds versions only up to {newest} ({missing} missing): "
            "restore the missing version file(s) from a backup and start again (hospitals "
            "that downloaded them never go back to an older version)")


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        # The certificate files first: a wrong path must not leave a new store behind.
        from securefl.certs import check_tls_files

        check_tls_files(settings.cert, settings.key, settings.ca)
        self._locks = _lock_store_and_audit(settings)
        try:
            self._open(settings)
        except BaseException:
            self._unlock()  # a refused start leaves nothing held (a retry in this process)
            raise

    def _unlock(self) -> None:
        _release(self._locks)
        self._locks = []

    def _open(self, settings: ServerSettings) -> None:
        self.store = ModelStore(settings.store_dir, settings.model.classes)
        _check_store_is_not_behind(self.store, Path(settings.audit_log))
        if self.store.empty:
            weights, layers = initial_model(settings.model)
            if layers is not None:
                save_layers(self.store.root, layers)
            save_spec(self.store.root, settings.model)
            self.store.write(weights, contributors=0, total_samples=0)
        check_spec(self.store.root, settings.model)
        self.audit = AuditLog(settings.audit_log)
        self.audit.listener = console.on_audit
        self.ca_cert = pki.load_cert_file(Path(settings.ca))
        if settings.members is not None:
            read_members(settings.members, self.ca_cert)  # refuse to start on a bad list
        length = self.store.latest()[1].shape[0]
        layout = model_layout(settings.model, self.store.root, length)
        self.coordinator = Coordinator(settings, self.store, self.audit, self.ca_cert,
                                       statistics=layout)
        self.max_payload = min(self.limits.max_payload_bytes, (length + 1) * 8)
        self._ctx: ssl.SSLContext | None = None
        self._crl_mtime = -1.0
        #: Certificates refused for crowding since the last refusal summary (named once).
        self._crowded_told: set[str] = set()
        #: Serial numbers the current CRL revokes (read with it, for the live re-check).
        self._revoked: frozenset[int] = frozenset()
        self._tasks: set[asyncio.Task] = set()
        self.admission = Admission(self.limits)
        self._slot_freed = asyncio.Event()
        self.admission.freed = self._wake_waiting
        self.refusals = RefusalSummary()
        #: Authenticated connections being served, and how to close each.
        self.live: dict[Peer, asyncio.StreamWriter] = {}
        self._chores: list[asyncio.Task] = []
        self._closed_since_trim = 0
        self._big_in = asyncio.Semaphore(BIG_SLOTS)
        self._big_out = asyncio.Semaphore(BIG_SLOTS)
        self.port = 0
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task | None = None

    def context(self) -> ssl.SSLContext:
        """The TLS context, rebuilt when the CRL file changes (revocation without restart)."""
        s = self.settings
        try:
            mtime = Path(s.crl).stat().st_mtime
        except OSError:
            mtime = -2.0  # missing (mid-replacement?): one attempt, then the last good list
        if self._ctx is None or mtime != self._crl_mtime:
            try:
                for warning in check_expiry(s.cert, s.crl):
                    log.warning(warning)
                ctx, revoked = server_context(s.cert, s.key, s.ca, s.crl), revoked_serials(s.crl)
            except ConfigError as exc:
                if self._ctx is None:
                    raise  # at start: refuse to serve without a revocation list
                # A CRL being copied in place (truncated first) or replaced by a wrong file
                # must not stop every handshake nor the re-check of live connections: the
                # last good list stays in force until the file reads again.
                self._crl_mtime = mtime
                log.warning("%s; still using the revocation list read before: replace the "
                            "file atomically (copy, then rename) with the CA's crl.pem",
                            exc.message)
                self.audit.record("crl-unreadable", reason=clip(exc.message), durable=True)
                return self._ctx
            self._ctx, self._revoked, self._crl_mtime = ctx, revoked, mtime
        return self._ctx

    async def start(self) -> int:
        self.context()
        loop = asyncio.get_running_loop()
        where = f"{self.settings.host}:{self.settings.port}"
        try:
            self._sock = socket.create_server((self.settings.host, self.settings.port),
                                              backlog=128, reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {where} ({exc.strerror}): is another server "
                              "running, or is the address wrong?") from exc
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._acceptor = asyncio.create_task(self._accept_loop(loop, self._sock))
        self._chores = [asyncio.create_task(self._every(self.limits.refusal_summary_interval,
                                                        self._summarise_refusals)),
                        asyncio.create_task(self._every(self.limits.recheck_interval,
                                                        self.recheck_connections)),
                        asyncio.create_task(self._every(TRIM_INTERVAL, self._trim))]
        if self.coordinator.schedule is not None:
            self._chores.append(asyncio.create_task(self.coordinator.schedule.run()))
        info = self.store.latest()[0]
        if (damage := self.audit.damage) is not None:
            # Into the chain itself, so the damage found now cannot later pass as unseen.
            self.audit.record("audit-damaged", places=len(damage.problems),
                              lines=[n for n, _ in damage.problems[:20]],
                              message=damage.sentence(), durable=True)
        self.audit.record("server-start", port=self.port, version=info.version, durable=True)
        log.info("listening on %s:%d at version %d; audit log %s, store %s",
                 self.settings.host, self.port, info.version, self.audit.path,
                 self.store.root)
        return self.port

    async def close(self) -> None:
        """Stop accepting, close every connection, close the audit log (safe if never
        started)."""
        for chore in [self._acceptor, *self._chores]:
            if chore is not None:
                chore.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chore
        if self._sock is not None:
            self._sock.close()
        if hasattr(self, "coordinator"):
            self.coordinator.stopping = True  # connections end now because of us
        pending = set(self._tasks)
        while pending:
            # Cancelled again until done: Python 3.11's wait_for drops a cancellation that
            # arrives as its read completes, and a connection busy with an admin app's
            # status requests then kept being served, so close() never returned.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        await self._summarise_refusals()
        self.audit.close()
        self._unlock()

    async def _every(self, interval: float, chore: Callable[[], Awaitable[None]]) -> None:
        """Run ``chore`` every ``interval`` seconds until cancelled; a failure is logged and
        the next run happens as planned (a chore must never stop the server)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await chore()
            except Exception:
                log.exception("periodic %s failed", getattr(chore, "__name__", "task"))

    async def _summarise_refusals(self) -> None:
        """One audit line for the unauthenticated refusals since the last one (if any)."""
        fields = self.refusals.take()
        self._crowded_told.clear()
        if fields is not None:
            self.audit.record("connections-refused", **fields)

    async def _trim(self) -> None:
        if self._closed_since_trim:
            self._closed_since_trim = 0
            trim_heap()

    async def recheck_connections(self) -> None:
        """Close every live connection whose certificate has expired or that the current CRL
        revokes, saying why first.

        Why: the certificate is checked in the handshake only, and a hospital's agent may
        hold one connection for days; without this a revoked hospital kept being served
        until it reconnected.  The CRL is the one the handshakes use, reloaded when its file
        changes (``context``).
        """
        self.context()
        now = dt.datetime.now(dt.UTC)
        closing = []
        for peer, writer in list(self.live.items()):
            cert = x509.load_der_x509_certificate(peer.cert_der)
            until = cert.not_valid_after_utc
            if until <= now:
                why = f"its certificate expired on {until:%Y-%m-%d %H:%M:%S} UTC"
            elif cert.serial_number in self._revoked:
                why = "its certificate has been revoked"
            else:
                continue
            closing.append(self._cut(peer, writer, why))
        await asyncio.gather(*closing, return_exceptions=True)

    async def _cut(self, peer: Peer, writer: asyncio.StreamWriter, why: str) -> None:
        self.live.pop(peer, None)
        self.audit.record("closed", name=peer.name, role=peer.role.value,
                          reason=f"certificate re-check: {why}")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.push(wm.ErrorMsg(
                code="certificate-rejected",
                message=f"connection closed: {why}; ask the federation operator for a "
                        "new certificate"), None), 2.0)
        writer.close()

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop,
                           listener: socket.socket) -> None:
        """Accept forever; running out of file descriptors is logged and retried, not fatal."""
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); retrying", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                raise
            self._admit(sock, addr)
            del sock, addr

    def _admit(self, sock: socket.socket, addr: tuple) -> None:
        """Refuse at once or start the connection's task (its own method so the accept loop
        holds no reference to the last socket or task)."""
        source = source_of(addr[0])
        ticket = self.admission.open(source)
        if isinstance(ticket, str):  # refused here, before any task or buffer exists
            self.refusals.add(source, ticket)
            _reset(sock)
            self._closed_since_trim += 1
            return
        # asyncio turns Nagle's algorithm off only for sockets whose ``proto`` is TCP, and
        # an accepted socket reports 0: without this, each small push that follows a
        # reply (roster, share envelopes, survivor list) waited for the hospital's delayed
        # ACK, 20-40 ms per protocol step.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.create_task(self._connection(sock, f"{addr[0]}:{addr[1]}", ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake_waiting(self) -> None:
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    async def _wait_for_handshake_slot(self, ticket: Ticket) -> bool:
        """A connection over a handshake limit waits here, within its handshake deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.handshake_timeout
        while not self.admission.start(ticket):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
        return True

    async def _connection(self, sock: socket.socket, address: str, ticket: Ticket) -> None:
        """One connection from accept to close; nothing it does can reach another."""
        writer: asyncio.StreamWriter | None = None
        try:
            if not await self._wait_for_handshake_slot(ticket):
                self.refusals.add(ticket.source, "handshake timeout (waiting for a slot)")
                return
            tls = await self._handshake(sock, address, ticket)
            if tls is None:
                return  # no transport was made: the socket is still ours to close
            peer, reader, writer = tls  # from here the transport owns the socket
            if peer is None:
                return  # refused after the handshake: closed through the transport
            await self._serve(peer, reader, writer)
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug must close this connection only, never the server
            log.exception("connection %s failed", address)
        finally:
            self.admission.release(ticket)
            self._closed_since_trim += 1
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            else:
                sock.close()

    async def _handshake(
        self, sock: socket.socket, address: str, ticket: Ticket
    ) -> tuple[Peer | None, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS on an accepted socket, so that every refused handshake is logged with why.

        None: the handshake failed and no transport holds the socket.  ``(None, ...)``: the
        certificate was refused after the handshake; the caller closes the writer, never the
        socket itself, or the freed descriptor, reused by the next client, would be cut
        by this transport's late teardown.  Refusals before a certificate identifies the peer
        are counted for the periodic summary (``RefusalSummary``); later ones, with a name,
        are audited one by one.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        timeout = self.limits.handshake_timeout
        started = loop.time()
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol, sock, ssl=self.context(),
                                             ssl_handshake_timeout=timeout),
                timeout + 1)
        except TimeoutError as exc:
            _forget(exc)
            self.refusals.add(ticket.source, "handshake timeout")
            return None
        except ssl.SSLError as exc:
            _forget(exc)
            why = getattr(exc, "verify_message", None) or exc.reason or "handshake failed"
            self.refusals.add(ticket.source, f"tls: {why}")
            return None
        except (ConnectionError, OSError) as exc:
            _forget(exc)
            # asyncio's own handshake deadline aborts the connection (ConnectionAbortedError)
            late = loop.time() - started >= timeout
            self.refusals.add(ticket.source,
                              "handshake timeout" if late else "closed during handshake")
            return None
        limit_tls_buffers(transport, TLS_READ_BUFFER)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            role, name = pki.identity_of(x509.load_der_x509_certificate(der))
        except (CryptoError, ValueError):
            self.admission.release(ticket)
            self.refusals.add(ticket.source, "certificate has no identity")
            return None, reader, writer
        registered = self.settings.hospitals
        if role not in (pki.Role.HOSPITAL, pki.Role.ADMIN) or (
            role is pki.Role.HOSPITAL and registered and name not in registered
        ):
            self.admission.release(ticket)
            self.audit.record("refused", address=address, name=name, role=role.value,
                              reason="role or name not allowed")
            return None, reader, writer
        crowded = self.admission.authenticate(ticket, role.value, name)
        if crowded is not None:
            self.admission.release(ticket)
            # Named once per summary interval, then counted: a certificate holder that
            # keeps reconnecting past its share must not fill the audit log either.
            who = f"{role.value} {name}"
            if who in self._crowded_told:
                self.refusals.add(ticket.source, f"{crowded} ({who})")
            else:
                self._crowded_told.add(who)
                self.audit.record("refused", address=address, name=name, role=role.value,
                                  reason=crowded)
            return None, reader, writer
        self.audit.record("connected", address=address, name=name, role=role.value)
        lock = asyncio.Lock()
        conversation = Conversation(role.value, Side.SERVER)

        async def push(msg: wm._Wire, array: np.ndarray | None) -> None:
            try:  # every frame to this peer, reply or push, in the order of its table
                conversation.send(msg)
            except LocalProtocolError as exc:
                log.error("not sent to %s (a server bug): %s", name, exc.message)
                raise
            await self._send(writer, lock, msg, array)

        peer = Peer(name=name, role=role, cert_der=der, push=push, conversation=conversation,
                    address=address)
        return peer, reader, writer

    async def _send(
        self, writer: asyncio.StreamWriter, lock: asyncio.Lock, msg: wm._Wire,
        array: np.ndarray | None = None,
    ) -> None:
        """One frame; a large payload goes out in slices, one drain each, so no connection's
        TLS buffers ever hold a whole model (they keep their capacity for life)."""
        header = wm.encode_header(msg)
        # ndarray.data is memoryview(array); numpy's stubs type that call on 3.12+ only.
        payload = memoryview(b"") if array is None else np.ascontiguousarray(
            array).data.cast("B")
        big = len(payload) > BIG_PAYLOAD
        async with lock:
            if big:
                await self._big_out.acquire()
            try:
                writer.write(frames.encode_prefix(header, len(payload)))
                for start in range(0, len(payload), SEND_SLICE):
                    writer.write(payload[start : start + SEND_SLICE])
                    await asyncio.wait_for(writer.drain(), self.limits.frame_timeout)
                await asyncio.wait_for(writer.drain(), self.limits.frame_timeout)
            finally:
                if big:
                    self._big_out.release()

    async def _serve(
        self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        lim = self.limits
        parser = frames.FrameParser(max_header=lim.max_header_bytes, max_payload=self.max_payload,
                                    admit_above=BIG_PAYLOAD)
        loop = asyncio.get_running_loop()
        frame_deadline = 0.0
        slot = _Slot()
        coord = self.coordinator
        coord.connected(peer)
        self.live[peer] = writer
        try:
            while True:
                if parser.in_frame:
                    timeout = min(lim.read_timeout, frame_deadline - loop.time())
                elif slot.granted:
                    timeout = slot.deadline - loop.time()
                else:
                    timeout = lim.idle_timeout
                try:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), max(timeout, 0))
                except TimeoutError:
                    if slot.granted and not parser.in_frame:
                        reason = "upload slot granted but nothing sent"
                    elif not parser.in_frame and coord.in_round(peer.name):
                        continue  # waiting for the round's next step (the admin) is not idle
                    else:
                        reason = "frame deadline" if parser.in_frame else "idle"
                    self.audit.record("closed", name=peer.name, reason=f"timeout ({reason})")
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(peer.push(wm.ErrorMsg(
                            code="timeout", message=f"connection closed: {reason} timeout"),
                            None), 2.0)
                    return
                if not data:
                    return
                if not parser.in_frame:
                    frame_deadline = loop.time() + lim.frame_timeout
                parser.receive_data(data)
                while True:
                    try:
                        frame = parser.next_frame()
                    except RemoteProtocolError as exc:
                        self.audit.record("closed", name=peer.name, reason=exc.code)
                        await self._reply_error(peer, exc, 0)
                        return
                    if frame is frames.NEED_DATA:
                        if not parser.awaiting_admission:
                            break
                        if not slot.granted:  # a sender that did not ask first queues here
                            await self._big_in.acquire()  # before its buffer exists
                            slot.granted = True
                        slot.admitted = True
                        parser.admit()
                        # Time spent queueing for the slot is not the sender's fault.
                        frame_deadline = loop.time() + lim.frame_timeout
                        continue
                    await self._dispatch(peer, frame, slot)
                    del frame
                    if slot.admitted or slot.spent:  # handled: the next upload may come in
                        slot.release(self._big_in)
                    if parser.in_frame:
                        frame_deadline = loop.time() + lim.frame_timeout
        finally:
            self.live.pop(peer, None)
            if slot.granted:
                slot.release(self._big_in)
            coord.disconnected(peer)
            self.audit.record("disconnected", name=peer.name)

    async def _dispatch(self, peer: Peer, frame: frames.Frame, slot: _Slot) -> None:
        rid = 0
        try:
            msg, array = wm.decode(frame)
            rid = msg.rid
            slot.spent = isinstance(msg, wm.MaskedInputMsg)
            self.coordinator.admit(peer, msg)  # the wire order decides before anyone acts
            reply: wm._Wire
            if isinstance(msg, wm.UploadSlot):
                reply, payload = await self._grant(peer, msg, slot), None
            else:
                reply, payload = await self.coordinator.handle(peer, msg, array)
        except SecureFLError as exc:
            await self._reply_error(peer, exc, rid or wm.request_id(frame.header))
            return
        except Exception:
            log.exception("request from %s failed", peer.name)
            await self._reply_error(peer, None, rid)
            return
        await peer.push(reply, payload)
        if isinstance(reply, wm.Welcome):
            self.coordinator.after_welcome(peer)

    async def _grant(self, peer: Peer, msg: wm.UploadSlot, slot: _Slot) -> wm.Ack:
        """Hold the reply until the upload slot is this connection's.

        Why a grant rather than only pausing the reader: bytes a hospital has already sent
        pile up in the TLS layer's buffers (~0.5 MB per connection), which made the server's
        memory grow with the number of hospitals; a hospital waiting for its grant keeps
        them at home.
        """
        if msg.nbytes > self.max_payload:
            raise RemoteProtocolError(f"an upload of {msg.nbytes} bytes exceeds this server's "
                                      f"limit of {self.max_payload}", code="too-large")
        self.coordinator.check_upload(peer, msg)
        if not slot.granted and msg.nbytes > BIG_PAYLOAD:  # small ones never queue
            await self._big_in.acquire()
            slot.granted = True
        slot.deadline = asyncio.get_running_loop().time() + self.limits.read_timeout
        rnd = self.coordinator.round
        return wm.Ack(rid=msg.rid, collected=rnd.engine.collected if rnd else 0)

    async def _reply_error(self, peer: Peer, exc: SecureFLError | None, rid: int) -> None:
        # Every refusal of an authenticated peer's request is audited with its code (issue
        # 14: bad-message, remote-protocol, crypto and internal ones were not), so an
        # operator can see a misbehaving hospital; the text is ours, never the peer's.
        self.audit.record("request-refused", name=peer.name,
                          code=exc.code if exc is not None else "internal",
                          reason=clip(exc.message if exc is not None else "internal error"))
        if exc is None:
            msg = wm.ErrorMsg(rid=rid, code="internal",
                              message="internal server error; the operator's log has details")
        else:
            version = self.coordinator.version if exc.code == "stale-version" else None
            msg = wm.ErrorMsg(rid=rid, code=exc.code, message=exc.message[:500],
                              version=version)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await peer.push(msg, None)


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False where
    there is no glibc.

    Why: every TLS connection makes many small OpenSSL allocations between larger buffers,
    and glibc returns freed memory to the system only from the top of its heap.  After
    10,000 connections that never authenticated the server's resident memory stayed at
    ~4.8x idle although only ~10 MB of its ~78 MB heap was in use (``mallinfo2``;
    ``bench/conn_churn_bench.py``); ``malloc_trim`` releases the free pages wherever they
    are.  It walks the heap once (milliseconds), so it runs only after connections closed.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _forget(exc: BaseException) -> None:
    """Drop the tracebacks of a failed handshake's exception and of those it chains.

    Why: asyncio keeps the exception in the handshake's future, and its traceback holds the
    frames that hold that future, the socket, the SSL object and our reader: a reference
    cycle, so every refused connection's objects waited for the cyclic garbage collector,
    which runs rarely in a long-lived process (found by ``gc.DEBUG_SAVEALL`` after churn).
    Without the tracebacks, reference counting frees them when the connection ends."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__context__, e.__cause__]


def _reset(sock: socket.socket) -> None:
    """Close a refused socket at once with a reset: no FIN handshake to wait for and no
    TIME_WAIT left behind for each of a flood's connections."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


#: The servers this process runs (``serve``): what a stop signal would end.
RUNNING: list[Server] = []


def held_versions() -> list[str]:
    """'version N of round R' for every result a running server holds in memory because its
    store cannot be written: what stopping now would lose."""
    out = []
    for server in RUNNING:
        held = server.coordinator.held
        if held is not None:
            out.append(f"version {server.store.latest()[0].version + 1} of round "
                       f"{held.rnd.round_id}")
    return out


async def serve(settings: ServerSettings, *, ready: asyncio.Event | None = None) -> None:
    """Run until cancelled (SIGINT/SIGTERM in the CLI)."""
    server = Server(settings)
    RUNNING.append(server)
    try:
        await server.start()
        print(f"securefl server listening on {settings.host}:{server.port}", flush=True)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        RUNNING.remove(server)
        await server.close()
