"""Forecasts of a loop's total energy and duration (green_mlops/forecast.py), from the core (marks,
a Tracker on a ManualClock) to EnergyMonitor in real Lightning fits."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from green_mlops import Tracker
from green_mlops.cost_models import fit
from green_mlops.forecast import FLOOR, Forecaster, Mark, Plan, price
from green_mlops.intensity import IntensityPoint, IntensitySeries
from green_mlops.meters import Readings
from tests.conftest import ClockMeter, ManualClock


def feed(
    costs: list[float],
    *,
    steps: int = 25,
    val_j: float = 30.0,
    val_every: int = 4,
    seconds_per_j: float = 0.1,
) -> tuple[Forecaster, list[Mark]]:
    """Marks of a loop whose i-th segment of ``steps`` steps costs ``costs[i]`` J per step,
    a validation run of ``val_j`` J after every ``val_every`` segments (an epoch)."""
    forecaster = Forecaster()
    energy, seconds, vj, vs, runs = 50.0, 5.0, 0.0, 0.0, 0  # the sanity check: spent
    marks = [Mark(0, energy, seconds)]
    forecaster.add(marks[0])
    for i, cost in enumerate(costs):
        energy += cost * steps
        seconds += cost * steps * seconds_per_j
        if (i + 1) % val_every == 0:
            energy, seconds = energy + val_j, seconds + val_j * seconds_per_j
            vj, vs, runs = vj + val_j, vs + val_j * seconds_per_j, runs + 1
        marks.append(Mark((i + 1) * steps, energy, seconds, vj, vs, runs))
        forecaster.add(marks[-1])
    return forecaster, marks


def replay(costs: list[float], at: int, **kwargs: float) -> tuple[Forecaster, float]:
    """The forecaster fed the first ``at`` segments, and the loop's true total."""
    forecaster, _ = feed(costs[:at], **kwargs)  # type: ignore[arg-type]
    _, marks = feed(costs, **kwargs)  # type: ignore[arg-type]
    return forecaster, marks[-1].energy_j


def test_warm_up_is_left_out_and_the_total_is_forecast_within_its_band() -> None:
    rng = random.Random(3)
    costs = [10.0 * (1 + 0.05 * rng.gauss(0, 1)) for _ in range(80)]
    costs[0] *= 4  # compilation, cache fill
    forecaster, truth = replay(costs, 8)  # 10 % of the loop
    forecast = forecaster.forecast(Plan(total_steps=80 * 25))
    assert forecast is not None and forecast.warmup_segments == 1
    assert forecast.train_model == "constant"
    assert forecast.energy_j == pytest.approx(truth, rel=0.05)
    assert forecast.low_j < truth < forecast.high_j
    # carbontracker's method (the mean so far x the loop) is thrown off by the warm-up
    spent = feed(costs[:8])[1][-1].energy_j
    assert abs(spent / 0.1 - truth) / truth > 0.2
    assert forecast.fraction == pytest.approx(0.1)


def test_no_forecast_before_a_steady_state_and_the_reason_says_why() -> None:
    forecaster = Forecaster()
    assert forecaster.forecast(Plan(100)) is None
    forecaster, _ = feed([40.0, 10.0])  # a warm-up and one steady segment
    assert forecaster.forecast(Plan(1000)) is None
    assert (
        "no steady state yet" in forecaster.reason and "1 left out as warm-up" in forecaster.reason
    )
    forecaster, _ = feed([40.0, 10.0, 10.0])
    assert forecaster.forecast(Plan(1000)) is not None and forecaster.reason == ""


def test_a_growing_cost_per_step_is_projected_as_a_trend() -> None:
    rng = random.Random(5)
    costs = [(5.0 + 0.5 * i) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(40)]
    forecaster, truth = replay(costs, 10)  # 25 %
    forecast = forecaster.forecast(Plan(total_steps=40 * 25))
    assert forecast is not None and forecast.train_model == "linear"
    assert forecast.energy_j == pytest.approx(truth, rel=0.05)
    assert forecast.low_j < truth < forecast.high_j


def test_a_flat_noisy_cost_keeps_the_constant_model() -> None:
    rng = random.Random(11)
    costs = [10.0 * (1 + 0.1 * rng.gauss(0, 1)) for _ in range(12)]
    forecaster, _ = feed(costs)
    forecast = forecaster.forecast(Plan(total_steps=1000))
    assert forecast is not None and forecast.train_model == "constant"
    remaining = forecast.energy_j - forecaster.last.energy_j  # type: ignore[union-attr]
    assert forecast.high_j - forecast.energy_j >= FLOOR * remaining * 0.999


def test_validation_is_projected_per_run_apart_from_training() -> None:
    # a validation run costs 500 J: 4 more runs planned in the 200 steps left add 4 x 500 J
    costs = [10.0] * 8
    forecaster, _ = feed(costs, val_j=500.0)
    last = forecaster.last
    assert last is not None and last.validations == 2
    many = forecaster.forecast(Plan(total_steps=400, validations_per_step=4 / 200))
    none = forecaster.forecast(Plan(total_steps=400, validations_per_step=0.0))
    assert many is not None and none is not None
    assert many.energy_j - none.energy_j == pytest.approx(4 * 500.0, rel=1e-6)
    assert many.validation_model == "constant"


def test_before_a_validation_run_is_seen_its_cost_comes_from_the_flop_ratio() -> None:
    # no run yet (validation every 4 segments, 3 seen): a run costs 6 training steps' FLOPs;
    # 4 runs in the 200 steps left at 10 J a step: 4 x 60 J, in a band that says little
    forecaster, _ = feed([10.0] * 3)
    assert forecaster.last is not None and forecaster.last.validations == 0
    rate = 4 / 200
    unknown = forecaster.forecast(Plan(total_steps=275, validations_per_step=rate))
    priced = forecaster.forecast(
        Plan(total_steps=275, validations_per_step=rate, validation_steps=6.0)
    )
    assert unknown is not None and priced is not None
    assert unknown.validation_model == "none"  # left out, as before
    assert priced.energy_j - unknown.energy_j == pytest.approx(4 * 6 * 10.0, rel=1e-6)
    assert priced.validation_model == "from FLOPs"
    assert priced.high_j - unknown.high_j > 4 * 60.0  # +/-50 %, one point's band: wide
    # once a run is seen, its measured cost replaces the ratio
    seen, _ = feed([10.0] * 4, val_j=500.0)
    measured = seen.forecast(Plan(total_steps=300, validations_per_step=rate, validation_steps=6.0))
    assert measured is not None and measured.validation_model == "constant"


def test_an_earlier_possible_end_lowers_the_low_end_and_the_point_is_the_least_wrong() -> None:
    forecaster, _ = feed([10.0] * 8)
    full = forecaster.forecast(Plan(total_steps=2000))
    early = forecaster.forecast(Plan(total_steps=2000, min_steps=300))
    assert full is not None and early is not None
    assert early.high_j == full.high_j
    done = forecaster.last.energy_j  # type: ignore[union-attr]
    # 100 more steps at 10 J and a validation run per 100 steps, less the band
    soonest = done + 100 * 10 + 30
    assert early.low_j == pytest.approx(soonest, rel=0.06)
    assert early.low_j < full.low_j
    # no likely end known: the point is off by the same share at either end of the range
    point = early.energy_j
    assert point == pytest.approx(2 * soonest * full.energy_j / (soonest + full.energy_j))
    assert point / soonest - 1 == pytest.approx(1 - point / full.energy_j)
    # a loop that improves steadily (no end likely before the limit): the limit's total
    limit = forecaster.forecast(Plan(total_steps=2000, min_steps=300, likely_steps=math.inf))
    assert limit is not None and limit.energy_j == full.energy_j


def test_adaptive_validation_after_one_full_run_spans_full_to_no_later_validation() -> None:
    forecaster, _ = feed([10.0] * 4, val_j=500.0)  # one validation run (a full one) seen
    assert forecaster.last is not None and forecaster.last.validations == 1
    plan = Plan(total_steps=400, validations_per_step=1 / 100)
    full = forecaster.forecast(plan)
    adaptive = forecaster.forecast(replace(plan, validation_low=0.0))
    assert full is not None and adaptive is not None
    done = forecaster.last.energy_j
    bare = done + 300 * 10  # the rest of training, no validation run at all
    assert full.energy_j == pytest.approx(bare + 3 * 500.0)
    assert adaptive.high_j == full.high_j
    assert adaptive.low_j < bare < adaptive.energy_j < full.energy_j
    assert adaptive.energy_j == pytest.approx(2 * bare * full.energy_j / (bare + full.energy_j))
    # once two runs are seen, their costs tell: the runs are projected as seen
    seen, _ = feed([10.0] * 8, val_j=500.0)
    two = seen.forecast(replace(plan, validation_low=0.0))
    assert two is not None and two.energy_j == seen.forecast(plan).energy_j  # type: ignore[union-attr]


def test_a_time_limit_cuts_the_projection() -> None:
    forecaster, _ = feed([10.0] * 8)
    free = forecaster.forecast(Plan(total_steps=2000))
    assert free is not None and free.duration_s > 600
    cut = forecaster.forecast(Plan(total_steps=2000, max_duration_s=600))
    assert cut is not None and cut.duration_s == pytest.approx(600)
    assert cut.energy_j < free.energy_j


def _series(points: list[tuple[float, float, float]], source: str) -> IntensitySeries:
    return IntensitySeries(
        tuple(IntensityPoint(*p) for p in points),
        source,
        "test",
        "DE",
        "average",
        "direct",
        True,
        "2026",
    )


def test_the_remaining_time_is_priced_by_the_intensity_forecast_else_the_current_value() -> None:
    forecaster, _ = feed([10.0] * 8)
    forecast = forecaster.forecast(Plan(total_steps=400))
    assert forecast is not None
    rest_j = forecast.energy_j - forecast.spent_j
    rest_s = forecast.duration_s - forecast.elapsed_s
    now = 1_000_000.0
    half = [(now, now + rest_s / 2, 100.0)]  # a provider's forecast covers half the time left
    priced = price(
        forecast, spent_g=5.0, now=now, chain=[_series(half, "fc")], current_g_per_kwh=300.0
    )
    assert priced.co2e_g == pytest.approx(5.0 + rest_j / 3.6e6 * (0.5 * 100 + 0.5 * 300))
    assert "50 % priced by fc/test" in priced.carbon_basis
    assert priced.metrics()["green/forecast/co2e_g"] == priced.co2e_g
    # nothing to price the uncovered half with: no carbon figure rather than a wrong one
    assert price(forecast, spent_g=5.0, now=now, chain=[_series(half, "fc")]).co2e_g is None
    # no series at all (a static intensity): the basis says so, not "0 % priced by no series"
    flat = price(forecast, spent_g=5.0, now=now, chain=[], current_g_per_kwh=300.0)
    assert flat.co2e_g == pytest.approx(5.0 + rest_j / 3.6e6 * 300)
    assert flat.carbon_basis == (
        "remaining time priced at the current 300 g/kWh (no intensity series covers it)"
    )


def test_a_short_remainder_at_todays_unix_time_is_priced_exactly() -> None:
    # at now ~ 1.8e9 s, (now + span) - now loses ~0.2 us: a 0.5 s remainder's carbon was
    # 3e-7 high relative (a flaky test of the run's PUE, at rel 1e-6)
    forecaster, _ = feed([10.0] * 8, seconds_per_j=0.0002)
    forecast = forecaster.forecast(Plan(total_steps=230))
    assert forecast is not None
    rest_s = forecast.duration_s - forecast.elapsed_s
    assert 0 < rest_s < 1
    now = 1_800_000_000.123
    whole = [(now - 10, now + 10, 400.0)]
    chain = [_series(whole, "fc")]
    priced = price(forecast, spent_g=5.0, now=now, chain=chain, current_g_per_kwh=300.0)
    rest_g = (forecast.energy_j - forecast.spent_j) / 3.6e6 * 400
    assert priced.co2e_g == pytest.approx(5.0 + rest_g, rel=1e-12, abs=0)
    # all of it covered by the series: no current intensity needed (it raised TypeError)
    assert price(forecast, spent_g=5.0, now=now, chain=chain).co2e_g == priced.co2e_g


class SteppedMeter(ClockMeter):
    """Energy = the integral of ``watts`` over a ManualClock's time (the test sets ``watts``)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock, self.joules, self.last = clock, 0.0, 0.0

    def start(self) -> None:
        self.last = self.clock()

    def sample(self, now: float) -> Readings:
        self.joules += self.watts * (now - self.last)
        self.last = now
        return {self.devices[0].id: self.joules}


def test_tracker_forecast_for_a_loop_that_reports_its_progress() -> None:
    clock = ManualClock()
    meter = SteppedMeter(clock)
    tracker = Tracker(meters=[meter], clock=clock).start()
    total, found = 40, []
    try:
        with pytest.raises(ValueError, match=r"progress=0\) is not valid.*a number in \(0, 1\]"):
            tracker.forecast(0)
        for step in range(1, total + 1):
            meter.watts = 400.0 if step <= 2 else 100.0  # a warm-up
            with tracker.phase("train"):
                clock.advance(1.0)
            if step % 10 == 0:
                with tracker.phase("validation"):
                    clock.advance(0.5)
            if step % 2 == 0:
                found.append(tracker.forecast(step / total))
        truth = tracker.snapshot()
    finally:
        tracker.stop()
    assert found[0] is None  # warm-up only
    at_25 = found[4]
    assert at_25 is not None and at_25.warmup_segments >= 1
    assert at_25.energy_j == pytest.approx(truth.joules, rel=0.03)
    assert at_25.duration_s == pytest.approx(truth.duration_s, rel=0.03)
    assert at_25.low_j <= truth.joules <= at_25.high_j
    assert not math.isnan(at_25.kwh)


# --- EnergyMonitor in real Lightning fits ------------------------------------------------------

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint  # noqa: E402

from green_mlops.integrations.lightning.forecasting import plan_of  # noqa: E402
from tests.test_energy_monitor import IN, Classifier, last, loader, monitor, rows, trainer  # noqa: E402

LIGHTNING_WARNINGS = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
)


class Plans(Callback):
    """The plan ``plan_of`` reads from the Trainer at each epoch end."""

    def __init__(self) -> None:
        self.plans: list[tuple[int, Plan | None]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plans.append(
            (trainer.global_step, plan_of(trainer, trainer.global_step, None, elapsed_s=0.0))
        )


@LIGHTNING_WARNINGS
def test_the_plan_follows_the_trainers_limits_and_early_stopping(tmp_path: Path) -> None:
    plans = Plans()
    es = EarlyStopping(monitor="val_loss", patience=3, min_delta=10.0)  # never improves
    tr = trainer(
        tmp_path,
        [plans, es],
        max_epochs=50,
        limit_train_batches=3,  # of 4
        accumulate_grad_batches=2,  # 2 optimizer steps per epoch
        max_time={"hours": 1},
    )
    tr.fit(Classifier(), loader(), loader())
    steps, plan = plans.plans[0]
    assert steps == 2 and plan is not None
    assert plan.total_steps == 100 and plan.validations_per_step == 0.5
    # first validation sets the best; 3 more without improvement: stops after epoch 4
    assert plan.min_steps == steps + 3 * 2
    assert plan.max_duration_s is not None and 3000 < plan.max_duration_s <= 3600
    assert plan.validation_low is None  # validation runs as long as those seen
    assert len(plans.plans) == 4


@LIGHTNING_WARNINGS
def test_energy_monitor_logs_the_forecast_each_epoch_and_its_errors_at_the_end(
    tmp_path: Path,
) -> None:
    # 16 epochs of 4 steps: 6 marks by 10 % of the fit, a steady state even where a loaded
    # machine slows a few of the first steps (left out as warm-up)
    tr = trainer(tmp_path, [monitor()], max_epochs=16)
    tr.fit(Classifier(), loader(), loader())
    table = rows(tr)
    forecasts = [r for r in table if "green/forecast/energy_kwh" in r]
    assert len(forecasts) >= 15  # from the first epoch on: quarter-epoch marks make it steady
    for row in forecasts:
        assert row["green/forecast/energy_low_kwh"] <= row["green/forecast/energy_kwh"]
        assert row["green/forecast/energy_kwh"] <= row["green/forecast/energy_high_kwh"]
        assert row["green/forecast/duration_s"] > 0 and row["green/forecast/co2e_g"] > 0
    final = [r["green/energy_kwh"] for r in table if "green/energy_kwh" in r][-1]
    steps = 16 * 4
    errors = {k: v for r in table for k, v in r.items() if "error_at" in k}
    assert set(errors) == {f"green/forecast/error_at_{p}pct" for p in (10, 25, 50)}
    for p, key in ((10, "error_at_10pct"), (25, "error_at_25pct"), (50, "error_at_50pct")):
        made = [r["green/forecast/energy_kwh"] for r in forecasts if r["step"] <= p / 100 * steps]
        assert errors[f"green/forecast/{key}"] == pytest.approx(made[-1] / final - 1, rel=1e-6)
    # one step (and the last validation) before the end, the forecast is the total
    assert forecasts[-2]["step"] == steps - 1
    assert forecasts[-2]["green/forecast/energy_kwh"] == pytest.approx(final, rel=0.1)
    tags = json_tags(tr)
    assert (
        "training constant" in tags["green.forecast"] or "training linear" in tags["green.forecast"]
    )


def json_tags(tr: pl.Trainer) -> dict[str, Any]:
    from tests.test_energy_monitor import report

    return report(tr)["tags"]  # type: ignore[no-any-return]


class TimeLeft(Callback):
    """``max_time``'s time left read just before (``before``) or after the monitor's mark; the
    second also records the forecast then and stops the fit after ``epochs`` epochs."""

    def __init__(self, mon: Any = None, epochs: int = 3) -> None:
        self.mon, self.epochs = mon, epochs
        self.reads: list[float] = []
        self.forecasts: list[Any] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reads.append(trainer.callbacks[-1].time_remaining())  # type: ignore[attr-defined]
        if self.mon is not None:
            self.forecasts.append(self.mon.forecast.latest)
            trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


@LIGHTNING_WARNINGS
def test_max_time_ends_the_forecast_when_the_time_left_runs_out(tmp_path: Path) -> None:
    mon = monitor()
    before, after = TimeLeft(), TimeLeft(mon)
    # a fit planned far past its hour: the forecast ends where the hour does, not at the
    # hour's remainder counted from the start (the Timer says the time *left*)
    tr = trainer(tmp_path, [before, mon, after], max_epochs=10**6, max_time={"hours": 1})
    assert type(tr.callbacks[-1]).__name__ == "Timer"
    tr.fit(Classifier(), loader(), loader())
    for ahead, behind, forecast in zip(before.reads, after.reads, after.forecasts, strict=True):
        assert forecast is not None and forecast.elapsed_s > 0
        left = forecast.duration_s - forecast.elapsed_s
        assert behind - 1e-6 <= left <= ahead + 1e-6
        assert forecast.high_duration_s == pytest.approx(forecast.duration_s)


def test_a_level_shift_projects_the_level_after_it() -> None:
    rng = random.Random(7)
    # a curriculum's second stage: the cost per step doubles at segment 12 and stays there
    costs = [(10.0 if i < 12 else 20.0) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(60)]
    forecaster, truth = replay(costs, 20)
    forecast = forecaster.forecast(Plan(total_steps=60 * 25))
    assert forecast is not None and forecast.train_model == "constant"
    assert forecast.energy_j == pytest.approx(truth, rel=0.05)
    assert forecast.low_j < truth < forecast.high_j


def test_a_recent_shift_up_widens_the_high_end_to_a_repeating_rise() -> None:
    """A curriculum lengthens the sequences every epoch (4 segments): 1.5 epochs in, the one
    shift seen may repeat. The point keeps the level after it; the high end counts the rise
    (it was the level's band alone: the true total lay above it)."""
    rng = random.Random(13)
    costs = [(10.0 + 2.0 * (i // 4)) * (1 + 0.01 * rng.gauss(0, 1)) for i in range(40)]
    forecaster, truth = replay(costs, 6)
    forecast = forecaster.forecast(Plan(total_steps=40 * 25))
    assert forecast is not None and forecast.train_model == "constant"
    assert forecast.energy_j < 0.7 * truth  # the level after the shift, held
    assert forecast.low_j < truth <= forecast.high_j
    # a shift that did not repeat within its spacing is a level: no rise
    flat = [10.0 if i < 4 else 12.0 for i in range(10)]
    assert fit([25.0 * i + 12.5 for i in range(10)], flat, [25.0] * 10).rise == 0.0
    assert fit([25.0 * i + 12.5 for i in range(6)], flat[:6], [25.0] * 6).rise > 0.0


class CountMarks(Callback):
    """The global step of each of the monitor's progress marks (its instance's ``mark``)."""

    def __init__(self, mon: Any) -> None:
        self.mon, self.steps = mon, []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit, original = self.mon.forecast, self.mon.forecast.mark

        def counted(tr: Any, *args: Any, **kwargs: Any) -> Any:
            self.steps.append(tr.global_step)
            return original(tr, *args, **kwargs)

        fit.mark = counted


@LIGHTNING_WARNINGS
def test_gradient_accumulation_makes_one_mark_per_step_not_one_per_batch(tmp_path: Path) -> None:
    mon = monitor(log_every_n_steps=1)
    marks = CountMarks(mon)
    tr = trainer(tmp_path, [mon, marks], max_epochs=3, accumulate_grad_batches=4)
    tr.fit(Classifier(), loader(), loader())
    assert tr.global_step == 3 and marks.steps
    # at most one batch mark per optimizer step, plus each epoch end's (after its validation)
    assert all(marks.steps.count(step) <= 2 for step in set(marks.steps)), marks.steps


class Latest(Callback):
    """The monitor's latest forecast after each epoch end's mark."""

    def __init__(self, mon: Any) -> None:
        self.mon, self.forecasts = mon, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.forecasts.append(self.mon.forecast.latest)


@LIGHTNING_WARNINGS
def test_the_remaining_carbon_counts_the_facility_overhead_as_the_run_does(tmp_path: Path) -> None:
    from green_mlops.integrations.lightning import EnergyMonitor
    from tests.test_energy_monitor import SETTINGS, meters

    mon = EnergyMonitor(settings={**SETTINGS, "pue": 1.5}, meters=meters)
    latest = Latest(mon)
    tr = trainer(tmp_path, [mon, latest], max_epochs=4)
    tr.fit(Classifier(), loader(), loader())
    g_per_kwh = SETTINGS["intensity_g_per_kwh"] * 1.5  # constant intensity x PUE
    assert last(rows(tr), "green/co2e_g") == pytest.approx(
        last(rows(tr), "green/energy_kwh") * g_per_kwh, rel=1e-6
    )
    priced = [f for f in latest.forecasts if f is not None and f.energy_j > f.spent_j]
    assert priced
    for f in priced:  # spent and remaining alike: facility energy x intensity
        assert f.co2e_g == pytest.approx(f.kwh * g_per_kwh, rel=1e-6)
        assert f.co2e_high_g == pytest.approx(f.high_j / 3.6e6 * g_per_kwh, rel=1e-6)


@LIGHTNING_WARNINGS
def test_early_stopping_at_epoch_ends_in_a_step_limited_fit_lowers_the_low_end(
    tmp_path: Path,
) -> None:
    plans = Plans()
    es = EarlyStopping(monitor="absent", strict=False, patience=3, check_on_train_epoch_end=True)
    tr = trainer(tmp_path, [plans, es], max_epochs=-1, max_steps=40)  # 4 steps per epoch
    tr.fit(Classifier(), loader(), loader())
    steps, plan = plans.plans[0]
    assert steps == 4 and plan is not None and plan.total_steps == 40
    assert plan.min_steps == steps + 3 * 4  # 3 more epoch-end checks, not the whole fit


def test_a_likely_earlier_end_moves_the_point_not_the_band() -> None:
    forecaster, _ = feed([10.0] * 8)
    full = forecaster.forecast(Plan(total_steps=2000, min_steps=300))
    likely = forecaster.forecast(Plan(total_steps=2000, min_steps=300, likely_steps=500))
    assert full is not None and likely is not None
    assert likely.high_j == full.high_j and likely.low_j == full.low_j
    done = forecaster.last.energy_j  # type: ignore[union-attr]
    # 300 more steps at 10 J and a validation run (30 J) per 100 steps
    assert likely.energy_j == pytest.approx(done + 300 * 10 + 3 * 30, rel=1e-9)


def test_early_stoppings_likely_end_from_its_metrics_trajectory() -> None:
    from green_mlops.integrations.lightning.forecasting import likely_stop

    # a convex loss with its minimum 2 checks ahead: it stops patience checks after that
    assert likely_stop([(k - 6.0) ** 2 for k in range(5)], patience=3, wait=0) == 2 + 3
    # the best was 2 checks ago and the loss rises: patience - wait more checks (the low end)
    assert likely_stop([5.0, 3.0, 2.0, 2.5, 3.5], patience=3, wait=2) == 1
    # getting worse at a growing rate (no minimum fitted): the best is behind
    assert likely_stop([2.0, 2.5, 3.5, 5.0], patience=3, wait=2) == 1
    # still improving at a steady or growing rate over 5 checks: no end likely before the limit
    assert likely_stop([6.0, 5.0, 4.0, 3.0, 2.0], patience=3, wait=0) == math.inf
    assert likely_stop([5.0, 4.95, 4.9, 4.5, 3.0], patience=3, wait=0) == math.inf
    # ... over 3 or 4 checks, noise bends a parabola either way: no trajectory yet (a fit of
    # the benchmark that stopped at 72 steps was forecast to run to its limit of 576)
    assert likely_stop([5.0, 4.0, 3.0, 2.0], patience=3, wait=0) is None
    assert likely_stop([5.0, 4.9, 4.5], patience=3, wait=0) is None
    assert likely_stop([5.0, 4.0], patience=3, wait=0) is None  # too few checks


class Convex(Classifier):
    """A monitored score with its minimum at epoch 5."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("score", float((self.current_epoch - 5) ** 2))


class Seen(Callback):
    """The plan EnergyMonitor's forecast used at each epoch end (after EnergyMonitor's)."""

    def __init__(self, mon: Any) -> None:
        self.mon, self.plans = mon, []  # type: ignore[var-annotated]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plans.append((trainer.global_step, self.mon.forecast.plan))


@LIGHTNING_WARNINGS
def test_early_stoppings_metric_trajectory_gives_the_point_forecasts_end(tmp_path: Path) -> None:
    mon = monitor()
    seen = Seen(mon)
    es = EarlyStopping(monitor="score", patience=2)
    tr = trainer(tmp_path, [mon, es, seen], max_epochs=30)  # 4 steps per epoch
    tr.fit(Convex(), loader(), loader())
    assert tr.current_epoch == 8  # best at epoch 5, two checks without improvement
    by_step = dict(seen.plans)
    # after epoch 3 (4 checks: 25, 16, 9, 4): the minimum at epoch 5, then 2 more checks
    plan = by_step[16]
    assert plan is not None and plan.total_steps == 120
    assert plan.likely_steps == 16 + (2 + 2) * 4
    assert plan.min_steps == 16 + 2 * 4
    early = by_step[8]  # 2 checks: no trajectory yet, the point runs to the limit
    assert early is not None and early.likely_steps is None


class PerExample(Classifier):
    """Per-example validation losses, as AdaptiveValidation reads them."""

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y, reduction="none")
        self.log("val_loss", loss.mean())
        return {"per_example_loss": loss.clamp(max=5.0)}


@LIGHTNING_WARNINGS
def test_with_adaptive_validation_later_runs_may_cost_nothing_down_from_a_full_one(
    tmp_path: Path,
) -> None:
    from green_mlops.integrations.lightning import AdaptiveValidation

    plans = Plans()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, IN, generator=g)
    val = torch.utils.data.DataLoader(
        AdaptiveValidation.permute_once(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())),
        batch_size=16,
    )
    on = AdaptiveValidation(monitor="val_loss", mode="min", upper=5.0)
    trainer(tmp_path, [plans, on], max_epochs=2).fit(PerExample(), loader(), val)
    off = Plans()
    reference = AdaptiveValidation(monitor="val_loss", mode="min", upper=5.0, enabled=False)
    trainer(tmp_path, [off, reference], max_epochs=2).fit(PerExample(), loader(), val)
    assert [p.validation_low for _, p in plans.plans if p is not None] == [0.0, 0.0]
    assert [p.validation_low for _, p in off.plans if p is not None] == [None, None]


@LIGHTNING_WARNINGS
def test_the_low_end_counts_early_stoppings_check_of_this_epoch_still_to_come(
    tmp_path: Path,
) -> None:
    # EarlyStopping checks at the epoch's end, after EnergyMonitor's mark there: its wait_count
    # is the previous epoch's at the mark; the plan counts the check to come
    mon = monitor()
    seen = Seen(mon)
    es = EarlyStopping(monitor="val_loss", patience=3, min_delta=10.0)  # never improves
    tr = trainer(tmp_path, [mon, es, seen], max_epochs=50, limit_train_batches=3)
    tr.fit(Classifier(), loader(), loader())
    assert tr.global_step == 12  # 3 steps per epoch: the best at epoch 1, 3 more checks
    lows = [plan.min_steps for _, plan in seen.plans if plan is not None]
    assert lows == [12.0, 12.0, 12.0, 12.0]  # the fit's end, at every epoch's end


class StopAfter(Callback):
    """Ends the fit after ``epochs`` epochs (a preempted job), its last checkpoint saved."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@LIGHTNING_WARNINGS
def test_a_resumed_fit_keeps_its_forecasts_and_reports_their_errors_over_the_whole_fit(
    tmp_path: Path,
) -> None:
    # a 16-epoch fit preempted after 6 epochs and resumed from its last checkpoint: the
    # forecasts made by 10 % and 25 % of the fit were made before the checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path, [monitor(), ckpt, StopAfter(6)], max_epochs=16, enable_checkpointing=True
    )
    first.fit(Classifier(), loader(), loader())
    before = [r for r in rows(first) if "green/forecast/energy_kwh" in r]
    assert before[-1]["step"] == 6 * 4
    second = trainer(tmp_path, [monitor()], max_epochs=16, enable_checkpointing=True)
    second.fit(Classifier(), loader(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.global_step == 16 * 4
    table = rows(second)
    final = [r["green/energy_kwh"] for r in table if "green/energy_kwh" in r][-1]
    errors = {k: v for r in table for k, v in r.items() if "error_at" in k}
    assert set(errors) == {f"green/forecast/error_at_{p}pct" for p in (10, 25, 50)}
    for p in (10, 25):  # the first fit's own forecasts, made by then
        made = [r["green/forecast/energy_kwh"] for r in before if r["step"] <= p / 100 * 64]
        assert errors[f"green/forecast/error_at_{p}pct"] == pytest.approx(made[-1] / final - 1)
    assert "no forecast yet" not in json_tags(second)["green.forecast"]


class PlanSeen(Callback):
    """The monitor's latest plan after each training batch (it marks every quarter epoch)."""

    def __init__(self, mon: Any) -> None:
        self.mon, self.seen = mon, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        plan = self.mon.forecast.plan
        self.seen.append((trainer.current_epoch, plan and plan.validation_steps))


@LIGHTNING_WARNINGS
def test_the_fit_prices_validation_from_flops_until_a_run_is_seen(tmp_path: Path) -> None:
    from tests.test_energy_monitor import BATCHES, FWD, TRAIN

    mon = monitor()
    seen = PlanSeen(mon)
    trainer(tmp_path, [mon, seen], max_epochs=2).fit(Classifier(), loader(), loader())
    first = [v for epoch, v in seen.seen if epoch == 0 and v is not None]
    # the sanity check's FLOPs per batch x the validation batches, over a training step's
    assert first and all(v == pytest.approx(BATCHES * FWD / TRAIN) for v in first)
    assert all(v is None for epoch, v in seen.seen if epoch == 1)  # a run seen: measured
