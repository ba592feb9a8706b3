"""The statistics core of adaptive validation (green_mlops.adaptive), without any framework.

Coverage of the confidence sequence is checked by simulation: many random visiting orders of
fixed populations (fixed seeds), counting how often the sequence ever misses the true mean
difference at any batch; it must stay below alpha. Exactness at the full set, the one-sided
use of bounds, alpha spending and the validator's logged values are checked directly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from green_mlops.adaptive import (
    ROUNDING_MARGIN,
    AdaptiveValidator,
    Decision,
    PairedComparison,
    alpha_spending,
)


def run(
    test: PairedComparison, candidate: np.ndarray, batch: int
) -> list[tuple[int, float, float]]:
    """Feed ``candidate`` batch by batch; the (n, lower, upper) after each batch."""
    trace = []
    for start in range(0, candidate.size, batch):
        test.update(candidate[start : start + batch])
        low, high = test.interval
        trace.append((test.n, low, high))
    return trace


def es_replay(values: list[float], patience: int = 3) -> tuple[int, int]:
    """(best index, stop index) of EarlyStopping(min_delta=0) + ModelCheckpoint(save_top_k=1)."""
    best, wait, best_i = math.inf, 0, -1
    for i, v in enumerate(values):
        if v < best:
            best, wait, best_i = v, 0, i
        else:
            wait += 1
            if wait >= patience:
                return best_i, i
    return best_i, len(values) - 1


# -- alpha spending ---------------------------------------------------------------------------


def test_alpha_spending_sums_to_alpha_and_decreases() -> None:
    spent = [alpha_spending(0.05, k) for k in range(1, 100_001)]
    assert spent[0] == pytest.approx(0.05 * 6 / math.pi**2)
    assert all(a > b for a, b in itertools.pairwise(spent))
    assert sum(spent) < 0.05
    assert sum(spent) == pytest.approx(0.05, rel=1e-4)  # the tail beyond 1e5 is ~6e-7 alpha
    with pytest.raises(ValueError, match="k must be >= 1"):
        alpha_spending(0.05, 0)


def test_validator_spends_alpha_per_comparison() -> None:
    rng = np.random.default_rng(0)
    validator = AdaptiveValidator(alpha=0.1)
    base = rng.exponential(0.5, 200)
    alphas = []
    for epoch in range(5):
        validator.begin()
        validator.observe(base + 0.01 * epoch)  # never improves after the first run
        outcome = validator.end()
        alphas.append((outcome.comparison, outcome.alpha))
    assert alphas[0] == (0, 0.0)  # the first run has nothing to compare with: a full pass
    assert alphas[1:] == [(k, alpha_spending(0.1, k)) for k in range(1, 5)]


# -- coverage by simulation -------------------------------------------------------------------

POPULATIONS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], float, float]] = {
    # incumbent losses (heavy-tailed, like cross-entropy) and a candidate close to it
    "close, worse": (lambda r: r.exponential(0.5, 400), 0.02, 0.15),
    "tie": (lambda r: r.exponential(0.5, 400), 0.0, 0.15),
    "heavy tail, better": (lambda r: r.pareto(2.5, 400), -0.05, 0.4),
}


@pytest.mark.parametrize("name", sorted(POPULATIONS))
def test_confidence_sequence_covers_at_every_batch(name: str) -> None:
    make, shift, noise = POPULATIONS[name]
    rng = np.random.default_rng(12345)
    incumbent = make(rng)
    candidate = np.maximum(incumbent + shift + noise * rng.standard_normal(incumbent.size), 0.0)
    mu = float(np.mean(candidate) - np.mean(incumbent))
    alpha, reps = 0.1, 300
    misses, gaps = 0, 0.0
    for _ in range(reps):
        order = rng.permutation(incumbent.size)  # a fresh random order each replication
        test = PairedComparison(
            incumbent[order], alpha, upper=float(candidate.max()) + 1.0, early="both"
        )
        trace = run(test, candidate[order], batch=10)
        misses += any(not (low - 1e-12 <= mu <= high + 1e-12) for _, low, high in trace)
        _, low, high = trace[len(trace) // 2]
        gaps += mu - low if mu >= 0 else high - mu  # the bound on the side of the truth
    # Anytime-valid: P(ever missing) <= alpha. Allow 3 binomial standard errors of slack.
    assert misses / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    # ... and not vacuously: halfway through, the bound on the side of the truth (the side
    # the bets aim at) is finite and not absurdly far from it.
    assert 0 < gaps / reps < 0.5


def test_no_wrong_decision_against_a_few_hidden_large_improvements() -> None:
    """The adversarial population for a one-sided test: the candidate is slightly worse on
    almost every example but perfect on the incumbent's 10 worst (loss 5), and better overall.
    Until one of those 10 is visited every difference looks like "not improved"; the bets'
    cap (one worst-case example keeps 10 % of the wealth) is what keeps the error <= alpha."""
    incumbent = np.concatenate((np.full(10, 5.0), np.full(490, 0.5)))
    candidate = np.concatenate((np.zeros(10), np.full(490, 0.6)))
    assert candidate.mean() < incumbent.mean()  # improved by 0.002
    rng = np.random.default_rng(11)
    alpha, reps, wrong = 0.1, 1000, 0
    for _ in range(reps):
        order = rng.permutation(500)
        test = PairedComparison(incumbent[order], alpha)
        for start in range(0, 500, 5):
            decision = test.update(candidate[order][start : start + 5])
            if decision is not Decision.UNDECIDED:
                wrong += decision is Decision.NOT_IMPROVED and test.n < 500
                break
    assert wrong / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert wrong > 0  # the test does bet: with nothing hidden it would decide early


def test_no_wrong_early_decision_at_the_boundary() -> None:
    """A candidate that is better by a hair: 'not improved' must (almost) never be declared."""
    rng = np.random.default_rng(7)
    incumbent = rng.exponential(0.5, 600)
    candidate = np.abs(incumbent + 0.1 * rng.standard_normal(600))
    candidate *= (incumbent.mean() - 1e-4) / candidate.mean()  # improved by 1e-4
    assert candidate.mean() < incumbent.mean()
    alpha, reps, wrong = 0.2, 200, 0
    for _ in range(reps):
        order = rng.permutation(600)
        test = PairedComparison(incumbent[order], alpha)
        for start in range(0, 600, 20):
            if test.update(candidate[order][start : start + 20]) is Decision.NOT_IMPROVED:
                wrong += test.n < 600
                break
    assert wrong / reps <= alpha


def test_clearly_worse_candidate_is_decided_early() -> None:
    rng = np.random.default_rng(3)
    incumbent = rng.exponential(0.5, 5000)
    candidate = incumbent + 0.2 + 0.1 * rng.standard_normal(5000)
    test = PairedComparison(incumbent, alpha_spending(0.05, 3))
    for start in range(0, 5000, 100):
        if test.update(candidate[start : start + 100]) is Decision.NOT_IMPROVED:
            break
    assert test.decision is Decision.NOT_IMPROVED
    assert test.n <= 1000
    low, high = test.interval
    assert 0 < low <= candidate.mean() - incumbent.mean() and high == math.inf  # one-sided


# -- exactness at the full set ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=60),
    st.data(),
)
def test_full_set_is_exact(incumbent: list[float], data: st.DataObject) -> None:
    n = len(incumbent)
    candidate = data.draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))
    batch = data.draw(st.integers(1, n))
    test = PairedComparison(incumbent, 0.05, upper=10.0, early="both")
    trace = run(test, np.array(candidate), batch)
    exact = float(np.mean(candidate)) - float(np.mean(incumbent))
    assert trace[-1] == (n, exact, exact)  # width 0 at the full set
    better = float(np.mean(candidate)) < float(np.mean(incumbent))
    assert test.decision is (Decision.IMPROVED if better else Decision.NOT_IMPROVED)
    for _, low, high in trace:  # and the sequence never excludes the truth here
        assert low <= exact + 1e-12 and exact - 1e-12 <= high


def test_ties_and_hairline_differences_at_the_full_set() -> None:
    incumbent = np.full(10, 0.5)
    tie = PairedComparison(incumbent, 0.05)
    assert tie.update(incumbent.copy()) is Decision.NOT_IMPROVED  # equal is not better
    hair = PairedComparison(incumbent, 0.05)
    assert hair.update(incumbent - 1e-15) is Decision.IMPROVED


def test_margin_keeps_early_decisions_clear_of_rounding() -> None:
    incumbent = np.full(100, 1.0)
    test = PairedComparison(incumbent, 0.05)
    # worse by 1e-12 everywhere: certain in exact arithmetic, but within rounding of the means
    for start in range(0, 99, 33):
        test.update(incumbent[start : start + 33] + 1e-12)
    assert ROUNDING_MARGIN > 1e-12 and test.decision is Decision.UNDECIDED


def test_deterministic_bound_needs_only_the_lower_bound() -> None:
    incumbent = np.full(100, 0.1)  # total 10
    test = PairedComparison(incumbent, 0.05, lower=0.0, upper=None)
    test.update(np.array([11.0]))  # one value already exceeds the incumbent's whole sum
    assert test.decision is Decision.NOT_IMPROVED and test.n == 1


def test_mode_max_mirrors_min() -> None:
    rng = np.random.default_rng(5)
    incumbent = (rng.random(3000) < 0.80).astype(float)
    candidate = (rng.random(3000) < 0.65).astype(float)  # clearly less accurate
    test = PairedComparison(incumbent, 0.05, mode="max", lower=0.0, upper=1.0)
    for start in range(0, 3000, 100):
        if test.update(candidate[start : start + 100]) is not Decision.UNDECIDED:
            break
    assert test.decision is Decision.NOT_IMPROVED and test.n < 3000
    low, high = test.interval
    assert low == -math.inf and high < 0  # an upper bound on candidate - incumbent
    with pytest.raises(ValueError, match="needs upper"):
        AdaptiveValidator(mode="max", upper=None)


def test_non_finite_and_out_of_bound_values_defer_to_the_full_set() -> None:
    incumbent = np.full(20, 0.5)
    nan = PairedComparison(incumbent, 0.05)
    assert nan.update([math.nan] + [9.0] * 9) is Decision.UNDECIDED  # would decide otherwise
    assert nan.update([9.0] * 10) is Decision.NOT_IMPROVED  # NaN mean: not an improvement
    negative = PairedComparison(incumbent, 0.05, lower=0.0)
    assert negative.update([-1.0] + [9.0] * 9) is Decision.UNDECIDED
    assert negative.out_of_bounds == -1.0
    with pytest.raises(ValueError, match="changed size"):
        negative.update([0.5] * 11)


# -- the validator: what is logged, across runs ------------------------------------------------


def trajectory(seed: int, epochs: int = 14, n: int = 2000) -> np.ndarray:
    """Per-epoch per-example losses: improving, then overfitting, with near-ties."""
    rng = np.random.default_rng(seed)
    base = rng.exponential(0.5, n)
    means = [0.9, 0.6, 0.45, 0.4, 0.38, 0.385, 0.37, 0.5, 0.62, 0.371, 0.8, 0.9, 1.0, 1.1]
    rows = [np.maximum(base * m / 0.5 + 0.05 * rng.standard_normal(n), 0.0) for m in means]
    return np.array(rows[:epochs])


def replay(validator: AdaptiveValidator, rows: np.ndarray, batch: int = 100) -> list[float]:
    logged = []
    for row in rows:
        validator.begin()
        for start in range(0, row.size, batch):
            if validator.should_stop:
                break
            validator.observe(row[start : start + batch])
        logged.append(validator.end().value)
    return logged


def test_validator_keeps_early_stopping_decisions_and_saves() -> None:
    rows = trajectory(0)
    full = replay(AdaptiveValidator(enabled=False), rows)
    validator = AdaptiveValidator(alpha=0.05)
    adaptive = replay(validator, rows)
    assert full == [float(np.mean(r)) for r in rows]
    assert es_replay(adaptive) == es_replay(full)
    for patience in (1, 2, 5):
        assert es_replay(adaptive, patience) == es_replay(full, patience)
    # improvements are logged exactly; early-stopped runs are strictly worse than the best
    best = math.inf
    for f, a in zip(full, adaptive, strict=True):
        if f < best:
            assert a == f
            best = f
        else:
            assert a >= f or a > best
            assert a > best
    assert validator.skipped_total > 0.2 * rows.size  # clear degradations stop early


def test_validator_state_round_trip_continues_identically() -> None:
    rows = trajectory(1)
    straight = replay(AdaptiveValidator(), rows)
    first = AdaptiveValidator()
    head = replay(first, rows[:6])
    resumed = AdaptiveValidator()
    resumed.load_state_dict(first.state_dict())
    assert head + replay(resumed, rows[6:]) == straight
    with pytest.raises(ValueError, match="mode"):
        AdaptiveValidator(mode="max", upper=1.0).load_state_dict(first.state_dict())


def test_validator_switches_to_full_passes_when_a_bound_breaks() -> None:
    rows = trajectory(2)
    rows[3][5] = -0.5  # a "loss" below the declared lower bound
    validator = AdaptiveValidator()
    logged = replay(validator, rows)
    assert validator.problem is not None and "outside the declared bounds" in validator.problem
    assert validator.skipped_total == 0  # no early stop after (and here: before) the violation
    assert logged[4:] == [float(np.mean(r)) for r in rows[4:]]


def test_validator_refuses_a_changed_population() -> None:
    validator = AdaptiveValidator()
    validator.begin()
    validator.observe(np.full(10, 0.5))
    validator.end()
    validator.begin()
    with pytest.raises(ValueError, match="changed"):
        validator.observe(np.full(11, 0.6))
    validator.begin()
    validator.observe(np.full(5, 0.4))
    with pytest.raises(ValueError, match="changed size"):
        validator.end()


def test_float32_precision_logs_values_a_float32_logger_orders_the_same_way() -> None:
    validator = AdaptiveValidator(precision="float32")
    validator.begin()
    validator.observe(np.full(10, 0.5))
    first = validator.end()
    validator.begin()
    validator.observe(np.full(10, 0.5 - 1e-12))  # better in float64, a tie in float32
    second = validator.end()
    assert first.improved and not second.improved
    assert np.float32(second.value) == np.float32(first.value)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_early_improved_never_decides_what_rounding_in_the_logged_dtype_reverses(
    precision: Any,
) -> None:
    """Better by 1e-8 relative: certain early from the sure bound, and an improvement in
    float64, but a tie once both means are rounded to float32 (a reviewer's reproducer)."""
    n = 1000
    incumbent, candidate = np.ones(n), np.ones(n)
    candidate[500] = 1 - 1e-5

    def fit(enabled: bool) -> Any:
        validator = AdaptiveValidator(upper=1.0, precision=precision, enabled=enabled)
        for values in (incumbent, candidate):
            validator.begin()
            for start in range(0, n, 100):
                if validator.should_stop:
                    break
                if validator.incumbent_missing(100):
                    validator.extend_incumbent(incumbent[start : start + 100])
                validator.observe(values[start : start + 100])
            outcome = validator.end()
        return outcome

    adaptive, full = fit(True), fit(False)
    assert adaptive.improved == full.improved == (precision == "float64")
    assert adaptive.evaluated < n if precision == "float64" else adaptive.evaluated == n


def test_resuming_with_bounds_the_incumbent_violates_falls_back_to_full_passes() -> None:
    first = AdaptiveValidator()
    replay(first, trajectory(4)[:2])
    stricter = AdaptiveValidator(lower=0.2)  # the saved incumbent has values below 0.2
    stricter.load_state_dict(first.state_dict())
    stricter.begin()
    assert not stricter.should_stop and stricter.problem is not None
    stricter.observe(trajectory(4)[2])
    assert stricter.end().exact


# -- incumbent="weights": early "improved", lazily evaluated incumbent -------------------------


def es_decisions(values: list[float], patience: int = 3, min_delta: float = 0.0) -> tuple[int, int]:
    """(ModelCheckpoint's best index, stop index) with EarlyStopping(min_delta) as Lightning
    computes it: improvement iff value + min_delta < best (mode "min")."""
    es_best, mc_best, wait, best_i = math.inf, math.inf, 0, -1
    for i, v in enumerate(values):
        if v < mc_best:
            mc_best, best_i = v, i
        if v + min_delta < es_best:
            es_best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return best_i, i
    return best_i, len(values) - 1


def replay_lazily(
    validator: AdaptiveValidator,
    rows: np.ndarray,
    batch: int = 100,
    *,
    epochs: range | None = None,
    incumbent: int = -1,
) -> tuple[list[float], list[Any], int]:
    """Replay ``rows[epochs]`` that evaluates the incumbent from its recorded row when asked
    (as the callback does from the kept weights); (logged values, outcomes, incumbent row)."""
    logged, outcomes = [], []
    for epoch in range(len(rows)) if epochs is None else epochs:
        row = rows[epoch]
        validator.begin()
        for start in range(0, row.size, batch):
            if validator.should_stop:
                break
            size = min(batch, row.size - start)
            if validator.incumbent_missing(size):
                validator.extend_incumbent(rows[incumbent][start : start + size])
            validator.observe(row[start : start + size])
        outcome = validator.end()
        if outcome.improved:
            incumbent = epoch
        logged.append(outcome.value)
        outcomes.append(outcome)
    return logged, outcomes, incumbent


def test_weights_mode_stops_improving_runs_and_keeps_every_decision() -> None:
    for seed in range(3):
        rows = np.minimum(trajectory(seed), 5.0)
        full = replay(AdaptiveValidator(enabled=False), rows)
        values = AdaptiveValidator(upper=5.0, incumbent="values")
        replay(values, rows)
        weights = AdaptiveValidator(upper=5.0)  # incumbent="weights" is the default
        logged, outcomes, _ = replay_lazily(weights, rows)
        for patience in (1, 2, 3, 5):
            assert es_decisions(logged, patience) == es_decisions(full, patience)
        early_improved = [o for o in outcomes if o.improved and not o.exact]
        assert early_improved and all(o.evaluated < o.population for o in early_improved)
        lazy = sum(o.incumbent_evaluated for o in outcomes)
        assert lazy > 0  # the incumbent was evaluated beyond its prefix, and that is counted
        assert weights.evaluated_total == sum(o.evaluated for o in outcomes) + lazy
        assert weights.skipped_total > values.skipped_total
        # every logged value is on the right side of the best logged before it
        best = math.inf
        for f, value, outcome in zip(full, logged, outcomes, strict=True):
            assert outcome.improved == (value < best)
            assert (f < min(full[: full.index(f)], default=math.inf)) == outcome.improved
            assert outcome.exact == (value == f)
            best = min(best, value)


@pytest.mark.parametrize("min_delta", [0.004, 0.015, 0.05])
def test_min_delta_decisions_are_kept_with_estimates_in_the_log(min_delta: float) -> None:
    """EarlyStopping(min_delta) compares with its own best, which lags ModelCheckpoint's when
    an improvement is smaller than min_delta: both must decide as on the exact means."""
    for seed in range(3):
        rows = np.minimum(trajectory(seed), 5.0)
        full = [float(np.mean(r)) for r in rows]
        validator = AdaptiveValidator(upper=5.0, min_delta=min_delta)
        logged, outcomes, _ = replay_lazily(validator, rows)
        for patience in (1, 2, 3):
            assert es_decisions(logged, patience, min_delta) == es_decisions(
                full, patience, min_delta
            )
        assert validator.problem is None
        assert any(o.improved and not o.exact for o in outcomes)


def test_weights_mode_state_round_trip_with_a_partial_incumbent() -> None:
    rows = np.minimum(trajectory(1), 5.0)
    straight, _, _ = replay_lazily(AdaptiveValidator(upper=5.0), rows)
    for cut in range(2, len(rows) - 2):
        first = AdaptiveValidator(upper=5.0)
        head, _, incumbent = replay_lazily(first, rows, epochs=range(cut))
        if first.needs_weights:
            break
    else:
        pytest.fail("no partial incumbent to resume from")
    state = first.state_dict()
    assert np.isnan(state["incumbent"][state["known"] :]).all() and state["known"] < rows.shape[1]
    resumed = AdaptiveValidator(upper=5.0)
    resumed.load_state_dict(state)
    assert resumed.needs_weights
    tail, _, _ = replay_lazily(resumed, rows, epochs=range(cut, len(rows)), incumbent=incumbent)
    assert head + tail == straight
    with pytest.raises(ValueError, match="min_delta"):
        AdaptiveValidator(upper=5.0, min_delta=0.1).load_state_dict(state)


def test_the_incumbent_must_be_extended_before_the_candidate() -> None:
    validator = AdaptiveValidator(upper=1.0)
    rows = np.minimum(trajectory(2, n=400), 1.0)
    replay_lazily(validator, rows, epochs=range(2))  # a clear improvement, decided early
    assert validator.needs_weights
    validator.begin()
    size = validator.known + 10  # a batch reaching past the known prefix
    assert validator.incumbent_missing(size) == 10
    with pytest.raises(ValueError, match="extend_incumbent"):
        validator.observe(rows[2][:size])
    validator.extend_incumbent(rows[1][:size])  # the known part is skipped, all are counted
    validator.observe(rows[2][:size])
    assert validator.known == size


def test_without_a_bound_on_the_improving_side_weights_mode_is_values_mode() -> None:
    rows = trajectory(0)
    a = replay(AdaptiveValidator(), rows)
    b = replay(AdaptiveValidator(incumbent="values"), rows)
    assert a == b and not AdaptiveValidator().improves_early


@pytest.mark.parametrize("known", [0.1, 0.5])
def test_confidence_sequence_covers_with_a_lazily_extended_incumbent(known: float) -> None:
    rng = np.random.default_rng(99)
    incumbent = np.minimum(rng.exponential(0.5, 400), 3.0)
    candidate = np.clip(incumbent - 0.03 + 0.2 * rng.standard_normal(400), 0.0, 3.0)
    mu = float(np.mean(candidate) - np.mean(incumbent))
    alpha, reps, misses, decided = 0.1, 300, 0, 0
    k = int(known * 400)
    for _ in range(reps):
        order = rng.permutation(400)
        inc, cand = incumbent[order], candidate[order]
        test = PairedComparison(inc, alpha, upper=3.0, early="both", known=k)
        missed = False
        for start in range(0, 400, 10):
            if test.known < start + 10:
                test.extend_incumbent(inc[test.known : start + 10])
            test.update(cand[start : start + 10])
            low, high = test.interval
            missed |= not (low - 1e-12 <= mu <= high + 1e-12)
        misses += missed
        decided += test.decision is Decision.IMPROVED
    assert misses / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert decided == reps  # (exact at the full set)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=2, max_size=2),
    st.sampled_from([np.float32, np.float64]),
)
def test_float_keys_order_like_floats(pair: list[float], dtype: Any) -> None:
    from green_mlops.adaptive.rounding import float_key as _float_key
    from green_mlops.adaptive.rounding import from_key as _from_key

    a, b = (float(dtype(x)) for x in pair)
    ka, kb = _float_key(a, dtype), _float_key(b, dtype)
    assert (ka < kb) == (a < b) and (ka == kb) == (a == b)
    assert _from_key(ka, dtype) == a
    assert _from_key(ka + 1, dtype) == float(np.nextafter(dtype(a), dtype(np.inf))) or a == math.inf
