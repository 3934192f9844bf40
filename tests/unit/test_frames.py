"""The frame codec without sockets: any slicing, every limit, before any allocation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefl.errors import LocalProtocolError
from securefl.protocol import frames
from securefl.protocol.frames import NEED_DATA, FrameParser, FrameTooLarge, MalformedFrame


def _all(parser: FrameParser) -> list[frames.Frame]:
    out = []
    while (f := parser.next_frame()) is not NEED_DATA:
        out.append(f)
    return out


@given(
    msgs=st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=300)),
                  min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_frames_survive_any_slicing(msgs: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(frames.encode_frame(h, p) for h, p in msgs)
    parser = FrameParser()
    got: list[frames.Frame] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        parser.receive_data(stream[pos : pos + cut])
        pos += cut
        got += _all(parser)
    assert [(f.header, bytes(f.payload)) for f in got] == msgs
    assert not parser.in_frame


def test_byte_by_byte_reports_in_frame_and_payload_len() -> None:
    data = frames.encode_frame(b"{}", b"xyz")
    parser = FrameParser()
    for i, b in enumerate(data[:-1]):
        parser.receive_data(bytes([b]))
        assert parser.next_frame() is NEED_DATA
        assert parser.in_frame
        if i >= frames.PREFIX_LEN - 1:
            assert parser.payload_len == 3
    parser.receive_data(data[-1:])
    frame = parser.next_frame()
    assert isinstance(frame, frames.Frame) and bytes(frame.payload) == b"xyz"


@pytest.mark.parametrize(("prefix", "error"), [
    (struct.pack(">IBI", 0xFFFFFFFF, 1, 2), FrameTooLarge),
    (struct.pack(">IBI", 1000, 1, 0), MalformedFrame),  # no header at all,
    (struct.pack(">IBI", 1000, 1, 2000), FrameTooLarge),
    (struct.pack(">IBI", 1000, 2, 2), MalformedFrame),
    (struct.pack(">IBI", 6, 1, 2), MalformedFrame),
])
def test_bad_prefixes_are_refused_from_the_prefix_alone(prefix: bytes, error: type) -> None:
    parser = FrameParser(max_header=1024, max_payload=100)
    parser.receive_data(prefix)
    with pytest.raises(error):
        parser.next_frame()
    with pytest.raises(error):  # and it stays refused: the stream cannot be resynchronised
        parser.next_frame()


def test_a_4_gib_claim_allocates_nothing() -> None:
    parser = FrameParser()
    parser.receive_data(struct.pack(">IBI", 0xFFFFFFFF, 1, 2))
    with pytest.raises(FrameTooLarge):
        parser.next_frame()
    assert parser.payload_len is None  # no buffer was set up


def test_eof_in_the_middle_of_a_frame() -> None:
    parser = FrameParser()
    parser.receive_data(frames.encode_frame(b"{}", b"abc")[:-1])
    assert parser.next_frame() is NEED_DATA
    parser.receive_eof()
    with pytest.raises(MalformedFrame):
        parser.next_frame()


def test_clean_eof_and_misuse() -> None:
    parser = FrameParser()
    parser.receive_eof()
    assert parser.next_frame() is NEED_DATA and parser.closed
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        frames.encode_frame(b"")


def test_large_payload_waits_for_admission_before_allocation() -> None:
    data = frames.encode_frame(b"{}", b"z" * 100)
    parser = FrameParser(admit_above=50)
    parser.receive_data(data)
    assert parser.next_frame() is NEED_DATA and parser.awaiting_admission
    assert parser.next_frame() is NEED_DATA  # still waiting: nothing allocated or consumed
    parser.admit()
    frame = parser.next_frame()
    assert isinstance(frame, frames.Frame) and bytes(frame.payload) == b"z" * 100
    small = FrameParser(admit_above=50)
    small.receive_data(frames.encode_frame(b"{}", b"z" * 10))
    assert isinstance(small.next_frame(), frames.Frame)  # small ones never wait
    with pytest.raises(LocalProtocolError):
        small.admit()
