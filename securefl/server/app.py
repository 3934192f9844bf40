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
import errno
import logging
import socket
import ssl
from pathlib import Path

import numpy as np
from cryptography import x509

from securefl.config import ServerSettings
from securefl.crypto import pki
from securefl.errors import (
    ConfigError,
    CryptoError,
    LocalProtocolError,
    RemoteProtocolError,
    SecureFLError,
)
from securefl.protocol import frames
from securefl.protocol import messages as wm
from securefl.protocol.conversation import Conversation, Side
from securefl.server.audit import AuditLog
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


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.store = ModelStore(settings.store_dir, settings.model.classes)
        if self.store.empty:
            weights, layers = initial_model(settings.model)
            if layers is not None:
                save_layers(self.store.root, layers)
            save_spec(self.store.root, settings.model)
            self.store.write(weights, contributors=0, total_samples=0)
        check_spec(self.store.root, settings.model)
        self.audit = AuditLog(settings.audit_log)
        self.ca_cert = pki.load_cert(Path(settings.ca).read_bytes())
        if settings.members is not None:
            read_members(settings.members, self.ca_cert)  # refuse to start on a bad list
        length = self.store.latest()[1].shape[0]
        layout = model_layout(settings.model, self.store.root, length)
        self.coordinator = Coordinator(settings, self.store, self.audit, self.ca_cert,
                                       statistics=layout)
        self.max_payload = min(self.limits.max_payload_bytes, (length + 1) * 8)
        self._ctx: ssl.SSLContext | None = None
        self._crl_mtime = -1.0
        self._tasks: set[asyncio.Task] = set()
        self._big_in = asyncio.Semaphore(BIG_SLOTS)
        self._big_out = asyncio.Semaphore(BIG_SLOTS)
        self.port = 0
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task | None = None

    def context(self) -> ssl.SSLContext:
        """The TLS context, rebuilt when the CRL file changes (revocation without restart)."""
        mtime = Path(self.settings.crl).stat().st_mtime
        if self._ctx is None or mtime != self._crl_mtime:
            s = self.settings
            for warning in check_expiry(s.cert, s.crl):
                log.warning(warning)
            self._ctx = server_context(s.cert, s.key, s.ca, s.crl)
            self._crl_mtime = mtime
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
        self._acceptor = asyncio.create_task(self._accept_loop(loop))
        info = self.store.latest()[0]
        self.audit.record("server-start", port=self.port, version=info.version, durable=True)
        log.info("listening on %s:%d at version %d", self.settings.host, self.port, info.version)
        return self.port

    async def close(self) -> None:
        """Stop accepting, close every connection, close the audit log (safe if never
        started)."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        if self._sock is not None:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.audit.close()

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept forever; running out of file descriptors is logged and retried, not fatal."""
        while True:
            try:
                sock, addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); retrying", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                raise
            # asyncio turns Nagle's algorithm off only for sockets whose ``proto`` is TCP, and
            # an accepted socket reports 0: without this, each small push that follows a
            # reply (roster, share envelopes, survivor list) waited for the hospital's delayed
            # ACK, 20-40 ms per protocol step.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._connection(sock, f"{addr[0]}:{addr[1]}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connection(self, sock: socket.socket, address: str) -> None:
        """One connection from accept to close; nothing it does can reach another."""
        writer: asyncio.StreamWriter | None = None
        try:
            if len(self._tasks) > self.limits.max_connections:
                self.audit.record("refused", address=address, reason="too many connections")
                sock.close()
                return
            tls = await self._handshake(sock, address)
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
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            else:
                sock.close()

    async def _handshake(
        self, sock: socket.socket, address: str
    ) -> tuple[Peer | None, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS on an accepted socket, so that every refused handshake is logged with why.

        None: the handshake failed and no transport holds the socket.  ``(None, ...)``: the
        certificate was refused after the handshake; the caller closes the writer, never the
        socket itself, or the freed descriptor, reused by the next client, would be cut
        by this transport's late teardown.
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
        except TimeoutError:
            self.audit.record("refused", address=address, reason="handshake timeout")
            return None
        except ssl.SSLError as exc:
            why = getattr(exc, "verify_message", None) or exc.reason or "handshake failed"
            self.audit.record("refused", address=address, reason=f"tls: {why}")
            return None
        except (ConnectionError, OSError):
            # asyncio's own handshake deadline aborts the connection (ConnectionAbortedError)
            late = loop.time() - started >= timeout
            self.audit.record("refused", address=address,
                              reason="handshake timeout" if late else "closed during handshake")
            return None
        limit_tls_buffers(transport, TLS_READ_BUFFER)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            role, name = pki.identity_of(x509.load_der_x509_certificate(der))
        except (CryptoError, ValueError):
            self.audit.record("refused", address=address, reason="certificate has no identity")
            return None, reader, writer
        registered = self.settings.hospitals
        if role not in (pki.Role.HOSPITAL, pki.Role.ADMIN) or (
            role is pki.Role.HOSPITAL and registered and name not in registered
        ):
            self.audit.record("refused", address=address, name=name, role=role.value,
                              reason="role or name not allowed")
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
        payload = memoryview(b"") if array is None else memoryview(
            np.ascontiguousarray(array)).cast("B")
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
                          reason=(exc.message if exc is not None else "internal error")[:200])
        if exc is None:
            msg = wm.ErrorMsg(rid=rid, code="internal",
                              message="internal server error; the operator's log has details")
        else:
            version = self.coordinator.version if exc.code == "stale-version" else None
            msg = wm.ErrorMsg(rid=rid, code=exc.code, message=exc.message[:500],
                              version=version)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await peer.push(msg, None)


async def serve(settings: ServerSettings, *, ready: asyncio.Event | None = None) -> None:
    """Run until cancelled (SIGINT/SIGTERM in the CLI)."""
    server = Server(settings)
    try:
        await server.start()
        print(f"securefl server listening on {settings.host}:{server.port}", flush=True)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await server.close()
