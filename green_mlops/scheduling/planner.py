"""Carbon-aware planning over an intensity forecast (framework-free; numpy only).

A job of known duration (and energy) must run between an earliest start and a deadline. The
planner prices every placement on the forecast and returns the cheapest:

* contiguous jobs: the Carbon Aware SDK's best window (slide the job over the forecast, score by
  the exact time-weighted mean intensity, partial intervals in proportion, ties to the earliest,
  windows ending after the deadline or past the forecast excluded). Every start where the job's
  start, end or a power-profile boundary meets a forecast boundary is tried, so the result is the
  exact optimum over continuous start times (the SDK's own candidates are a subset);
* interruptible jobs: the cheapest set of slots holding the work before the deadline, each
  resume paying ``resume_overhead_s`` of extra run time (checkpoint restore), found by
  :func:`green_mlops.scheduling.interruptible.cheapest_slots`.

"Run now" is priced the same way, so the saving is explicit; a saving below ``min_saving``
(default :data:`DEFAULT_MIN_SAVING`, the forecast's own error) is not worth waiting for.
See docs/scheduling.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from green_mlops.scheduling.interruptible import cheapest_slots
from green_mlops.scheduling.model import FloatArray, Forecast, Job, Placement, PlanError

__all__ = [
    "DEFAULT_MIN_SAVING",
    "DEFAULT_RESOLUTION_S",
    "Forecast",
    "Job",
    "Placement",
    "Plan",
    "PlanError",
    "plan",
]

#: Default minimum relative saving worth waiting for: 5 %, the forecast error Wiesner et al.
#: (Middleware '21) simulate and the order of day-ahead grid-intensity forecast errors (a
#: saving smaller than the forecast's own error may not exist). ``min_saving=0`` disables it.
DEFAULT_MIN_SAVING = 0.05
#: Time step of the interruptible planner (seconds).
DEFAULT_RESOLUTION_S = 300.0
_TIE = 1e-9  # relative tolerance under which two placements cost the same (the earliest wins)


@dataclass(frozen=True)
class Plan:
    """The planner's answer. ``chosen`` is ``best`` unless waiting is not worth it (then
    ``now``); ``reason`` says why in words."""

    chosen: Placement
    best: Placement
    now: Placement
    decision: str  # "wait" or "run-now"
    reason: str
    min_saving: float
    deadline: float
    location: str = ""
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def saving_fraction(self) -> float:
        """Relative carbon saved by the chosen placement vs running now."""
        now = self.now.impact
        return 0.0 if now <= 0 else 1.0 - self.chosen.impact / now

    @property
    def saving_g(self) -> float | None:
        c, n = self.chosen.carbon_g, self.now.carbon_g
        return None if c is None or n is None else n - c


def plan(
    forecast: Forecast,
    job: Job,
    *,
    earliest: float,
    finish_by: float | None = None,
    start_by: float | None = None,
    min_saving: float = DEFAULT_MIN_SAVING,
    resolution_s: float = DEFAULT_RESOLUTION_S,
) -> Plan:
    """Plan ``job`` on ``forecast``, starting no earlier than ``earliest`` (usually now), done
    by ``finish_by`` or started by ``start_by`` (exactly one). Raises :class:`PlanError` when
    it cannot: the job longer than the forecast, no forecast for "now", bad arguments."""
    if (finish_by is None) == (start_by is None):
        raise PlanError("give exactly one deadline: finish_by (completion) or start_by")
    d = job.duration_s
    if not (math.isfinite(d) and d > 0):
        raise PlanError(f"duration must be a positive number of seconds, not {d!r}")
    if job.energy_kwh is not None and not (math.isfinite(job.energy_kwh) and job.energy_kwh >= 0):
        raise PlanError(f"energy_kwh must be >= 0, not {job.energy_kwh!r}")
    if not (0 <= min_saving < 1):
        raise PlanError(f"min_saving must be in [0, 1), not {min_saving!r}")
    notes: list[str] = []
    horizon = forecast.end - max(earliest, forecast.start)
    if forecast.start > earliest + 1e-6:
        raise PlanError(
            f"the forecast starts {(forecast.start - earliest) / 60:.0f} min after the earliest "
            "start: 'run now' cannot be priced"
        )
    if d > horizon + 1e-6:
        raise PlanError(
            f"the job ({d / 3600:g} h) is longer than the forecast horizon ({horizon / 3600:g} h "
            "from the earliest start): cannot plan it"
        )
    segments = job.segments()
    now = _contiguous(forecast, segments, d, np.array([earliest]), job.energy_kwh)
    if now is None:
        raise PlanError("the forecast has a gap in the next run of the job: cannot price 'run now'")
    if finish_by is not None:
        deadline, latest, latest_end = finish_by, finish_by - d, min(forecast.end, finish_by)
        if finish_by > forecast.end:
            notes.append(
                "the deadline is past the forecast's end: only the forecast's span is used"
            )
    else:
        assert start_by is not None
        deadline, latest, latest_end = start_by, start_by, forecast.end
    latest = min(latest, latest_end - d)

    def answer(chosen: Placement, best: Placement, decision: str, why: str) -> Plan:
        return Plan(
            chosen, best, now, decision, why, min_saving, deadline, forecast.location,
            forecast.source, tuple(notes),
        )  # fmt: skip

    if latest < earliest - 1e-6:
        why = "the deadline cannot be met even starting now: running now (deadline fallback)"
        return answer(now, now, "run-now", why)
    latest = max(latest, earliest)
    if job.interruptible:
        slots = cheapest_slots(
            forecast, job, earliest=earliest, end=latest + d, resolution_s=resolution_s
        )
        # a single window is a schedule too (exact off the step grid): the DP must beat it
        window = _best_window(forecast, segments, d, earliest, latest, job.energy_kwh) or now
        best = window if slots is None or slots.impact >= window.impact * (1 - _TIE) else slots
    else:
        best = _best_window(forecast, segments, d, earliest, latest, job.energy_kwh) or now
    saving = 0.0 if now.impact <= 0 else 1 - best.impact / now.impact
    if best is now or saving <= 0:
        return answer(now, now, "run-now", "no cheaper placement before the deadline")
    if saving < min_saving:
        why = (
            f"waiting would save {saving:.1%}, less than the {min_saving:.1%} threshold "
            "(the forecast's error): running now"
        )
        return answer(now, best, "run-now", why)
    return answer(best, best, "wait", f"waiting saves {saving:.1%} vs running now")


def window_means(
    forecast: Forecast, segments: tuple[FloatArray, FloatArray], d: float, starts: FloatArray
) -> FloatArray:
    """Energy-weighted mean intensity of the job started at each of ``starts``; NaN where a
    segment is not fully covered by the forecast."""
    bounds, frac = segments
    a = starts[:, None] + bounds[None, :-1]
    b = starts[:, None] + bounds[None, 1:]
    integral, covered = forecast.integrals(a, b)
    width = b - a
    ok = np.all(covered >= width - 1e-6, axis=1)
    means = (integral / width) @ frac
    return np.where(ok, means, np.nan)


def _contiguous(
    forecast: Forecast,
    segments: tuple[FloatArray, FloatArray],
    d: float,
    starts: FloatArray,
    energy_kwh: float | None,
) -> Placement | None:
    means = window_means(forecast, segments, d, starts)
    if np.all(np.isnan(means)):
        return None
    lo = float(np.nanmin(means))
    i = int(np.argmax(means <= lo + _TIE * max(1.0, abs(lo))))  # the earliest of the ties
    s = float(starts[i])
    return Placement(((s, s + d),), float(means[i]), energy_kwh)


def _best_window(
    forecast: Forecast,
    segments: tuple[FloatArray, FloatArray],
    d: float,
    earliest: float,
    latest: float,
    energy_kwh: float | None,
) -> Placement | None:
    """The exact best start in ``[earliest, latest]``: the mean is piecewise linear in the start
    between the starts where a job boundary meets a forecast edge, so those are the candidates."""
    bounds = segments[0]
    cand = (forecast.edges[:, None] - bounds[None, :]).ravel()
    cand = cand[(cand >= earliest) & (cand <= latest)]
    starts = np.unique(np.concatenate(([earliest, latest], cand)))
    return _contiguous(forecast, segments, d, starts, energy_kwh)
