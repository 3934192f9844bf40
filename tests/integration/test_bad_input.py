"""Hostile and broken peers over real TLS: each gets a clear error (or nothing, if it never
authenticated), and the server goes on serving everyone else."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession
from securefl.client.transport import client_context
from securefl.protocol import frames
from securefl.server.audit import read_entries

from .conftest import Federation, running

D = 1000


class Raw:
    """A TLS connection speaking bytes, for sending what our own client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = frames.FrameParser()

    @classmethod
    async def open(cls, fed: Federation, name: str, port: int, *, hello: bool = True) -> Raw:
        """Connected, and past ``hello`` unless told not to (a connection must start with
        it).  The hello's rid is 1000, out of the way of the tests' own."""
        s = fed.client_settings(name, port)
        ctx = client_context(s.cert, s.key, s.ca)
        raw = cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                 server_hostname="127.0.0.1"))
        if hello:
            welcome = await raw.request({"kind": "hello", "rid": 1000, "protocol": 4})
            assert welcome["kind"] == "welcome", welcome
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, header: dict | bytes, payload: bytes = b"") -> dict:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        await self.send(frames.encode_frame(raw, payload))
        return await self.reply()

    async def reply(self) -> dict:
        """The next frame's header, or {"eof": True} when the server closed the connection."""
        while True:
            frame = self.parser.next_frame()
            if frame is not frames.NEED_DATA:
                return json.loads(frame.header)
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), 20)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                return {"eof": True}
            self.parser.receive_data(data)

    def close(self) -> None:
        self.writer.close()


async def _others_still_served(fed: Federation, port: int) -> None:
    async with AdminSession(fed.client_settings("admin", port)) as admin:
        assert await admin.version() == 0
    async with HospitalSession(fed.client_settings("b", port)) as h:
        assert (await h.get_global()).weights.shape == (D,)


def _plain(fed: Federation, **limits: object) -> config.ServerSettings:
    return fed.server_settings(round=config.RoundSettings(masking="plain"),
                               limits=config.Limits(**limits))


@pytest.mark.parametrize(("header", "payload", "code"), [
    (b"{not json", b"", "bad-message"),
    ({"kind": "status", "rid": 1, "extra": 1}, b"", "bad-message"),
    ({"kind": "teleport", "rid": 1}, b"", "bad-message"),
    ({"kind": "status", "rid": 0}, b"", "bad-message"),
    ({"kind": "status", "rid": 1}, b"unexpected", "bad-message"),
    # A hospital cannot claim a name: identity fields do not exist on the wire.
    ({"kind": "advertise", "rid": 1, "round_id": 1, "name": "b", "c_pk": "", "s_pk": "",
      "signature": ""}, b"", "bad-message"),
    ({"kind": "advertise", "rid": 1, "round_id": 1, "c_pk": "***", "s_pk": "",
      "signature": ""}, b"", "bad-message"),
    ({"kind": "admin", "rid": 1, "action": "aggregate"}, b"", "forbidden"),
    ({"kind": "hello", "rid": 1, "protocol": 1}, b"", "unsupported-protocol"),
    ({"kind": "masked_input", "rid": 1, "round_id": 1,
      "array": {"dtype": "<u4", "shape": [D + 1]}}, b"\0" * 16, "bad-shape"),
    ({"kind": "share_keys", "rid": 1, "round_id": 1, "envelopes": {},
      "digests": {}, "b_commit": "AAAA"}, b"", "not-joined"),
    ({"kind": "join", "rid": 1, "base_version": 7}, b"", "stale-version"),
    ({"kind": "join", "rid": 1, "base_version": 2**64}, b"", "bad-message"),  # not a u64
    # A strict wire (issue 14, item 7): nothing is coerced.
    ({"kind": "status", "rid": "2"}, b"", "bad-message"),
    ({"kind": "status", "rid": 2.0}, b"", "bad-message"),
    ({"kind": "status", "rid": True}, b"", "bad-message"),
    ({"kind": "hello", "rid": 5}, b"", "bad-message"),  # which protocol?
    ({"kind": "join", "rid": 6, "base_version": "0"}, b"", "bad-message"),
    # What only the server sends, sent to it as a request: not a request at all.
    ({"kind": "round_done", "rid": 8, "round_id": 1, "version": 0}, b"", "bad-message"),
    ({"kind": "welcome", "rid": 9, "name": "a", "role": "hospital", "version": 0,
      "protocol": 4}, b"", "bad-message"),
    ({"kind": "error", "rid": 10, "code": "x", "message": "y"}, b"", "bad-message"),
    # Element counts whose product overflows 64 bits (item 8): refused, no internal error.
    ({"kind": "masked_input", "rid": 7, "round_id": 1,
      "array": {"dtype": "<u4", "shape": [65536, 65536, 65536, 65536]}}, b"", "bad-shape"),
])
def test_malformed_requests_get_a_typed_error_and_the_connection_lives(
    fed: Federation, header: dict | bytes, payload: bytes, code: str
) -> None:
    async def scenario() -> None:
        async with running(_plain(fed)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            reply = await raw.request(header, payload)
            assert reply.get("kind") == "error" and reply["code"] == code, reply
            assert "Traceback" not in reply["message"] and "pydantic" not in reply["message"]
            # The reply answers the request it refuses whenever its rid is a valid u32
            # (item 6: it used to be 0, and a client following the spec hung).
            rid = header.get("rid") if isinstance(header, dict) else None
            valid = isinstance(rid, int) and not isinstance(rid, bool) and rid > 0
            assert reply["rid"] == (rid if valid else 0), reply
            # Framing was intact, so the same connection still works.
            assert (await raw.request({"kind": "status", "rid": 2}))["kind"] == "status_reply"
            raw.close()
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())
    # Every refusal is in the audit log with its code and who asked (issue 14, item 10).
    refused = [e for e in read_entries(fed.certs.root / "audit.jsonl")
               if e["event"] == "request-refused"]
    assert [(e["name"], e["code"]) for e in refused] == [("a", code)]


def test_a_connection_must_start_with_hello(fed: Federation) -> None:
    """Before a welcome, every other request is bad-message with its rid (issue 14, item 7:
    hello was not required at all); the connection lives, and a hello then works."""
    async def scenario() -> None:
        async with running(_plain(fed)) as srv:
            raw = await Raw.open(fed, "a", srv.port, hello=False)
            for header in ({"kind": "status", "rid": 3}, {"kind": "get_global", "rid": 4},
                           {"kind": "join", "rid": 5, "base_version": 0}):
                reply = await raw.request(header)
                assert (reply["kind"], reply["code"], reply["rid"]) == (
                    "error", "bad-message", header["rid"]), reply
                assert "hello" in reply["message"]
            # A refused hello (another protocol) does not count as one.
            assert (await raw.request({"kind": "hello", "rid": 6, "protocol": 1}))["code"] == (
                "unsupported-protocol")
            assert (await raw.request({"kind": "status", "rid": 7}))["code"] == "bad-message"
            assert (await raw.request({"kind": "hello", "rid": 8, "protocol": 4}))["kind"] == (
                "welcome")
            assert (await raw.request({"kind": "status", "rid": 9}))["kind"] == "status_reply"
            raw.close()
            admin = await Raw.open(fed, "admin", srv.port, hello=False)
            reply = await admin.request({"kind": "admin", "rid": 2, "action": "version"})
            assert (reply["code"], reply["rid"]) == ("bad-message", 2), reply
            admin.close()

    asyncio.run(scenario())
    refused = [(e["name"], e["code"]) for e in read_entries(fed.certs.root / "audit.jsonl")
               if e["event"] == "request-refused"]
    assert refused == [("a", "bad-message")] * 3 + [("a", "unsupported-protocol"),
                                                    ("a", "bad-message"),
                                                    ("admin", "bad-message")]


@pytest.mark.parametrize("update", [
    np.zeros(D + 2, "<u4"),          # wrong shape
    np.zeros(D + 1, "<f4"),          # floats (e.g. NaN/Inf) where ring elements belong
    np.full(D + 1, np.nan, "<f8"),
])
def test_wrong_shape_or_type_of_update_is_refused(fed: Federation, update: np.ndarray) -> None:
    async def scenario() -> None:
        async with running(_plain(fed)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            joined = await raw.request({"kind": "join", "rid": 1, "base_version": 0})
            assert joined["kind"] == "joined"
            spec = {"dtype": update.dtype.str, "shape": list(update.shape)}
            reply = await raw.request({"kind": "masked_input", "rid": 2, "round_id":
                                       joined["round_id"], "array": spec}, update.tobytes())
            assert reply["kind"] == "error" and reply["code"] == "remote-protocol", reply
            assert "expects" in reply["message"]
            status = await raw.request({"kind": "status", "rid": 3})
            assert status["submitted"] == []
            raw.close()
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())


@pytest.mark.parametrize(("prefix", "code"), [
    (struct.pack(">IBI", 0xFFFFFFFF, 1, 10), "frame-too-large"),      # claims 4 GiB
    (struct.pack(">IBI", 5 + 10 + 10 * D * 8, 1, 10), "frame-too-large"),  # oversized payload
    (struct.pack(">IBI", 100, 1, 0xFFFFFF), "frame-too-large"),       # header over limit
    (struct.pack(">IBI", 100, 7, 10), "malformed-frame"),             # unknown frame type
    (struct.pack(">IBI", 8, 1, 10), "malformed-frame"),               # shorter than header
])
def test_bad_frames_are_refused_before_allocation_and_closed(
    fed: Federation, prefix: bytes, code: str
) -> None:
    async def scenario() -> None:
        async with running(_plain(fed)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            await raw.send(prefix)
            reply = await raw.reply()
            assert reply.get("code") == code, reply
            assert (await raw.reply()) == {"eof": True}
            await _others_still_served(fed, srv.port)
            events = [e for e in read_entries(srv.settings.audit_log) if e["event"] == "closed"]
            assert events and events[-1]["reason"] == code

    asyncio.run(scenario())


def test_truncated_frame_then_hangup_disturbs_nobody(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(_plain(fed)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            whole = frames.encode_frame(b'{"kind":"status","rid":1}')
            await raw.send(whole[: len(whole) // 2])
            raw.writer.transport.abort()
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())


def test_idle_connection_is_closed_by_its_deadline(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(_plain(fed, idle_timeout=0.3)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            reply = await raw.reply()  # we send nothing at all
            assert reply.get("code") == "timeout" and "idle" in reply["message"]
            assert (await raw.reply()) == {"eof": True}
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())


def test_slow_drip_frame_is_closed_by_the_frame_deadline(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(_plain(fed, read_timeout=5, frame_timeout=0.5)) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            whole = frames.encode_frame(b'{"kind":"status","rid":1}' + b" " * 200)
            reply: dict = {}
            for byte in whole:  # one byte every 50 ms: each read is in time, the frame not
                try:
                    await raw.send(bytes([byte]))
                except (ConnectionError, ssl.SSLError):
                    break
                await asyncio.sleep(0.05)
                if raw.reader.at_eof() or raw.reader._buffer:
                    break
            reply = await raw.reply()
            assert reply.get("code") == "timeout" and "frame deadline" in reply["message"]
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())


def test_forged_keys_and_out_of_order_round_messages(fed: Federation) -> None:
    """A hospital that signs nothing, or skips ahead, is refused and the round goes on."""
    import base64

    def b64(n: int) -> str:
        return base64.b64encode(bytes(range(n))).decode()

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            raw = await Raw.open(fed, "a", srv.port)
            joined = await raw.request({"kind": "join", "rid": 1, "base_version": 0})
            rid = joined["round_id"]
            v0_sha = bytes.fromhex(srv.store.latest()[0].sha256)
            forged = await raw.request({"kind": "advertise", "rid": 2, "round_id": rid,
                                        "c_pk": b64(32), "s_pk": b64(32),
                                        "signature": b64(70),
                                        "base_sha256": base64.b64encode(v0_sha).decode(),
                                        "graph_commit": b64(32)})
            assert forged["kind"] == "error" and forged["code"] == "crypto", forged
            early = await raw.request({"kind": "share_keys", "rid": 3, "round_id": rid,
                                       "envelopes": {"1": b64(10)},
                                       "digests": {"1": b64(64)}, "b_commit": b64(32)})
            assert early["kind"] == "error" and early["code"] == "remote-protocol", early
            assert "roster" in early["message"] or "not allowed" in early["message"]
            wrong = await raw.request({"kind": "unmask_response", "rid": 4, "round_id": rid + 5,
                                       "b_shares": {}, "s_shares": {}})
            assert wrong["code"] == "wrong-round"
            status = await raw.request({"kind": "status", "rid": 5})
            assert status["phase"] == "enrolling" and status["joined"] == ["a"]
            raw.close()
            await _others_still_served(fed, srv.port)

    asyncio.run(scenario())
