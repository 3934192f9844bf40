"""The same round without masks: the baseline the benchmark compares secure rounds against.

Why it exists: ``plain_round_s`` in ``bench/round_bench.py`` must measure the same transport,
framing, encoding and store with only the masking removed.  It mirrors the small part of
``ServerRound``'s interface the coordinator uses.  With it the server sees each hospital's
encoded update, so it is only switched on by ``masking = "plain"`` in the server settings.
"""

from __future__ import annotations

import numpy as np

from securefl.crypto.messages import AggregateResult, MaskedInput
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ServerState
from securefl.errors import NotEnoughSurvivorsError, RemoteProtocolError


class PlainRound:
    def __init__(
        self, *, round_id: int, vector_len: int, encoding: Encoding, min_contributors: int = 2
    ) -> None:
        self.state = ServerState.ENROLLING
        self.round_id, self.vector_len, self.encoding = round_id, vector_len, encoding
        self.min_contributors = min_contributors
        self._sum: np.ndarray | None = None
        self._names: list[str] = []
        self.joined: list[str] = []

    @property
    def collected(self) -> int:
        return len(self._names)

    def submitted_names(self) -> list[str]:
        return sorted(self._names)

    def receive(self, msg: MaskedInput, *, from_name: str) -> None:
        if self.state not in (ServerState.ENROLLING, ServerState.COLLECTING):
            raise RemoteProtocolError(f"updates are not accepted while the round is "
                                      f"{self.state.value}")
        if from_name in self._names:
            raise RemoteProtocolError(f"'{from_name}' already sent its update")
        y = msg.y
        if y.dtype != self.encoding.dtype or y.shape != (self.vector_len + 1,):
            raise RemoteProtocolError(
                f"update has shape {y.shape} and type {y.dtype}; this round expects "
                f"({self.vector_len + 1},) of {np.dtype(self.encoding.dtype)}")
        if self._sum is None:
            self._sum = y.copy()
        else:
            np.add(self._sum, y, out=self._sum)
        self._names.append(from_name)

    def close_enrolment(self) -> None:
        self.state = ServerState.COLLECTING

    def close_inputs(self) -> None:
        if self.collected < self.min_contributors:
            self.fail()
            raise NotEnoughSurvivorsError(
                f"only {self.collected} update(s) arrived; at least {self.min_contributors} "
                "are needed")
        self.state = ServerState.UNMASKING

    def finish(self) -> AggregateResult:
        assert self._sum is not None
        mean, weight = self.encoding.decode(self._sum)
        self._sum = None
        self.state = ServerState.DONE
        return AggregateResult(self.round_id, 0, mean, weight, tuple(self.submitted_names()))

    def fail(self) -> None:
        self.state = ServerState.FAILED
        self._sum = None
