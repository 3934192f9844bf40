"""What both roles of a round agree on: config checks, HKDF contexts, the transition check.

Names follow Bonawitz et al. 2017 (Fig. 4): ``U1`` hospitals that shared keys, ``U2`` those
whose masked input arrived ("survivors"), ``U1 \\ U2`` the dropped ones, ``t`` the threshold,
``b_u`` a self-mask seed, ``s_uv`` a pairwise mask seed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from securefl.crypto.keys import advertisement_bytes
from securefl.crypto.messages import Roster, RoundConfig
from securefl.errors import ConfigError, LocalProtocolError, RemoteProtocolError

# HKDF labels, one per purpose (securefl/v1/<label>|<round context>).
PAIR_MASK = "pair-mask"
SELF_MASK = "self-mask"
ENVELOPE_KEY = "envelope"

#: A role's state type: ``step`` returns a state of the same type as the table's.
State = TypeVar("State", bound=Enum)
#: {state: {event (a message type or a local action's name): next state}}
Table = Mapping[State, Mapping[Any, State]]


def round_context(config: RoundConfig) -> bytes:
    """Binds every derived key to this round of this federation's model version."""
    return struct.pack(">QQ", config.round_id, config.base_version)


def roster_digest(roster: Roster) -> bytes:
    """sha256 over everything a roster fixes: config, names, keys, certificates, signatures.

    Signed inside the consistency statement, so two hospitals that were shown different
    rosters can never count each other's signatures.
    """
    c, e = roster.config, roster.config.encoding
    h = hashlib.sha256(b"securefl/v4/roster\x00")
    h.update(struct.pack(">QQQHHH", c.round_id, c.base_version, c.vector_len, c.threshold,
                         c.neighbours, c.min_contributors))
    h.update(struct.pack(">HddQQ", e.ring_bits, e.clip, e.scale, e.max_clients, e.max_weight))
    for a in roster.participants:
        for part in (advertisement_bytes(a.round_id, a.base_version, a.name, a.c_pk, a.s_pk,
                                         a.base_sha256, a.graph_commit), a.cert_der,
                     a.signature):
            h.update(struct.pack(">I", len(part)))
            h.update(part)
    return h.digest()


def graph_commitment(round_id: int, base_version: int, name: str, value: bytes) -> bytes:
    """What a hospital's advertisement commits to: a hash of its 32-byte graph-seed value.

    Bound to the round and the hospital's name, so a colluder cannot copy an honest
    hospital's commitment and later reveal the same value as its own.
    """
    if len(value) != 32:
        raise ConfigError("a graph-seed value is 32 bytes")
    raw = name.encode()
    return hashlib.sha256(b"securefl/v4/graph-commit\x00" + struct.pack(
        ">QQH", round_id, base_version, len(raw)) + raw + value).digest()


def graph_seed(config: RoundConfig, values: Sequence[bytes]) -> bytes:
    """The SecAgg+ graph seed: a hash of every participant's revealed value, roster order.

    Why everyone's: one honest hospital's fresh random value, committed before anyone's was
    seen, makes the seed uniform; the server and any colluders can only abort a round (a
    fresh draw, which hospitals cap per base version), never pick the graph.
    """
    h = hashlib.sha256(b"securefl/v4/graph-seed\x00" + round_context(config))
    for v in values:
        h.update(v)
    return h.digest()


def share_digest(config: RoundConfig, kind: bytes, dealer: int, holder: int,
                 share: bytes) -> bytes:
    """What a dealer commits to for each share it hands out (``kind`` b"b" or b"s").

    Why: at the unmask step the server checks every returned share against its dealer's
    digest, so a hospital that returns a wrong share is caught and named at any number of
    answers (with t answers there is no redundancy to decode errors from).  The holder
    checks its digests on receipt, so a dealer cannot frame an honest holder.  The digest
    hides the share: to anyone holding fewer than t shares each one is a uniformly random
    field element.
    """
    return hashlib.sha256(b"securefl/v4/share-digest\x00" + kind + round_context(config)
                          + struct.pack(">II", dealer, holder) + share).digest()


def self_mask_commit(config: RoundConfig, dealer: int, b: bytes) -> bytes:
    """The dealer's commitment to its self-mask seed b_u: a b_u rebuilt from shares that
    each match their digests but lie on no single polynomial is caught (and the dealer
    named) instead of stripping the wrong mask."""
    return hashlib.sha256(b"securefl/v4/self-mask-commit\x00" + round_context(config)
                          + struct.pack(">I", dealer) + b).digest()


def check_config(config: RoundConfig, n: int) -> None:
    """Refuse a round whose parameters would leak or could not finish.

    Each hospital's secrets are shared among its k neighbours and itself (k + 1 holders, as
    in Bonawitz et al. where users also keep a share), so ``t <= k + 1``.  ``t > (k + 1) / 2``
    matters for privacy, not just liveness: otherwise a server could collect self-mask
    shares from one half of the holders and key shares from the other half and strip both
    of that hospital's masks.
    """
    k, t = config.neighbours, config.threshold
    if n < 2:
        raise ConfigError(f"a round needs at least 2 hospitals, it has {n}")
    if not (1 <= k <= n - 1):
        raise ConfigError(f"neighbour count {k} impossible with {n} hospitals")
    if k < n - 1 and k % 2:
        raise ConfigError(f"neighbour count {k} must be even when below n - 1")
    holders = k + 1
    if not (holders / 2 < t <= holders):
        raise ConfigError(
            f"threshold {t} is unsafe or unreachable with {holders} share holders: it must be "
            f"more than half of them ({holders // 2 + 1} or more) and at most all of them"
        )
    if config.min_contributors < 2:
        raise ConfigError("a round must combine at least 2 hospitals, or one would be exposed")
    if config.min_contributors > n:
        raise ConfigError(f"the round asks for {config.min_contributors} contributors but has "
                          f"only {n} hospitals, so it could never finish")
    if n > config.encoding.max_clients:
        raise ConfigError(
            f"{n} hospitals exceed the encoding's budget of {config.encoding.max_clients}"
        )
    if config.vector_len < 1:
        raise ConfigError("round config has an empty model")


def step(table: Table[State], state: State, event: Any, *, remote: bool) -> State:
    """Next state from the role's transition table, or the right kind of protocol error."""
    nxt = table.get(state, {}).get(event)
    if nxt is None:
        name = event.__name__ if isinstance(event, type) else str(event)
        text = f"{name} is not allowed while the round is {state.value}"
        raise (RemoteProtocolError if remote else LocalProtocolError)(text)
    return nxt
