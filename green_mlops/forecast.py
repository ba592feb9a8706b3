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
   the lowest BIC; the trend and the shift need :data:`MIN_TREND_SEGMENTS` segments. A shift
   projects the level after it; a trend is held at its value past :data:`TREND_HORIZON` times
   the span it was seen over; a falling cost is never extrapolated towards zero.
4. Interval: a one-sided 95 % Student-t band of the chosen model for the remaining mean cost
   (parameter error plus the spread of future segments), at least :data:`FLOOR` of the
   remainder; with an earlier possible end (``EarlyStopping``) the low end is that end's, and
   the point's end is the plan's likely end where it has one.
5. ``max_duration_s`` (the Trainer's ``max_time``) cuts each end where it runs out of time.

Framework-free and O(segments) per forecast (segments are merged pairwise past
:data:`MAX_SEGMENTS`). Carbon: :func:`price` (the intensity chain over the remaining time, else the
current intensity). See docs/forecasts.md.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

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

#: A leading segment costing more than this times the median of the later ones is warm-up.
WARMUP_RATIO = 1.25
#: Training segments needed after the warm-up before a forecast is made (the steady state).
MIN_SEGMENTS = 2
#: Segments needed before a linear trend may be chosen over a constant cost.
MIN_TREND_SEGMENTS = 4
#: A trend is extrapolated over at most this many times the span it was seen over; beyond,
#: the cost is held at the trend's value there.
TREND_HORIZON = 3.0
#: The smallest half-width of the band, as a fraction of the projected remainder (the drift
#: of a shared machine's load is not in the segments' spread; chosen on benchmarks/forecast.py).
FLOOR = 0.15
#: Past this many segments, the oldest are merged pairwise (the first one is kept apart).
MAX_SEGMENTS = 256
#: One-sided 95 % Student-t quantiles for 1..10 degrees of freedom; 1.645 beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


def _t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.645


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
    ``likely_steps``: where it likely ends (the point forecast's end; None: the limit)."""

    total_steps: float
    min_steps: float | None = None
    validations_per_step: float | None = None
    max_duration_s: float | None = None
    likely_steps: float | None = None


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


@dataclass(frozen=True)
class _Fit:
    """A cost model over positions ``x`` (step, or validation run index)."""

    model: str
    a: float
    b: float
    x_mean: float
    sxx: float
    sd: float
    n: int
    unit: float  # the mean weight of a point (steps per segment)
    #: Past this position a trend is held at its value there (TREND_HORIZON).
    horizon: float = math.inf
    #: Effective points per point: (1 - r) / (1 + r) for the residuals' lag-1 correlation r
    #: (a load that persists over several segments tells less than independent ones).
    independence: float = 1.0

    def total(self, x0: float, x1: float) -> float:
        """The cost integrated over ``[x0, x1)``."""
        h = max(x0, min(x1, self.horizon))
        rising = self.a * (h - x0) + 0.5 * self.b * (h * h - x0 * x0)
        return rising + (self.a + self.b * h) * (x1 - h)

    def half_width(self, x0: float, x1: float) -> float:
        """A one-sided 95 % band of :meth:`total` over ``[x0, x1)``."""
        span = x1 - x0
        if span <= 0:
            return 0.0
        centre = 0.5 * (x0 + x1)
        params = self.n - (2 if self.model == "linear" else 1)
        lever = (centre - self.x_mean) ** 2 / self.sxx if self.sxx > 0 else 0.0
        se_mean = self.sd * math.sqrt((1.0 / self.n + lever) / self.independence)
        future = self.sd / math.sqrt(max(1.0, span / self.unit * self.independence))
        band = _t95(max(1, params)) * math.hypot(se_mean, future) * span
        return max(band, FLOOR * abs(self.total(x0, x1)))


def _fit(xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]) -> _Fit:
    """The model with the lowest BIC: a constant, a rising line, or a level shift (then the
    level after it); see the module's doc."""
    n = len(xs)
    line = _least_squares(xs, ys, ws)
    flat = _least_squares(xs, ys, ws, constant=True)
    w = sum(ws)
    best, choice = _bic(flat.sd, n, 1, w), flat
    if n >= MIN_TREND_SEGMENTS and line.model == "linear":
        bic = _bic(line.sd, n, 2, w)
        if bic < best:
            best, choice = bic, line
    if n >= MIN_TREND_SEGMENTS:
        k = _best_split(ys, ws)
        rss = _rss(ys[:k], ws[:k]) + _rss(ys[k:], ws[k:])
        if n * math.log(max(rss / w, 1e-300)) + 3 * math.log(n) < best:
            level = _least_squares(xs[k:], ys[k:], ws[k:], constant=True)
            if len(xs) - k < MIN_SEGMENTS:  # too few after the shift to measure a spread
                level = replace(level, sd=max(level.sd, flat.sd))
            choice = replace(level, n=max(level.n, 1))
    horizon = xs[-1] + TREND_HORIZON * (xs[-1] - xs[0])
    return replace(choice, unit=w / n, horizon=horizon)


def _best_split(ys: Sequence[float], ws: Sequence[float]) -> int:
    """The ``k`` in [1, n) where a level shift (``ys[:k]``, ``ys[k:]``) leaves the least
    weighted residual: O(n) by running sums of the values centred on their mean."""
    w = sum(ws)
    mean = sum(y * v for y, v in zip(ys, ws, strict=True)) / w
    total_d = sum(v * (y - mean) for y, v in zip(ys, ws, strict=True))
    total_q = sum(v * (y - mean) ** 2 for y, v in zip(ys, ws, strict=True))
    best, chosen = math.inf, 1
    sw = sd = sq = 0.0
    for k in range(1, len(ys)):
        d = ys[k - 1] - mean
        sw, sd, sq = sw + ws[k - 1], sd + ws[k - 1] * d, sq + ws[k - 1] * d * d
        rest_w, rest_d = w - sw, total_d - sd
        rss = sq - sd * sd / sw + (total_q - sq) - rest_d * rest_d / rest_w
        if rss < best:
            best, chosen = rss, k
    return chosen


def _rss(ys: Sequence[float], ws: Sequence[float]) -> float:
    w = sum(ws)
    mean = sum(y * v for y, v in zip(ys, ws, strict=True)) / w
    return sum(v * (y - mean) ** 2 for y, v in zip(ys, ws, strict=True))


def _bic(sd: float, n: int, params: int, w: float) -> float:
    """BIC of a fit from its spread ``sd`` (``rss / w = sd^2 (n - params) / n``)."""
    rss_w = sd * sd * (n - params) / n if n > params else 0.0
    return n * math.log(max(rss_w, 1e-300)) + params * math.log(n)


def _least_squares(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float], *, constant: bool = False
) -> _Fit:
    """The weighted mean, or the weighted line when its BIC is lower and its slope rises."""
    n = len(xs)
    w = sum(ws)
    x_mean = sum(x * v for x, v in zip(xs, ws, strict=True)) / w
    y_mean = sum(y * v for y, v in zip(ys, ws, strict=True)) / w
    sxx = sum(v * (x - x_mean) ** 2 for x, v in zip(xs, ws, strict=True))
    sxy = sum(v * (x - x_mean) * (y - y_mean) for x, y, v in zip(xs, ys, ws, strict=True))
    rss0 = sum(v * (y - y_mean) ** 2 for y, v in zip(ys, ws, strict=True))
    unit = w / n
    flat = _Fit("constant", y_mean, 0.0, x_mean, 0.0, _sd(rss0, w, n, 1), n, unit)
    flat = replace(flat, independence=_independence([y - y_mean for y in ys]))
    if constant or n < 2 or sxx <= 0:
        return flat
    b = sxy / sxx
    rss1 = max(rss0 - b * sxy, 0.0)
    tiny = 1e-12 * (rss0 + y_mean * y_mean * w) + 1e-300
    bic0 = n * math.log(max(rss0, tiny) / w)
    bic1 = n * math.log(max(rss1, tiny) / w) + math.log(n)
    if b <= 0 or bic1 >= bic0:
        return flat
    a = y_mean - b * x_mean
    fit = _Fit("linear", a, b, x_mean, sxx, _sd(rss1, w, n, 2), n, unit)
    return replace(
        fit, independence=_independence([y - a - b * x for x, y in zip(xs, ys, strict=True)])
    )


def _independence(residuals: Sequence[float]) -> float:
    """(1 - r) / (1 + r) for the lag-1 autocorrelation r of ``residuals`` (r in [0, 0.9])."""
    squares = sum(r * r for r in residuals)
    if len(residuals) < 3 or squares <= 0:
        return 1.0
    lag = sum(a * b for a, b in itertools.pairwise(residuals)) / squares
    r = min(0.9, max(0.0, lag))
    return (1 - r) / (1 + r)


def _sd(rss: float, w: float, n: int, params: int) -> float:
    """The spread of one point of average weight (weighted residuals, ``params`` fitted)."""
    if n <= params:
        return 0.0
    return math.sqrt(rss / w * n / (n - params))


def _steady(costs: Sequence[float]) -> int:
    """How many leading ``costs`` are warm-up: each over WARMUP_RATIO x the later median."""
    cut = 0
    while len(costs) - cut > 1:
        later = sorted(costs[cut + 1 :])
        half = len(later) // 2
        median = later[half] if len(later) % 2 else 0.5 * (later[half - 1] + later[half])
        if costs[cut] > WARMUP_RATIO * median:
            cut += 1
        else:
            break
    return cut


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
        warmup = _steady([s.train_j / s.steps for s in trained])
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
        energy = _fit(xs, [s.train_j / s.steps for s in kept], ws)
        seconds = _fit(xs, [s.train_s / s.steps for s in kept], ws)
        runs_fit = self._validation_fits()
        per_step = plan.validations_per_step
        if per_step is None:
            done = sum(s.runs for s in kept)
            per_step = done / sum(ws)
        now = last.steps
        runs_done = last.validations

        def project(end: float) -> tuple[float, float, float, float]:
            """(energy, energy band, seconds, seconds band) from now to ``end`` steps."""
            end = max(end, now)
            e, eb = energy.total(now, end), energy.half_width(now, end)
            t, tb = seconds.total(now, end), seconds.half_width(now, end)
            runs = per_step * (end - now)
            if runs > 0 and runs_fit is not None:
                v_e, v_t = runs_fit
                r0, r1 = runs_done, runs_done + runs
                e, eb = e + v_e.total(r0, r1), eb + v_e.half_width(r0, r1)
                t, tb = t + v_t.total(r0, r1), tb + v_t.half_width(r0, r1)
            return e, eb, t, tb

        e, eb, t, tb = project(plan.total_steps)
        high = (last.energy_j + e + eb, last.duration_s + t + tb)
        early = plan.min_steps if plan.min_steps is not None else plan.total_steps
        le, leb, lt, ltb = project(min(early, plan.total_steps))
        if plan.likely_steps is not None:  # the point's end: where the loop likely stops
            e, _, t, _ = project(min(max(plan.likely_steps, early), plan.total_steps))
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

    def _validation_fits(self) -> tuple[_Fit, _Fit] | None:
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
        cut = _steady(costs) if len(costs) > MIN_SEGMENTS else 0
        xs, costs, times, ws = xs[cut:], costs[cut:], times[cut:], ws[cut:]
        fit_e, fit_t = _fit(xs, costs, ws), _fit(xs, times, ws)
        if len(xs) < MIN_SEGMENTS:  # one run seen: no spread to measure, say +/-25 %
            fit_e = replace(fit_e, sd=0.25 * abs(fit_e.a) * math.sqrt(2.0), n=2)
            fit_t = replace(fit_t, sd=0.25 * abs(fit_t.a) * math.sqrt(2.0), n=2)
        return fit_e, fit_t


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
        span = max(1e-9, seconds - forecast.elapsed_s)
        pieces = resolve(chain, now, now + span)
        covered = sum(p.end - p.start for p in pieces)
        grams = sum(rest_j * (p.end - p.start) / span * p.g_per_kwh for p in pieces)
        gap = max(0.0, span - covered) / span
        if gap > 1e-9:
            if current_g_per_kwh is None:
                return forecast
            grams += rest_j * gap * current_g_per_kwh
        out[name] = spent_g + grams / J_PER_KWH
        if name == "co2e_g":
            sources = ", ".join(sorted({p.series.describe() for p in pieces})) or "no series"
            basis = f"remaining time: {100 * (1 - gap):.0f} % priced by {sources}"
            if gap > 1e-9:
                basis += f", the rest at the current {current_g_per_kwh:g} g/kWh"
    return replace(
        forecast,
        carbon_basis=basis,
        co2e_g=out["co2e_g"],
        co2e_low_g=out["co2e_low_g"],
        co2e_high_g=out["co2e_high_g"],
    )


def tracker_forecast(
    forecaster: Forecaster, snapshot: Snapshot, progress: float, max_duration_s: float | None
) -> Forecast | None:
    """:meth:`green_mlops.tracker.Tracker.forecast`: ``progress`` is the fraction done (0, 1]."""
    if (
        isinstance(progress, bool)
        or not isinstance(progress, (int, float))
        or not 0 < progress <= 1
    ):
        raise ValueError(
            f"forecast(progress={progress!r}) is not valid: expected the fraction of the loop "
            "done, a number in (0, 1], e.g. step / total_steps"
        )
    if max_duration_s is not None and not max_duration_s > 0:
        raise ValueError(
            f"forecast(max_duration_s={max_duration_s!r}) is not valid: expected seconds > 0"
        )
    if forecaster.last is None:  # the tracker's start: its first steps may be warm-up
        forecaster.add(Mark(0.0, 0.0, 0.0))
    forecaster.add(mark_from_snapshot(snapshot, float(progress)))
    found = forecaster.forecast(Plan(total_steps=1.0, max_duration_s=max_duration_s))
    if found is None and not forecaster.said:
        forecaster.said = True
        log.info("green-mlops: no forecast yet (%s)", forecaster.reason)
    return found
