"""The planner on hand-made forecasts: exact windows (partial intervals, ties, deadlines on a
boundary), interruptible slots against brute force, the threshold and the refusals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from green_mlops.intensity import IntensityPoint
from green_mlops.scheduling import Forecast, Job, PlanError, plan

H = 3600.0


def hourly(*values: float, start: float = 0.0, step: float = H) -> Forecast:
    return Forecast.from_points(
        [IntensityPoint(start + i * step, start + (i + 1) * step, v) for i, v in enumerate(values)],
        location="DE",
    )


def test_partial_intervals_give_the_exact_best_start() -> None:
    # A 1.5 h job: starting on a data point (0 h or 2 h) averages 133.3 g/kWh; starting at
    # 1.5 h (half of the 200 h, all of the 50) averages exactly 100.
    f = hourly(100, 200, 50, 300)
    p = plan(f, Job(1.5 * H, energy_kwh=3.0), earliest=0.0, finish_by=4 * H, min_saving=0)
    assert p.decision == "wait"
    assert p.chosen.slots == ((1.5 * H, 3 * H),)
    assert p.chosen.mean_g_per_kwh == pytest.approx(100.0)
    assert p.now.mean_g_per_kwh == pytest.approx((100 + 0.5 * 200) / 1.5)
    assert p.chosen.carbon_g == pytest.approx(300.0)
    assert p.saving_g == pytest.approx(3.0 * 200 / 1.5 - 300.0)


def test_ties_go_to_the_earliest_window() -> None:
    f = hourly(100, 50, 50, 100, 50, 50)
    p = plan(f, Job(2 * H), earliest=0.0, finish_by=6 * H, min_saving=0)
    assert p.chosen.slots == ((1 * H, 3 * H),)
    flat = plan(hourly(80, 80, 80, 80), Job(2 * H), earliest=0.0, finish_by=4 * H, min_saving=0)
    assert flat.decision == "run-now" and flat.chosen.start == 0.0


def test_a_window_ending_exactly_at_the_deadline_counts_one_past_it_does_not() -> None:
    f = hourly(300, 300, 100, 100, 300)
    on = plan(f, Job(2 * H), earliest=0.0, finish_by=4 * H, min_saving=0)
    assert on.chosen.slots == ((2 * H, 4 * H),)
    before = plan(f, Job(2 * H), earliest=0.0, finish_by=3 * H, min_saving=0)
    assert before.chosen.slots == ((1 * H, 3 * H),)
    assert before.chosen.mean_g_per_kwh == pytest.approx(200.0)
    latest = plan(f, Job(2 * H), earliest=0.0, start_by=1 * H, min_saving=0)
    assert latest.chosen.slots == ((1 * H, 3 * H),)
    assert plan(f, Job(2 * H), earliest=0.0, start_by=2 * H, min_saving=0).chosen.start == 2 * H


def test_the_earliest_start_inside_an_interval_and_the_deadline_past_the_forecast() -> None:
    f = hourly(300, 100, 100, 300)
    p = plan(f, Job(1 * H), earliest=0.25 * H, finish_by=10 * H, min_saving=0)
    assert p.now.slots == ((0.25 * H, 1.25 * H),)
    assert p.now.mean_g_per_kwh == pytest.approx(0.75 * 300 + 0.25 * 100)
    assert p.chosen.slots == ((1 * H, 2 * H),)
    assert any("past the forecast" in n for n in p.notes)


def test_a_power_profile_moves_the_window() -> None:
    f = hourly(300, 100, 200, 50)
    flat = plan(f, Job(2 * H), earliest=0.0, finish_by=4 * H, min_saving=0)
    assert flat.chosen.start == 2 * H  # (200 + 50) / 2
    heavy_first = Job(2 * H, power_profile=((H, 300.0), (H, 100.0)))
    p = plan(f, heavy_first, earliest=0.0, finish_by=4 * H, min_saving=0)
    assert p.chosen.start == 1 * H  # 0.75 x 100 + 0.25 x 200 = 125 < 0.75 x 200 + 0.25 x 50
    assert p.chosen.mean_g_per_kwh == pytest.approx(125.0)
    with pytest.raises(PlanError, match="power profile lasts"):
        plan(f, Job(3 * H, power_profile=((H, 1.0),)), earliest=0.0, finish_by=4 * H)


def test_waiting_for_less_than_the_threshold_runs_now() -> None:
    f = hourly(100, 100, 97, 97)  # waiting saves 3 %
    p = plan(f, Job(2 * H, energy_kwh=1.0), earliest=0.0, finish_by=4 * H)
    assert p.decision == "run-now" and "3.0%" in p.reason and "threshold" in p.reason
    assert p.chosen is p.now and p.best.start == 2 * H
    assert p.saving_fraction == 0.0
    eager = plan(f, Job(2 * H, energy_kwh=1.0), earliest=0.0, finish_by=4 * H, min_saving=0.02)
    assert eager.decision == "wait" and eager.chosen.start == 2 * H
    assert eager.saving_fraction == pytest.approx(0.03)


def test_an_unmeetable_deadline_falls_back_to_running_now() -> None:
    p = plan(hourly(300, 100, 100), Job(2 * H), earliest=0.0, finish_by=1.5 * H)
    assert p.decision == "run-now" and "deadline fallback" in p.reason
    assert p.chosen.slots == ((0.0, 2 * H),)


@pytest.mark.parametrize(
    ("points", "match"),
    [
        ([], "empty"),
        ([IntensityPoint(0, H, math.nan)], "garbage"),
        ([IntensityPoint(0, H, -5.0)], "garbage"),
        ([IntensityPoint(0, H, 10.0), IntensityPoint(0.5 * H, 2 * H, 10.0)], "overlaps"),
        ([IntensityPoint(0, math.inf, 10.0)], "non-finite"),
    ],
)
def test_an_empty_or_garbage_forecast_is_refused(points: list[IntensityPoint], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Forecast.from_points(points)


def test_refusals_name_the_reason() -> None:
    f = hourly(100, 200, 300)
    with pytest.raises(PlanError, match=r"longer than the forecast horizon \(3 h"):
        plan(f, Job(4 * H), earliest=0.0, finish_by=10 * H)
    with pytest.raises(PlanError, match="starts 30 min after"):
        plan(hourly(100, 100, start=0.5 * H), Job(H), earliest=0.0, finish_by=3 * H)
    with pytest.raises(PlanError, match="exactly one deadline"):
        plan(f, Job(H), earliest=0.0)
    gap = Forecast.from_points([IntensityPoint(0, H, 100.0), IntensityPoint(2 * H, 4 * H, 50.0)])
    with pytest.raises(PlanError, match="gap"):
        plan(gap, Job(1.5 * H), earliest=0.0, finish_by=4 * H)
    # a window over the gap is never chosen; one after it is
    p = plan(gap, Job(H), earliest=0.0, finish_by=4 * H, min_saving=0)
    assert p.chosen.slots == ((2 * H, 3 * H),)


def test_interruptible_slots_with_a_resume_overhead() -> None:
    f = hourly(100, 500, 100, 500, 100)
    free = plan(f, Job(3 * H, interruptible=True), earliest=0.0, finish_by=5 * H, min_saving=0)
    assert free.chosen.slots == ((0, H), (2 * H, 3 * H), (4 * H, 5 * H))
    assert free.chosen.mean_g_per_kwh == pytest.approx(100.0)
    job = Job(3 * H, energy_kwh=3.0, interruptible=True, resume_overhead_s=0.1 * H)
    f = hourly(100, 500, 100, 400, 100)  # (with two 500s, restoring at 4.0 h ties)
    p = plan(f, job, earliest=0.0, finish_by=5 * H, min_saving=0, resolution_s=0.1 * H)
    assert p.chosen.resumes == 2
    # Work 29 x 6 min at 100 and one at 400, restores at 100 and 400 (per kWh of the job's own
    # energy); placements that swap a restore for an equal-priced work step tie, so only the
    # cost and the occupied time are pinned.
    assert p.chosen.impact == pytest.approx((29 * 100 + 400 + 100 + 400) * 0.1 / 3)
    assert sum(b - a for a, b in p.chosen.slots) == pytest.approx(3.2 * H)
    assert p.chosen.slots[0] == (0.0, H) and p.chosen.end == 5 * H
    assert p.chosen.energy_kwh == pytest.approx(3.0 * (1 + 2 * 0.1 / 3))
    # a 30-minute restore costs more than it saves: the contiguous run now is best
    slow = Job(3 * H, interruptible=True, resume_overhead_s=0.5 * H)
    f = hourly(100, 500, 100, 500, 100)
    s = plan(f, slow, earliest=0.0, finish_by=5 * H, min_saving=0, resolution_s=0.5 * H)
    assert s.chosen.slots == ((0.0, 3 * H),) and s.decision == "run-now"


def _brute(values: np.ndarray, work: int, overhead: int) -> float:
    """Cheapest cost per kWh over every set of ``work`` steps, by enumeration."""
    best = math.inf
    for chosen in itertools.combinations(range(len(values)), work):
        runs: list[list[int]] = []
        for s in chosen:
            if runs and runs[-1][1] == s:
                runs[-1][1] = s + 1
            else:
                runs.append([s, s + 1])
        if any(b[0] - a[1] < overhead for a, b in itertools.pairwise(runs)):
            continue  # no room for the restore
        cost = values[list(chosen)].sum() + sum(
            values[r[0] - overhead : r[0]].sum() for r in runs[1:]
        )
        best = min(best, cost / work)
    return best


def test_interruptible_matches_brute_force_on_random_series() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        steps = int(rng.integers(3, 9))
        work = int(rng.integers(1, steps + 1))
        overhead = int(rng.integers(0, 3))
        values = rng.integers(1, 6, size=steps).astype(float)
        f = hourly(*values, step=60.0)
        job = Job(work * 60.0, interruptible=True, resume_overhead_s=overhead * 60.0)
        p = plan(f, job, earliest=0.0, finish_by=steps * 60.0, min_saving=0, resolution_s=60)
        assert p.chosen.impact == pytest.approx(min(_brute(values, work, overhead), p.now.impact))
        assert sum(b - a for a, b in p.chosen.slots) == pytest.approx(
            (work + p.chosen.resumes * overhead) * 60.0
        )


def test_interruptible_is_never_worse_than_the_best_window_off_the_grid() -> None:
    # "now" is 17 minutes past an hour: the 5-minute steps are aligned on the clock, not on now,
    # so the cheap hours can be used whole; and a window always counts as one slot.
    f = hourly(300, 300, 100, 110, 100, 300, 300)
    now = 17 * 60.0
    job = Job(3 * H, energy_kwh=1.0, interruptible=True, resume_overhead_s=300)
    p = plan(f, job, earliest=now, finish_by=7 * H, min_saving=0)
    window = plan(f, Job(3 * H, energy_kwh=1.0), earliest=now, finish_by=7 * H, min_saving=0)
    assert window.chosen.slots == ((2 * H, 5 * H),)
    assert p.chosen.impact <= window.chosen.impact * (1 + 1e-12)
    assert p.chosen.slots == ((2 * H, 5 * H),)
