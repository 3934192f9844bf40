"""One mutual-TLS connection to the server: requests with replies, and server pushes.

Why a reader task: the server both answers requests (matched by ``rid``) and pushes round
steps unprompted (roster, envelopes, unmask request, round done).  One task owns the read
side and sorts frames into reply futures and a push queue; writes are serialised by a lock.

Rejections: with TLS 1.3 the client's handshake completes before the server has checked its
certificate, so a refused certificate shows up as EOF, a reset or an SSL alert at the first
read.  ``open`` therefore says hello and waits for the welcome before it reports success,
and turns "closed before any reply" into ``CertificateRejectedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from securefl.certs import check_tls_files
from securefl.client import revocation
from securefl.config import ClientSettings
from securefl.crypto import pki
from securefl.errors import (
    CertificateRejectedError,
    ConfigError,
    CryptoError,
    DataError,
    NotEnoughSurvivorsError,
    ProtocolError,
    RemoteProtocolError,
    SecureFLError,
    ServerUnreachableError,
    StaleVersionError,
    TransportError,
)
from securefl.protocol import frames
from securefl.protocol import messages as wm
from securefl.protocol.conversation import Conversation, Side

READ_CHUNK = 1 << 20
#: A wire message type: what was asked for is what is handed back.
W = TypeVar("W", bound=wm._Wire)

log = logging.getLogger("securefl.client")

_ERRORS: dict[str, type[SecureFLError]] = {
    "stale-version": StaleVersionError,
    "too-few-hospitals": NotEnoughSurvivorsError,
    "data": DataError,
    "crypto": CryptoError,
    # The round is complete; the server could not store its version yet and holds it.
    "publish-deferred": DataError,
    "certificate-rejected": CertificateRejectedError,
}


def _refuse_expired(cert: Path) -> None:
    """Say so when this site's own certificate has expired, before the server refuses it.

    Why: the server's refusal can only be "revoked, expired, not registered or from another
    federation" (TLS tells the client nothing more), and walking it an expired kit got just
    that.  The expiry is in the certificate itself, so the hospital can name it."""
    import datetime as dt

    from cryptography import x509

    try:
        obj = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        role, name = pki.identity_of(obj)
    except (OSError, ValueError, CryptoError):
        return  # check_tls_files has said what is wrong with the file, or TLS will
    ends = obj.not_valid_after_utc
    if ends <= dt.datetime.now(dt.UTC):
        who = "the administrator's" if role is pki.Role.ADMIN else f"hospital '{name}''s"
        renew = "admin" if role is pki.Role.ADMIN else name
        raise CertificateRejectedError(
            f"{who} certificate {cert} expired on {ends:%Y-%m-%d %H:%M} UTC, so the server "
            "would refuse it: ask the federation's operator for a renewed kit (`securefl "
            f"certs renew {renew}` on the machine that holds the CA)")


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS 1.3, the server checked against the federation CA and its host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    check_tls_files(cert, key, ca)  # one sentence naming the file at fault
    _refuse_expired(cert)
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load this site's certificates ({cert}, {key}, {ca}): "
                          f"{getattr(exc, 'reason', None) or exc}") from exc
    return ctx


def error_from_wire(msg: wm.ErrorMsg) -> SecureFLError:
    """The server's typed refusal as the matching local exception (code kept)."""
    cls = _ERRORS.get(msg.code, ProtocolError)
    exc = cls(f"the server refused: {msg.message}", code=msg.code)
    exc.server_version = msg.version  # type: ignore[attr-defined]
    return exc


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: ClientSettings, conversation: Conversation | None = None) -> None:
        self._reader, self._writer, self.settings = reader, writer, settings
        #: This end's wire order: every request before it leaves, every frame as it arrives
        #: (a push out of order fails the connection with ``RemoteProtocolError``).
        self.conversation = conversation or Conversation("hospital", Side.CLIENT)
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._pushes: asyncio.Queue = asyncio.Queue()
        #: ``round_open`` / ``round_closed`` (the server's schedule): kept apart from the
        #: round's steps, so a ``send`` in progress never sees them and they wait here for
        #: whoever follows the schedule (the hospital agent).
        self.schedule_pushes: asyncio.Queue = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._closed: SecureFLError | None = None
        self._got_reply = False
        self.bytes_sent = 0
        self.welcome: wm.Welcome | None = None
        #: The server's certificate (DER) as the TLS handshake presented it.
        self.server_cert = b""
        #: What the user should hear about this connection (e.g. an expired revocation list).
        self.warnings: list[str] = []
        #: Called with (bytes received, payload size) while a large payload arrives.
        self.payload_progress: Callable[[int, int], None] | None = None
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, settings: ClientSettings,
                   conversation: Conversation | None = None) -> Connection:
        """Connect, check the server, say hello; ``conversation``: the wire order of this
        end (default: a hospital's)."""
        # Reading the certificate files off the loop: an app retrying with backoff keeps
        # drawing while a slow or network disk answers.
        ctx = await asyncio.to_thread(client_context, settings.cert, settings.key, settings.ca)
        where = f"{settings.host}:{settings.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(settings.host, settings.port, ssl=ctx,
                                        server_hostname=settings.host, limit=READ_CHUNK),
                settings.connect_timeout)
        except ssl.SSLCertVerificationError as exc:
            if "address mismatch" in (msg := (exc.verify_message or "").lower()) or \
                    "hostname mismatch" in msg:
                # The CA did issue it, for another name (walking it: host = "localhost" for a
                # server certified as 127.0.0.1 was blamed on the CA).
                raise CertificateRejectedError(
                    f"the server at {where} has a certificate for another name than "
                    f"'{settings.host}': either host in these settings is not the name the "
                    "server was certified for (`securefl certs init --server-host`), or the "
                    "server still presents its certificate from before `securefl certs "
                    "set-server` (the operator restarts it with the new server.pem)") from None
            raise CertificateRejectedError(
                f"the server at {where} presented a certificate this federation's CA did not "
                f"issue ({exc.verify_message}); check the address and ca.pem") from None
        except ssl.SSLError:
            raise CertificateRejectedError(
                f"the server at {where} refused this site's certificate (revoked, expired, "
                "not registered or from another federation), or it is at its connection "
                "limit: ask the federation operator") from None
        except (OSError, TimeoutError):
            raise ServerUnreachableError(
                f"cannot reach the securefl server at {where}: is it running, and are the "
                "host and port in the settings right?") from None
        # The CA vouched for the server's certificate; whether the operator has revoked it
        # since is in the revocation list this hospital holds (the kit's, or a newer one).
        server_cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

        def check() -> list[str]:  # reads the CA and the lists: off the loop, as above
            return revocation.check_server(
                server_cert, pki.load_cert_file(settings.ca), kit=settings.crl,
                held=settings.state_dir / "crl.der", where=f"the server at {where}")

        try:
            warnings = await asyncio.to_thread(check)
        except SecureFLError:
            writer.close()
            raise
        for warning in warnings:
            log.warning(warning)
        conn = cls(reader, writer, settings, conversation)
        conn.server_cert, conn.warnings = server_cert, warnings
        try:
            welcome, _ = await conn.request(wm.Hello(protocol=wm.PROTOCOL_VERSION))
        except TransportError:
            await conn.close()
            if conn._got_reply:
                raise
            raise CertificateRejectedError(
                f"the server at {where} closed the connection without a word: it refused this "
                "site's certificate (revoked, expired, not registered or from another "
                "federation), or it is at its connection limit") from None
        assert isinstance(welcome, wm.Welcome)
        conn.welcome = welcome
        return conn

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)

    # -- writing -----------------------------------------------------------------------------
    async def send(self, msg: wm._Wire, array: np.ndarray | None = None) -> None:
        if self._closed is not None:
            raise self._closed
        header = wm.encode_header(msg)
        # ndarray.data is memoryview(array); numpy's stubs type that call on 3.12+ only.
        payload = b"" if array is None else np.ascontiguousarray(array).data.cast("B")
        self.conversation.send(msg)  # LocalProtocolError: our own code is out of order
        async with self._lock:
            try:
                prefix = frames.encode_prefix(header, len(payload))
                self._writer.write(prefix)
                if payload:
                    self._writer.write(payload)
                self.bytes_sent += len(prefix) + len(payload)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise TransportError("the connection to the server was lost") from exc

    async def request(
        self, msg: wm._Wire, array: np.ndarray | None = None
    ) -> tuple[wm.Message, np.ndarray | None]:
        """Send a request and wait for its reply; an ``error`` reply is raised."""
        rid = next(self._rids)
        msg = msg.model_copy(update={"rid": rid})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(msg, array)
            reply, data = await asyncio.wait_for(fut, self.settings.reply_timeout)
        except TimeoutError:
            raise TransportError("the server did not answer in time") from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, wm.ErrorMsg):
            raise error_from_wire(reply)
        return reply, data

    def take_pushes(self, kind: type[W]) -> list[W]:
        """Remove and return the queued pushes of ``kind``, in order; the rest stay."""
        taken: list[W] = []
        keep = []
        while not self._pushes.empty():
            item = self._pushes.get_nowait()
            if isinstance(item, tuple) and isinstance(item[0], kind):
                taken.append(item[0])
            else:
                keep.append(item)
        for item in keep:
            self._pushes.put_nowait(item)
        return taken

    async def next_push(self, timeout: float) -> tuple[wm.Message, np.ndarray | None]:
        try:
            item = await asyncio.wait_for(self._pushes.get(), timeout)
        except TimeoutError:
            raise TransportError("the server sent no next step in time") from None
        if isinstance(item, SecureFLError):
            self._pushes.put_nowait(item)  # every later wait sees the same failure
            raise item
        return item

    async def next_schedule_push(self, timeout: float | None) -> wm.RoundOpen | wm.RoundClosed:
        """The next ``round_open`` / ``round_closed``; the connection's failure is raised
        (to this and every later wait); ``TimeoutError`` after ``timeout`` seconds."""
        item = await asyncio.wait_for(self.schedule_pushes.get(), timeout)
        if isinstance(item, SecureFLError):
            self.schedule_pushes.put_nowait(item)
            raise item
        return item

    # -- reading -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        parser = frames.FrameParser(max_header=frames.CLIENT_MAX_HEADER,
                                    max_payload=frames.DEFAULT_MAX_PAYLOAD)
        failure: SecureFLError = TransportError(
            "the server closed the connection: once the server is back, try again")
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                parser.receive_data(data)
                while (frame := parser.next_frame()) is not frames.NEED_DATA:
                    if self.payload_progress is not None and frame.payload:
                        self.payload_progress(len(frame.payload), len(frame.payload))
                    assert isinstance(frame, frames.Frame)
                    self._got_reply = True
                    try:
                        msg, array = wm.decode(frame)
                    except RemoteProtocolError as exc:
                        raise RemoteProtocolError(
                            f"the server sent a message this program refuses ({exc.message}); "
                            "the connection was closed and nothing more was sent to it: tell "
                            "the federation's operator") from None
                    deliver = self.conversation.receive(msg)
                    fut = self._pending.get(msg.rid) if msg.rid else None
                    if fut is not None and not fut.done():
                        fut.set_result((msg, array))
                    elif isinstance(msg, wm.ErrorMsg):
                        failure = error_from_wire(msg)
                    elif deliver and isinstance(msg, wm.RoundOpen | wm.RoundClosed):
                        self.schedule_pushes.put_nowait(msg)
                    elif deliver and not msg.rid:  # not a late reply nobody waits for
                        self._pushes.put_nowait((msg, array))
                if self.payload_progress is not None and parser.payload_len:
                    self.payload_progress(parser.payload_received, parser.payload_len)
        except RemoteProtocolError as exc:
            failure = exc
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self._closed = failure
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(failure)
            self._pushes.put_nowait(failure)
            self.schedule_pushes.put_nowait(failure)
