"""Adaptive validation: stop a validation pass as soon as its decision is certain.

Framework-agnostic statistics core (numpy only). The Lightning callback
``green_mlops.integrations.lightning.AdaptiveValidation`` and ``benchmarks/adaptive_validation.py``
drive the same :class:`AdaptiveValidator`, so a replay of recorded losses decides exactly as a
live fit.

The decision. With ``EarlyStopping`` and ``ModelCheckpoint(save_top_k=1)`` the only thing a
validation run decides is whether the candidate's mean over the *full* validation set beats the
best mean so far (the *incumbent*): ``improved`` or ``not improved``. Both models are scored on
the same N examples, so we compare them paired, example by example: ``d_i = c_i - b_i``
(candidate minus incumbent, sign-flipped for ``mode="max"``), and the candidate improved iff the
population mean ``mu = mean(d_1..d_N) < 0``.

The confidence sequence. The examples are visited in one fixed order that is a uniformly random
permutation drawn once, independently of the models (shuffle once with a fixed seed and keep
it). Then the first ``n`` differences are a sample drawn *without replacement* from the N
differences, and given the first ``i - 1`` of them, ``E[d_i] = (N mu - S_{i-1}) / (N - i + 1)``
(``S`` the running sum). For any predictable ``lambda_i >= 0``, centre ``m_i`` and scale ``s_i``
with ``d_i >= m_i - s_i`` surely, the inequality ``exp(u x - psi(u) x^2) <= 1 + u x`` (``x >=
-1``, ``0 <= u < 1``, ``psi(u) = -log(1 - u) - u``; Fan, Grama & Liu, "Exponential inequalities
for martingales with applications", Electron. J. Probab. 20, 2015) makes

    M_n = prod_i exp(lambda_i (d_i - E[d_i]) - psi(lambda_i s_i) ((d_i - m_i) / s_i)^2)

a non-negative supermartingale, and Ville's inequality gives, simultaneously for all n with
probability at least ``1 - a``,

    mu > L_n = (sum_i lambda_i (d_i + S_{i-1}/(N-i+1)) - sum_i psi(.) (.)^2 - log(1/a))
               / sum_i lambda_i N/(N-i+1).

This is the empirical-Bernstein confidence sequence for sampling without replacement of
Waudby-Smith & Ramdas, "Confidence sequences for sampling without replacement", NeurIPS 2020
(arXiv:2006.04347, Sec. 3), with the plug-in ``lambda`` of Waudby-Smith & Ramdas, "Estimating
means of bounded random variables by betting", JRSS-B 2024 (arXiv:2010.09686, Thm 2), and one
change: the scale ``s_i`` comes from a *one-sided* predictable bound. The incumbent's values are
all known, so ``d_i >= lower - max(incumbent values not yet visited)``; the lower confidence
bound needs only the candidate's lower bound (0 for a loss), never an upper one. It is
intersected with the deterministic finite-population bound ``mu >= (S_n + sum over unvisited j
of (lower - b_j)) / N``, which is exact at ``n = N``: the width is 0 at the full set. An upper
bound (for an early ``improved``) is computed symmetrically when ``upper`` is given.

Alpha spending. Comparison ``k`` (1, 2, ...) of a training run gets ``alpha_k = alpha * 6 /
(pi^2 k^2)``, which sums to ``alpha``.

The guarantee. If every per-example value is finite and within ``[lower, upper]`` and the order
is a random permutation independent of the models, then with probability at least ``1 -
alpha`` every early decision of every comparison equals the full-set decision, for any number
of comparisons. Proof sketch: the models of full validation do not depend on the permutation;
adaptive validation coincides with full validation until its first wrong decision; that
requires some comparison's sequence to miss its ``mu``, probability at most ``sum alpha_k``.
Decisions reached at the full set are exact (no statistics involved). An early "not improved"
also needs the bound to clear 0 by a relative ``ROUNDING_MARGIN``, so that float rounding of the
two full-set means could not have produced the opposite comparison.

Memory: the incumbent's per-example values, N float64 (40 kB for N = 5,000).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
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

#: Largest per-step bet, as a fraction of the scale (Waudby-Smith & Ramdas use 1/2 or 3/4).
MAX_BET = 0.75
#: Relative margin by which an early "not improved" must clear the incumbent, so that float
#: rounding of the two full-set means cannot turn it into a tie-break the other way.
ROUNDING_MARGIN = 1e-9


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


def _psi(u: FloatArray | float) -> Any:
    return -np.log1p(-np.asarray(u)) - u


class _Side:
    """One side of the confidence sequence, in the orientation where it is a lower bound.

    ``values``: the incumbent's (oriented) badness; ``floor``: the least possible candidate
    badness. Tracks ``L_n`` for the mean of ``d = candidate - incumbent``.
    """

    def __init__(self, incumbent: FloatArray, floor: float, log_inv_alpha: float) -> None:
        n = incumbent.size
        self.N = n
        # suffix_max[j] = max of incumbent[j:], the worst incumbent value still unvisited.
        self.suffix_max = np.maximum.accumulate(incumbent[::-1])[::-1]
        self.floor = floor
        self.log_inv_alpha = log_inv_alpha
        self.a = 0.0  # sum lambda_i (d_i + S_{i-1} / (N - i + 1))
        self.w = 0.0  # sum lambda_i N / (N - i + 1)
        self.v = 0.0  # sum psi(lambda_i s_i) ((d_i - m_i) / s_i)^2
        self.sq = 0.0  # sum (d_i - m_i)^2, for the variance estimate
        self.bound = -math.inf

    def update(self, d: FloatArray, start: int, prefix: float) -> None:
        """Add the differences ``d`` at positions ``start .. start + len(d) - 1`` (0-based);
        ``prefix`` is the sum of all earlier differences. Bet size, centre and scale are fixed
        from what was known before the batch (predictable)."""
        n_seen = start
        least = self.floor - float(self.suffix_max[start])  # every unvisited d_i >= least
        centre = prefix / n_seen if n_seen else 0.0
        scale = centre - least
        if not scale > 0:  # centre at the bound: nudge it up (any predictable centre is valid)
            scale = max(abs(least), 1.0) * 1e-12
            centre = least + scale
        var = ((scale / 2.0) ** 2 + self.sq) / (n_seen + 1)
        t = n_seen + 1
        lam = min(MAX_BET / scale, math.sqrt(2.0 * self.log_inv_alpha / (var * t * math.log1p(t))))
        idx = np.arange(start, start + d.size, dtype=np.float64)  # 0-based i - 1
        remaining = self.N - idx  # N - i + 1
        before = prefix + np.concatenate(([0.0], np.cumsum(d)[:-1]))  # S_{i-1}
        self.a += lam * float(np.sum(d + before / remaining))
        self.w += lam * float(np.sum(self.N / remaining))
        resid = d - centre
        self.v += float(_psi(lam * scale)) * float(np.sum((resid / scale) ** 2))
        self.sq += float(np.sum(resid**2))
        if self.w > 0:
            stat = (self.a - self.v - self.log_inv_alpha) / self.w
            self.bound = max(self.bound, stat)

    def deterministic(self, n: int, prefix: float, unvisited_sum: float) -> float:
        """Lower bound from ``candidate >= floor`` alone; exact at ``n = N``."""
        return (prefix + (self.N - n) * self.floor - unvisited_sum) / self.N


class PairedComparison:
    """Sequential paired comparison of a candidate with an incumbent on N examples.

    Args:
        incumbent: the incumbent's per-example values over the full set, in visiting order.
        alpha: error budget of this comparison (use :func:`alpha_spending`).
        mode: ``"min"`` (a loss: lower is better) or ``"max"`` (accuracy: higher is better).
        lower, upper: bounds on every per-example value. ``mode="min"`` needs ``lower`` to
            decide "not improved" early and ``upper`` for an early "improved"; ``"max"`` the
            reverse. An absent bound disables that early decision (the full set still decides).
        early: which decisions may be taken before the full set: ``"not_improved"`` (all of
            ``alpha`` on that side) or ``"both"`` (``alpha`` split in halves).

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
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if early not in ("not_improved", "both"):
            raise ValueError(f"early must be 'not_improved' or 'both', got {early!r}")
        values = np.asarray(incumbent, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError("the incumbent has no values")
        if not np.all(np.isfinite(values)):
            raise ValueError("the incumbent's values must be finite")
        self.mode = mode
        self.sign = 1.0 if mode == "min" else -1.0
        self.N = int(values.size)
        self._inc = self.sign * values  # oriented: badness, lower is better
        self.incumbent_mean = float(np.mean(values))
        self._inc_suffix_sum = np.concatenate((np.cumsum(self._inc[::-1])[::-1], [0.0]))
        # floor of the candidate's badness (for "not improved") and ceiling (for "improved")
        floor = lower if mode == "min" else (None if upper is None else -upper)
        ceiling = upper if mode == "min" else (None if lower is None else -lower)
        for name, bound in (("lower", lower), ("upper", upper)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{name} must be finite or None, got {bound}")
        if floor is not None and np.any(self._inc < floor):
            raise ValueError("an incumbent value lies outside the given bounds")
        if ceiling is not None and np.any(self._inc > ceiling):
            raise ValueError("an incumbent value lies outside the given bounds")
        sides = 2 if early == "both" else 1
        log_inv = math.log(sides / alpha)
        self.alpha = alpha
        self._low = None if floor is None else _Side(self._inc, floor, log_inv)
        self._high = (
            None
            if ceiling is None or early != "both"
            else _Side(-self._inc, -ceiling, log_inv)  # upper bound of d = -(lower bound of -d)
        )
        self._floor = floor
        self._ceiling = ceiling
        self._cand = np.empty(self.N, dtype=np.float64)
        self.n = 0
        self._sum = 0.0  # of oriented differences
        self.finite = True
        self.out_of_bounds: float | None = None
        self.decision = Decision.UNDECIDED
        self._margin = ROUNDING_MARGIN * max(abs(self.incumbent_mean), np.finfo(float).tiny)

    # -- feeding ---------------------------------------------------------------------------

    def update(self, values: Sequence[float] | npt.ArrayLike) -> Decision:
        """Add the candidate's values for the next examples (in visiting order)."""
        batch = np.asarray(values, dtype=np.float64).ravel()
        if self.n + batch.size > self.N:
            raise ValueError(
                f"got {self.n + batch.size} candidate values for a population of {self.N}: "
                "the validation set changed size"
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
        bad = (self._floor is not None and np.any(oriented < self._floor)) or (
            self._ceiling is not None and np.any(oriented > self._ceiling)
        )
        if bad and self.out_of_bounds is None:
            outside = batch[
                (oriented < (self._floor if self._floor is not None else -np.inf))
                | (oriented > (self._ceiling if self._ceiling is not None else np.inf))
            ]
            self.out_of_bounds = float(outside[0])
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
            low = max(
                self._low.bound,
                self._low.deterministic(self.n, self._sum, float(self._inc_suffix_sum[self.n])),
            )
            if low >= self._margin:
                self.decision = Decision.NOT_IMPROVED
        if self._high is not None and self.decision is Decision.UNDECIDED:
            self._high.update(-d, start, -prefix)
            high = -max(
                self._high.bound,
                self._high.deterministic(self.n, -self._sum, -float(self._inc_suffix_sum[self.n])),
            )
            if high < -self._margin:
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
        (in the metric's own units and sign); ``(-inf, inf)`` where no bound applies."""
        if self.n == self.N and self.finite:
            exact = float(np.mean(self._cand)) - self.incumbent_mean
            return exact, exact
        lo = hi = -math.inf  # in oriented units: lo = lower bound, hi = -(upper bound)
        if self.finite and self.out_of_bounds is None:
            if self._low is not None:
                lo = max(
                    self._low.bound,
                    self._low.deterministic(self.n, self._sum, float(self._inc_suffix_sum[self.n])),
                )
            if self._high is not None:
                hi = max(
                    self._high.bound,
                    self._high.deterministic(
                        self.n, -self._sum, -float(self._inc_suffix_sum[self.n])
                    ),
                )
        low, high = lo, -hi
        return (low, high) if self.sign > 0 else (-high, -low)

    @property
    def values(self) -> FloatArray:
        """The candidate values seen so far."""
        return self._cand[: self.n]

    def estimate(self) -> float:
        """Paired estimate of the candidate's full-set mean: the incumbent's mean plus the
        mean difference seen so far (unbiased under the random order)."""
        if self.n == 0:
            return math.nan
        return self.incumbent_mean + self.sign * self._sum / self.n


@dataclass(frozen=True)
class Outcome:
    """What a validation run concluded, and the value to log for the monitored metric."""

    #: The value to log. Exact full-set mean when ``exact``; otherwise the paired estimate,
    #: moved just past the best value when needed so that it is certainly not an improvement.
    value: float
    exact: bool
    improved: bool
    decision: Decision
    evaluated: int
    population: int
    #: Comparison index (1-based) and its error budget; 0 and 0.0 for a run without one.
    comparison: int
    alpha: float

    @property
    def fraction_evaluated(self) -> float:
        return self.evaluated / self.population if self.population else 1.0


class AdaptiveValidator:
    """Adaptive validation across a training run (the policy the callback and replay share).

    Keeps the incumbent (the best run so far, with its per-example values) and the best logged
    value, exactly as ``EarlyStopping`` keeps ``best_score``. Per validation run::

        validator.begin()
        for batch in val_batches:            # in the fixed order
            if validator.should_stop:
                break
            validator.observe(per_example_values(batch))
        outcome = validator.end()            # log outcome.value under the monitored key

    A run with no incumbent, or with a non-finite value, or after a bound was violated, is a
    full pass. An early "not improved" stops the run; "improved" always completes it, because
    the next comparisons need the new incumbent's every value and an exact logged value.

    Logged values (``mode="min"``; mirrored for ``"max"``): a full run logs its exact mean
    ``v`` rounded to ``precision`` (the dtype the logger keeps); it improves iff ``v < best``
    (``best`` starts at +inf, NaN never improves), as in ``EarlyStopping(min_delta=0)`` and
    ``ModelCheckpoint(save_top_k=1)``. An early "not improved" logs ``max(estimate,
    nextafter(best, +inf))``: strictly worse than ``best``, so ``EarlyStopping`` (any
    ``min_delta >= 0``), ``ModelCheckpoint`` and ``ReduceLROnPlateau`` (``threshold >= 0``)
    reach the decision full validation reaches; the value itself is an estimate
    (``Outcome.exact`` is False).
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
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
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
        self.alpha = alpha
        self.lower = lower
        self.upper = upper
        self.precision = precision
        self.enabled = enabled
        self.best = math.inf if mode == "min" else -math.inf
        self.incumbent: FloatArray | None = None
        self.comparisons = 0
        self.evaluated_total = 0
        self.skipped_total = 0
        #: Set when an assumption was found broken; every later run is a full pass.
        self.problem: str | None = None
        self._test: PairedComparison | None = None
        self._values: list[FloatArray] = []
        self._n = 0
        self._running = False

    # -- one run ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a validation run."""
        self._values = []
        self._n = 0
        self._running = True
        self._test = None
        if (
            self.enabled
            and self.problem is None
            and self.incumbent is not None
            and bool(np.all(np.isfinite(self.incumbent)))
        ):
            try:
                test = PairedComparison(
                    self.incumbent,
                    alpha_spending(self.alpha, self.comparisons + 1),
                    mode=self.mode,
                    lower=self.lower,
                    upper=self.upper,
                )
            except ValueError:  # e.g. resumed with bounds the incumbent violates
                low = -math.inf if self.lower is None else self.lower
                high = math.inf if self.upper is None else self.upper
                bad = self.incumbent[(self.incumbent < low) | (self.incumbent > high)]
                self._set_problem(float(bad[0]) if bad.size else math.nan)
                return
            self.comparisons += 1
            self._test = test

    @property
    def population(self) -> int | None:
        """N, known once a full run produced the incumbent."""
        return None if self.incumbent is None else int(self.incumbent.size)

    @property
    def decision(self) -> Decision:
        return Decision.UNDECIDED if self._test is None else self._test.decision

    @property
    def should_stop(self) -> bool:
        """True once the rest of this run cannot change its decision."""
        test = self._test
        return test is not None and test.decision is Decision.NOT_IMPROVED and test.n < test.N

    def observe(self, values: Sequence[float] | npt.ArrayLike) -> Decision:
        """Add one batch of per-example values (in visiting order)."""
        if not self._running:
            raise RuntimeError("observe() outside a run: call begin() first")
        batch = np.asarray(values, dtype=np.float64).ravel()
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
        if values.size == 0:
            raise ValueError("the validation run produced no per-example values")
        self.evaluated_total += values.size
        if test is not None and test.n < test.N:
            if test.decision is not Decision.NOT_IMPROVED:
                raise ValueError(
                    f"the validation run ended after {test.n} of {test.N} examples without a "
                    "decision: the validation set changed size (or limit_val_batches changed)"
                )
            self.skipped_total += test.N - test.n
            value = self._past_best(test.estimate())
            return Outcome(value, False, False, Decision.NOT_IMPROVED, test.n, test.N, k, alpha_k)
        if self.population is not None and values.size != self.population:
            raise ValueError(
                f"the validation run had {values.size} examples, the incumbent's {self.population}:"
                " the validation set changed size"
            )
        value = self._round(float(np.mean(values)))
        improved = value < self.best if self.mode == "min" else value > self.best
        if improved:
            self.best = value
            self.incumbent = values.copy()
        decision = Decision.IMPROVED if improved else Decision.NOT_IMPROVED
        return Outcome(value, True, improved, decision, values.size, population, k, alpha_k)

    # -- helpers ---------------------------------------------------------------------------

    def _round(self, value: float) -> float:
        """``value`` as the logger keeps it (``precision``); rounding is monotone."""
        return float(np.float32(value)) if self.precision == "float32" else float(value)

    def _past_best(self, estimate: float) -> float:
        """``estimate`` moved strictly past ``best`` on the worse side, if it is not already."""
        worse = math.inf if self.mode == "min" else -math.inf
        if self.precision == "float32":
            step = float(np.nextafter(np.float32(self.best), np.float32(worse)))
        else:
            step = float(np.nextafter(self.best, worse))
        value = self._round(estimate)
        if self.mode == "min":
            return max(value, step)
        return min(value, step)

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
        """Everything needed to resume: the incumbent's values, the best value, counters."""
        return {
            "version": 1,
            "mode": self.mode,
            "alpha": self.alpha,
            "lower": self.lower,
            "upper": self.upper,
            "precision": self.precision,
            "best": self.best,
            "incumbent": None if self.incumbent is None else self.incumbent.copy(),
            "comparisons": self.comparisons,
            "evaluated_total": self.evaluated_total,
            "skipped_total": self.skipped_total,
            "problem": self.problem,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown AdaptiveValidator state version {state.get('version')!r}")
        if state["mode"] != self.mode:
            raise ValueError(
                f"the checkpoint was written with mode={state['mode']!r}, this run has "
                f"mode={self.mode!r}"
            )
        incumbent = state["incumbent"]
        self.best = float(state["best"])
        self.incumbent = None if incumbent is None else np.asarray(incumbent, np.float64).copy()
        self.comparisons = int(state["comparisons"])
        self.evaluated_total = int(state["evaluated_total"])
        self.skipped_total = int(state["skipped_total"])
        self.problem = state["problem"]
        self._test = None
        self._running = False
