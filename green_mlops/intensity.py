"""Carbon-intensity signals and the contract of the providers that supply them.

A provider answers with an :class:`IntensitySeries` (intervals of constant gCO2e/kWh with their
provenance) or raises :class:`IntensityUnavailable`. See docs/carbon-accounting.md.
"""

from __future__ import annotations

import abc
import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from green_mlops.location import Location
from green_mlops.units import DAY, HOUR

__all__ = [
    "MARKET_BASED",
    "IntensityPoint",
    "IntensityProvider",
    "IntensitySeries",
    "IntensityUnavailable",
    "day_blocks",
    "merge_forecast",
    "parse_time",
]

#: ``IntensitySeries.basis`` of a contractual figure (a PPA, a supplier's factor): the GHG
#: Protocol's market-based method. Priced apart from the location-based chain; never in SCI.
MARKET_BASED = "market-based"

#: "all time", for yearly tables and user constants.
FOREVER = (-math.inf, math.inf)


class IntensityUnavailable(Exception):
    """A provider cannot answer for this location and time range. The message says why and is
    shown to the user; it must never contain a secret (token, password)."""


@dataclass(frozen=True)
class IntensityPoint:
    """Constant intensity over ``[start, end)`` (Unix seconds)."""

    start: float
    end: float
    g_per_kwh: float


@dataclass(frozen=True)
class IntensitySeries:
    """Intensity over time with its provenance. ``points`` are sorted and do not overlap."""

    points: tuple[IntensityPoint, ...]
    #: Provider name (``static``, ``electricitymaps``, ``watttime``, ``uk``, ``constant``).
    source: str
    #: Dataset within the provider (``ember-yearly``, ``electricitymaps-yearly-2025``, ...).
    dataset: str
    #: Zone or region the numbers are for (``DE``, ``US-CAL-CISO``, ``GB``, ``CAISO_NORTH``).
    zone: str
    #: ``average`` or ``marginal`` (location-based), or :data:`MARKET_BASED` (a contract).
    basis: str
    #: ``lifecycle`` (includes upstream emissions) or ``direct`` (combustion only).
    scope: str
    #: True when any point is an estimate or forecast rather than a measurement.
    estimated: bool
    #: Data year (yearly tables) or retrieval time (APIs), human-readable.
    vintage: str
    #: Attribution the licence requires, if any.
    attribution: str = ""
    notes: tuple[str, ...] = field(default=())

    def covered(self, start: float, end: float) -> float:
        """Seconds of ``[start, end)`` that the points cover."""
        return sum(max(0.0, min(end, p.end) - max(start, p.start)) for p in self.points)

    def describe(self) -> str:
        kind = "estimated" if self.estimated else "measured"
        return (
            f"{self.source}/{self.dataset} zone {self.zone}, {self.basis} {self.scope}, "
            f"{kind}, {self.vintage}"
        )


class IntensityProvider(abc.ABC):
    """Base class for providers returned by the ``green_mlops_intensity_providers`` hook."""

    #: Name used in ``GREEN_MLOPS_INTENSITY_PROVIDERS`` and in provenance.
    name: str = ""

    def configured(self) -> str | None:
        """``None`` when usable; otherwise why not (e.g. "no token: set ..."). Cheap, no I/O."""
        return None

    def close(self) -> None:
        """Release what :meth:`series` opened (an HTTP session). Called once when the run's
        accountant closes; the hook makes new providers for each run."""

    @abc.abstractmethod
    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        """Intensity at ``location`` over ``[start, end)`` (Unix seconds).

        May cover only part of the range (a forecast shorter than the run, history with gaps);
        the caller fills the rest from the next provider. Called from a background thread,
        never from the training thread. Raise :class:`IntensityUnavailable` to decline.
        """

    def forecast(self, location: Location, start: float, end: float) -> IntensitySeries:
        """Forecast intensity at ``location`` over the future range ``[start, end)``, for
        planning (``green-mlops plan``, docs/scheduling.md). Optional: a provider with a
        time-varying forecast overrides it (the built-in API providers answer from
        :meth:`series`); the default declines, since a yearly table or a constant does not
        vary and planning on it would pretend it did. Raise :class:`IntensityUnavailable`
        to decline; the planner then asks the next provider.
        """
        raise IntensityUnavailable(
            f"{self.name or type(self).__name__}: no forecast (a static or constant "
            "intensity does not vary over time)"
        )


def sorted_points(points: Sequence[IntensityPoint]) -> tuple[IntensityPoint, ...]:
    """Sort by start and drop overlaps (the earlier point wins) and empty intervals."""
    out: list[IntensityPoint] = []
    for p in sorted(points, key=lambda p: (p.start, p.end)):
        if p.end <= p.start:
            continue
        if out and p.start < out[-1].end:
            if p.end <= out[-1].end:
                continue
            p = IntensityPoint(out[-1].end, p.end, p.g_per_kwh)
        out.append(p)
    return tuple(out)


# --- helpers for API providers ---------------------------------------------------------------


def parse_time(text: object) -> float:
    """Unix seconds of an ISO 8601 time; 'Z' is UTC, and so is a time without an offset (the
    APIs document their times as UTC). Raises TypeError/ValueError for anything else."""
    if not isinstance(text, str):
        raise TypeError
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def day_blocks(
    start: float, stop: float, now: float, *, provider: str, max_days: int
) -> list[tuple[float, float]]:
    """Whole UTC days covering ``[start, stop)``; the day of ``now`` ends at the next full hour,
    so requests are the same for every run in that hour (and hit the cache).

    Unix time has no DST: a UTC day is always 86400 s, also on the days clocks change.
    """
    day = math.floor(start / DAY) * DAY
    open_end = math.ceil(now / HOUR) * HOUR
    if (stop - day) / DAY > max_days:
        raise IntensityUnavailable(f"{provider}: range longer than {max_days} days")
    blocks = []
    while day < stop:
        blocks.append((day, min(day + DAY, open_end)))
        day += DAY
    return blocks


def merge_forecast(
    measured: Iterable[IntensityPoint], forecast: Iterable[IntensityPoint], start: float, end: float
) -> tuple[tuple[IntensityPoint, ...], bool]:
    """Measured points, forecasts only where no measurement exists, limited to ``[start, end)``;
    and whether any forecast is in that range."""
    base = sorted_points(list(measured))
    ends = [p.end for p in base]
    gaps: list[IntensityPoint] = []
    for p in sorted_points(list(forecast)):
        cursor = p.start
        i = bisect.bisect_right(ends, cursor)
        while i < len(base) and base[i].start < p.end and cursor < p.end:
            if base[i].start > cursor:
                gaps.append(IntensityPoint(cursor, base[i].start, p.g_per_kwh))
            cursor = max(cursor, base[i].end)
            i += 1
        if cursor < p.end:
            gaps.append(IntensityPoint(cursor, p.end, p.g_per_kwh))
    inside = [p for p in (*base, *gaps) if p.end > start and p.start < end]
    estimated = any(p.end > start and p.start < end for p in gaps)
    return sorted_points(inside), estimated
