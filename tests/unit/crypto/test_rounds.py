"""Whole secure-aggregation rounds in memory: correctness under dropouts, and refusals."""

import random

import numpy as np
import pytest

from securefl.crypto.quantize import Encoding
from securefl.crypto.simulate import run_round
from securefl.errors import NotEnoughSurvivorsError


def make_updates(n, d, seed):
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0, 0.2, d).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, 2000, n)]
    return updates, weights


def expected_mean(updates, weights, contributors, clip):
    x = np.clip(np.stack([updates[i] for i in contributors]).astype(np.float64), -clip, clip)
    w = [weights[i] for i in contributors]
    return np.average(x, axis=0, weights=w), sum(w)


def random_dropouts(rng, n, budget):
    """Spread up to ``budget`` hospitals over the four post-enrolment stages."""
    lost = rng.sample(range(n), rng.randint(0, budget))
    plan = {"share": set(), "input": set(), "check": set(), "unmask": set()}
    for i in lost:
        plan[rng.choice(list(plan))].add(i)
    return plan


@pytest.mark.parametrize("n", [2, 3, 5, 10, 30])
@pytest.mark.parametrize("trial", range(4))
def test_round_with_random_dropouts_gives_weighted_mean(n, trial):
    rng = random.Random(1000 * n + trial)
    updates, weights = make_updates(n, 257, seed=trial)
    c = 0 if n == 2 else 1  # two hospitals cannot assume a colluder: c + 2 would be 3
    t = (n + c) // 2 + 1  # default threshold: the split-view bound for c colluders
    plan = random_dropouts(rng, n, n - t) if trial else {}
    gone = plan.get("share", set()) | plan.get("input", set())
    survivors = [i for i in range(n) if i not in gone]
    enc = Encoding.auto(clip=0.5, max_clients=n, max_weight=2000)
    if len(survivors) < 2:
        with pytest.raises(NotEnoughSurvivorsError):
            run_round(updates, weights, encoding=enc, drop=plan, colluders=c)
        return
    result, _ = run_round(updates, weights, encoding=enc, drop=plan, colluders=c)
    mean, total = expected_mean(updates, weights, survivors, 0.5)
    assert result.total_weight == total
    assert result.contributors == tuple(f"hospital-{i:03d}" for i in survivors)
    assert np.abs(result.mean_update - mean).max() <= enc.error_bound(len(survivors), total)


def test_n2_loses_one_and_refuses_to_expose_the_other():
    updates, weights = make_updates(2, 16, seed=0)
    with pytest.raises(NotEnoughSurvivorsError, match="at least 2"):
        run_round(updates, weights, drop={"input": {1}}, colluders=0)


def test_two_hospitals_cannot_assume_a_colluder():
    updates, weights = make_updates(2, 16, seed=0)
    with pytest.raises(NotEnoughSurvivorsError, match="at least 3"):
        run_round(updates, weights)


def test_a_survivor_that_never_signs_is_still_unmasked_by_the_others():
    n = 7  # c = 1: t = 5; one survivor silent at the check, one at the unmask step
    updates, weights = make_updates(n, 64, seed=9)
    result, _ = run_round(updates, weights, drop={"check": {2}, "unmask": {5}})
    mean, total = expected_mean(updates, weights, range(n), 1.0)
    assert result.total_weight == total
    assert np.abs(result.mean_update - mean).max() < 1e-6


def test_too_few_signatures_publish_nothing():
    n = 5  # c = 1: t = 4; two survivors never sign the list
    updates, weights = make_updates(n, 32, seed=4)
    with pytest.raises(NotEnoughSurvivorsError, match="signed the survivor list"):
        run_round(updates, weights, drop={"check": {0, 1}})


def test_dropouts_before_enrolment_just_shrink_the_round():
    updates, weights = make_updates(6, 64, seed=3)
    result, _ = run_round(updates, weights, drop={"advertise": {0, 4}})
    mean, total = expected_mean(updates, weights, [1, 2, 3, 5], 1.0)
    assert result.total_weight == total
    assert np.abs(result.mean_update - mean).max() < 1e-6


@pytest.mark.parametrize("trial", range(3))
def test_secagg_plus_sparse_graph_with_dropouts(trial):
    # Sized by the analysis at the default fractions: k = 10 (11 holders per secret),
    # t = 7, at most 3 dropouts; any 4 losses leave every secret >= t holders.
    n = 30
    updates, weights = make_updates(n, 300, seed=10 + trial)
    rng = random.Random(trial)
    lost = rng.sample(range(n), 4)
    plan = {"share": {lost[0]}, "input": {lost[1]}, "unmask": {lost[2], lost[3]}}
    seen = []
    result, _ = run_round(updates, weights, sparse=True, drop=plan, colluders=1,
                          on_message=lambda name, msg: seen.append(msg))
    assert {len(m.envelopes) for m in seen if hasattr(m, "envelopes")} == {10}
    contributors = [i for i in range(n) if i not in (lost[0], lost[1])]
    mean, total = expected_mean(updates, weights, contributors, 1.0)
    assert result.total_weight == total
    assert np.abs(result.mean_update - mean).max() < 1e-6


def test_too_many_unmask_dropouts_publish_nothing():
    n = 10  # t = 6; 5 survivors silent at unmask leaves 5 < t responders
    updates, weights = make_updates(n, 32, seed=5)
    with pytest.raises(NotEnoughSurvivorsError, match="needed"):
        run_round(updates, weights, drop={"unmask": {0, 1, 2, 3, 4}})


def test_exactly_t_responders_is_enough():
    n = 10
    updates, weights = make_updates(n, 32, seed=6)
    result, _ = run_round(updates, weights, drop={"unmask": {0, 1, 2, 3}})
    mean, total = expected_mean(updates, weights, range(n), 1.0)
    assert result.total_weight == total
    assert np.abs(result.mean_update - mean).max() < 1e-6


def test_64_bit_ring_round():
    updates, weights = make_updates(4, 100, seed=7)
    enc = Encoding.auto(ring_bits=64, max_clients=4, max_weight=2000)
    result, timings = run_round(updates, weights, encoding=enc, drop={"input": {2}})
    mean, total = expected_mean(updates, weights, [0, 1, 3], 1.0)
    assert np.abs(result.mean_update - mean).max() <= enc.error_bound(3, total)
    assert timings.upload_bytes == 8 * 101
