"""The SecAgg+ neighbour graph: a randomly relabelled Harary graph H(k, n).

Bell et al. 2020 ("Secure single-server aggregation with (poly)logarithmic overhead") show
that masking only with k ~ O(log n) neighbours keeps the server from learning individual
inputs with high probability, cutting client cost from O(n) to O(k).  Their construction
places the n participants on a ring in random order and joins each to its k/2 nearest on
either side.  With k = n - 1 it is the complete graph: classic SecAgg.

The random order comes from a PRG keyed by the round's ``graph_seed`` — every participant
derives the same graph without trusting anyone's arithmetic — never from ``random``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from securefl.crypto.prg import derive_seed, expand
from securefl.errors import ConfigError


def effective_degree(n: int, requested: int | None) -> int:
    """k actually used: n - 1 when not given or too large, otherwise rounded down to even."""
    if n < 2:
        raise ConfigError(f"a round needs at least 2 hospitals, not {n}")
    if requested is None or requested >= n - 1:
        return n - 1
    if requested < 2:
        raise ConfigError(f"each hospital needs at least 2 neighbours, not {requested}")
    return requested - (requested % 2)


def _permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates driven by AES-CTR output, with rejection sampling (no modulo bias)."""

    def draws() -> Iterator[int]:
        block = 0
        while True:  # practically one block: a rejection is rarer than 1 in 2**32 / n
            raw = expand(derive_seed(seed, "graph-order", block.to_bytes(4, "big")),
                         4 * n + 64, np.uint32)
            # Read as little-endian whatever the machine: every party must draw one graph.
            yield from np.frombuffer(raw.tobytes(), dtype="<u4").tolist()
            block += 1

    source = draws()
    order = list(range(1, n + 1))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (2**32 // bound) * bound
        r = next(source)
        while r >= limit:
            r = next(source)
        j = r % bound
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(n: int, k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Participant number (1..n) -> its neighbours; symmetric, k-regular, no self loops."""
    if k >= n - 1:
        everyone = frozenset(range(1, n + 1))
        return {u: everyone - {u} for u in everyone}
    if k % 2:
        raise ConfigError(f"the neighbour count must be even when below n - 1, not {k}")
    order = _permutation(n, seed)
    result: dict[int, set[int]] = {u: set() for u in range(1, n + 1)}
    for pos, u in enumerate(order):
        for step in range(1, k // 2 + 1):
            v = order[(pos + step) % n]
            result[u].add(v)
            result[v].add(u)
    return {u: frozenset(vs) for u, vs in result.items()}


def connected(graph: dict[int, frozenset[int]], nodes: frozenset[int]) -> bool:
    """Whether ``nodes`` form one connected piece of ``graph`` restricted to them.

    Why it matters: in a sparse graph the survivors' masks cancel only within each
    connected piece, so a split survivor graph lets even an honest server unmask the sum of
    each piece on its own — less than the total the hospitals agreed to reveal.
    """
    if not nodes:
        return True
    start = min(nodes)
    seen, todo = {start}, [start]
    while todo:
        for v in graph[todo.pop()] & nodes:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == set(nodes)
