import os

import pytest

from securefl.crypto import envelope, graph
from securefl.errors import ConfigError, CryptoError

KEY = os.urandom(32)
B, S = bytes(range(33)), bytes(range(33, 66))
ROUTE = {"round_id": 4, "base_version": 2, "sender": 1, "recipient": 2}


def test_envelope_round_trip():
    ct = envelope.seal(KEY, b_share=B, s_share=S, **ROUTE)
    assert len(ct) == envelope.ENVELOPE_BYTES
    assert envelope.open_envelope(KEY, ct, **ROUTE) == (B, S)
    assert B not in ct and S not in ct


@pytest.mark.parametrize("position", [0, 12, 40, envelope.ENVELOPE_BYTES - 1])
def test_tampered_envelope_is_rejected(position):
    ct = bytearray(envelope.seal(KEY, b_share=B, s_share=S, **ROUTE))
    ct[position] ^= 0x01
    with pytest.raises(CryptoError, match="failed authentication"):
        envelope.open_envelope(KEY, bytes(ct), **ROUTE)


@pytest.mark.parametrize(
    "change", [{"recipient": 3}, {"sender": 5}, {"round_id": 5}, {"base_version": 3}]
)
def test_misrouted_or_replayed_envelope_is_rejected(change):
    ct = envelope.seal(KEY, b_share=B, s_share=S, **ROUTE)
    with pytest.raises(CryptoError, match="failed authentication"):
        envelope.open_envelope(KEY, ct, **{**ROUTE, **change})


def test_envelope_under_another_key_is_rejected():
    ct = envelope.seal(KEY, b_share=B, s_share=S, **ROUTE)
    with pytest.raises(CryptoError):
        envelope.open_envelope(os.urandom(32), ct, **ROUTE)


def test_truncated_envelope_is_rejected():
    ct = envelope.seal(KEY, b_share=B, s_share=S, **ROUTE)
    with pytest.raises(CryptoError, match="wrong size"):
        envelope.open_envelope(KEY, ct[:-1], **ROUTE)


@pytest.mark.parametrize(("n", "k"), [(10, 4), (31, 6), (100, 12), (7, 6), (5, 2)])
def test_graph_is_symmetric_regular_and_deterministic(n, k):
    seed = os.urandom(32)
    g = graph.neighbours(n, k, seed)
    assert set(g) == set(range(1, n + 1))
    assert all(len(vs) == k and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == graph.neighbours(n, k, seed)


def test_graph_depends_on_the_seed():
    assert graph.neighbours(50, 6, bytes(32)) != graph.neighbours(50, 6, b"\x01" * 32)


def test_graph_effective_degree():
    assert graph.effective_degree(10, None) == 9
    assert graph.effective_degree(10, 50) == 9
    assert graph.effective_degree(10, 5) == 4
    with pytest.raises(ConfigError):
        graph.effective_degree(1, None)
    with pytest.raises(ConfigError):
        graph.effective_degree(10, 1)
    with pytest.raises(ConfigError):
        graph.neighbours(10, 5, bytes(32))
