"""Sans-I/O frame codec: bytes in, frames out, never a socket or a clock.

A frame on the wire (all integers big-endian)::

    u32 frame_len    bytes that follow this field (= 5 + header_len + payload_len)
    u8  frame_type   1 (a message); anything else is refused
    u32 header_len   1 .. max_header
    header           UTF-8 JSON object, validated by ``securefl.protocol.messages``
    payload          frame_len - 5 - header_len raw bytes (arrays, little-endian)

Why this shape (after h11/wsproto): the parser is fed whatever the transport read, in any
slicing, and hands out whole frames or ``NEED_DATA``.  Every length is checked against its
limit *before* a buffer is allocated, so a prefix claiming 4 GiB costs nothing.  A payload is
received straight into one preallocated buffer (no joining of chunks), which is what makes an
8 MB masked input cheap to read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from securefl.errors import LocalProtocolError, RemoteProtocolError

FRAME_TYPE_MESSAGE = 1
PREFIX = struct.Struct(">IBI")
PREFIX_LEN = PREFIX.size  # 9
DEFAULT_MAX_HEADER = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 30
#: What a client accepts from the server: a roster of 1000 hospitals with 64-character
#: names is about 1.05 MB, past the 1 MiB a server takes from one client.
CLIENT_MAX_HEADER = 4 << 20


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by ``FrameParser.next_frame`` when more bytes are needed.
NEED_DATA = _Sentinel.NEED_DATA


@dataclass(frozen=True)
class Frame:
    header: bytes
    payload: bytearray | bytes


class FrameTooLarge(RemoteProtocolError):
    code = "frame-too-large"


class MalformedFrame(RemoteProtocolError):
    code = "malformed-frame"


def encode_prefix(header: bytes, payload_len: int) -> bytes:
    """Prefix + header; the caller writes the payload after it without copying it."""
    if not header:
        raise LocalProtocolError("a frame needs a header")
    return PREFIX.pack(5 + len(header) + payload_len, FRAME_TYPE_MESSAGE, len(header)) + header


def encode_frame(header: bytes, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One whole frame as bytes (convenient for small frames and tests)."""
    return encode_prefix(header, len(payload)) + bytes(payload)


class FrameParser:
    """Incremental parser for one direction of one connection."""

    def __init__(
        self,
        *,
        max_header: int = DEFAULT_MAX_HEADER,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        admit_above: int | None = None,
    ) -> None:
        """``admit_above``: payloads larger than this wait for ``admit()`` before their
        buffer is allocated, so the transport can bound how many are held at once."""
        self.max_header = max_header
        self.max_payload = max_payload
        self.admit_above = admit_above
        self._admitted = False
        self._pending = bytearray()  # bytes not yet consumed (prefix/header stage)
        self._prefix: tuple[int, int] | None = None  # (header_len, payload_len)
        self._header: bytes | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._eof = False
        self._broken: RemoteProtocolError | None = None

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but is not complete (for the frame deadline)."""
        return bool(self._pending) or self._prefix is not None

    @property
    def awaiting_admission(self) -> bool:
        """A large payload is announced and waits for ``admit()`` (nothing allocated yet)."""
        return (
            self._prefix is not None
            and self._payload is None
            and self.admit_above is not None
            and self._prefix[1] > self.admit_above
            and not self._admitted
        )

    def admit(self) -> None:
        if not self.awaiting_admission:
            raise LocalProtocolError("no payload is waiting for admission")
        self._admitted = True

    @property
    def payload_len(self) -> int | None:
        """Payload size of the frame being received, once its prefix has been read."""
        return None if self._prefix is None else self._prefix[1]

    @property
    def payload_received(self) -> int:
        """Payload bytes of the current frame already in place (for download progress)."""
        return self._filled if self._payload is not None else 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            return
        view = memoryview(data)
        if self._payload is not None and not self._pending:
            # Fast path: copy straight into the preallocated payload buffer.
            n = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
        self._pending += view

    def receive_eof(self) -> None:
        self._eof = True

    def next_frame(self) -> Frame | _Sentinel:
        """A complete frame, or ``NEED_DATA``; raises on a frame that breaks the rules."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _next(self) -> Frame | _Sentinel:
        if self._prefix is None:
            if len(self._pending) < PREFIX_LEN:
                return self._need()
            frame_len, frame_type, header_len = PREFIX.unpack_from(self._pending)
            if frame_type != FRAME_TYPE_MESSAGE:
                raise MalformedFrame(f"unknown frame type {frame_type}")
            if header_len == 0:
                raise MalformedFrame("a frame must carry a header")
            if header_len > self.max_header:
                raise FrameTooLarge(f"header of {header_len} bytes (limit {self.max_header})")
            payload_len = frame_len - 5 - header_len
            if payload_len < 0:
                raise MalformedFrame("frame length shorter than its header")
            if payload_len > self.max_payload:
                raise FrameTooLarge(f"payload of {payload_len} bytes (limit {self.max_payload})")
            self._prefix = (header_len, payload_len)
            del self._pending[:PREFIX_LEN]
        header_len, payload_len = self._prefix
        if self.awaiting_admission:
            return NEED_DATA
        if self._header is None:
            if len(self._pending) < header_len:
                return self._need()
            self._header = bytes(self._pending[:header_len])
            del self._pending[:header_len]
            self._payload = bytearray(payload_len)
            self._filled = 0
        assert self._payload is not None
        if self._pending and self._filled < payload_len:
            n = min(len(self._pending), payload_len - self._filled)
            self._payload[self._filled : self._filled + n] = self._pending[:n]
            self._filled += n
            del self._pending[:n]
        if self._filled < payload_len:
            return self._need()
        frame = Frame(self._header, self._payload)
        self._prefix, self._header, self._payload, self._filled = None, None, None, 0
        self._admitted = False
        return frame

    def _need(self) -> _Sentinel:
        if self._eof:
            if self.in_frame:
                raise MalformedFrame("connection closed in the middle of a frame")
            return NEED_DATA
        return NEED_DATA

    @property
    def closed(self) -> bool:
        """End of stream seen and nothing left to hand out."""
        return self._eof and not self.in_frame
