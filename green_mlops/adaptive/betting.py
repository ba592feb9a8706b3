"""The betting test: is the mean of N differences, visited without replacement, above a threshold?

An anytime-valid one-sided sequential test (a wealth process bet on each difference, Ville's
inequality), and the alpha spent on the k-th test of a fit. See docs/betting-test.md.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BET_CAP",
    "FloatArray",
    "OneSidedTest",
    "alpha_spending",
    "check_tolerance",
    "comparison_budget",
]

FloatArray = npt.NDArray[np.float64]

#: Largest share of the wealth one example may put at risk: a bet never exceeds ``BET_CAP`` over
#: the most that example can fall below its null mean, so a worst-case example keeps 10 %.
BET_CAP = 0.9


def alpha_spending(alpha: float, k: int) -> float:
    """Error budget of comparison ``k`` (1-based): ``alpha * 6 / (pi^2 k^2)``; sums to ``alpha``."""
    if k < 1:
        raise ValueError(f"comparison index k must be >= 1, got {k}")
    return alpha * 6.0 / (math.pi**2 * k * k)


def comparison_budget(
    alpha: float, k: int, *, horizon: int | None, pair: tuple[int, int] | None
) -> float | None:
    """Error budget of comparison ``k`` of a fit (None: no budget left, a full pass).

    ``horizon``: ``alpha / horizon`` for ``k <= horizon``, else :func:`alpha_spending`.
    ``pair``: (this run, the incumbent's run), with a tolerance: the compared pair depends on
    earlier calls inside the zone, so the budget is spent over pairs, by the run index and
    then by the incumbent's distance (docs/adaptive-validation.md, "Tolerance")."""
    if pair is not None:
        k = max(1, pair[0])
    if horizon is not None:
        if k > horizon:
            return None
        alpha_k = alpha / horizon
    else:
        alpha_k = alpha_spending(alpha, k)
    if pair is not None:
        alpha_k *= alpha_spending(1.0, max(1, pair[0] - pair[1]))
    return alpha_k


def check_tolerance(tolerance: float | None, lower: float | None, upper: float | None) -> None:
    """Refuse a tolerance that is not ``None`` or a number in ``[0, upper - lower)``."""
    if tolerance is None:
        return
    span = math.inf if lower is None or upper is None else upper - lower
    accepted = "pass None (strict) or a number >= 0 in the metric's units"
    if math.isfinite(span):
        accepted += f", less than the range of the per-example values (upper - lower = {span:g})"
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):  # (numpy too)
        raise ValueError(f"tolerance={tolerance!r}: {accepted}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r}: {accepted}")
    if tolerance >= span:
        raise ValueError(
            f"tolerance={tolerance!r} is not less than the range of the per-example values "
            f"[{lower}, {upper}]: every run would be inside the zone. {accepted}"
        )


class OneSidedTest:
    """One side of a paired comparison, in the orientation where it decides on a *large* mean.

    ``x``: the incumbent's values in this orientation (``d = candidate - x``), of which the first
    ``known`` are known; ``floor``: the least possible candidate value; ``cap``: the largest
    possible incumbent value (``inf`` if unbounded), standing in for values not known yet.
    Tests ``mean(d) <= threshold`` with the wealth process of docs/betting-test.md; rejecting
    it (``rejected``) means the mean is above ``threshold``.
    """

    def __init__(
        self,
        x: FloatArray,
        known: int,
        floor: float,
        cap: float,
        log_inv_alpha: float,
        threshold: float,
    ) -> None:
        n = x.size
        self.N = n
        self.x = np.full(n, np.nan)
        self.x[:known] = x[:known]
        self.known = known
        self.cum = np.zeros(n + 1)  # prefix sums of the known values
        self.cum[1 : known + 1] = np.cumsum(x[:known])
        self.floor = floor
        self.cap = cap
        self.suffix_max: FloatArray | None = None
        self.suffix_sum: FloatArray | None = None
        if known == n:
            self._complete()
        self.log_inv_alpha = log_inv_alpha
        self.threshold = threshold
        self.log_wealth = 0.0
        self.rejected = False
        self._d = np.empty(n)  # the differences seen
        self._bet = np.zeros(n)  # lambda_i, the bet placed on each of them
        self._x_sum = 0.0  # sum and sum of squares of d_i - e_i(threshold), for the next bet
        self._x_sq = 0.0
        self._bound = -math.inf  # the best lower confidence bound computed so far
        self.fed = 0  # how many differences were added

    def _complete(self) -> None:
        # suffix_max[j] = max of x[j:], the worst incumbent value still unvisited.
        self.suffix_max = np.maximum.accumulate(self.x[::-1])[::-1]
        self.suffix_sum = np.concatenate((np.cumsum(self.x[::-1])[::-1], [0.0]))

    def extend(self, values: FloatArray) -> None:
        k, m = self.known, values.size
        self.x[k : k + m] = values
        self.cum[k + 1 : k + m + 1] = self.cum[k] + np.cumsum(values)
        self.known = k + m
        if self.known == self.N:
            self._complete()

    def least(self, start: int) -> float:
        """A sure lower bound of every unvisited ``d_i`` (positions ``start ..``)."""
        if self.suffix_max is not None:
            return self.floor - float(self.suffix_max[start])
        return self.floor - self.cap  # an unknown incumbent value may be as large as ``cap``

    def unvisited_sum(self, n: int) -> float:
        """An upper bound of the sum of the unvisited incumbent values (exact when known)."""
        if self.suffix_sum is not None:
            return float(self.suffix_sum[n])
        known = float(self.cum[self.known] - self.cum[n]) if n < self.known else 0.0
        unknown = self.N - max(n, self.known)
        return known + unknown * self.cap if unknown else known

    def _null_means(self, m: Any, d: FloatArray, start: int, prefix: float) -> Any:
        """``e_i(m) = (N m - S_{i-1}) / (N - i + 1)`` for the differences ``d`` at positions
        ``start ..``: the mean of ``d_i`` given the earlier ones, were ``mean(d) = m``.
        ``m`` may be an array of shape (k, 1): then one row per value."""
        idx = np.arange(start, start + d.size, dtype=np.float64)  # 0-based i - 1
        before = prefix + np.concatenate(([0.0], np.cumsum(d)[:-1]))  # S_{i-1}
        return (self.N * m - before) / (self.N - idx)

    def update(self, d: FloatArray, start: int, prefix: float) -> None:
        """Add the differences ``d`` at positions ``start .. start + len(d) - 1`` (0-based);
        ``prefix`` is the sum of all earlier differences. The batch's bet is fixed from what
        was seen before it, each example's cap from what was seen before that example."""
        size = d.size
        self._d[start : start + size] = d
        self.fed = start + size
        excess = d - self._null_means(self.threshold, d, start, prefix)  # d_i - e_i
        least = self.least(start)  # every unvisited d_i >= least
        if math.isfinite(least) and start > 0:
            mean = self._x_sum / (start + 1)  # shrunk towards 0 by one pseudo-example
            second = self._x_sq / (start + 1)
            bet = mean / (second + mean * mean) if mean > 0 else 0.0
            room = (d - excess) - least  # e_i - least >= 0: d_i - e_i >= -room surely
            safe = np.where(room > 0, room, 1.0)
            lam = np.where(room > 0, np.minimum(bet, BET_CAP / safe), 0.0)
            self._bet[start : start + size] = lam
            self.log_wealth += float(np.sum(np.log1p(lam * excess)))
            if self.log_wealth >= self.log_inv_alpha:
                self.rejected = True
        # (no finite bound, or nothing seen yet: no bet, lambda = 0)
        self._x_sum += float(np.sum(excess))
        self._x_sq += float(np.sum(excess * excess))

    def deterministic(self, n: int, prefix: float) -> float:
        """Lower bound from ``candidate >= floor`` alone; exact at ``n = N``."""
        return (prefix + (self.N - n) * self.floor - self.unvisited_sum(n)) / self.N

    def decided(self, n: int, prefix: float, strict: bool) -> bool:
        """Whether the mean is surely, or with the test's confidence, above ``threshold``."""
        if self.rejected:
            return True
        sure = self.deterministic(n, prefix)
        return sure > self.threshold if strict else sure >= self.threshold

    def _log_wealth(self, m: FloatArray, n: int) -> FloatArray:
        """``log K_n(m)`` for each ``m <= threshold`` (shape (k,)), replaying the same bets."""
        d = self._d[:n]
        e = self._null_means(m[:, None], d, 0, 0.0)
        return np.sum(np.log1p(self._bet[:n] * (d - e)), axis=1)  # type: ignore[no-any-return]

    def lower(self, n: int, prefix: float) -> float:
        """A lower confidence bound of the mean, simultaneous over ``n``, truncated at
        ``threshold`` (all the decision needs): ``sup {m <= threshold: K_n(m) >= 1/a}``."""
        sure = self.deterministic(n, prefix)
        if self.rejected or sure >= self.threshold:
            return max(sure, self.threshold)
        n = self.fed  # (a decided comparison is not fed further: its bound stays valid)
        if n == 0 or not np.any(self._bet[:n] > 0):
            return max(sure, self._bound)
        lo = sure
        if not math.isfinite(lo):  # find a rejected m below the threshold
            step = max(1.0, abs(self.threshold))
            for _ in range(64):
                lo = self.threshold - step
                if self._log_wealth(np.array([lo]), n)[0] >= self.log_inv_alpha:
                    break
                step *= 2.0
            else:
                return max(sure, self._bound)
        elif self._log_wealth(np.array([lo]), n)[0] < self.log_inv_alpha:
            return max(sure, self._bound)
        hi = self.threshold  # log K_n(m) is non-increasing in m: bracket the crossing
        for _ in range(4):
            grid = np.linspace(lo, hi, 33)
            above = self._log_wealth(grid, n) >= self.log_inv_alpha
            j = int(np.count_nonzero(above)) - 1  # above = [True .. True, False .. False]
            lo, hi = float(grid[j]), float(grid[min(j + 1, 32)])
        self._bound = max(self._bound, lo)
        return max(sure, self._bound)
