"""The validator: adaptive validation across a fit, the policy the callback and replays share.

It keeps the incumbent, replays what ``ModelCheckpoint`` and ``EarlyStopping`` keep, runs one
:class:`~green_mlops.adaptive.comparison.PairedComparison` per validation run and says what to
log. See docs/adaptive-validation.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from green_mlops.adaptive.betting import FloatArray, check_tolerance, comparison_budget
from green_mlops.adaptive.comparison import Decision, PairedComparison
from green_mlops.adaptive.persistence import load_state, state_of
from green_mlops.adaptive.rounding import (
    FLOAT32_ROUNDING_MARGIN,
    ROUNDING_MARGIN,
    Constraint,
    place,
)

__all__ = ["AdaptiveValidator", "Outcome"]


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
        incumbent: ``"weights"`` (early "improved" allowed) or ``"values"`` (see
            docs/adaptive-validation.md).
        min_delta: ``EarlyStopping``'s ``min_delta`` (>= 0) for the monitored key, 0 if none.
        early_improved: ``False`` turns early "improved" off in ``"weights"`` mode (the
            callback does so when another callback compares the value with a threshold it
            cannot track, e.g. ``stopping_threshold``).
        tolerance: ``None`` (strict) or ``eps >= 0`` in the metric's units, less than
            ``upper - lower``: runs within ``eps`` of the decision threshold may be called
            either way (docs/adaptive-validation.md, "Tolerance"). The budget of run ``r``
            against the incumbent of run ``j`` is then ``alpha_r * 6 / (pi^2 (r - j)^2)``.
        horizon: ``None`` or the most validation runs of the fit: comparison ``k <= horizon``
            gets ``alpha / horizon`` instead of ``alpha * 6 / (pi^2 k^2)``; later runs are
            full passes.
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
        tolerance: float | None = None,
        horizon: int | None = None,
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
        check_tolerance(tolerance, lower, upper)
        if horizon is not None and (
            isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1
        ):
            raise ValueError(
                f"horizon={horizon!r}: pass None or an int >= 1, the most validation runs of "
                "the fit (e.g. max_epochs with one validation run per epoch)"
            )
        self.tolerance = None if tolerance is None else float(tolerance)
        self.horizon = horizon
        #: Validation runs ended so far, and the run (0-based) that produced the incumbent.
        self.runs = 0
        self.incumbent_run = -1
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
        #: With a tolerance, the declared N while the first run is evaluated on a prefix only.
        self._first: int | None = None

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
        if self._first is not None:
            return 0 < self._n < self._first
        test = self._test
        return test is not None and test.decision is not Decision.UNDECIDED and test.n < test.N

    # -- one run ---------------------------------------------------------------------------

    def begin(self, population: int | None = None) -> None:
        """Start a validation run. ``population``: the number of per-example values a full
        pass yields (N), where the driver knows it. With a tolerance and early "improved",
        the first run (no incumbent yet) then stops after its first batch: it decides
        nothing, and the incumbent's other values are evaluated lazily, only as deep as
        later comparisons need (docs/adaptive-validation.md, "The first run")."""
        self._values = []
        self._n = 0
        self._incumbent_run = 0
        self._running = True
        self._test = None
        self._first = None
        inc = self.incumbent
        if population is not None and population < 1:
            raise ValueError(f"population must be None or >= 1, got {population}")
        if (
            inc is None
            and population is not None
            and self.tolerance is not None
            and self.improves_early
            and self.problem is None
        ):
            self._first = population
        if not self.enabled or self.problem is not None or inc is None:
            return
        if not bool(np.all(np.isfinite(inc[: self.known]))):
            return
        alpha_k = self._budget()
        if alpha_k is None:  # beyond the horizon: no error budget left, a full pass
            return
        improves_early = self.improves_early
        improve_by = self._improve_by()
        if self.tolerance is not None and self.es_value is not None:
            # EarlyStopping's best is another model: the "improved" threshold would depend on
            # which (a path-dependent choice under a tolerance), so only "not improved" here
            improves_early, improve_by = False, self.min_delta
        early: Literal["not_improved", "both"] = "both" if improves_early else "not_improved"
        try:
            test = PairedComparison(
                inc,
                alpha_k,
                mode=self.mode,
                lower=self.lower,
                upper=self.upper,
                early=early,
                known=self.known,
                improve_by=improve_by,
                rounding=FLOAT32_ROUNDING_MARGIN
                if self.precision == "float32"
                else ROUNDING_MARGIN,
                tolerance=self.tolerance or 0.0,
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

    def _budget(self) -> float | None:
        """The error budget of the comparison this run would start (None: none left)."""
        return comparison_budget(
            self.alpha,
            self.comparisons + 1,
            horizon=self.horizon,
            pair=None if self.tolerance is None else (self.runs, self.incumbent_run),
        )

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

    def full_first(self) -> None:
        """Evaluate this first run in full after all (before its second batch): the driver
        found that its batches do not yield one value per example of the declared N."""
        self._first = None

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
            if self._first is not None and not bool(np.all(np.isfinite(batch))):
                self._first = None  # a non-finite value: a full pass, its mean logged as is
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
        first, self._first = self._first, None
        if first is not None and values.size > first:
            raise ValueError(
                f"the first validation run yielded more than the {first} per-example values "
                "declared (population)"
            )
        if first is not None and values.size < first:
            return self._end_first(values, first)
        self.evaluated_total += values.size + lazy
        self.population_total += population
        run, self.runs = self.runs, self.runs + 1
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
                self._new_incumbent(inc, test.n, None, cls, run)
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
            self._new_incumbent(values.copy(), values.size, mean, cls, run)
        self._track(value)
        exact = value == mean or (math.isnan(value) and math.isnan(mean))
        decision = Decision.NOT_IMPROVED if cls == "not" else Decision.IMPROVED
        return Outcome(
            value, exact, cls != "not", decision, values.size, population, k, alpha_k, lazy
        )

    def _end_first(self, values: FloatArray, population: int) -> Outcome:
        """The first run, evaluated on a prefix: it becomes the incumbent (as at the full
        set: nothing to beat) known on that prefix; its logged value is the prefix's mean."""
        self.evaluated_total += values.size
        self.population_total += population
        run, self.runs = self.runs, self.runs + 1
        value, _ = self._place(float(np.mean(values)), "improved_by_delta", early=True)
        inc = np.full(population, np.nan)
        inc[: values.size] = values
        self._new_incumbent(inc, values.size, None, "improved_by_delta", run)
        self._track(value)
        return Outcome(value, False, True, Decision.IMPROVED, values.size, population, 0, 0.0, 0)

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
        constraints: list[Constraint] = []  # ModelCheckpoint's first: place() keeps it
        if cls == "not":
            constraints.append((lambda u: self._better(u, best), False))
            if early:  # strictly worse than the best: no tie for any threshold >= 0
                constraints.append((lambda u: self._better(best, u), True))
        else:
            constraints.append((lambda u: self._better(u, best), True))
        if self.min_delta > 0:
            want = cls == "improved_by_delta"
            constraints.append((lambda u: self._es_improves(u, es_best), want))
        return place(value, constraints, dtype)

    def _track(self, value: float) -> None:
        """Replay ModelCheckpoint's and EarlyStopping's bests on the logged value."""
        if self._better(value, self.best):
            self.best = value
        if self._es_improves(value, self.es_best):
            self.es_best = value

    def _new_incumbent(
        self, values: FloatArray, known: int, mean: float | None, cls: _Class, run: int
    ) -> None:
        if cls == "improved" and self.es_value is None:
            self.es_value = self.incumbent_value  # EarlyStopping's best stays the old incumbent
        elif cls == "improved_by_delta":
            self.es_value = None
        self.incumbent = values
        self.known = known
        self.incumbent_value = mean
        self.incumbent_run = run

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
        return state_of(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_state(self, state)
