"""Connection admission without sockets: the counts an outsider or one certificate can reach,
and the audit summary of refusals (issue 14, item 3 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl import config
from securefl.errors import ConfigError
from securefl.server import admission as adm


def _limits(**changes: object) -> config.Limits:
    return config.Limits(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "source"), [
    ("127.0.0.2", "127.0.0.2"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),   # same /64: one source
    ("::ffff:10.0.0.7", "10.0.0.7"),                 # IPv4 through a dual-stack socket
    ("fe80::1%eth0", "fe80::/64"),
])
def test_a_source_is_an_address_or_an_ipv6_64(host: str, source: str) -> None:
    assert adm.source_of(host) == source


def test_one_source_gets_only_its_share_of_handshakes() -> None:
    a = adm.Admission(_limits(max_handshakes=10, max_handshakes_per_source=3,
                              max_connections=30, reserved_connections=0,
                              max_connections_per_identity=5))
    freed = []
    a.freed = lambda: freed.append(1)
    held = [a.open("10.0.0.1") for _ in range(3)]
    assert all(isinstance(t, adm.Ticket) and t.handshaking for t in held)
    # over its share: it waits for a slot (a burst from one NAT), up to max_handshakes
    queued = [a.open("10.0.0.1") for _ in range(10)]
    assert all(isinstance(t, adm.Ticket) and t.waiting for t in queued)
    assert a.open("10.0.0.1") == adm.TOO_MANY_FROM_SOURCE  # beyond the queue: reset
    assert not a.start(queued[0])  # type: ignore[arg-type]
    a.release(held[0])  # type: ignore[arg-type]
    assert freed == [1]
    assert a.start(queued[0]) and queued[0].handshaking  # type: ignore[union-attr]
    assert not a.start(queued[1])  # type: ignore[arg-type]
    others = [a.open(f"10.0.1.{i}") for i in range(7)]  # other addresses are not held up
    assert all(isinstance(t, adm.Ticket) and t.handshaking for t in others)
    assert a.open("10.0.2.1").waiting  # type: ignore[union-attr]  # the pool is full
    for _ in range(30 - 10):
        a.open("10.0.3.1" if a.queued["10.0.3.1"] < 10 else "10.0.4.1")
    assert a.open("10.0.5.1") == adm.TOO_MANY_HANDSHAKES  # every queue together is full


def test_hospitals_behind_one_address_are_limited_per_certificate_not_per_address() -> None:
    """A NAT: many hospitals, one address.  Once authenticated a connection no longer counts
    against the address, so the address never starves a registered hospital."""
    a = adm.Admission(_limits(max_handshakes_per_source=2, max_connections_per_identity=2))
    for name in [f"h{i}" for i in range(20)] * 2:
        ticket = a.open("192.0.2.1")
        assert isinstance(ticket, adm.Ticket)
        assert a.authenticate(ticket, "hospital", name) is None
    assert a.handshakes == {} and a.authenticated == 40
    third = a.open("192.0.2.1")
    assert isinstance(third, adm.Ticket)
    assert a.authenticate(third, "hospital", "h0") == adm.TOO_MANY_FOR_IDENTITY
    a.release(third)
    assert a.authenticated == 40 and a.identities[("hospital", "h0")] == 2


def test_the_reserve_lets_a_certificate_with_no_connection_in() -> None:
    a = adm.Admission(_limits(max_connections=10, reserved_connections=3,
                              max_connections_per_identity=10))
    busy = []
    for _ in range(7):  # one identity up to max_connections - reserved
        t = a.open("10.0.0.1")
        assert isinstance(t, adm.Ticket) and a.authenticate(t, "hospital", "h1") is None
        busy.append(t)
    t = a.open("10.0.0.1")
    assert isinstance(t, adm.Ticket)
    assert a.authenticate(t, "hospital", "h1") == adm.TOO_MANY_CONNECTIONS
    a.release(t)
    for name, role in [("h2", "hospital"), ("h3", "hospital"), ("admin", "admin")]:
        t = a.open("10.0.0.2")
        assert isinstance(t, adm.Ticket) and a.authenticate(t, role, name) is None
    t = a.open("10.0.0.3")
    assert isinstance(t, adm.Ticket)
    assert a.authenticate(t, "hospital", "h4") == adm.TOO_MANY_CONNECTIONS  # all 10 taken
    a.release(t)


def test_every_count_returns_to_empty() -> None:
    a = adm.Admission(_limits())
    tickets = [a.open(f"10.0.0.{i % 5}") for i in range(40)]
    for i, t in enumerate(tickets):
        assert isinstance(t, adm.Ticket)
        if i % 2:
            a.authenticate(t, "hospital", f"h{i % 7}")
    for t in tickets:
        a.release(t)  # type: ignore[arg-type]
        a.release(t)  # type: ignore[arg-type]  # twice is harmless
    assert a.empty


def test_refusals_are_summarised_in_bounded_counts() -> None:
    s = adm.RefusalSummary()
    assert s.take() is None
    for _ in range(300):
        s.add("10.99.0.1", "handshake timeout")
    for i in range(5000):  # far more addresses than are told apart: the rest are "(other)"
        s.add(f"10.{i // 250}.{i % 250}.1", "tls: certificate has expired" if i % 2 else
              adm.TOO_MANY_FROM_SOURCE)
    for i in range(100):
        s.add("10.99.0.2", f"tls: reason {i}")  # more reasons than are told apart
    fields = s.take()
    assert fields is not None and fields["count"] == 5400
    assert fields["sources"][0].endswith(" (other)")  # the busiest first
    assert fields["sources"][1] == "300 10.99.0.1"
    assert len(fields["sources"]) == adm.RefusalSummary.TOP
    assert fields["addresses"] <= adm.RefusalSummary.MAX_SOURCES + 1
    assert len(fields["reasons"]) <= adm.RefusalSummary.MAX_REASONS + 1
    assert sum(int(r.split(" ", 1)[0]) for r in fields["reasons"]) == 5400
    assert len(s.sources) == len(s.reasons) == 0 and s.take() is None


@pytest.mark.parametrize(("limits", "words"), [
    ({"max_connections": 20, "reserved_connections": 20},
     "reserved_connections (20) must be below"),
    ({"max_connections": 8, "reserved_connections": 0, "max_connections_per_identity": 9},
     "max_connections_per_identity (9) exceeds"),
    ({"max_handshakes": 4}, "max_handshakes_per_source (8) exceeds max_handshakes (4)"),
    ({"max_handshakes_per_source": 0}, "max_handshakes_per_source"),
    ({"recheck_interval": 0}, "recheck_interval"),
])
def test_inconsistent_admission_limits_are_refused_at_load(
    tmp_path: Path, limits: dict, words: str
) -> None:
    path = tmp_path / "server.toml"
    config.write_toml(path, {"cert": "s.pem", "key": "s.key", "ca": "ca.pem", "crl": "crl.pem",
                             "limits": limits})
    with pytest.raises(ConfigError, match="limits") as err:
        config.load(path, config.ServerSettings)
    assert words in err.value.message
    assert err.value.message.count("\n") == 0
