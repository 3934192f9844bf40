"""Typed messages of one secure-aggregation round (Bonawitz et al. 2017, §4 / Fig. 4).

These are the inputs and outputs of the sans-I/O round objects in ``securefl.crypto.secagg``.
They know nothing about frames or sockets: ``securefl.protocol`` maps each one to a wire
frame (header fields + raw binary payload) and back.

Participants are numbered 1..n in the order of the roster (sorted by name); that number is
also the x-coordinate of the Shamir shares a participant holds, so it must never be 0.
Byte sizes: public keys 32 (raw X25519), Shamir share values ``SHARE_BYTES`` (big-endian).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from securefl.crypto.quantize import Encoding

#: Size of a Shamir share value: the field prime is just above 2**256.
SHARE_BYTES = 33
KEY_BYTES = 32
#: A dealer's digests for one holder: sha256 of the b share, then of the s share.
DIGEST_PAIR_BYTES = 64


@dataclass(frozen=True)
class KeyAdvertisement:
    """Round 0, hospital -> server: fresh round keys, signed with the hospital's certificate.

    ``signature`` covers (round_id, base_version, base_sha256, name, c_pk, s_pk) under
    ``securefl.crypto.keys.advertisement_bytes``; ``cert_der`` lets every other hospital
    check it against the federation CA without trusting the server.  ``base_sha256`` is the
    sha256 of the model bytes this hospital received as ``base_version``: every hospital
    checks that all others received the same bytes.  ``graph_commit`` commits to this
    hospital's share of the SecAgg+ graph seed (``common.graph_commitment``); the value
    itself is revealed only once every hospital acknowledged the same roster.
    """

    round_id: int
    base_version: int
    name: str
    c_pk: bytes
    s_pk: bytes
    cert_der: bytes
    signature: bytes
    base_sha256: bytes = bytes(32)
    graph_commit: bytes = bytes(32)


@dataclass(frozen=True)
class RoundConfig:
    """What the server fixes when enrolment closes; every hospital checks it before sharing.

    ``neighbours`` is k of the SecAgg+ graph (n - 1 = every pair masks, classic SecAgg);
    ``threshold`` is t, the shares needed to rebuild a secret.  The graph's random
    relabelling is not the server's to choose: its seed comes from every hospital's
    revealed commitment (``SeedReveals``), after the roster is fixed.
    """

    round_id: int
    base_version: int
    vector_len: int
    threshold: int
    neighbours: int
    encoding: Encoding
    min_contributors: int = 2


@dataclass(frozen=True)
class Roster:
    """Round 0 -> 1, server -> every joined hospital: the round's config and all keys."""

    config: RoundConfig
    participants: tuple[KeyAdvertisement, ...]

    def index_of(self, name: str) -> int:
        """1-based participant number of ``name`` (its Shamir x-coordinate)."""
        for i, adv in enumerate(self.participants, start=1):
            if adv.name == name:
                return i
        raise KeyError(name)


@dataclass(frozen=True)
class RosterAck:
    """Round 1, hospital -> server: its signature on the roster it holds
    (``keys.roster_statement``).  No hospital reveals its graph-seed value before it has
    seen every participant's acknowledgement of the same roster."""

    round_id: int
    sender: int
    signature: bytes


@dataclass(frozen=True)
class RosterAcks:
    """Round 1, server -> every participant: all participants' roster signatures."""

    round_id: int
    signatures: Mapping[int, bytes]


@dataclass(frozen=True)
class SeedReveal:
    """Round 1, hospital -> server: the 32-byte value its advertisement committed to."""

    round_id: int
    sender: int
    value: bytes


@dataclass(frozen=True)
class SeedReveals:
    """Round 1, server -> every participant: every participant's revealed value.  The
    graph seed is the hash of all of them (``common.graph_seed``), so it is random as long
    as one hospital is honest, and no one could see the others' values before committing."""

    round_id: int
    values: Mapping[int, bytes]


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, hospital -> server: one AES-GCM envelope per neighbour (recipient id -> ct).

    ``digests``: for every holder of this dealer's shares (its neighbours and itself),
    ``share_digest`` of its b share then of its s share (64 bytes); ``b_commit`` is
    ``self_mask_commit`` of b_u.  The server checks returned shares against them.
    """

    round_id: int
    sender: int
    envelopes: Mapping[int, bytes]
    digests: Mapping[int, bytes]
    b_commit: bytes


@dataclass(frozen=True)
class EnvelopeBundle:
    """Round 1 -> 2, server -> one hospital: the envelopes addressed to it (sender id -> ct)
    and, per sender, the 64 digest bytes that sender committed to for this recipient."""

    round_id: int
    recipient: int
    envelopes: Mapping[int, bytes]
    digests: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, hospital -> server: y_u, ring elements (uint32 or uint64), length D + 1.

    The last element is the masked sample count, so the server learns only the sum of
    counts and the count-weighted sum of updates.
    """

    round_id: int
    sender: int
    y: np.ndarray


@dataclass(frozen=True)
class ConsistencyRequest:
    """Round 3, server -> surviving hospitals: whose masked inputs are in the sum (U3).

    Each survivor checks the list and signs it (``ConsistencySignature``); no share leaves
    a hospital before it has seen t signatures on the same list (Bonawitz et al. 2017 §6).
    """

    round_id: int
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class ConsistencySignature:
    """Round 3, hospital -> server: its signature on ``keys.survivors_statement``."""

    round_id: int
    sender: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4, server -> hospitals that signed: the survivor list and t+ signatures on it.

    Carries no "dropped" list: each hospital takes as dropped those whose shares it holds
    and who are not on the signed list, so the server has nothing more to choose.
    """

    round_id: int
    survivors: tuple[int, ...]
    signatures: Mapping[int, bytes]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 4, hospital -> server: shares of b_u for survivors, of s_sk_u for the dropped.

    Keys are the participant whose secret the share belongs to; the share's x-coordinate is
    ``sender``.  A hospital never puts the same participant in both maps.
    """

    round_id: int
    sender: int
    b_shares: Mapping[int, bytes]
    s_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: the sample-weighted mean update and the total sample count."""

    round_id: int
    base_version: int
    mean_update: np.ndarray
    total_weight: int
    contributors: tuple[str, ...]
