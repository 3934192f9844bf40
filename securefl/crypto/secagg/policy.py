"""What one hospital accepts from a round, whatever the server's roster says.

Why the hospital's own: the server runs the round, so every parameter it fixes alone — the
threshold, how many hospitals a sum combines, whether masks are used — is exactly what a
dishonest server would fix.  ``ClientRound`` checks each roster and request against this
policy and refuses, with nothing revealed, when one falls short.
"""

from __future__ import annotations

from dataclasses import dataclass

from securefl.crypto.quantize import Encoding


def split_view_threshold(holders: int, colluders: int) -> int:
    """The least threshold t for which two conflicting survivor lists cannot both gather t
    signatures: honest hospitals sign one list each, the c colluders sign both, so
    t + t > holders + c, i.e. t = floor((holders + c) / 2) + 1 (Bonawitz et al. 2017 §6).
    """
    return (holders + colluders) // 2 + 1


@dataclass(frozen=True)
class RoundPolicy:
    """A hospital's floors for any round it takes part in (``[policy]`` of hospital.toml).

    ``colluders`` (c): how many other hospitals it assumes may work with a dishonest server.
    The threshold must then be at least ``split_view_threshold(n, c)`` and a sum must
    combine at least c + 2 hospitals, so that it always holds two honest ones.
    ``required_survivors``: when set (a retry of a round whose masked input already left),
    the round must combine exactly these hospitals — any other set would let two sums be
    subtracted to expose one hospital.
    """

    colluders: int = 1
    min_contributors: int = 2
    ring_bits: frozenset[int] = frozenset({32, 64})
    max_clip: float = 10.0
    #: The coarsest fixed-point scale accepted.  Also the scale at which the hospital
    #: checks that its update is not all below precision, so that refusal depends on the
    #: hospital's own setting and never on one the server chose (which could otherwise be
    #: varied to learn the update's magnitude bit by bit).
    min_scale: float = 64.0
    #: Accept a SecAgg+ sparse graph (k < n - 1); its guarantees against a deviating
    #: server are weaker (see docs/SECURITY.md), so a hospital opts in.
    allow_sparse: bool = False
    #: SecAgg+ only: the fraction of hospitals assumed dishonest (gamma) and the fraction
    #: that may drop out (delta) of Bell et al. 2020; each hospital sizes the least degree
    #: and threshold it accepts from them (``params.choose_graph``), rounding counts up.
    corrupt_fraction: float = 0.05
    dropout_fraction: float = 0.1
    #: Serial numbers of certificates the CA revoked.
    revoked: frozenset[int] = frozenset()
    required_survivors: frozenset[str] | None = None
    #: When set (with ``required_survivors``), the retry must also use exactly this
    #: encoding: the same hospitals with another max_weight or clip give another sum, and
    #: the difference of two such sums can expose one hospital (``ClientRound``
    #: ``signed_encoding`` is the one to keep).
    required_encoding: Encoding | None = None

    @property
    def contributors_floor(self) -> int:
        return max(2, self.min_contributors, self.colluders + 2)

    def threshold_floor(self, holders: int) -> int:
        return split_view_threshold(holders, self.colluders)


@dataclass(frozen=True)
class SignedList:
    """A survivor list this hospital signed, with the encoding of that round: what a retry
    of a failed round must repeat exactly (``RoundPolicy.bound_to``)."""

    survivors: frozenset[str]
    encoding: Encoding | None = None

    def policy_fields(self) -> dict[str, object]:
        return {"required_survivors": self.survivors, "required_encoding": self.encoding}
