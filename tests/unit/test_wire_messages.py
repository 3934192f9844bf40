"""Wire models and their mapping to the crypto core's round messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securefl.crypto import messages as cm
from securefl.crypto.quantize import Encoding
from securefl.errors import RemoteProtocolError
from securefl.protocol import mapping
from securefl.protocol import messages as wm
from securefl.protocol.frames import Frame


def _frame(msg: wm._Wire, payload: bytes = b"") -> Frame:
    return Frame(wm.encode_header(msg), payload)


def test_bytes_travel_as_base64_and_come_back() -> None:
    msg = wm.Advertise(rid=3, round_id=1, c_pk=b"\x00" * 32, s_pk=b"\xff" * 32,
                       signature=b"sig", base_sha256=b"\x07" * 32, graph_commit=b"\x08" * 32)
    header = json.loads(wm.encode_header(msg))
    assert header["c_pk"] == "A" * 43 + "="
    back, array = wm.decode(_frame(msg))
    assert back == msg and array is None


def test_arrays_are_raw_little_endian_with_dtype_and_shape() -> None:
    y = np.arange(5, dtype=np.uint32)
    msg = wm.MaskedInputMsg(rid=1, round_id=2, array=wm.ArraySpec.of(y))
    assert json.loads(wm.encode_header(msg))["array"] == {"dtype": "<u4", "shape": [5]}
    back, array = wm.decode(_frame(msg, y.astype("<u4").tobytes()))
    assert isinstance(back, wm.MaskedInputMsg)
    np.testing.assert_array_equal(array, y)
    with pytest.raises(RemoteProtocolError) as err:
        wm.decode(_frame(msg, b"\0" * 19))
    assert err.value.code == "bad-shape"


@pytest.mark.parametrize("header", [
    b"[]", b"{}", b'{"kind":"status"', b'{"kind":"status","rid":-1}',
    b'{"kind":"status","rid":1,"name":"b"}', b'{"kind":"join","rid":1}',
    b'{"kind":"masked_input","rid":1,"round_id":1,"array":{"dtype":">f4","shape":[1]}}',
    b'{"kind":"masked_input","rid":1,"round_id":1,"array":{"dtype":"<f4","shape":[]}}',
    b'{"kind":"advertise","rid":1,"round_id":1,"c_pk":"%%%","s_pk":"","signature":""}',
    b"\xff\xfe",
    b'{"kind":"status","rid":1,"x":' + b"[" * 3000 + b"]" * 3000 + b"}",  # RecursionError
])
def test_malformed_headers_are_refused_without_echoing_them(header: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        wm.decode(Frame(header, b""))
    assert err.value.code == "bad-message"
    assert "%%%" not in err.value.message and "Traceback" not in err.value.message


_UNMASK = '{"kind":"unmask_request","round_id":1,"survivors":[1,2],"signatures":%s}'


@pytest.mark.parametrize("keys", ['{"01":"AAAA"}', '{"+1":"AAAA"}', '{" 1":"AAAA"}',
                                  '{"1_0":"AAAA"}', '{"0":"AAAA"}', '{"1":"AAAA","1":"AAAB"}'])
def test_participant_keys_have_one_spelling_and_appear_once(keys: str) -> None:
    """Probes found "01", "+1", "1_0" (read as 10) accepted and a repeated key silently
    overwritten: two readers of the same bytes could see different maps."""
    with pytest.raises(RemoteProtocolError) as err:
        wm.decode(Frame((_UNMASK % keys).encode(), b""))
    assert err.value.code == "bad-message"
    msg, _ = wm.decode(Frame((_UNMASK % '{"1":"AAAA","10":"AAAA"}').encode(), b""))
    assert set(msg.signatures) == {1, 10}  # type: ignore[union-attr]


@pytest.mark.parametrize(("header", "rid"), [
    (b'{"kind":"nope","rid":5}', 5), (b'{"rid":5,"rid":6}', 0), (b'{"rid":5,"x":{"rid":7}}', 5),
    (b'{"rid":"5"}', 0), (b'{"rid":4294967296}', 0), (b"[" * 3000, 0),
])
def test_an_error_reply_answers_the_rid_of_the_request_when_it_has_exactly_one(
        header: bytes, rid: int) -> None:
    assert wm.request_id(header) == rid


def test_models_are_frozen() -> None:
    msg = wm.Status(rid=1)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        msg.rid = 2  # type: ignore[misc]


def _roster() -> cm.Roster:
    enc = Encoding.auto(max_clients=4, max_weight=100)
    cfg = cm.RoundConfig(round_id=3, base_version=2, vector_len=10, threshold=2, neighbours=2,
                         encoding=enc, min_contributors=2)
    parts = tuple(cm.KeyAdvertisement(3, 2, n, bytes([i]) * 32, bytes([i + 1]) * 32,
                                      b"cert-" + n.encode(), b"sig", bytes([9 + i]) * 32,
                                      bytes([20 + i]) * 32)
                  for i, n in enumerate(["a", "b", "c"]))
    return cm.Roster(cfg, parts)


def test_the_graph_seed_steps_round_trip_through_the_wire() -> None:
    """Roster acknowledgements and graph-seed values, both directions."""
    ack = cm.RosterAck(3, 2, b"signature")
    msg, _ = wm.decode(_frame(mapping.roster_ack_to_wire(ack, rid=4)))
    assert mapping.roster_ack_from_wire(msg, sender=2) == ack  # type: ignore[arg-type]
    acks = cm.RosterAcks(3, {1: b"s1", 2: b"s2"})
    msg, _ = wm.decode(_frame(mapping.roster_acks_to_wire(acks)))
    assert mapping.roster_acks_from_wire(msg) == acks  # type: ignore[arg-type]
    rev = cm.SeedReveal(3, 2, b"\x05" * 32)
    msg, _ = wm.decode(_frame(mapping.seed_reveal_to_wire(rev, rid=5)))
    assert mapping.seed_reveal_from_wire(msg, sender=2) == rev  # type: ignore[arg-type]
    revs = cm.SeedReveals(3, {1: b"\x01" * 32, 2: b"\x02" * 32})
    msg, _ = wm.decode(_frame(mapping.seed_reveals_to_wire(revs)))
    assert mapping.seed_reveals_from_wire(msg) == revs  # type: ignore[arg-type]


def test_roster_round_trips_through_the_wire() -> None:
    roster = _roster()
    frame = _frame(mapping.roster_to_wire(roster))
    msg, _ = wm.decode(frame)
    assert isinstance(msg, wm.RosterMsg)
    assert mapping.roster_from_wire(msg) == roster


def test_the_largest_roster_reaches_a_hospital() -> None:
    """1000 hospitals with 64-character names and real-sized certificates: past the 1 MiB a
    server takes from a client, within what the hospital's parser accepts."""
    from securefl.crypto import pki
    from securefl.protocol import frames

    ca = pki.make_ca("big")
    cert = pki.cert_der(pki.issue(ca, pki.Role.HOSPITAL, "h" * 64).cert)
    one = wm.Participant(name="h" * 64, c_pk=bytes(32), s_pk=bytes(32), cert_der=cert,
                         signature=bytes(72), base_sha256=bytes(32), graph_commit=bytes(32))
    msg = wm.RosterMsg(round_id=1, base_version=0, vector_len=10, threshold=600,
                       neighbours=999, ring_bits=32, clip=1.0, scale=1024.0, max_clients=1000,
                       max_weight=10_000, min_contributors=2, participants=[one] * 1000)
    wire = frames.encode_frame(wm.encode_header(msg))
    assert len(wire) > frames.DEFAULT_MAX_HEADER
    parser = frames.FrameParser(max_header=frames.CLIENT_MAX_HEADER)
    parser.receive_data(wire)
    assert isinstance(wm.decode(parser.next_frame())[0], wm.RosterMsg)


def test_round_messages_round_trip() -> None:
    sk = cm.ShareKeys(round_id=1, sender=2, envelopes={1: b"x", 3: b"y"},
                      digests={1: b"d" * 64, 2: b"e" * 64, 3: b"f" * 64}, b_commit=b"c" * 32)
    msg, _ = wm.decode(_frame(mapping.share_keys_to_wire(sk, rid=4)))
    assert mapping.share_keys_from_wire(msg, sender=2) == sk  # type: ignore[arg-type]
    b = cm.EnvelopeBundle(round_id=1, recipient=2, envelopes={1: b"x"}, digests={1: b"d" * 64})
    msg, _ = wm.decode(_frame(mapping.bundle_to_wire(b)))
    assert mapping.bundle_from_wire(msg) == b  # type: ignore[arg-type]
    listed = cm.ConsistencyRequest(round_id=1, survivors=(1, 2, 4))
    msg, _ = wm.decode(_frame(mapping.survivor_list_to_wire(listed)))
    assert mapping.survivor_list_from_wire(msg) == listed  # type: ignore[arg-type]
    sig = cm.ConsistencySignature(round_id=1, sender=2, signature=b"\x30" * 70)
    msg, _ = wm.decode(_frame(mapping.signature_to_wire(sig, rid=5)))
    assert mapping.signature_from_wire(msg, sender=2) == sig  # type: ignore[arg-type]
    req = cm.UnmaskRequest(round_id=1, survivors=(1, 2, 4),
                           signatures={1: b"s1", 2: b"s2", 4: b"s4"})
    msg, _ = wm.decode(_frame(mapping.unmask_request_to_wire(req)))
    assert mapping.unmask_request_from_wire(msg) == req  # type: ignore[arg-type]
    resp = cm.UnmaskResponse(round_id=1, sender=2, b_shares={1: b"\x01" * 33},
                             s_shares={3: b"\x02" * 33})
    msg, _ = wm.decode(_frame(mapping.unmask_response_to_wire(resp, rid=9)))
    assert mapping.unmask_response_from_wire(msg, sender=2) == resp  # type: ignore[arg-type]


def test_identity_comes_from_the_caller_not_the_message() -> None:
    adv = wm.Advertise(rid=1, round_id=5, c_pk=b"c" * 32, s_pk=b"s" * 32, signature=b"x",
                       base_sha256=b"h" * 32, graph_commit=b"g" * 32)
    ka = mapping.advertisement_from_wire(adv, name="b", base_version=4, cert_der=b"der")
    assert (ka.name, ka.base_version, ka.cert_der) == ("b", 4, b"der")


def test_global_model_carries_the_class_names_in_order() -> None:
    w = np.arange(3, dtype="<f4")
    msg = wm.GlobalModel(rid=1, version=4, sha256="ab", contributors=2, total_samples=9,
                         created="2026-01-01T00:00:00+00:00", classes=["notumor", "glioma"],
                         array=wm.ArraySpec.of(w))
    header = json.loads(wm.encode_header(msg))
    assert header["classes"] == ["notumor", "glioma"]
    back, array = wm.decode(_frame(msg, w.tobytes()))
    assert isinstance(back, wm.GlobalModel) and back.classes == ["notumor", "glioma"]
    np.testing.assert_array_equal(array, w)
    # Protocol 3: a global_model without the field (a protocol-2 server) is refused.
    del header["classes"]
    with pytest.raises(RemoteProtocolError) as err:
        wm.decode(Frame(json.dumps(header).encode(), w.tobytes()))
    assert err.value.code == "bad-message"
    assert wm.PROTOCOL_VERSION == 4
