"""How many neighbours (k) and what threshold (t) a SecAgg+ round needs, from the analysis of
Bell et al. 2020 ("Secure single-server aggregation with (poly)logarithmic overhead") as
Google's open-source SecAgg+ (fcp/secagg/server/graph_parameter_finder.cc) carries it out.

Why a calculation and not a setting: a sparse graph is only safe when, with overwhelming
probability over the random relabelling of the Harary graph,

* the honest hospitals that survive still form one connected graph (otherwise each piece's
  sum can be unmasked alone — less than the total everyone agreed to reveal),
* no hospital has so many corrupt holders of its shares that they, with the server, can
  rebuild its secrets, and
* every hospital keeps at least t surviving holders, so the round can finish.

A k that is too small breaks the first two silently; nobody should have to pick it by hand.

``harary_parameters`` is Google's search on integer counts: the smallest even k in
[2, n - 1) for which a union bound puts the chance of a disconnected honest-survivor graph
below 2^-(sigma+1), and for which a threshold exists between t1 (a hypergeometric upper bound
on corrupt neighbours, exceeded with probability < 2^-(sigma+1)/n per hospital) and t2 (a
lower bound on surviving neighbours, undershot with probability < 2^-eta/n per hospital).
The n in those probabilities pays for a union bound over all hospitals.

``choose_graph`` adapts it to securefl, each rule for a reason:

1. Counts are rounded UP: corrupt = max(colluders, ceil(corrupt_fraction * n)) and
   dropped = ceil(dropout_fraction * n).  Google floors them, which at small n assumes *no*
   corrupt hospital and fewer dropouts than configured: n = 10 at 5 % / 10 % then gives
   k = 2, a ring that any two non-adjacent dropouts cut in two.  Products are rounded to 9
   decimals first so that float noise (0.1 * 30 = 3.0000000000000004) cannot add a hospital.
2. The fractions must lie in [0, 1) and corrupt_fraction + 2 * dropout_fraction <= 0.9:
   Google's feasibility condition against a server that may show different survivor lists
   to different hospitals ("semi-malicious"); beyond it no k works.
3. A securefl hospital Shamir-shares its secrets among its k neighbours AND ITSELF, so it
   has k + 1 holders.  Two conflicting survivor lists must not both gather t signatures
   from them: honest holders sign one list, the (at most t1) corrupt ones sign both, so
   2t > (k + 1) + t1, i.e. t >= (k + 1 + t1) // 2 + 1 — one more than Google's rule (which
   counts k holders) when k + t1 is odd.  Here t1 is taken over the n - 1 *other* hospitals
   (the hospital being protected is honest), which is slightly more cautious than Google's
   population of n.  The search goes on to a larger k while this t exceeds t2, so the round
   stays completable with the same 2^-eta/n guarantee as Google's.
4. When no sparse k exists, or k does not at least halve each hospital's work
   (2k > n - 1), the complete graph is used with the classic split-view threshold
   ``split_view_threshold(n, corrupt)``: there the count of corrupt holders is exact, not a
   probability, and the sparse graph would buy little.

The hospital side re-derives all of this (``sparse_threshold_floor``, ``dropout_allowance``)
so that a server cannot pick a weaker graph, a lower threshold, or claim more dropouts than
the analysis assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from securefl.crypto.secagg.policy import split_view_threshold
from securefl.errors import ConfigError

#: Statistical security (2^-SIGMA chance that the server learns more than the sum).
SIGMA = 40.0
#: Correctness (2^-ETA chance that a round cannot finish for lack of surviving holders).
ETA = 20.0
#: Semi-malicious feasibility bound on corrupt_fraction + 2 * dropout_fraction.
MAX_BAD_SHARE = 0.9


# --- hypergeometric tails ------------------------------------------------------------------
#
# Y = how many of ``sample`` draws (without replacement) from ``total`` items hit the
# ``marked`` ones.  Only far tails matter (probabilities ~ 2^-50), so terms are summed
# outward from a point known to be in the tail, never as 1 - (something close to 1).


def _log_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _pmf(total: int, marked: int, sample: int, y: int) -> float:
    if y < max(0, sample - (total - marked)) or y > min(sample, marked):
        return 0.0
    return math.exp(_log_choose(marked, y) + _log_choose(total - marked, sample - y)
                    - _log_choose(total, sample))


def _cdf_from_below(total: int, marked: int, sample: int, y: int) -> float:
    """P(Y <= y) for a y below the mode: terms shrink going down, so stop when negligible."""
    lowest = max(0, sample - (total - marked))
    term = _pmf(total, marked, sample, y)
    result = 0.0
    while y >= lowest and term > result * 1e-17:
        result += term
        # P(y - 1) / P(y)
        term *= y * (total - marked - sample + y) / ((marked - y + 1) * (sample - y + 1))
        y -= 1
    return result


def _lower_quantile(total: int, marked: int, sample: int, q: float) -> int:
    """The largest y with P(Y <= y) < q (at least the smallest possible value minus one).

    Rounded outwards as in Google's ``FindQuantile``: a count the variable falls to or below
    with probability under q.  The walk starts from Hoeffding's bound
    P(Y <= sample * (marked/total - e)) <= exp(-2 sample e^2), which is already in the tail,
    and steps up — a few hundred steps at most where a scan from 0 would take thousands.
    """
    lowest, highest = max(0, sample - (total - marked)), min(sample, marked)
    slack = math.sqrt(-math.log(q) / (2 * sample))
    y = max(lowest - 1, min(highest, math.floor(sample * (marked / total - slack))))
    cdf = _cdf_from_below(total, marked, sample, y)
    while y >= lowest and cdf >= q:  # only if the bound was hit exactly: step back
        y -= 1
        cdf = _cdf_from_below(total, marked, sample, y)
    term = _pmf(total, marked, sample, y + 1)
    while y < highest and cdf + term < q:
        cdf += term
        y += 1
        if term > 0:  # P(y + 1) / P(y)
            term *= ((marked - y) * (sample - y)
                     / ((y + 1) * (total - marked - sample + y + 1)))
        else:
            term = _pmf(total, marked, sample, y + 1)
    return y


def _upper_bound(total: int, marked: int, sample: int, q: float) -> int:
    """The least x with P(X > x) < q: more than x marked draws is rarer than q.

    Counted as sample minus the unmarked draws, whose lower tail is what
    ``_lower_quantile`` computes accurately.
    """
    return sample - 1 - _lower_quantile(total, total - marked, sample, q)


def _corrupt_holders_bound(n: int, corrupt: int, degree: int, sigma: float) -> int:
    """t1 for securefl's rule: corrupt among a hospital's ``degree`` neighbours, drawn from
    the n - 1 other hospitals, exceeds this with probability < 2^-(sigma+1) / n."""
    return _upper_bound(n - 1, min(corrupt, n - 1), degree, 2.0 ** -(sigma + 1) / n)


# --- the search ------------------------------------------------------------------------------


def _log_p_disconnected(n: int, k: int, bad: int) -> float:
    """Union bound (natural log) on the honest survivors of a randomly relabelled H(k, n)
    falling apart when ``bad`` hospitals (corrupt or dropped) are removed.

    Cutting a Harary ring needs two runs of k/2 consecutive removed hospitals; there are
    n (n - k - 1) / 2 such pairs of runs and each is all-bad with probability
    bad! (n - k)! / (n! (bad - k)!).
    """
    if k > bad:
        return -math.inf
    return (math.log(n) + math.log(n - k - 1) - math.log(2)
            + math.lgamma(bad + 1) + math.lgamma(n - k + 1)
            - math.lgamma(n + 1) - math.lgamma(bad - k + 1))


@lru_cache(maxsize=1024)
def _search(n: int, corrupt: int, dropped: int, malicious: bool, sigma: float, eta: float,
            ours: bool) -> tuple[int, int] | None:
    """The smallest even k in [2, n - 1) that passes the analysis, with its threshold.

    ``ours`` False: Google's rule, threshold t = max(t1' + 1, 2) where t1' is t1 (curious
    server) or ceil((t1 + k - 1.25) / 2) (semi-malicious), accepted when t1' < t2.
    ``ours`` True: securefl's threshold (module docstring rule 3), accepted only when it
    does not exceed t2 — so the search continues past a k where only Google's t fits.
    Cached: every hospital runs this each round with the same few arguments.
    """
    log_q_secure = -(sigma + 1) * math.log(2)
    q_secure = 2.0 ** -(sigma + 1) / n
    q_correct = 2.0 ** -eta / n
    for k in range(2, n - 1, 2):
        if _log_p_disconnected(n, k, corrupt + dropped) >= log_q_secure:
            continue
        t1 = _upper_bound(n, corrupt, k, q_secure)
        # Google rounds t2 back up by one (its "CDF(t2) < q: t2++"): t2 is then the least
        # count of surviving neighbours with P(S <= t2) >= q, and t <= t2 means
        # P(fewer than t survive) < q.
        t2 = _lower_quantile(n, n - dropped, k, q_correct) + 1
        google_t1 = math.ceil((t1 + k - 1.25) / 2) if malicious else t1
        google_t = max(google_t1 + 1, 2)
        if not ours:
            if t2 > google_t1:
                return k, google_t
            continue
        own_t1 = _corrupt_holders_bound(n, corrupt, k, sigma)
        t = max(google_t, (k + 1 + own_t1) // 2 + 1, 2)
        if t <= t2:
            return k, t
    return None


def harary_parameters(n: int, corrupt: int, dropped: int, *, malicious: bool = True,
                      sigma: float = SIGMA, eta: float = ETA) -> tuple[int, int] | None:
    """Google's (k, t) for n clients of which at most ``corrupt`` are adversarial and at
    most ``dropped`` drop out, or None when no sparse k < n - 1 passes.

    Kept exactly as Google computes it (their published vectors are its test) so that the
    securefl adaptations in ``choose_graph`` are visibly layered on a checked base.
    ``malicious`` selects the semi-malicious server model (False: honest-but-curious).
    """
    if n < 1:
        raise ConfigError(f"the number of hospitals must be at least 1, not {n}.")
    if not 0 <= corrupt <= n or not 0 <= dropped <= n:
        raise ConfigError(f"corrupt ({corrupt}) and dropped ({dropped}) hospitals must each "
                          f"be between 0 and the number of hospitals ({n}).")
    return _search(n, corrupt, dropped, malicious, float(sigma), float(eta), False)


# --- securefl's choice -----------------------------------------------------------------------


@dataclass(frozen=True)
class GraphChoice:
    """The graph and threshold a round must use, with the counts they were derived from —
    a hospital compares a server's roster against this and refuses anything weaker."""

    n: int
    degree: int  # k; n - 1 means the full graph
    threshold: int  # t among k + 1 holders
    corrupt: int  # assumed corrupted hospitals, rounded UP
    dropped: int  # tolerated dropouts, rounded UP

    @property
    def sparse(self) -> bool:
        """Whether this is a SecAgg+ sparse graph (weaker guarantees; hospitals opt in)."""
        return self.degree < self.n - 1


def _round_up(fraction: float, n: int) -> int:
    """ceil(fraction * n) without float noise adding one (0.1 * 30 is 3.0000000000000004)."""
    return math.ceil(round(fraction * n, 9))


def _check_n(n: int) -> None:
    if n < 2:
        raise ConfigError(f"a round needs at least 2 hospitals, not {n}.")


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:  # also refuses NaN
        raise ConfigError(f"{name} must be at least 0 and below 1, not {value}; set it to "
                          f"the share of hospitals you expect (for example 0.05).")


def dropout_allowance(n: int, dropout_fraction: float) -> int:
    """How many of n hospitals may be missing from a survivor list a hospital signs.

    The sparse analysis assumed no more dropouts than this; a server claiming more could
    cut the honest survivors' graph apart, so hospitals refuse such a list.  Rounded up
    like ``choose_graph`` so that both sides agree to the hospital.
    """
    _check_n(n)
    _check_fraction("dropout_fraction", dropout_fraction)
    return _round_up(dropout_fraction, n)


def sparse_threshold_floor(n: int, degree: int, corrupt: int) -> int:
    """The least threshold a hospital accepts for a server-chosen ``degree``.

    Security only (completion is the server's problem): with k + 1 holders of which at
    most t1 are corrupt (except with probability 2^-41 / n), two conflicting survivor lists
    cannot both gather t signatures when 2t > k + 1 + t1.  ``degree`` may exceed the
    hospital's own choice, so it is computed for the degree actually offered; at
    degree = n - 1 it equals the full-graph ``split_view_threshold(n, corrupt)``.
    """
    _check_n(n)
    if not 1 <= degree <= n - 1:
        raise ConfigError(f"the neighbour count must be between 1 and {n - 1} for {n} "
                          f"hospitals, not {degree}.")
    if not 0 <= corrupt <= n:
        raise ConfigError(f"the corrupt count must be between 0 and {n}, not {corrupt}.")
    t1 = _corrupt_holders_bound(n, corrupt, degree, SIGMA)
    return max(2, (degree + 1 + t1) // 2 + 1)


def choose_graph(n: int, *, corrupt_fraction: float, dropout_fraction: float,
                 colluders: int) -> GraphChoice:
    """The degree and threshold for a round of n hospitals (rules in the module docstring).

    ``colluders`` is the hospital's own assumption (``RoundPolicy.colluders``); it is a
    floor on the corrupt count so that a small n never assumes fewer than that.
    """
    _check_n(n)
    _check_fraction("corrupt_fraction", corrupt_fraction)
    _check_fraction("dropout_fraction", dropout_fraction)
    if corrupt_fraction + 2 * dropout_fraction > MAX_BAD_SHARE + 1e-12:
        raise ConfigError(
            f"corrupt_fraction + 2 × dropout_fraction is "
            f"{corrupt_fraction + 2 * dropout_fraction:.3g}, above {MAX_BAD_SHARE}, so no "
            f"threshold both survives the dropouts and resists a server that shows "
            f"different survivor lists; lower one of the two.")
    if colluders < 0:
        raise ConfigError(f"colluders must be 0 or more, not {colluders}.")
    corrupt = max(colluders, _round_up(corrupt_fraction, n))
    dropped = _round_up(dropout_fraction, n)
    if corrupt > n - 2:
        raise ConfigError(
            f"with {n} hospitals at most {n - 2} may be assumed corrupt, so that every sum "
            f"holds two honest ones, but the settings assume {corrupt}; add hospitals or "
            f"lower colluders or corrupt_fraction.")
    found = _search(n, corrupt, dropped, True, SIGMA, ETA, True)
    if found is not None and 2 * found[0] <= n - 1:
        return GraphChoice(n, found[0], found[1], corrupt, dropped)
    return GraphChoice(n, n - 1, split_view_threshold(n, corrupt), corrupt, dropped)
