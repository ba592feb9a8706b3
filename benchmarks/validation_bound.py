"""A lower bound on the validation examples any valid (eps, alpha) test needs, per comparison.

One comparison: candidate vs incumbent, per-example values ``cand`` and ``inc`` in
``[lower, upper]`` (a loss: the candidate improved iff ``mean(cand - inc) < 0``), visited in a
uniformly random order. A sequential test is *valid* with tolerance ``eps`` if, on every data
set whose full-set difference lies ``eps`` or more beyond 0, it calls the other side with
probability <= ``alpha``. The bound holds for every such test, whatever else it reads (the
incumbent's values ahead, other epochs' values), on the observed data set itself:

* Alternative: the same data set except that each candidate value independently moves, with
  probability ``1 - q``, to the far end of the range (``upper`` against a call "improved",
  ``lower`` against "not improved"), with ``q`` such that the alternative's mean difference
  exceeds ``eps`` (beyond 0, on the other side) except with probability ``delta`` (Bernstein):
  a valid test errs there with probability <= ``alpha + delta``. Each candidate value seen is
  then ``1 / q`` times likelier under the observed data set than under the alternative (at
  most), so the log-likelihood ratio after ``n`` examples is <= ``n log(1 / q)``.
* Change of measure (data processing; Kaufmann, Cappe & Garivier 2016, Lemma 1): a call made
  with probability p on the observed data set needs ``E[n] log(1 / q) >= kl(p, alpha + delta)``.
  Beyond the zone the right call is forced (p >= 1 - alpha); inside it either call may be
  made, and the bound takes the least over p.
* ``alpha``: the whole fit's budget for each comparison (valid however a test spends it), or
  the budget AdaptiveValidation gives it (a bound for tests that split alpha that way).

It errs low (towards saving more): the alternative is one valid choice among many (a nearer one
would raise the bound), and Bernstein, the least over p and alpha per comparison can only
lower it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from green_mlops.adaptive.betting import comparison_budget

Array = npt.NDArray[np.float64]

__all__ = ["DELTAS", "comparison_bound", "comparison_bounds", "fit_bound", "kl_bernoulli"]

#: the slacks tried for an alternative data set falling short of the zone (each gives a bound)
DELTAS = (1e-3, 1e-2, 3e-2)


def kl_bernoulli(p: Array, q: float) -> Array:
    """kl(p, q) for Bernoulli laws, 0 where p <= q (no constraint there)."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return np.where(p > q, kl, 0.0)


def _bernstein_margin(n: int, var: float, span: float, delta: float) -> float:
    """t with exp(-n t^2 / (2 var + 2 span t / 3)) = delta: the mean of n independent values,
    each at most ``span`` below its mean, falls t below it with probability <= delta."""
    log = math.log(1 / delta)
    a = 2 * span * log / 3
    return (a + math.sqrt(a * a + 8 * n * var * log)) / (2 * n)


def _log_ratio(gains: Array, shift: float, delta: float) -> float:
    """log(1 / q) of the least move (each value gains ``gains_i`` with probability 1 - q) whose
    mean gain exceeds ``shift`` except with probability ``delta`` (inf: out of reach)."""
    n = gains.size
    total, square, most = float(np.mean(gains)), float(np.mean(gains**2)), float(np.max(gains))

    def short(move: float) -> float:  # > 0 where moving with probability ``move`` falls short
        var = move * (1 - move) * square
        return shift + _bernstein_margin(n, var, move * most, delta) - move * total

    if short(1.0 - 1e-12) > 0:
        return math.inf
    lo, hi = 0.0, 1.0 - 1e-12
    for _ in range(60):  # the least move probability that reaches the shift
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
    return -math.log1p(-hi)


def comparison_bound(
    cand: Array,
    inc: Array,
    eps: float,
    alpha: float = 0.05,
    lower: float = 0.0,
    upper: float = 5.0,
) -> float:
    """Lower bound on the expected candidate examples any valid test needs (module docstring)."""
    return comparison_bounds(cand, inc, eps, (alpha,), lower, upper)[0]


def comparison_bounds(
    cand: Array,
    inc: Array,
    eps: float,
    alphas: Sequence[float],
    lower: float = 0.0,
    upper: float = 5.0,
) -> list[float]:
    """:func:`comparison_bound` for each of ``alphas``: each slack in :data:`DELTAS` gives a
    bound, the largest is kept."""
    cand = np.asarray(cand, dtype=np.float64)
    n = cand.size
    mean = float(np.mean(cand - np.asarray(inc, dtype=np.float64)))
    best = [0.0] * len(alphas)
    for delta in DELTAS:
        # against "improved": the candidate worse by eps; against "not improved": better by eps
        worse = _log_ratio(upper - cand, eps - mean, delta)
        better = _log_ratio(cand - lower, eps + mean, delta)
        for i, alpha in enumerate(alphas):
            if mean <= -eps:
                p = np.array([1 - alpha])  # P(call "improved") on the observed data set
            elif mean >= eps:
                p = np.array([alpha])
            else:
                p = np.linspace(0.0, 1.0, 2001)
            q = alpha + delta
            with np.errstate(divide="ignore", invalid="ignore"):
                need_imp = np.nan_to_num(kl_bernoulli(p, q) / worse, nan=0.0)
                need_not = np.nan_to_num(kl_bernoulli(1 - p, q) / better, nan=0.0)
            best[i] = max(best[i], min(n, float(np.min(np.maximum(need_imp, need_not)))))
    return best


def fit_bound(
    val: Array, stop: int, eps: float, alpha: float = 0.05, upper: float = 5.0
) -> tuple[float, float]:
    """Lower bounds on a fit's validation cost (fraction of full validation's) along full
    validation's comparisons up to its stop epoch: each candidate's bound, and each incumbent
    evaluated on at least as many examples as its comparisons need (paired tests). First for
    any valid test (the whole ``alpha`` for each comparison), then for tests that give each
    comparison the budget AdaptiveValidation gives it (``comparison_budget``, a tolerance)."""
    means = val.mean(axis=1)
    n = val.shape[1]
    need = np.zeros((2, stop + 1))  # examples each epoch's model must be evaluated on
    incumbent = 0
    for epoch in range(1, stop + 1):
        budget = comparison_budget(alpha, epoch, horizon=None, pair=(epoch, incumbent))
        alphas = (alpha, alpha if budget is None else budget)
        b = np.array(comparison_bounds(val[epoch], val[incumbent], eps, alphas, 0.0, upper))
        need[:, epoch] = np.maximum(need[:, epoch], b)
        need[:, incumbent] = np.maximum(need[:, incumbent], b)
        if means[epoch] < means[incumbent]:
            incumbent = epoch
    cost = need.sum(axis=1) / (n * (stop + 1))
    return float(cost[0]), float(cost[1])
