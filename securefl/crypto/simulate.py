"""A whole secure-aggregation round in one process, no network: for tests, benchmarks,
the in-memory demo and the ML experiments that compare secure and plain FedAvg.

It drives real ``ClientRound``/``ServerRound`` objects exactly as the network layer does,
only passing messages by function call; hospitals listed in a ``drop`` set vanish at the
start of that stage (they never send that stage's message or anything after it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

import numpy as np

from securefl.crypto import pki
from securefl.crypto.messages import AggregateResult, Roster, RosterAcks, SeedReveals
from securefl.crypto.quantize import Encoding
from securefl.crypto.secagg import ClientRound, ServerRound
from securefl.crypto.secagg.policy import RoundPolicy

STAGES = ("advertise", "share", "input", "check", "unmask")

T = TypeVar("T")


@dataclass
class RoundTimings:
    """Seconds spent in each hospital and in the server, plus bytes of the masked inputs."""

    client_s: dict[str, float] = field(default_factory=dict)
    server_s: float = 0.0
    upload_bytes: int = 0


@lru_cache(maxsize=4)
def federation(n: int) -> tuple[pki.Credential, tuple[pki.Credential, ...]]:
    """A CA and ``n`` hospital credentials (cached: making keys is not what we measure)."""
    ca = pki.make_ca("simulated")
    return ca, tuple(pki.issue(ca, pki.Role.HOSPITAL, f"hospital-{i:03d}") for i in range(n))


def run_round(
    updates: Sequence[np.ndarray],
    weights: Sequence[int],
    *,
    encoding: Encoding | None = None,
    neighbours: int | None = None,
    threshold: int | None = None,
    drop: Mapping[str, Collection[int]] | None = None,
    round_id: int = 1,
    base_version: int = 0,
    on_stage: Callable[[str], None] | None = None,
    colluders: int = 1,
    on_message: Callable[[str, object], None] | None = None,
    sparse: bool = False,
    policy: RoundPolicy | None = None,
) -> tuple[AggregateResult, RoundTimings]:
    """Run one round; ``drop[stage]`` lists hospital indices (0-based) lost before ``stage``.

    ``colluders``: the c both the server's threshold and every hospital's policy assume.
    ``on_message(name, msg)`` hears every message a hospital sends, outside the timings
    (the benchmark counts their bytes on the wire with it).  ``sparse``: the server sizes a
    SecAgg+ graph by the analysis (``params.choose_graph``); ``policy``: every hospital's
    (default: ``colluders`` and sparse graphs accepted).

    Raises what the server raises (e.g. ``NotEnoughSurvivorsError``) when too many drop.
    """
    n = len(updates)
    drop = drop or {}
    unknown = set(drop) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {unknown}; use {STAGES}")
    encoding = encoding or Encoding.auto(max_clients=max(n, 2), max_weight=max(weights))
    ca, creds = federation(n)
    timings = RoundTimings()

    # The callers bind loop variables as lambda defaults (``lambda c=c: ...``), which mypy
    # cannot match to ``Callable[[], T]``: hence ``...``; every ``fn`` is called bare.
    def timed(name: str, fn: Callable[..., T]) -> T:
        t0 = time.perf_counter()
        out = fn()
        timings.client_s[name] = timings.client_s.get(name, 0.0) + time.perf_counter() - t0
        return out

    def sent(name: str, msg: T) -> T:
        if on_message is not None:
            on_message(name, msg)
        return msg

    def server_timed(fn: Callable[..., T]) -> T:
        t0 = time.perf_counter()
        out = fn()
        timings.server_s += time.perf_counter() - t0
        return out

    server = ServerRound(
        round_id=round_id,
        base_version=base_version,
        vector_len=int(updates[0].shape[0]),
        encoding=encoding,
        ca_cert=ca.cert,
        neighbours=neighbours,
        threshold=threshold,
        colluders=colluders,
        sparse=sparse,
    )
    policy = policy or RoundPolicy(colluders=colluders, allow_sparse=True)
    alive: dict[str, ClientRound] = {}
    lost: set[int] = set()

    def stage(name: str) -> None:
        lost.update(drop.get(name, ()))
        for i in lost:
            alive.pop(creds[i].name, None)
        if on_stage:
            on_stage(name)

    stage("advertise")
    for i in range(n):
        if i in lost:
            continue
        c = ClientRound(cert=creds[i].cert, signing_key=creds[i].key, ca_cert=ca.cert,
                        round_id=round_id, base_version=base_version,
                        update=updates[i], weight=int(weights[i]), policy=policy)
        alive[creds[i].name] = c
        adv = sent(creds[i].name, timed(creds[i].name, c.advertise))
        server_timed(lambda adv=adv, name=creds[i].name: server.receive(adv, from_name=name))
    roster = server_timed(server.close_enrolment)

    def everyone(message: Roster | RosterAcks | SeedReveals) -> None:
        """Every hospital still here answers ``message``; the server takes each answer."""
        for name, c in alive.items():
            msg = sent(name, timed(name, lambda c=c: c.receive(message)))
            server_timed(lambda msg=msg, name=name: server.receive(msg, from_name=name))

    everyone(roster)  # roster acknowledgements
    everyone(server_timed(server.close_acks))  # graph-seed values
    reveals = server_timed(server.close_reveals)

    stage("share")
    everyone(reveals)  # key shares
    bundles = server_timed(server.close_shares)

    stage("input")
    for name, c in alive.items():
        if c.me not in bundles:
            continue
        masked = sent(name, timed(name, lambda c=c: c.receive(bundles[c.me])))
        timings.upload_bytes = masked.y.nbytes
        server_timed(lambda msg=masked, name=name: server.receive(msg, from_name=name))
    listed = server_timed(server.close_inputs)

    def ask(request: object, addressed: Collection[int]) -> None:
        """Every hospital still here that ``request`` is addressed to answers it."""
        for name, c in alive.items():
            if c.me in addressed:
                msg = sent(name, timed(name, lambda c=c: c.receive(request)))
                server_timed(lambda msg=msg, name=name: server.receive(msg, from_name=name))

    stage("check")
    ask(listed, listed.survivors)
    requests = server_timed(server.close_check)

    stage("unmask")
    for name, c in alive.items():
        if c.me in requests:
            answer = sent(name, timed(name, lambda c=c: c.receive(requests[c.me])))
            server_timed(lambda msg=answer, name=name: server.receive(msg, from_name=name))
    result = server_timed(server.finish)
    return result, timings


def secure_weighted_mean(
    updates: Sequence[np.ndarray], weights: Sequence[int], *, clip: float = 1.0
) -> np.ndarray:
    """The sample-weighted mean of float32 update vectors, computed by a full secure round.

    For experiments that compare secure with plain FedAvg: the answer differs from the plain
    mean only by clipping to ``[-clip, clip]`` and the encoding's documented rounding.
    """
    encoding = Encoding.auto(clip=clip, max_clients=max(len(updates), 2),
                             max_weight=max(int(w) for w in weights))
    result, _ = run_round(
        [np.ascontiguousarray(u, dtype=np.float32) for u in updates],
        [int(w) for w in weights],
        encoding=encoding,
        colluders=0,  # an honest computation of the mean, not a security setting
    )
    return result.mean_update
