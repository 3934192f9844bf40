"""securefl.client: the hospital's and the admin's sessions with the server.

``HospitalSession`` and ``AdminSession`` are the only network API the CLI and the TUIs use.
"""

from securefl.client.session import (
    AdminSession,
    AggregateOutcome,
    GlobalModel,
    HospitalSession,
    RoundAbandonedError,
    RoundOutcome,
    ServerStatus,
)

__all__ = [
    "AdminSession",
    "AggregateOutcome",
    "GlobalModel",
    "HospitalSession",
    "RoundAbandonedError",
    "RoundOutcome",
    "ServerStatus",
]
