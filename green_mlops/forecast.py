"""Forecasts of a fit's total energy, duration and carbon from its progress so far.

A loop reports cumulative :class:`Mark`\\ s (steps done, energy, validation energy, time, validation
runs) to a :class:`Forecaster`; :meth:`Forecaster.forecast` projects the rest of the :class:`Plan`:

1. Segments: the differences between consecutive marks. Training's share of a segment is its
   energy minus its validation energy (data loading and the loop's bookkeeping included), per
   training step; validation's is its validation energy per validation run. Each is projected on
   its own (adaptive validation changes validation's share, not training's).
2. Warm-up: leading segments whose cost per step (per run) is over :data:`WARMUP_RATIO` times
   the median of the later ones are left out (compilation, cache fill; the sanity check is spent
   before the first mark). No forecast before :data:`MIN_SEGMENTS` training segments remain
   after that: the steady state (:attr:`Forecaster.reason` says why there is none).
3. Model: of a constant, a rising linear trend in the step (a growing sequence length, a
   curriculum) and a level shift (a constant before and after the best split), the one with
   the lowest BIC (:mod:`green_mlops.cost_models`); the trend and the shift need a few
   segments. A shift projects the level after it; a trend is held at its value past a few times
   the span it was seen over; a falling cost is never extrapolated towards zero.
4. Interval: a one-sided 95 % Student-t band of the chosen model for the remaining mean cost
   (parameter error plus the spread of future segments), at least :data:`FLOOR` of the
   remainder; with an earlier possible end (``EarlyStopping``) the low end is that end's, and
   the point's end is the plan's likely end where it has one. Where the loop may end anywhere
   in a range (no likely end yet; ``AdaptiveValidation``'s later runs after one full run,
   :attr:`Plan.validation_low`), the point is the total least wrong in the worst case over it
   (:func:`_minimax`).
5. ``max_duration_s`` (the Trainer's ``max_time``) cuts each end where it runs out of time.

Framework-free and O(segments) per forecast (segments are merged pairwise past
:data:`MAX_SEGMENTS`). Carbon: :func:`price` (the intensity chain over the remaining time, else the
current intensity). See docs/forecasts.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from typing import TYPE_CHECKING, Any

from green_mlops.cost_models import FLOOR, MIN_SEGMENTS, WARMUP_RATIO, Fit, fit, steady
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:
    from green_mlops.intensity import IntensitySeries
    from green_mlops.snapshot import Snapshot

log = logging.getLogger(__name__)

__all__ = [
    "FLOOR",
    "MIN_SEGMENTS",
    "WARMUP_RATIO",
    "Forecast",
    "Forecaster",
    "Mark",
    "Plan",
    "mark_from_snapshot",
    "price",
    "tracker_forecast",
]

#: Past this many segments, the oldest are merged pairwise (the first one is kept apart).
MAX_SEGMENTS = 256


@dataclass(frozen=True)
class Mark:
    """Cumulative totals when ``steps`` training steps were done (all phases in ``energy_j``)."""

    steps: float
    energy_j: float
    duration_s: float
    validation_j: float = 0.0
    validation_s: float = 0.0
    #: Validation runs done so far (not counting the sanity check).
    validations: int = 0


@dataclass(frozen=True)
class Plan:
    """Where the loop ends: ``total_steps`` at its limit; ``min_steps`` at the earliest end it
    may take (``EarlyStopping`` at patience from now); ``validations_per_step``: validation runs
    per training step from here (None: the rate seen so far); ``max_duration_s``: a time limit;
    ``likely_steps``: where it likely ends (the point forecast's end; None: anywhere from
    ``min_steps`` to the limit); ``validation_low``: the least a validation run may cost from
    here, as a share of the runs seen (``AdaptiveValidation``: 0; None: like them);
    ``validation_steps``: before any validation run is seen, one run's cost in training steps
    (its forward FLOPs over a training step's; None: unknown, validation is left out)."""

    total_steps: float
    min_steps: float | None = None
    validations_per_step: float | None = None
    max_duration_s: float | None = None
    likely_steps: float | None = None
    validation_low: float | None = None
    validation_steps: float | None = None


@dataclass(frozen=True)
class Forecast:
    """The loop's projected totals at its end, with a band; carbon once :func:`price`\\ d."""

    steps: float
    total_steps: float
    energy_j: float
    low_j: float
    high_j: float
    duration_s: float
    low_duration_s: float
    high_duration_s: float
    #: ``constant`` or ``linear``: the model of training's cost per step (and validation's).
    train_model: str
    validation_model: str
    #: Leading training segments left out as warm-up.
    warmup_segments: int
    #: Energy and time spent when it was made.
    spent_j: float = 0.0
    elapsed_s: float = 0.0
    co2e_g: float | None = None
    co2e_low_g: float | None = None
    co2e_high_g: float | None = None
    #: How the remaining time's carbon was priced.
    carbon_basis: str = ""

    @property
    def kwh(self) -> float:
        return self.energy_j / J_PER_KWH

    @property
    def fraction(self) -> float:
        """Progress when it was made (steps done / steps at the limit)."""
        return self.steps / self.total_steps if self.total_steps > 0 else 1.0

    def metrics(self) -> dict[str, float]:
        """``green/forecast/...`` (docs/forecasts.md)."""
        out = {
            "green/forecast/energy_kwh": self.energy_j / J_PER_KWH,
            "green/forecast/energy_low_kwh": self.low_j / J_PER_KWH,
            "green/forecast/energy_high_kwh": self.high_j / J_PER_KWH,
            "green/forecast/duration_s": self.duration_s,
        }
        if self.co2e_g is not None:
            out["green/forecast/co2e_g"] = self.co2e_g
        return out


@dataclass(frozen=True)
class _Segment:
    start: float  # steps at its start
    steps: float
    train_j: float
    train_s: float
    runs: int
    validation_j: float
    validation_s: float


class Forecaster:
    """Collects :class:`Mark`\\ s of one loop and forecasts its totals (see the module's doc).

    ``add`` is O(1) (amortised); :meth:`forecast` is O(segments).
    """

    def __init__(self) -> None:
        self._first: Mark | None = None
        self._last: Mark | None = None
        self._segments: list[_Segment] = []
        #: Why :meth:`forecast` returned None (empty when it did not).
        self.reason = "no progress reported yet"
        #: Whether :attr:`reason` was said (integrations say it once).
        self.said = False

    @property
    def last(self) -> Mark | None:
        return self._last

    def add(self, mark: Mark) -> None:
        """Record the loop's totals now. Marks that do not move forward are ignored."""
        last = self._last
        if last is None:
            self._first = self._last = mark
            return
        if mark.steps < last.steps or mark.duration_s <= last.duration_s:
            return
        val_j = max(0.0, mark.validation_j - last.validation_j)
        val_s = max(0.0, mark.validation_s - last.validation_s)
        segment = _Segment(
            start=last.steps,
            steps=mark.steps - last.steps,
            train_j=max(0.0, mark.energy_j - last.energy_j - val_j),
            train_s=max(0.0, mark.duration_s - last.duration_s - val_s),
            runs=max(0, mark.validations - last.validations),
            validation_j=val_j,
            validation_s=val_s,
        )
        self._last = mark
        if segment.steps == 0 and self._segments:  # an epoch's end: its overheads join it
            self._segments[-1] = _join(self._segments[-1], segment)
            return
        self._segments.append(segment)
        if len(self._segments) > MAX_SEGMENTS:
            self._merge()

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` continues from (plain data, for a checkpoint)."""
        return {
            "marks": [None if m is None else list(astuple(m)) for m in (self._first, self._last)],
            "segments": [list(astuple(s)) for s in self._segments],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (a resumed loop: its totals continue the same way)."""
        first, last = (None if m is None else Mark(*m) for m in state.get("marks", (None, None)))
        self._first, self._last = first, last
        self._segments = [_Segment(*s) for s in state.get("segments", ())]

    def _merge(self) -> None:
        """Halve the resolution: the first segment (warm-up) apart, the rest merged in pairs."""
        head, rest = self._segments[:1], self._segments[1:]
        merged = []
        for i in range(0, len(rest) - 1, 2):
            merged.append(_join(rest[i], rest[i + 1]))
        if len(rest) % 2:
            merged.append(rest[-1])
        self._segments = head + merged

    def forecast(self, plan: Plan) -> Forecast | None:
        """The loop's totals at the end of ``plan``; None before a steady state (see
        :attr:`reason`)."""
        last = self._last
        trained = [s for s in self._segments if s.steps > 0]
        if last is None or not trained:
            self.reason = (
                "no training progress between two reports yet: a forecast needs "
                f"{MIN_SEGMENTS} segments after the warm-up"
            )
            return None
        warmup = steady([s.train_j / s.steps for s in trained])
        kept = trained[warmup:]
        if len(kept) < MIN_SEGMENTS:
            self.reason = (
                f"no steady state yet: {len(trained)} training segment(s) reported, "
                f"{warmup} left out as warm-up; a forecast needs {MIN_SEGMENTS} after it"
            )
            return None
        if not plan.total_steps > 0 or not math.isfinite(plan.total_steps):
            self.reason = "the loop's number of steps is not known: no end to forecast"
            return None
        self.reason = ""
        xs = [s.start + 0.5 * s.steps for s in kept]
        ws = [s.steps for s in kept]
        energy = fit(xs, [s.train_j / s.steps for s in kept], ws)
        seconds = fit(xs, [s.train_s / s.steps for s in kept], ws)
        runs_fit = self._validation_fits()
        if runs_fit is None and plan.validation_steps is not None and plan.validation_steps > 0:
            level = plan.validation_steps
            runs_fit = (
                _prior(level * energy.at(last.steps)),
                _prior(level * seconds.at(last.steps)),
            )
        per_step = plan.validations_per_step
        if per_step is None:
            done = sum(s.runs for s in kept)
            per_step = done / sum(ws)
        now = last.steps
        runs_done = last.validations

        # AdaptiveValidation: one (full) run says little of the later, shorter ones
        ranged = plan.validation_low is not None and self._validation_runs() < MIN_SEGMENTS
        low_share = plan.validation_low if ranged and plan.validation_low is not None else 1.0

        def project(end: float, share: float = 1.0) -> tuple[float, float, float, float]:
            """(energy, energy band, seconds, seconds band) from now to ``end`` steps, each
            validation run at ``share`` of the runs' projected cost."""
            end = max(end, now)
            e, eb = energy.total(now, end), energy.half_width(now, end)
            t, tb = seconds.total(now, end), seconds.half_width(now, end)
            runs = per_step * (end - now)
            if runs > 0 and runs_fit is not None:
                v_e, v_t = runs_fit
                r0, r1 = runs_done, runs_done + runs
                e, eb = e + share * v_e.total(r0, r1), eb + share * v_e.half_width(r0, r1)
                t, tb = t + share * v_t.total(r0, r1), tb + share * v_t.half_width(r0, r1)
            return e, eb, t, tb

        e, eb, t, tb = project(plan.total_steps)
        rises = energy.growth(now, plan.total_steps), seconds.growth(now, plan.total_steps)
        high = (last.energy_j + e + eb + rises[0], last.duration_s + t + tb + rises[1])
        early = plan.min_steps if plan.min_steps is not None else plan.total_steps
        le, leb, lt, ltb = project(min(early, plan.total_steps), low_share)
        if plan.likely_steps is not None:  # the point's end: where the loop likely stops
            likely = min(max(plan.likely_steps, early), plan.total_steps)
            early = late = likely
        else:
            late = plan.total_steps
        e, _, t, _ = project(late)
        if early < late or ranged:  # it may end anywhere in between: the least-wrong point
            ae, _, at, _ = project(min(early, late), low_share)
            e, t = _minimax(last.energy_j, ae, e), _minimax(last.duration_s, at, t)
        points = [
            (last.energy_j + e, last.duration_s + t),
            (last.energy_j + max(0.0, le - leb), last.duration_s + max(0.0, lt - ltb)),
            high,
        ]
        if plan.max_duration_s is not None:
            points = [_cut(j, s, last, plan.max_duration_s) for j, s in points]
        (ej, es), (lj, ls), (hj, hs) = points
        return Forecast(
            steps=now,
            total_steps=plan.total_steps,
            energy_j=ej,
            low_j=min(lj, ej),
            high_j=max(hj, ej),
            duration_s=es,
            low_duration_s=min(ls, es),
            high_duration_s=max(hs, es),
            train_model=energy.model,
            validation_model=runs_fit[0].model if runs_fit is not None else "none",
            warmup_segments=warmup,
            spent_j=last.energy_j,
            elapsed_s=last.duration_s,
        )

    def _validation_runs(self) -> int:
        """Validation runs seen in the reported segments."""
        return sum(s.runs for s in self._segments)

    def _validation_fits(self) -> tuple[Fit, Fit] | None:
        """Energy and time per validation run, by run index (warm-up runs left out)."""
        xs: list[float] = []
        costs: list[float] = []
        times: list[float] = []
        ws: list[float] = []
        index = float(self._first.validations if self._first is not None else 0)
        for s in self._segments:
            if s.runs <= 0:
                continue
            xs.append(index + 0.5 * s.runs)
            costs.append(s.validation_j / s.runs)
            times.append(s.validation_s / s.runs)
            ws.append(float(s.runs))
            index += s.runs
        if not xs:
            return None
        cut = steady(costs) if len(costs) > MIN_SEGMENTS else 0
        xs, costs, times, ws = xs[cut:], costs[cut:], times[cut:], ws[cut:]
        fit_e, fit_t = fit(xs, costs, ws), fit(xs, times, ws)
        if len(xs) < MIN_SEGMENTS:  # one run seen: no spread to measure, say +/-25 %
            fit_e = replace(fit_e, sd=0.25 * abs(fit_e.a) * math.sqrt(2.0), n=2)
            fit_t = replace(fit_t, sd=0.25 * abs(fit_t.a) * math.sqrt(2.0), n=2)
        return fit_e, fit_t


def _prior(cost: float) -> Fit:
    """A validation run's cost from the FLOP ratio, none seen yet: +/-50 % (one point's band)."""
    return Fit("from FLOPs", cost, 0.0, 0.0, 0.0, 0.5 * abs(cost) * math.sqrt(2.0), 2, 1.0)


def _minimax(spent: float, early: float, late: float) -> float:
    """The rest to add to ``spent`` for the total least wrong in the worst case when the loop
    ends anywhere from ``spent + early`` to ``spent + late``: their harmonic mean (its
    relative error is at most (late - early) / (late + early + 2 spent) over that range)."""
    low, high = spent + early, spent + late
    return 2 * low * high / (low + high) - spent if low + high > 0 else late


def _join(a: _Segment, b: _Segment) -> _Segment:
    """Two consecutive segments as one."""
    return _Segment(
        a.start,
        a.steps + b.steps,
        a.train_j + b.train_j,
        a.train_s + b.train_s,
        a.runs + b.runs,
        a.validation_j + b.validation_j,
        a.validation_s + b.validation_s,
    )


def _cut(joules: float, seconds: float, last: Mark, limit: float) -> tuple[float, float]:
    """A projection cut where the time limit runs out (power held at the projected mean)."""
    if seconds <= limit or seconds <= last.duration_s:
        return joules, seconds
    share = max(0.0, limit - last.duration_s) / (seconds - last.duration_s)
    return last.energy_j + (joules - last.energy_j) * share, max(limit, last.duration_s)


def mark_from_snapshot(
    snapshot: Snapshot, steps: float, *, validation_phase: str = "validation"
) -> Mark:
    """A :class:`Mark` of a tracker's snapshot: validation is the ``validation_phase`` phase."""
    phase = snapshot.phases.get(validation_phase)
    return Mark(
        steps=steps,
        energy_j=snapshot.joules,
        duration_s=snapshot.duration_s,
        validation_j=phase.joules if phase is not None else 0.0,
        validation_s=phase.duration_s if phase is not None else 0.0,
        validations=phase.entries if phase is not None else 0,
    )


def price(
    forecast: Forecast,
    *,
    spent_g: float | None,
    now: float,
    chain: Sequence[IntensitySeries] = (),
    current_g_per_kwh: float | None = None,
    pue: float = 1.0,
) -> Forecast:
    """``forecast`` with carbon: ``spent_g`` (the carbon so far) plus the remaining energy
    times ``pue`` (the facility's, as the run's carbon counts it), spread evenly over the
    remaining time from ``now`` (Unix seconds), priced by ``chain`` (each piece of time by the
    first series covering it, as the run is priced: providers' forecasts included) and, where
    no series covers it, at ``current_g_per_kwh``. Without ``spent_g``, or with time to price
    and neither, the forecast is returned unpriced."""
    from green_mlops.carbon import resolve

    if spent_g is None:
        return forecast
    out: dict[str, float] = {}
    basis = ""
    for name, joules, seconds in (
        ("co2e_g", forecast.energy_j, forecast.duration_s),
        ("co2e_low_g", forecast.low_j, forecast.low_duration_s),
        ("co2e_high_g", forecast.high_j, forecast.high_duration_s),
    ):
        rest_j = max(0.0, joules - forecast.spent_j) * pue
        stop = now + max(1e-9, seconds - forecast.elapsed_s)
        span = max(1e-9, stop - now)  # in the pieces' float resolution (Unix s: ~0.2 us)
        pieces = resolve(chain, now, stop)
        covered = sum(p.end - p.start for p in pieces)
        grams = sum(rest_j * (p.end - p.start) / span * p.g_per_kwh for p in pieces)
        gap = max(0.0, span - covered) / span
        if gap > 1e-9:
            if current_g_per_kwh is None:
                return forecast
            grams += rest_j * gap * current_g_per_kwh
        out[name] = spent_g + grams / J_PER_KWH
        if name == "co2e_g":
            sources = ", ".join(sorted({p.series.describe() for p in pieces}))
            # (needed only where time is left uncovered, and then set: else returned above)
            current = (
                "" if current_g_per_kwh is None else f"the current {current_g_per_kwh:g} g/kWh"
            )
            if not sources:  # no series covers the remaining time
                basis = f"remaining time priced at {current} (no intensity series covers it)"
            else:
                basis = f"remaining time: {100 * (1 - gap):.0f} % priced by {sources}"
                if gap > 1e-9:
                    basis += f", the rest at {current}"
    return replace(
        forecast,
        carbon_basis=basis,
        co2e_g=out["co2e_g"],
        co2e_low_g=out["co2e_low_g"],
        co2e_high_g=out["co2e_high_g"],
    )


def price_run(
    forecast: Forecast, metrics: Mapping[str, float], chain: Sequence[Any], now: float
) -> Forecast:
    """:func:`price` with what a run's ``metrics`` say so far: its carbon, the current
    intensity and the facility's overhead (facility kWh per IT kWh; 1 without a PUE)."""
    it, facility = metrics.get("green/energy_kwh", 0.0), metrics.get("green/energy_facility_kwh")
    return price(
        forecast,
        spent_g=metrics.get("green/co2e_g"),
        now=now,
        chain=chain,
        current_g_per_kwh=metrics.get("green/intensity_g_per_kwh"),
        pue=facility / it if facility and it > 0 else 1.0,
    )


def check_request(progress: object, max_duration_s: object) -> None:
    """Raise ValueError unless ``progress`` is in (0, 1] and ``max_duration_s`` None or > 0."""
    if (
        isinstance(progress, bool)
        or not isinstance(progress, (int, float))
        or not 0 < progress <= 1
    ):
        raise ValueError(
            f"forecast(progress={progress!r}) is not valid: expected the fraction of the loop "
            "done, a number in (0, 1], e.g. step / total_steps"
        )
    if max_duration_s is not None and not (
        isinstance(max_duration_s, (int, float)) and max_duration_s > 0
    ):
        raise ValueError(
            f"forecast(max_duration_s={max_duration_s!r}) is not valid: expected seconds > 0"
        )


def tracker_forecast(
    forecaster: Forecaster, snapshot: Snapshot, progress: float, max_duration_s: float | None
) -> Forecast | None:
    """:meth:`green_mlops.tracker.Tracker.forecast`: ``progress`` is the fraction done (0, 1]."""
    check_request(progress, max_duration_s)
    if forecaster.last is None:  # the tracker's start: its first steps may be warm-up
        forecaster.add(Mark(0.0, 0.0, 0.0))
    forecaster.add(mark_from_snapshot(snapshot, float(progress)))
    found = forecaster.forecast(Plan(total_steps=1.0, max_duration_s=max_duration_s))
    if found is None and not forecaster.said:
        forecaster.said = True
        log.info("green-mlops: no forecast yet (%s)", forecaster.reason)
    return found
