"""Cost models fitted to a loop's segments (cost per step, or per validation run, by position):
a constant, a rising line, or a level shift, chosen by BIC, with a one-sided 95 % band of their
integral (green_mlops.forecast's steps 2-4; see its doc and docs/forecasts.md)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["FLOOR", "MIN_SEGMENTS", "WARMUP_RATIO", "Fit", "fit", "steady"]

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
#: One-sided 95 % Student-t quantiles for 1..10 degrees of freedom; 1.645 beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


def _t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.645


@dataclass(frozen=True)
class Fit:
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
    #: A recent upward level shift: the rate (cost per unit, per unit of position) at which
    #: the cost rises if the shift repeats at the spacing it came at (a curriculum lengthens
    #: the sequences every epoch); the band's high end counts it (:meth:`growth`).
    rise: float = 0.0

    def at(self, x: float) -> float:
        """The cost per unit at position ``x`` (a trend held past its horizon)."""
        return self.a + self.b * min(x, self.horizon)

    def total(self, x0: float, x1: float) -> float:
        """The cost integrated over ``[x0, x1)``."""
        h = max(x0, min(x1, self.horizon))
        rising = self.a * (h - x0) + 0.5 * self.b * (h * h - x0 * x0)
        return rising + (self.a + self.b * h) * (x1 - h)

    def growth(self, x0: float, x1: float) -> float:
        """What :attr:`rise` adds over ``[x0, x1)`` if the cost keeps rising from ``x0``."""
        span = max(0.0, x1 - x0)
        return 0.5 * self.rise * span * span

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


def fit(xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]) -> Fit:
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
            choice = replace(level, n=max(level.n, 1), rise=_rise(xs, ys, ws, k, level.a))
    horizon = xs[-1] + TREND_HORIZON * (xs[-1] - xs[0])
    return replace(choice, unit=w / n, horizon=horizon)


def _rise(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float], k: int, after: float
) -> float:
    """The rate at which the cost rises if the shift up to ``after`` at segment ``k`` repeats
    at its spacing (from the first segment's start to the shift); 0 for a shift down, or one
    older than that spacing (a repeat would have been seen)."""
    before = sum(y * w for y, w in zip(ys[:k], ws[:k], strict=True)) / sum(ws[:k])
    start, shift = xs[0] - 0.5 * ws[0], xs[k] - 0.5 * ws[k]
    end = xs[-1] + 0.5 * ws[-1]
    spacing = shift - start
    if after <= before or spacing <= 0 or end - shift >= spacing:
        return 0.0
    return (after - before) / spacing


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
) -> Fit:
    """The weighted mean, or the weighted line when its BIC is lower and its slope rises."""
    n = len(xs)
    w = sum(ws)
    x_mean = sum(x * v for x, v in zip(xs, ws, strict=True)) / w
    y_mean = sum(y * v for y, v in zip(ys, ws, strict=True)) / w
    sxx = sum(v * (x - x_mean) ** 2 for x, v in zip(xs, ws, strict=True))
    sxy = sum(v * (x - x_mean) * (y - y_mean) for x, y, v in zip(xs, ys, ws, strict=True))
    rss0 = sum(v * (y - y_mean) ** 2 for y, v in zip(ys, ws, strict=True))
    unit = w / n
    flat = Fit("constant", y_mean, 0.0, x_mean, 0.0, _sd(rss0, w, n, 1), n, unit)
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
    fit = Fit("linear", a, b, x_mean, sxx, _sd(rss1, w, n, 2), n, unit)
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


def steady(costs: Sequence[float]) -> int:
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
