"""Alpha per side of a paired comparison: for any full-set gap at most one of the two early
calls can be wrong (out of the zone), so each side's test runs at the comparison's whole alpha;
only ``0 < improve_by`` with ``improve_by >= 2 tolerance`` (a gap in ``[-improve_by, 0)`` makes
both calls wrong) keeps the halves. Checked on the decisions' timing and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from green_mlops.adaptive import Decision, PairedComparison
from tests.test_adaptive_tolerance import feed, population


def test_asking_for_early_improved_too_no_longer_delays_the_not_improved_call() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        incumbent, candidate = population(rng, 5000, 0.01)
        one = PairedComparison(incumbent, 0.01, upper=5.0, early="not_improved")
        both = PairedComparison(incumbent, 0.01, upper=5.0, early="both")
        assert feed(one, candidate, 64) is feed(both, candidate, 64) is Decision.NOT_IMPROVED
        assert both.n == one.n < 5000  # the same examples, not those of alpha / 2


@pytest.mark.parametrize(
    ("improve_by", "tolerance", "split"),
    [
        (0.0, 0.0, False),
        (0.0, 0.01, False),
        (0.015, 0.01, False),
        (0.02, 0.01, True),
        (0.001, 0.0, True),
    ],
)
def test_each_side_gets_half_only_where_both_calls_can_be_wrong(
    improve_by: float, tolerance: float, split: bool
) -> None:
    incumbent = np.full(100, 1.0)
    test = PairedComparison(
        incumbent, 0.05, upper=5.0, early="both", improve_by=improve_by, tolerance=tolerance
    )
    assert test.split is split and test.side_alpha == (0.025 if split else 0.05)
    one = PairedComparison(incumbent, 0.05, upper=5.0, improve_by=improve_by)
    assert one.side_alpha == 0.05  # one side: all of it, as before


@pytest.mark.parametrize(
    ("gap", "tolerance"), [(-0.0105, 0.01), (0.0105, 0.01), (-0.0005, 0.0), (0.0005, 0.0)]
)
def test_wrong_calls_beyond_the_zone_stay_below_alpha_with_the_whole_alpha_per_side(
    gap: float, tolerance: float
) -> None:
    """Just beyond the zone (or just off a tie, strict) over many random orders: the only
    call that can be wrong is the one whose test's null holds; it errs w.p. <= alpha."""
    alpha, reps, n = 0.2, 300, 1000
    rng = np.random.default_rng(29)
    incumbent, candidate = population(rng, n, gap)
    wrong_call = Decision.NOT_IMPROVED if gap < 0 else Decision.IMPROVED
    wrong = early = 0
    for _ in range(reps):
        order = rng.permutation(n)
        test = PairedComparison(
            incumbent[order], alpha, upper=5.0, early="both", tolerance=tolerance
        )
        assert test.side_alpha == alpha
        decision = feed(test, candidate[order], 20)
        early += test.n < n
        wrong += decision is wrong_call and test.n < n
    assert wrong / reps <= alpha - 3 * math.sqrt(alpha * (1 - alpha) / reps)  # with margin
    if tolerance:
        assert early / reps > 0.9  # and it does stop early
