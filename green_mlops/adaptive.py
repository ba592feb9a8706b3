"""Adaptive validation: stop a validation pass as soon as its decision is certain.

Framework-agnostic statistics core (numpy only). The Lightning callback
``green_mlops.integrations.lightning.AdaptiveValidation`` and ``benchmarks/adaptive_validation.py``
drive the same :class:`AdaptiveValidator`, so a replay of recorded losses decides exactly as a
live fit.

The decision. With ``EarlyStopping`` and ``ModelCheckpoint(save_top_k=1)`` the only thing a
validation run decides is whether the candidate's mean over the *full* validation set beats the
best mean so far (the *incumbent*): ``improved`` or ``not improved`` (and, with
``EarlyStopping(min_delta > 0)``, whether it improved by more than ``min_delta``). Both models
are scored on the same N examples, so we compare them paired, example by example: ``d_i = c_i
- b_i`` (candidate minus incumbent, sign-flipped for ``mode="max"``), and the candidate improved
iff the population mean ``mu = mean(d_1..d_N) < 0``.

The test. The examples are visited in one fixed order that is a uniformly random permutation
drawn once, independently of the models (shuffle once with a fixed seed and keep it). Then the
first ``n`` differences are a sample drawn *without replacement* from the N differences, and
given the first ``i - 1`` of them, ``E[d_i] = (N mu - S_{i-1}) / (N - i + 1)`` (``S`` the
running sum). "Not improved" is decided by a sequential test of ``H0: mu <= t`` (``t`` a
rounding margin above 0) with the wealth process

    K_n = prod_{i <= n} (1 + lambda_i (d_i - e_i)),    e_i = (N t - S_{i-1}) / (N - i + 1),

where the bet ``lambda_i >= 0`` is fixed before ``d_i`` is seen. Under ``H0``, ``E[d_i | past]
<= e_i``, so each factor has conditional mean at most 1: ``K`` is a supermartingale, and it stays
non-negative because ``lambda_i <= BET_CAP / (e_i - least_i)`` with ``least_i`` a sure lower
bound of ``d_i`` (one worst-case example keeps 10 % of the wealth). Ville's inequality gives
``P(K_n >= 1/a for some n) <= a`` under ``H0``: deciding when ``K_n >= 1/a`` errs with
probability at most ``a``, however often it looks. The bet is the growth-rate (Kelly)
approximation ``lambda = m / (v + m^2)``, ``m`` and ``v`` the mean (shrunk by one
pseudo-example) and mean square of the earlier excesses ``d_j - e_j``, fixed per batch and
capped per example. This is the betting method of Waudby-Smith & Ramdas, "Estimating means of
bounded random variables by betting", JRSS-B 2024 (arXiv:2010.09686, Sec. 5, the aGRAPA bet),
for sampling without replacement as in Waudby-Smith & Ramdas, "Confidence sequences for
sampling without replacement", NeurIPS 2020 (arXiv:2006.04347), run at the one threshold the
decision needs. Inverting these tests over ``t`` gives a confidence sequence for ``mu``
(:attr:`PairedComparison.interval`, truncated at the thresholds: bounds beyond them would need
bets aimed there). An earlier version decided from the linearised (empirical-Bernstein) form
of that sequence, whose penalty ``psi(u) x^2`` is more than twice the exact ``log(1 + u x)``
loss for the small differences typical of consecutive epochs; in
``benchmarks/adaptive_validation.py`` (``EarlyStopping(patience=3)``, CE<=5) the exact product
raised the validation saved from 23 % and 18 % to 27 % and 28 % at N = 5,000, and from 39 % and
30 % to 46 % and 43 % at N = 20,000, with every decision still that of full validation.

The sure bounds are *one-sided*. Where the incumbent's values are all known, ``d_i >= lower -
max(incumbent values not yet visited)``: the test needs only the candidate's lower bound (0
for a loss), never an upper one. Incumbent values not known yet (see "Two incumbent modes")
are bounded by ``upper``. The test is combined with the deterministic finite-population bound
``mu >= (S_n + sum over unvisited j of (lower - b_j)) / N`` (a sure statement, costing no
error budget), which is exact at ``n = N``. "Improved" is tested symmetrically (``H0: mu >=
-improve_by - t``); it needs the candidate's ``upper`` bound (``lower`` in ``mode="max"``).

Two incumbent modes. ``incumbent="values"`` keeps the incumbent's per-example values, N floats,
and completes every improving run (the next comparisons need the new incumbent's every value);
only "not improved" is decided early. ``incumbent="weights"`` (the default) also stops an
improving run as soon as the improvement is certain: the candidate becomes the incumbent with
its values known only on the evaluated prefix, and the driver keeps a copy of its *weights*.
A later comparison that reaches beyond that prefix gets the incumbent's values there by
evaluating the kept weights on those same batches (:meth:`AdaptiveValidator.incumbent_missing`,
:meth:`AdaptiveValidator.extend_incumbent`); those forward passes count as validation cost.
The incumbent's values are a fixed function of its (copied, frozen) weights and of each
example, so the values obtained late are the very values a full run of the incumbent would
have produced: the pairs ``(c_i, b_i)`` form the same fixed population, visited in the same
random order, and each pair is revealed in the same step as before (the incumbent's value is
added just before the candidate's). The test keeps its proof; only its predictable sure
bounds change: an unvisited incumbent value not evaluated yet is bounded by
``upper`` (an assumption checked on every value seen) instead of by the known maximum.
Early "improved" needs a bounded candidate value on the improving side: with an unbounded
loss a single unseen example can undo any improvement, and no sequential test can rule that
out; the mode then behaves like ``"values"``.

What is logged, and why the decisions stay those of full validation. ``ModelCheckpoint``
(``save_top_k`` 1, 0 or -1) and ``EarlyStopping`` use the logged value ``u_t`` of run ``t`` only
through two yes/no questions (``mode="min"``; ``"max"`` mirrored): A_t "is ``u_t`` below the
least value logged before?" (save; the best epoch) and B_t "is ``u_t + min_delta`` (computed in
the logged dtype, as EarlyStopping does) below EarlyStopping's best?" (reset the wait count,
else count up and stop at ``patience``); ``ReduceLROnPlateau(threshold=0)`` asks A_t too. Full
validation asks them of the exact means ``v_t``. If A_t and B_t come out the same on ``u`` as on
``v`` for every ``t``, the callbacks' states (best epoch, wait count) coincide after every run,
by induction, and so do the saved checkpoint, the best epoch and the stop epoch. The validator
replays both callbacks' bests on ``u`` and keeps, on ``v``, the incumbent and, when
EarlyStopping's best is another model, that model's exact mean. Each run answers A_t and B_t on
``v``: exactly after a full pass (the incumbent's values are completed lazily on the way), or
early from the sequential test ("not improved": no, no; "improved": yes, yes, because an
early "improved" must establish ``mu < -min_delta``). It then logs its estimate, clamped (in
the logged dtype, by bisection over the float line) into the values of ``u`` that give the same
answers: ``(best_u, +inf)`` for "not improved" (this answers B no as well: EarlyStopping's best
is never below ``best_u + min_delta``); ``(-inf, min(best_u, t))`` for "improved by more than
``min_delta``", ``t`` the least value with ``t + min_delta >= `` EarlyStopping's best; ``[t,
best_u)`` for a smaller improvement, which is only decided at the full set. The first two sets
are never empty; the third only if the two bests lie within float rounding of each other, in
which case A is kept, ``problem`` is set and the callback warns. Because only improvements
beyond ``min_delta`` are decided early, EarlyStopping's best is always the incumbent (then
B's threshold is ``-min_delta`` from the incumbent, known) or a model whose exact mean is
known: every B_t is decidable. So given correct early decisions, the decisions are identical.

For charts: where ``Outcome.exact`` the logged value is the exact mean over the validation
set. Otherwise it is the paired estimate from the evaluated prefix, moved if needed just past
the best logged value (or past ``best - min_delta``) on the decided side: its side of the best
is certain, its size is an estimate. Once an improving run was logged as an estimate, later
full passes may be moved too (flagged not exact) to keep their order against it.

Alpha spending. Comparison ``k`` (1, 2, ...) of a training run gets ``alpha_k = alpha * 6 /
(pi^2 k^2)``, which sums to ``alpha``; with early "improved" each side gets half of it.

The guarantee. If every per-example value is finite and within ``[lower, upper]`` and the order
is a random permutation independent of the models, then with probability at least ``1 -
alpha`` every early decision of every comparison equals the full-set decision, for any number
of comparisons. Proof sketch: the models of full validation do not depend on the permutation
(validation does not change training) and neither does which of them full validation makes
the incumbent; adaptive validation coincides with full validation until its first wrong
decision; that requires some comparison's test, run on a fixed pair of populations, to reject
a true null, probability at most ``sum alpha_k`` (each side of comparison ``k`` spends at most
its share). The error rates are checked by simulation in ``tests/test_adaptive.py``, an
adversarial population among them. Decisions reached at the full set are exact. An early
decision also needs to clear its threshold by a relative ``ROUNDING_MARGIN`` (float64;
``FLOAT32_ROUNDING_MARGIN`` when the logger keeps float32), so that rounding of the full-set
means could not have produced the opposite comparison.

Memory: ``"values"``: N float64 (40 kB for N = 5,000), and 2 N per side of a running
comparison. ``"weights"``: the same, plus, while the incumbent is known only on a prefix, one
copy of the model's weights (held by the driver).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "AdaptiveValidator",
    "Decision",
    "Outcome",
    "PairedComparison",
    "alpha_spending",
]

FloatArray = npt.NDArray[np.float64]

#: Largest share of the wealth one example may put at risk: a bet never exceeds ``BET_CAP`` over
#: the most that example can fall below its null mean, so a worst-case example keeps 10 %.
BET_CAP = 0.9
#: Relative margin by which an early decision must clear its threshold, so that float rounding
#: of the two full-set means cannot turn it into a tie-break the other way.
ROUNDING_MARGIN = 1e-9
#: The same for a logger that keeps float32 (MPS): 8 float32 ulps, relative.
FLOAT32_ROUNDING_MARGIN = 2.0**-20


class Decision(str, enum.Enum):
    """The state of one comparison after a batch."""

    IMPROVED = "improved"
    NOT_IMPROVED = "not_improved"
    UNDECIDED = "undecided"


def alpha_spending(alpha: float, k: int) -> float:
    """Error budget of comparison ``k`` (1-based): ``alpha * 6 / (pi^2 k^2)``; sums to ``alpha``."""
    if k < 1:
        raise ValueError(f"comparison index k must be >= 1, got {k}")
    return alpha * 6.0 / (math.pi**2 * k * k)


class _Side:
    """One side of the comparison, in the orientation where it decides on a *large* mean.

    ``x``: the incumbent's values in this orientation (``d = candidate - x``), of which the first
    ``known`` are known; ``floor``: the least possible candidate value; ``cap``: the largest
    possible incumbent value (``inf`` if unbounded), standing in for values not known yet.
    Tests ``mean(d) <= threshold`` with the wealth process of the module docstring; rejecting
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


class PairedComparison:
    """Sequential paired comparison of a candidate with an incumbent on N examples.

    Args:
        incumbent: the incumbent's per-example values over the full set, in visiting order;
            only the first ``known`` are read (the rest may be NaN); more are added with
            :meth:`extend_incumbent`, always before the candidate's values at those positions.
        alpha: error budget of this comparison (use :func:`alpha_spending`).
        mode: ``"min"`` (a loss: lower is better) or ``"max"`` (accuracy: higher is better).
        lower, upper: bounds on every per-example value. ``mode="min"`` needs ``lower`` to
            decide "not improved" early and ``upper`` for an early "improved" (and for "not
            improved" while incumbent values are unknown); ``"max"`` the reverse. An absent
            bound disables that early decision (the full set still decides).
        early: which decisions may be taken before the full set: ``"not_improved"`` (all of
            ``alpha`` on that side) or ``"both"`` (``alpha`` split in halves).
        known: how many leading incumbent values are known (default: all).
        improve_by: an early "improved" needs the candidate's mean to be better than the
            incumbent's by more than this (>= 0, in the metric's units; ``EarlyStopping``'s
            ``min_delta``). At the full set "improved" means strictly better, by any amount.
        rounding: relative margin by which an early decision must clear its threshold, so
            that rounding the full-set means in the logged dtype could not have reversed it:
            :data:`ROUNDING_MARGIN` (float64), :data:`FLOAT32_ROUNDING_MARGIN` (float32).

    Feed the candidate's values batch by batch with :meth:`update`; it returns the decision so
    far. At the full set the decision is exact: improved iff the candidate's mean is strictly
    better. A non-finite candidate value makes the comparison undecided until the full set.
    """

    def __init__(
        self,
        incumbent: Sequence[float] | npt.ArrayLike,
        alpha: float,
        *,
        mode: Literal["min", "max"] = "min",
        lower: float | None = 0.0,
        upper: float | None = None,
        early: Literal["not_improved", "both"] = "not_improved",
        known: int | None = None,
        improve_by: float = 0.0,
        rounding: float = ROUNDING_MARGIN,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not (math.isfinite(rounding) and rounding >= 0):
            raise ValueError(f"rounding must be finite and >= 0, got {rounding}")
        if early not in ("not_improved", "both"):
            raise ValueError(f"early must be 'not_improved' or 'both', got {early!r}")
        if not (math.isfinite(improve_by) and improve_by >= 0):
            raise ValueError(f"improve_by must be finite and >= 0, got {improve_by}")
        values = np.asarray(incumbent, dtype=np.float64).ravel().copy()
        if values.size == 0:
            raise ValueError("the incumbent has no values")
        known = values.size if known is None else int(known)
        if not 1 <= known <= values.size:
            raise ValueError(f"known must be in [1, {values.size}], got {known}")
        values[known:] = np.nan
        head = values[:known]
        if not np.all(np.isfinite(head)):
            raise ValueError("the incumbent's values must be finite")
        self.mode = mode
        self.sign = 1.0 if mode == "min" else -1.0
        self.N = int(values.size)
        self.known = known
        self._raw = values
        self._inc = self.sign * values  # oriented: badness, lower is better
        self.incumbent_mean = float(np.mean(values)) if known == self.N else math.nan
        # floor of the candidate's badness (for "not improved") and ceiling (for "improved")
        floor = lower if mode == "min" else (None if upper is None else -upper)
        ceiling = upper if mode == "min" else (None if lower is None else -lower)
        for name, bound in (("lower", lower), ("upper", upper)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{name} must be finite or None, got {bound}")
        self._floor = floor
        self._ceiling = ceiling
        self.out_of_bounds: float | None = None
        if self._outside(self._inc[:known]) is not None:
            raise ValueError("an incumbent value lies outside the given bounds")
        self.alpha = alpha
        self.improve_by = improve_by
        self._cand = np.empty(self.N, dtype=np.float64)
        self.n = 0
        self._sum = 0.0  # of oriented differences
        self.finite = True
        self.decision = Decision.UNDECIDED
        # the size of the means and thresholds that rounding acts on: mean |incumbent value|
        # (robust to mixed signs), over the full set when known, else bounded by the bounds
        scale = float(np.mean(np.abs(head)))
        bounds = [abs(b) for b in (lower, upper) if b is not None]
        if known < self.N and bounds:  # (without a bound nothing is decided early here)
            scale = (known * scale + (self.N - known) * max(bounds)) / self.N
        self._margin = rounding * max(scale + improve_by, np.finfo(float).tiny)
        log_inv = math.log((2 if early == "both" else 1) / alpha)
        # "not improved": mean(d) >= margin; "improved": mean(-d) > improve_by + margin
        self._low = (
            None
            if floor is None
            else _Side(
                self._inc,
                known,
                floor,
                math.inf if ceiling is None else ceiling,
                log_inv,
                self._margin,
            )
        )
        self._high = (
            None
            if ceiling is None or early != "both"
            else _Side(
                -self._inc,
                known,
                -ceiling,
                math.inf if floor is None else -floor,
                log_inv,
                improve_by + self._margin,
            )
        )

    def _outside(self, oriented: FloatArray) -> float | None:
        """The first finite value (oriented) outside the bounds, in the metric's units."""
        low = -np.inf if self._floor is None else self._floor
        high = np.inf if self._ceiling is None else self._ceiling
        bad = oriented[np.isfinite(oriented) & ((oriented < low) | (oriented > high))]
        return None if bad.size == 0 else float(self.sign * bad[0])

    # -- feeding ---------------------------------------------------------------------------

    def extend_incumbent(self, values: Sequence[float] | npt.ArrayLike) -> None:
        """Add the incumbent's values for the next unknown positions (in visiting order)."""
        batch = np.asarray(values, dtype=np.float64).ravel()
        if self.known + batch.size > self.N:
            raise ValueError(
                f"got {self.known + batch.size} incumbent values for a population of {self.N}"
            )
        if batch.size == 0:
            return
        k = self.known
        oriented = self.sign * batch
        if not np.all(np.isfinite(batch)):
            self.finite = False
        elif self.out_of_bounds is None:
            self.out_of_bounds = self._outside(oriented)
        self._raw[k : k + batch.size] = batch
        self._inc[k : k + batch.size] = oriented
        self.known = k + batch.size
        if self._low is not None:
            self._low.extend(oriented)
        if self._high is not None:
            self._high.extend(-oriented)
        if self.known == self.N:
            self.incumbent_mean = float(np.mean(self._raw))

    def update(self, values: Sequence[float] | npt.ArrayLike) -> Decision:
        """Add the candidate's values for the next examples (in visiting order)."""
        batch = np.asarray(values, dtype=np.float64).ravel()
        if self.n + batch.size > self.N:
            raise ValueError(
                f"got {self.n + batch.size} candidate values for a population of {self.N}: "
                "the validation set changed size"
            )
        if self.n + batch.size > self.known:
            raise ValueError(
                f"the incumbent's values are known up to position {self.known}; extend them "
                f"(extend_incumbent) before adding candidate values up to {self.n + batch.size}"
            )
        if batch.size == 0:
            return self.decision
        start = self.n
        self._cand[start : start + batch.size] = batch
        self.n += batch.size
        if self.finite and not np.all(np.isfinite(batch)):
            self.finite = False
        if not self.finite:
            self.decision = self._exact() if self.n == self.N else Decision.UNDECIDED
            return self.decision
        oriented = self.sign * batch
        if self.out_of_bounds is None:
            self.out_of_bounds = self._outside(oriented)
        d = oriented - self._inc[start : start + batch.size]
        prefix = self._sum
        self._sum += float(np.sum(d))
        if self.n == self.N:
            self.decision = self._exact()
            return self.decision
        if self.out_of_bounds is not None:  # assumption broken: only the full set decides
            return self.decision
        if self.decision is not Decision.UNDECIDED:
            return self.decision
        if self._low is not None:
            self._low.update(d, start, prefix)
        if self._high is not None:
            self._high.update(-d, start, -prefix)
        if self._low is not None and self._low.decided(self.n, self._sum, strict=False):
            self.decision = Decision.NOT_IMPROVED
        elif self._high is not None and self._high.decided(self.n, -self._sum, strict=True):
            self.decision = Decision.IMPROVED
        return self.decision

    def _exact(self) -> Decision:
        cand = float(np.mean(self._cand))
        better = cand < self.incumbent_mean if self.mode == "min" else cand > self.incumbent_mean
        return Decision.IMPROVED if better else Decision.NOT_IMPROVED

    # -- reading ---------------------------------------------------------------------------

    @property
    def interval(self) -> tuple[float, float]:
        """Confidence interval for ``mean(candidate) - mean(incumbent)`` over the N examples
        (in the metric's own units and sign), valid simultaneously over time: the inverted
        tests, so each bound stops at its decision threshold (near 0, or ``-improve_by``) and
        is tight only on the side the evidence points to; ``(-inf, inf)`` where no bound
        applies. Computed on demand (a few replays of the bets), not per batch."""
        if self.n == self.N and self.finite:
            exact = float(np.mean(self._cand)) - self.incumbent_mean
            return exact, exact
        lo = hi = -math.inf  # in oriented units: lo = lower bound, hi = -(upper bound)
        if self.finite and self.out_of_bounds is None:
            if self._low is not None:
                lo = self._low.lower(self.n, self._sum)
            if self._high is not None:
                hi = self._high.lower(self.n, -self._sum)
        low, high = lo, -hi
        return (low, high) if self.sign > 0 else (-high, -low)

    @property
    def values(self) -> FloatArray:
        """The candidate values seen so far."""
        return self._cand[: self.n]

    def estimate(self) -> float:
        """Paired estimate of the candidate's full-set mean: the incumbent's mean plus the
        mean difference seen so far; with a partly known incumbent, the mean of its known
        values plus the mean difference. Unbiased under the random order."""
        if self.n == 0:
            return math.nan
        if self.known == self.N:
            return self.incumbent_mean + self.sign * self._sum / self.n
        return float(np.mean(self._raw[: self.known])) + self.sign * self._sum / self.n


@dataclass(frozen=True)
class Outcome:
    """What a validation run concluded, and the value to log for the monitored metric."""

    #: The value to log. The exact full-set mean when ``exact``; otherwise an estimate placed
    #: on the side of the best logged values that the decision requires.
    value: float
    exact: bool
    #: Whether the candidate became the incumbent (strictly better than the best).
    improved: bool
    decision: Decision
    #: Candidate examples evaluated in this run, and the population N.
    evaluated: int
    population: int
    #: Comparison index (1-based) and its error budget; 0 and 0.0 for a run without one.
    comparison: int
    alpha: float
    #: Incumbent examples evaluated in this run (``incumbent="weights"``: lazily, from the
    #: kept weights); validation forward passes like the candidate's.
    incumbent_evaluated: int = 0

    @property
    def fraction_evaluated(self) -> float:
        """Validation forward passes of this run (candidate and incumbent) per example in the
        set: 1.0 for a full pass; may exceed 1 when the incumbent was evaluated too."""
        total = self.evaluated + self.incumbent_evaluated
        return total / self.population if self.population else 1.0


_Class = Literal["not", "improved", "improved_by_delta"]


def _float_key(x: float, dtype: type[np.floating[Any]]) -> int:
    """An integer that orders like the (non-NaN) float ``x`` of ``dtype``; adjacent floats
    have adjacent keys (+0.0 and -0.0 share 0)."""
    if dtype is np.float32:
        bits = int(np.array(x, np.float32).view(np.int32))
        return bits if bits >= 0 else -(bits & 0x7FFFFFFF)
    bits = int(np.array(x, np.float64).view(np.int64))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFFFFFFFFFF)


def _from_key(key: int, dtype: type[np.floating[Any]]) -> float:
    if dtype is np.float32:
        bits = key if key >= 0 else (-key) | -0x80000000
        return float(np.array(bits, np.int32).view(np.float32))
    bits = key if key >= 0 else (-key) | -0x8000000000000000
    return float(np.array(bits, np.int64).view(np.float64))


def _half_line(
    predicate: Callable[[float], bool], want: bool, dtype: type[np.floating[Any]]
) -> tuple[int, int] | None:
    """The keys of the floats where a monotone ``predicate`` equals ``want``, as a closed
    interval (None if none)."""
    lo, hi = _float_key(-math.inf, dtype), _float_key(math.inf, dtype)
    at_lo, at_hi = predicate(-math.inf), predicate(math.inf)
    if at_lo == at_hi:
        return (lo, hi) if at_lo == want else None
    a, b = lo, hi  # predicate(a) == at_lo, predicate(b) == at_hi
    while b - a > 1:
        mid = (a + b) // 2
        if predicate(_from_key(mid, dtype)) == at_lo:
            a = mid
        else:
            b = mid
    return (lo, a) if at_lo == want else (b, hi)


class AdaptiveValidator:
    """Adaptive validation across a training run (the policy the callback and replay share).

    Keeps the incumbent (the best run so far: its per-example values, possibly only a prefix
    of them) and replays what ``ModelCheckpoint`` and ``EarlyStopping`` keep (their best
    logged values). Per validation run::

        validator.begin()
        for batch in val_batches:            # in the fixed order
            if validator.should_stop:
                break
            missing = validator.incumbent_missing(len(batch))
            if missing:                      # incumbent="weights": evaluate the kept weights
                validator.extend_incumbent(incumbent_values(batch))
            validator.observe(per_example_values(batch))
        outcome = validator.end()            # log outcome.value under the monitored key
        # incumbent="weights": keep a copy of the weights while validator.needs_weights
        # (a fresh copy when outcome.improved), drop it when it turns False

    A run with no incumbent, or with a non-finite value, or after a bound was violated, is a
    full pass. In ``incumbent="values"`` mode and when early "improved" is off, an early
    "not improved" is the only early stop, and :meth:`incumbent_missing` is always 0.

    Args:
        mode, alpha, lower, upper: as for :class:`PairedComparison` (alpha for the whole fit).
        precision: the dtype in which the logger keeps values (``"float32"`` on MPS).
        enabled: ``False``: every run is a full pass (the reference).
        incumbent: ``"weights"`` (early "improved" allowed) or ``"values"`` (see the module
            docstring).
        min_delta: ``EarlyStopping``'s ``min_delta`` (>= 0) for the monitored key, 0 if none.
        early_improved: ``False`` turns early "improved" off in ``"weights"`` mode (the
            callback does so when another callback compares the value with a threshold it
            cannot track, e.g. ``stopping_threshold``).
    """

    def __init__(
        self,
        *,
        mode: Literal["min", "max"] = "min",
        alpha: float = 0.05,
        lower: float | None = 0.0,
        upper: float | None = None,
        precision: Literal["float64", "float32"] = "float64",
        enabled: bool = True,
        incumbent: Literal["weights", "values"] = "weights",
        min_delta: float = 0.0,
        early_improved: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
        if incumbent not in ("weights", "values"):
            raise ValueError(f"incumbent must be 'weights' or 'values', got {incumbent!r}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be finite and >= 0, got {min_delta}")
        if mode == "min" and lower is None:
            raise ValueError(
                "mode='min' needs lower= (the least possible per-example value, 0.0 for a loss)"
            )
        if mode == "max" and upper is None:
            raise ValueError(
                "mode='max' needs upper= (the largest possible per-example value, 1.0 for "
                "correctness)"
            )
        if lower is not None and upper is not None and not lower < upper:
            raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}")
        self.mode = mode
        self.sign = 1.0 if mode == "min" else -1.0
        self.alpha = alpha
        self.lower = lower
        self.upper = upper
        self.precision = precision
        self.enabled = enabled
        self.incumbent_mode = incumbent
        self.min_delta = min_delta
        self.early_improved = early_improved
        worst = math.inf if mode == "min" else -math.inf
        #: Best logged value (ModelCheckpoint's best score) and EarlyStopping's best score.
        self.best = worst
        self.es_best = worst
        #: The incumbent's per-example values (NaN where not known yet), how many are known,
        #: and its exact full-set mean (as logged by full validation) once all are.
        self.incumbent: FloatArray | None = None
        self.known = 0
        self.incumbent_value: float | None = None
        #: EarlyStopping's best model, when it is not the incumbent: its exact mean.
        self.es_value: float | None = None
        self.comparisons = 0
        self.evaluated_total = 0
        self.population_total = 0
        #: Set when an assumption was found broken; every later run is a full pass.
        self.problem: str | None = None
        self._test: PairedComparison | None = None
        self._values: list[FloatArray] = []
        self._n = 0
        self._incumbent_run = 0
        self._running = False
        self._es_tracked = True

    # -- state queries ---------------------------------------------------------------------

    @property
    def population(self) -> int | None:
        """N, known once a run produced the incumbent."""
        return None if self.incumbent is None else int(self.incumbent.size)

    @property
    def skipped_total(self) -> int:
        """Validation forward passes saved so far (negative if lazy evaluation cost more)."""
        return self.population_total - self.evaluated_total

    @property
    def needs_weights(self) -> bool:
        """True while the incumbent is known only on a prefix: the driver must keep its
        weights to evaluate it on later batches."""
        return self.incumbent is not None and self.known < self.incumbent.size

    @property
    def improves_early(self) -> bool:
        """Whether this fit may decide "improved" before the full set."""
        ceiling = self.upper if self.mode == "min" else self.lower
        return (
            self.enabled
            and self.incumbent_mode == "weights"
            and self.early_improved
            and self._es_tracked
            and ceiling is not None
        )

    @property
    def decision(self) -> Decision:
        return Decision.UNDECIDED if self._test is None else self._test.decision

    @property
    def should_stop(self) -> bool:
        """True once the rest of this run cannot change its decision."""
        test = self._test
        return test is not None and test.decision is not Decision.UNDECIDED and test.n < test.N

    # -- one run ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a validation run."""
        self._values = []
        self._n = 0
        self._incumbent_run = 0
        self._running = True
        self._test = None
        inc = self.incumbent
        if not self.enabled or self.problem is not None or inc is None:
            return
        if not bool(np.all(np.isfinite(inc[: self.known]))):
            return
        early: Literal["not_improved", "both"] = "both" if self.improves_early else "not_improved"
        try:
            test = PairedComparison(
                inc,
                alpha_spending(self.alpha, self.comparisons + 1),
                mode=self.mode,
                lower=self.lower,
                upper=self.upper,
                early=early,
                known=self.known,
                improve_by=self._improve_by(),
                rounding=FLOAT32_ROUNDING_MARGIN
                if self.precision == "float32"
                else ROUNDING_MARGIN,
            )
        except ValueError:  # e.g. resumed with bounds the incumbent violates
            low = -math.inf if self.lower is None else self.lower
            high = math.inf if self.upper is None else self.upper
            head = inc[: self.known]
            bad = head[(head < low) | (head > high)]
            self._set_problem(float(bad[0]) if bad.size else math.nan)
            return
        self.comparisons += 1
        self._test = test

    def _improve_by(self) -> float:
        """The improvement over the incumbent that EarlyStopping counts as one (>= 0)."""
        if self.min_delta == 0 or self.es_value is None or self.incumbent_value is None:
            return self.min_delta  # EarlyStopping's best is the incumbent
        gap = self.sign * (self.es_value - self.incumbent_value)  # >= 0: the incumbent is better
        return max(0.0, self.min_delta - gap)

    def incumbent_missing(self, size: int) -> int:
        """How many of the incumbent's values at the next ``size`` positions are not known:
        if not 0, call :meth:`extend_incumbent` with the incumbent's values on that batch
        before :meth:`observe`."""
        inc = self.incumbent
        if inc is None or self.known >= inc.size:
            return 0
        end = min(self._n + size, inc.size)
        return max(0, end - max(self.known, self._n))

    def extend_incumbent(self, values: Sequence[float] | npt.ArrayLike) -> None:
        """The incumbent's values on the next batch (the positions :meth:`observe` gets next);
        those already known are ignored. All of them count as evaluated."""
        if not self._running:
            raise RuntimeError("extend_incumbent() outside a run: call begin() first")
        batch = np.asarray(values, dtype=np.float64).ravel()
        inc = self.incumbent
        if inc is None:
            raise RuntimeError("extend_incumbent() without an incumbent")
        self._incumbent_run += batch.size
        skip = self.known - self._n
        if skip < 0:
            raise ValueError(
                f"incumbent values known up to {self.known}, the batch starts at {self._n}"
            )
        new = batch[skip:][: inc.size - self.known]
        if new.size == 0:
            return
        inc[self.known : self.known + new.size] = new
        self.known += new.size
        if self._test is not None:
            self._test.extend_incumbent(new)
            if self._test.out_of_bounds is not None and self.problem is None:
                self._set_problem(self._test.out_of_bounds)
        else:
            self._check_bounds(new)
        if not np.all(np.isfinite(new)) and self.problem is None:
            self.problem = (
                "the incumbent, evaluated lazily from its kept weights, produced a non-finite "
                "value: the early 'improved' decision that made it the incumbent rested on "
                "finite values (an assumption of the guarantee). Every later validation run "
                "is a full pass."
            )
        if self.known == inc.size:
            self.incumbent_value = self._round(float(np.mean(inc)))

    def observe(self, values: Sequence[float] | npt.ArrayLike) -> Decision:
        """Add one batch of per-example values (in visiting order)."""
        if not self._running:
            raise RuntimeError("observe() outside a run: call begin() first")
        batch = np.asarray(values, dtype=np.float64).ravel()
        if self.incumbent_missing(batch.size):
            raise ValueError(
                "the incumbent's values on this batch are not known: call extend_incumbent() "
                "with them first (incumbent_missing() > 0)"
            )
        self._values.append(batch)
        self._n += batch.size
        test = self._test
        if test is None:
            if self.population is not None and self._n > self.population:
                raise ValueError(
                    f"validation run has more than {self.population} examples, the size of "
                    "the incumbent's run: the validation set changed"
                )
            self._check_bounds(batch)
            return Decision.UNDECIDED
        decision = test.update(batch)
        if test.out_of_bounds is not None and self.problem is None:
            self._set_problem(test.out_of_bounds)
        return decision

    def end(self) -> Outcome:
        """Close the run: update the incumbent and return the value to log."""
        if not self._running:
            raise RuntimeError("end() without begin()")
        self._running = False
        values = np.concatenate(self._values) if self._values else np.empty(0)
        test, self._test = self._test, None
        population = self.population if self.population is not None else values.size
        k = self.comparisons if test is not None else 0
        alpha_k = test.alpha if test is not None else 0.0
        lazy = self._incumbent_run
        if values.size == 0:
            raise ValueError("the validation run produced no per-example values")
        self.evaluated_total += values.size + lazy
        self.population_total += population
        if test is not None and test.n < test.N:
            if test.decision is Decision.UNDECIDED:
                raise ValueError(
                    f"the validation run ended after {test.n} of {test.N} examples without a "
                    "decision: the validation set changed size (or limit_val_batches changed)"
                )
            early = test.decision
            cls: _Class = "improved_by_delta" if early is Decision.IMPROVED else "not"
            value, _ = self._place(test.estimate(), cls, early=True)
            if early is Decision.IMPROVED:
                inc = np.full(test.N, np.nan)
                inc[: test.n] = test.values
                self._new_incumbent(inc, test.n, None, cls)
            self._track(value)
            return Outcome(
                value, False, early is Decision.IMPROVED, early, test.n, test.N, k, alpha_k, lazy
            )
        if self.population is not None and values.size != self.population:
            raise ValueError(
                f"the validation run had {values.size} examples, the incumbent's {self.population}:"
                " the validation set changed size"
            )
        if self.needs_weights:
            raise ValueError(
                "the run covered the full set but the incumbent's values were not completed: "
                "call extend_incumbent() whenever incumbent_missing() > 0"
            )
        mean = self._round(float(np.mean(values)))
        cls = self._classify(mean)
        value, consistent = self._place(mean, cls, early=False)
        if not consistent:
            self.problem = self.problem or (
                "no loggable value orders like the exact mean against both ModelCheckpoint's "
                "and EarlyStopping's best (a float rounding corner of min_delta); the value "
                "logged keeps ModelCheckpoint's decision"
            )
        if cls != "not":
            self._new_incumbent(values.copy(), values.size, mean, cls)
        self._track(value)
        exact = value == mean or (math.isnan(value) and math.isnan(mean))
        decision = Decision.NOT_IMPROVED if cls == "not" else Decision.IMPROVED
        return Outcome(
            value, exact, cls != "not", decision, values.size, population, k, alpha_k, lazy
        )

    # -- what is logged --------------------------------------------------------------------

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _es_improves(self, value: float, best: float) -> bool:
        """EarlyStopping's test, in the logged dtype: ``monitor_op(value - min_delta, best)``
        with ``min_delta`` signed as EarlyStopping stores it."""
        if self.precision == "float32":
            x = float(np.float32(value) + np.float32(self.sign * self.min_delta))
        else:
            x = value + self.sign * self.min_delta
        return self._better(x, best)

    def _classify(self, mean: float) -> _Class:
        """The full-validation answers for an exact (logged-dtype) mean."""
        incumbent = self.incumbent_value
        if incumbent is None:  # no incumbent yet
            incumbent = math.inf if self.mode == "min" else -math.inf
        if not self._better(mean, incumbent):
            return "not"
        es_value = self.es_value if self.es_value is not None else incumbent
        return "improved_by_delta" if self._es_improves(mean, es_value) else "improved"

    def _place(self, estimate: float, cls: _Class, *, early: bool) -> tuple[float, bool]:
        """``estimate`` (rounded) moved, if needed, into the set of values that give the
        answers ``cls`` against the best logged values; and whether that set is non-empty."""
        value = self._round(estimate)
        if math.isnan(value):
            return value, cls == "not"
        dtype: type[np.floating[Any]] = np.float32 if self.precision == "float32" else np.float64
        best, es_best = self.best, self.es_best
        constraints: list[tuple[Callable[[float], bool], bool]] = []
        if cls == "not":
            constraints.append((lambda u: self._better(u, best), False))
            if early:  # strictly worse than the best: no tie for any threshold >= 0
                constraints.append((lambda u: self._better(best, u), True))
        else:
            constraints.append((lambda u: self._better(u, best), True))
        if self.min_delta > 0:
            want = cls == "improved_by_delta"
            constraints.append((lambda u: self._es_improves(u, es_best), want))
        lo, hi = _float_key(-math.inf, dtype), _float_key(math.inf, dtype)
        for predicate, want in constraints:
            line = _half_line(predicate, want, dtype)
            if line is None:
                lo, hi = 1, 0
                break
            lo, hi = max(lo, line[0]), min(hi, line[1])
        if lo > hi:  # keep ModelCheckpoint's decision (the first constraint) at least
            line = _half_line(constraints[0][0], constraints[0][1], dtype)
            assert line is not None
            lo, hi = line
            key = min(max(_float_key(value, dtype), lo), hi)
            return _from_key(key, dtype), False
        key = min(max(_float_key(value, dtype), lo), hi)
        return (value if key == _float_key(value, dtype) else _from_key(key, dtype)), True

    def _track(self, value: float) -> None:
        """Replay ModelCheckpoint's and EarlyStopping's bests on the logged value."""
        if self._better(value, self.best):
            self.best = value
        if self._es_improves(value, self.es_best):
            self.es_best = value

    def _new_incumbent(
        self, values: FloatArray, known: int, mean: float | None, cls: _Class
    ) -> None:
        if cls == "improved" and self.es_value is None:
            self.es_value = self.incumbent_value  # EarlyStopping's best stays the old incumbent
        elif cls == "improved_by_delta":
            self.es_value = None
        self.incumbent = values
        self.known = known
        self.incumbent_value = mean

    # -- helpers ---------------------------------------------------------------------------

    def _round(self, value: float) -> float:
        """``value`` as the logger keeps it (``precision``); rounding is monotone."""
        return float(np.float32(value)) if self.precision == "float32" else float(value)

    def _check_bounds(self, batch: FloatArray) -> None:
        if self.problem is not None or batch.size == 0:
            return
        finite = batch[np.isfinite(batch)]
        low = self.lower if self.lower is not None else -math.inf
        high = self.upper if self.upper is not None else math.inf
        outside = finite[(finite < low) | (finite > high)]
        if outside.size:
            self._set_problem(float(outside[0]))

    def _set_problem(self, value: float) -> None:
        self.problem = (
            f"a per-example value ({value!r}) lies outside the declared bounds "
            f"[{self.lower}, {self.upper}]; adaptive validation is off for the rest of this run "
            "(every validation run is now a full pass, so decisions stay exact). Set lower=/upper= "
            "to bounds every per-example value respects."
        )

    # -- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the incumbent's weights are the driver's): the
        incumbent's values (NaN where unknown), the best values, counters."""
        return {
            "version": 2,
            "mode": self.mode,
            "alpha": self.alpha,
            "lower": self.lower,
            "upper": self.upper,
            "precision": self.precision,
            "incumbent_mode": self.incumbent_mode,
            "min_delta": self.min_delta,
            "best": self.best,
            "es_best": self.es_best,
            "incumbent": None if self.incumbent is None else self.incumbent.copy(),
            "known": self.known,
            "incumbent_value": self.incumbent_value,
            "es_value": self.es_value,
            "comparisons": self.comparisons,
            "evaluated_total": self.evaluated_total,
            "population_total": self.population_total,
            "problem": self.problem,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version = state.get("version")
        if version not in (1, 2):
            raise ValueError(f"unknown AdaptiveValidator state version {version!r}")
        if state["mode"] != self.mode:
            raise ValueError(
                f"the checkpoint was written with mode={state['mode']!r}, this run has "
                f"mode={self.mode!r}"
            )
        incumbent = state["incumbent"]
        self.incumbent = None if incumbent is None else np.asarray(incumbent, np.float64).copy()
        self.best = float(state["best"])
        self.comparisons = int(state["comparisons"])
        self.evaluated_total = int(state["evaluated_total"])
        self.problem = state["problem"]
        size = 0 if self.incumbent is None else self.incumbent.size
        if version == 1:  # values mode: complete incumbent, logged values all exact
            self.known = size
            self.incumbent_value = None if self.incumbent is None else self.best
            self.es_best = self.best  # exact when min_delta == 0; else see below
            self.es_value = None
            self.population_total = self.evaluated_total + int(state["skipped_total"])
            # EarlyStopping's best was not recorded: without it no early "improved"
            self._es_tracked = self.min_delta == 0
        else:
            self.known = int(state["known"])
            value = state["incumbent_value"]
            self.incumbent_value = None if value is None else float(value)
            self.es_best = float(state["es_best"])
            es_value = state["es_value"]
            self.es_value = None if es_value is None else float(es_value)
            self.population_total = int(state["population_total"])
            if float(state["min_delta"]) != self.min_delta:
                raise ValueError(
                    f"the checkpoint was written with EarlyStopping min_delta="
                    f"{state['min_delta']}, this run has {self.min_delta}"
                )
        if self.known > size:
            raise ValueError(f"state has {self.known} known values of {size}")
        self._test = None
        self._running = False
