"""Carbon-intensity signals and the contract of the providers that supply them.

A provider answers "what was (or will be) the grid's carbon intensity at this location between
these two times" with an :class:`IntensitySeries`: intervals of constant intensity in
gCO2e/kWh, labelled with where the numbers come from (source, zone, basis, scope, estimated or
measured, data year or retrieval time). A yearly table answers with one interval that covers
all time; an API with its 5-minute, 30-minute or hourly points.

Providers are plugins (hook ``green_mlops_intensity_providers``). They raise
:class:`IntensityUnavailable` when they cannot answer (not configured, unknown zone, HTTP error,
malformed data); the chain in :mod:`green_mlops.carbon` then falls back to the next provider and
records why.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from green_mlops.location import Location

__all__ = [
    "IntensityPoint",
    "IntensityProvider",
    "IntensitySeries",
    "IntensityUnavailable",
]

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
    #: ``average`` or ``marginal``.
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

    @abc.abstractmethod
    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        """Intensity at ``location`` over ``[start, end)`` (Unix seconds).

        May cover only part of the range (a forecast shorter than the run, history with gaps);
        the caller fills the rest from the next provider. Called from a background thread,
        never from the training thread. Raise :class:`IntensityUnavailable` to decline.
        """


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
