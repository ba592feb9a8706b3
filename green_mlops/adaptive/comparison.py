"""The paired comparison of a candidate with the incumbent on the same N examples.

Two betting tests (one per decision) and the sure finite-population bound decide "improved",
"not improved" or not yet. See docs/betting-test.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from green_mlops.adaptive.betting import FloatArray, OneSidedTest
from green_mlops.adaptive.rounding import ROUNDING_MARGIN

__all__ = ["SIGN_Z", "TIE_CAP", "Decision", "PairedComparison"]

#: with a tolerance, a call is made only where the running paired mean is this many
#: finite-population standard errors on its side (docs/adaptive-validation.md, "Tolerance")
SIGN_Z = 3.0
#: ... or, for a near tie (both calls allowed), once it has seen this many times the examples
#: at which both calls first were allowed: then by the running mean's side
TIE_CAP = 4.0


class Decision(str, enum.Enum):
    """The state of one comparison after a batch."""

    IMPROVED = "improved"
    NOT_IMPROVED = "not_improved"
    UNDECIDED = "undecided"


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
        early: which decisions may be taken before the full set: ``"not_improved"`` or
            ``"both"``. Each side's test runs at all of ``alpha``: for any full-set gap at most
            one of the two calls can be wrong, except with ``0 < improve_by`` and
            ``improve_by >= 2 tolerance`` (a gap in ``[-improve_by, 0)`` makes both wrong,
            for ModelCheckpoint or for EarlyStopping): then each side gets half
            (:attr:`side_alpha`, :attr:`split`).
        known: how many leading incumbent values are known (default: all).
        improve_by: an early "improved" needs the candidate's mean to be better than the
            incumbent's by more than this (>= 0, in the metric's units; ``EarlyStopping``'s
            ``min_delta``). At the full set "improved" means strictly better, by any amount.
        rounding: relative margin by which an early decision must clear its threshold, so
            that rounding the full-set means in the logged dtype could not have reversed it:
            :data:`ROUNDING_MARGIN` (float64), :data:`FLOAT32_ROUNDING_MARGIN` (float32).
        tolerance: the indifference zone ``eps >= 0`` (metric units): each early decision is
            tested at its threshold shifted by ``eps`` towards the other decision, so it is
            wrong with probability <= its share of ``alpha`` only where the full-set
            difference lies ``eps`` or more beyond the threshold (docs/betting-test.md,
            "Tolerance"). 0 is the strict test. With a tolerance > 0 a call that a test
            allows is also held back until the running paired mean is ``sign_z``
            finite-population standard errors on that call's side, or (both calls allowed)
            for :data:`TIE_CAP` times the examples at which both first were: a stricter
            stopping rule, so the guarantee is unchanged, and calls inside the zone agree
            with full validation more often.
        sign_z: that number of standard errors (default :data:`SIGN_Z`); 0 only asks the
            running mean's side.

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
        tolerance: float = 0.0,
        sign_z: float | None = None,
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
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
        sign_z = SIGN_Z if sign_z is None else sign_z
        if not (math.isfinite(sign_z) and sign_z >= 0):
            raise ValueError(f"sign_z must be finite and >= 0, got {sign_z}")
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
        self._sumsq = 0.0  # of their squares (the tolerant rule's standard error)
        self.finite = True
        self.decision = Decision.UNDECIDED
        # the size of the means and thresholds that rounding acts on: mean |incumbent value|
        # (robust to mixed signs), over the full set when known, else bounded by the bounds
        scale = float(np.mean(np.abs(head)))
        bounds = [abs(b) for b in (lower, upper) if b is not None]
        if known < self.N and bounds:  # (without a bound nothing is decided early here)
            scale = (known * scale + (self.N - known) * max(bounds)) / self.N
        self._margin = rounding * max(scale + improve_by, np.finfo(float).tiny)
        # Each side may spend all of alpha where, whatever the full-set gap, at most one of
        # the two calls can be wrong (outside the zone): improve_by 0, or < 2 tolerance
        # (docs/betting-test.md, "Alpha spending"); otherwise (a gap in [-improve_by, 0)
        # makes both calls wrong) each side gets half.
        self.split = early == "both" and not (improve_by == 0 or improve_by < 2 * tolerance)
        #: the level each side's test runs at
        self.side_alpha = alpha / 2 if self.split else alpha
        log_inv = math.log(1 / self.side_alpha)
        # "not improved": mean(d) >= margin - tolerance; "improved": mean(-d) > improve_by +
        # margin - tolerance (with tolerance 0: the strict thresholds)
        self.tolerance = tolerance
        self.sign_z = sign_z
        self._both_at: int | None = None  # examples seen when both calls were first allowed
        self._low = (
            None
            if floor is None
            else OneSidedTest(
                self._inc,
                known,
                floor,
                math.inf if ceiling is None else ceiling,
                log_inv,
                self._margin - tolerance,
            )
        )
        self._high = (
            None
            if ceiling is None or early != "both"
            else OneSidedTest(
                -self._inc,
                known,
                -ceiling,
                math.inf if floor is None else -floor,
                log_inv,
                improve_by + self._margin - tolerance,
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
        self._sumsq += float(np.dot(d, d))
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
        low = self._low is not None and self._low.decided(self.n, self._sum, strict=False)
        if self.tolerance > 0:
            self.decision = self._tolerant(low)
        elif low:
            self.decision = Decision.NOT_IMPROVED
        elif self._high is not None and self._high.decided(self.n, -self._sum, strict=True):
            self.decision = Decision.IMPROVED
        return self.decision

    def _tolerant(self, low: bool) -> Decision:
        """With a tolerance, a call that a test allows is made only where the running paired
        mean lies ``sign_z`` finite-population standard errors on that call's side of the
        midpoint between the two thresholds (a tie counts as "not improved", as at the full
        set), so that calls inside the zone agree with full validation as often as they can;
        a near tie that both tests allow is called by that side after :data:`TIE_CAP` times
        the examples at which both first allowed it (what a tie can cost stays capped).
        Holding a call back only delays it: the tests' guarantee is unchanged."""
        high = self._high is not None and self._high.decided(self.n, -self._sum, strict=True)
        if not (low or high) or self.n < 2:
            return Decision.UNDECIDED
        n = self.n
        mean = self._sum / n  # oriented: candidate minus incumbent
        spread = max(self._sumsq / n - mean * mean, 0.0) * n / (n - 1)
        error = math.sqrt(spread * (1.0 - n / self.N) / n)
        side = mean + self.improve_by / 2  # from the midpoint of the thresholds 0, -improve_by
        if low and side >= self.sign_z * error:
            return Decision.NOT_IMPROVED
        if high and -side > self.sign_z * error:
            return Decision.IMPROVED
        if low and high:
            if self._both_at is None:
                self._both_at = n
            if n >= TIE_CAP * self._both_at:
                return Decision.NOT_IMPROVED if side >= 0 else Decision.IMPROVED
        return Decision.UNDECIDED

    def _exact(self) -> Decision:
        cand = float(np.mean(self._cand))
        better = cand < self.incumbent_mean if self.mode == "min" else cand > self.incumbent_mean
        return Decision.IMPROVED if better else Decision.NOT_IMPROVED

    # -- reading ---------------------------------------------------------------------------

    @property
    def interval(self) -> tuple[float, float]:
        """Confidence interval for ``mean(candidate) - mean(incumbent)`` over the N examples
        (in the metric's own units and sign), valid simultaneously over time at level
        ``1 - 2 side_alpha`` (each bound alone at ``1 - side_alpha``): the inverted
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
