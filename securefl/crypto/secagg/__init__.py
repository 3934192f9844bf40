"""Secure aggregation rounds (Bonawitz et al. 2017 with the SecAgg+ neighbour graph).

``ClientRound`` and ``ServerRound`` are sans-I/O state machines: the transport feeds them
typed messages from ``securefl.crypto.messages`` and sends what they return.
"""

from securefl.crypto.secagg.client import CLIENT_TABLE, ClientRound, ClientState
from securefl.crypto.secagg.server import SERVER_TABLE, ServerRound, ServerState

__all__ = [
    "CLIENT_TABLE",
    "SERVER_TABLE",
    "ClientRound",
    "ClientState",
    "ServerRound",
    "ServerState",
]
