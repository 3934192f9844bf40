"""Who may hold a connection: counts per source before TLS, per certificate after it.

Why two stages with their own limits: before the handshake the server knows only an
address, after it a certificate.  One global cap (as before) let anyone who reaches the port
lock every hospital out with 256 idle TCP connections, and one hospital certificate do the
same with 256 TLS connections.  So:

* a connection still in its TLS handshake counts against its source address (one address,
  or one /64 for IPv6, where a host is handed a whole prefix) and against the pool of
  handshakes; both are small, and a handshake lasts milliseconds for a real client;
* once authenticated it leaves the handshake counts and counts against its certificate's
  identity (name and role) and the pool of authenticated connections, so hospitals behind
  one NAT address are never limited by that address;
* the two pools are separate, so connections that have not authenticated can never take a
  slot an authenticated hospital or the administrator needs; and the last
  ``reserved_connections`` authenticated slots go only to an identity that holds no other
  connection, so a registered hospital or the administrator gets in however many
  connections others hold.

Sans-I/O: the server asks, this answers with a refusal reason or admits; every admitted
connection must be released exactly once, so the counts never drift (the suite checks they
return to empty).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from securefl.config import Limits

#: Refusal reasons before a certificate is known (summarised in the audit, not one line each).
TOO_MANY_FROM_SOURCE = "too many handshakes from this address"
TOO_MANY_HANDSHAKES = "too many handshakes in progress"
#: Refusal reasons after the handshake (audited per connection: the peer is known).
TOO_MANY_FOR_IDENTITY = "too many connections for this certificate"
TOO_MANY_CONNECTIONS = "too many connections"


def source_of(host: str) -> str:
    """The address a handshake counts against: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(eq=False)
class Ticket:
    """One admitted connection's place in the counts."""

    source: str
    handshaking: bool = False  # counts against its source until the handshake ends
    waiting: bool = False      # queued for a handshake slot (see ``Admission.open``)
    identity: tuple[str, str] | None = None  # (role, name) once authenticated
    released: bool = False


class Admission:
    """The counts.  A connection over a handshake limit first waits for a slot (up to
    ``max_handshakes`` per address, ``max_connections`` in all), within its handshake
    deadline: twenty hospitals behind one NAT that connect in the same second are served
    one handshake batch after another instead of being reset; only beyond that queue is a
    connection reset at once."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.handshakes: Counter[str] = Counter()
        self.queued: Counter[str] = Counter()
        self.identities: Counter[tuple[str, str]] = Counter()
        self.in_handshake = 0
        self.in_queue = 0
        self.authenticated = 0
        #: Called whenever a handshake slot frees (the server wakes waiting connections).
        self.freed: Callable[[], None] | None = None

    def _room(self, source: str) -> bool:
        lim = self.limits
        return (self.handshakes[source] < lim.max_handshakes_per_source
                and self.in_handshake < lim.max_handshakes)

    def open(self, source: str) -> Ticket | str:
        """A connection accepted from ``source``: its ticket (handshaking, or waiting for
        ``start``), or why it is closed at once."""
        lim = self.limits
        ticket = Ticket(source)
        if self._room(source):
            self._begin(ticket)
            return ticket
        if self.queued[source] >= lim.max_handshakes:
            return TOO_MANY_FROM_SOURCE
        if self.in_queue >= lim.max_connections:
            return TOO_MANY_HANDSHAKES
        ticket.waiting = True
        self.queued[source] += 1
        self.in_queue += 1
        return ticket

    def start(self, ticket: Ticket) -> bool:
        """Whether a waiting connection may begin its handshake now (it then counts as
        handshaking); True at once for one that is not waiting."""
        if not ticket.waiting:
            return True
        if not self._room(ticket.source):
            return False
        self._unqueue(ticket)
        self._begin(ticket)
        return True

    def _begin(self, ticket: Ticket) -> None:
        ticket.handshaking = True
        self.handshakes[ticket.source] += 1
        self.in_handshake += 1

    def _unqueue(self, ticket: Ticket) -> None:
        if ticket.waiting:
            ticket.waiting = False
            self.queued[ticket.source] -= 1
            if self.queued[ticket.source] <= 0:
                del self.queued[ticket.source]
            self.in_queue -= 1

    def authenticate(self, ticket: Ticket, role: str, name: str) -> str | None:
        """The handshake gave this identity; None if it may stay, else why it is closed.
        Either way the connection no longer counts against its source."""
        self._end_handshake(ticket)
        identity = (role, name)
        lim = self.limits
        held = self.identities[identity]
        if held >= lim.max_connections_per_identity:
            return TOO_MANY_FOR_IDENTITY
        room = lim.max_connections - (lim.reserved_connections if held else 0)
        if self.authenticated >= room:
            return TOO_MANY_CONNECTIONS
        self.identities[identity] += 1
        self.authenticated += 1
        ticket.identity = identity
        return None

    def release(self, ticket: Ticket) -> None:
        """The connection closed (whatever stage it reached)."""
        if ticket.released:
            return
        ticket.released = True
        self._unqueue(ticket)
        self._end_handshake(ticket)
        if ticket.identity is not None:
            self.identities[ticket.identity] -= 1
            if self.identities[ticket.identity] <= 0:
                del self.identities[ticket.identity]
            self.authenticated -= 1

    def _end_handshake(self, ticket: Ticket) -> None:
        if ticket.handshaking:
            ticket.handshaking = False
            self.handshakes[ticket.source] -= 1
            if self.handshakes[ticket.source] <= 0:
                del self.handshakes[ticket.source]
            self.in_handshake -= 1
            if self.freed is not None:
                self.freed()

    @property
    def empty(self) -> bool:
        """Nothing is counted (every connection released)."""
        return (not self.handshakes and not self.identities and not self.queued
                and self.in_handshake == self.in_queue == self.authenticated == 0)


class RefusalFields(TypedDict):
    """The audit fields of one ``connections-refused`` line (``RefusalSummary.take``)."""

    count: int
    reasons: list[str]
    sources: list[str]
    addresses: int


class RefusalSummary:
    """Refusals of connections that never authenticated, counted for one audit line per
    interval instead of one line each.

    Why: anyone who reaches the port can open connections without a certificate; one line
    each (~200 bytes) let them grow the audit log without bound (3.5 MB after ~18,000).  The
    counts are bounded too: at most ``MAX_REASONS`` reasons and ``MAX_SOURCES`` addresses
    are told apart per interval, the rest are counted together.
    """

    MAX_REASONS = 32
    MAX_SOURCES = 1024
    TOP = 5
    OTHER = "(other)"

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.total = 0

    def add(self, source: str, reason: str) -> None:
        self.total += 1
        if reason in self.reasons or len(self.reasons) < self.MAX_REASONS:
            self.reasons[reason] += 1
        else:
            self.reasons[self.OTHER] += 1
        if source in self.sources or len(self.sources) < self.MAX_SOURCES:
            self.sources[source] += 1
        else:
            self.sources[self.OTHER] += 1

    def take(self) -> RefusalFields | None:
        """The audit fields summarising what was counted since the last call (None: nothing),
        and the counts start again.  Reasons and sources read ``"<count> <what>"``, most
        first; ``sources`` names the ``TOP`` busiest addresses of ``addresses`` in all."""
        if not self.total:
            return None
        fields: RefusalFields = {
            "count": self.total,
            "reasons": [f"{n} {why}" for why, n in self.reasons.most_common()],
            "sources": [f"{n} {src}" for src, n in self.sources.most_common(self.TOP)],
            "addresses": len(self.sources),
        }
        self.reasons, self.sources, self.total = Counter(), Counter(), 0
        return fields
