"""Who is connected and what one round holds: the coordinator's bookkeeping types.

Kept apart from ``coordinator`` so the decisions (when a step closes, what is published)
read on their own; these are only the records they act on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from securefl.crypto.pki import Role
from securefl.crypto.secagg import ServerRound, ServerState
from securefl.errors import RemoteProtocolError, SecureFLError
from securefl.protocol import messages as wm
from securefl.protocol.conversation import Conversation
from securefl.server.plain import PlainRound

Push = Callable[[wm._Wire, np.ndarray | None], Awaitable[None]]


class RoundBusyError(SecureFLError):
    code = "round-busy"


@dataclass(eq=False)
class Peer:
    """One authenticated connection: who it is (from the certificate), how to reach it, and
    the server's end of its wire order (every frame in or out passes ``conversation``)."""

    name: str
    role: Role
    cert_der: bytes
    push: Push
    conversation: Conversation
    address: str = ""
    open: bool = True


@dataclass(eq=False)
class ActiveRound:
    round_id: int
    base_version: int
    engine: ServerRound | PlainRound
    members: dict[str, Peer] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    #: Joined, but enrolment closed before their keys arrived: answered ``enrolment-closed``.
    late: dict[str, Peer] = field(default_factory=dict)
    deadline_passed: bool = False
    #: A retry round waits only for the members of the failed round still online.
    invited: frozenset[str] = frozenset()
    #: Only the invited may join (a retry bound to a signed survivor list).
    exact: bool = False
    #: How many failed rounds this one is retrying (bounded by ``max_retries``).
    attempt: int = 0
    step_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: The admin connection waiting on ``aggregate``: told as unmask answers arrive.
    watcher: Peer | None = None
    timer: asyncio.TimerHandle | None = None
    #: ``round-doomed`` was recorded (``cannot_finish``): said once.
    doomed: bool = False

    @property
    def phase(self) -> str:
        return self.engine.state.value

    def submitted(self) -> list[str]:
        """Hospitals whose (masked) update is in the running sum."""
        eng = self.engine
        if isinstance(eng, PlainRound):
            return eng.submitted_names()
        return sorted(eng.name_of(u) for u in eng.survivors)

    def cannot_finish(self) -> str | None:
        """Why this collecting round can no longer publish, or None.

        Why it matters: a member that leaves after its masked input went in cannot come
        back into this round (membership is its connection).  When fewer of the round's
        hospitals are still connected than the survivor list needs signatures (t), the
        round is lost; aggregating it anyway would send out a survivor list naming the
        hospital that left, and bind every later round on this version to exactly that
        list: a federation stalled on a hospital that cannot rejoin."""
        eng = self.engine
        if (not isinstance(eng, ServerRound) or eng.roster is None
                or eng.state is not ServerState.COLLECTING):
            return None
        gone = sorted(n for n in self.submitted() if not self.members[n].open)
        still = sorted(n for n, p in self.members.items() if p.open)
        t = eng.roster.config.threshold
        if not gone or len(still) >= t:
            return None
        them = ", ".join(f"'{n}'" for n in gone)
        return (f"{them} left after sending {'its' if len(gone) == 1 else 'their'} masked "
                f"update, and the survivor list needs {t} signatures while only "
                f"{len(still)} of the round's hospitals ({', '.join(still) or 'none'}) are "
                "still connected")

    def may_all_send_again(self) -> bool:
        """Whether every member may send its update again into any later round on this
        version once this one ends before its survivor list went out.

        Why: a hospital whose masked input left but who signed no list treats its update as
        possibly exposed when the others alone could sign a list without it (n - 1 >= t;
        ``securefl.client.outbox``), and sends nothing more on that version.  Only when no
        list could be signed without every member (t = n) is ending a lost round early a way
        forward for all of them; otherwise the list still goes out, so those online at least
        resend into a round of exactly its names."""
        eng = self.engine
        return (isinstance(eng, ServerRound) and eng.roster is not None
                and len(eng.roster.participants) - 1 < eng.roster.config.threshold)

    def index_of(self, name: str) -> int:
        """The participant number of a member, once the roster exists."""
        eng = self.engine
        if not isinstance(eng, ServerRound) or eng.roster is None:
            raise RemoteProtocolError(f"round {self.round_id} has no roster yet")
        try:
            return eng.roster.index_of(name)
        except KeyError:
            raise RemoteProtocolError(f"'{name}' is not on the roster of round "
                                      f"{self.round_id}") from None
