"""The planner's data: a piecewise-constant forecast, a job, a placement (framework-free)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from green_mlops.intensity import IntensityPoint, IntensitySeries

__all__ = ["FloatArray", "Forecast", "Job", "Placement", "PlanError"]

FloatArray = npt.NDArray[np.float64]


class PlanError(ValueError):
    """The planner refuses: the message says why (no usable forecast, job longer than it...)."""


@dataclass(frozen=True)
class Forecast:
    """Piecewise-constant intensity: ``values[i]`` g/kWh over ``[edges[i], edges[i+1])``; a
    NaN value is a gap (no forecast there: nothing is planned over it)."""

    edges: FloatArray
    values: FloatArray
    location: str = ""
    source: str = ""

    @classmethod
    def from_points(
        cls, points: Sequence[IntensityPoint], *, location: str = "", source: str = ""
    ) -> Forecast:
        """From provider points (sorted, non-overlapping); refuses an empty or garbage one."""
        if not points:
            raise PlanError(f"no forecast for {location or 'this location'}: the series is empty")
        edges: list[float] = []
        values: list[float] = []
        for p in sorted(points, key=lambda p: p.start):
            ok = all(isinstance(x, (int, float)) for x in (p.start, p.end, p.g_per_kwh))
            if not ok or not (math.isfinite(p.start) and math.isfinite(p.end)):
                raise PlanError(f"garbage forecast: point {p!r} has a non-finite time")
            if not (math.isfinite(p.g_per_kwh) and p.g_per_kwh >= 0) or p.end <= p.start:
                raise PlanError(
                    f"garbage forecast: point {p!r} (intensity must be finite and >= 0, "
                    "end after start)"
                )
            if edges and p.start < edges[-1]:
                raise PlanError(f"garbage forecast: point {p!r} overlaps the previous one")
            if edges and p.start > edges[-1]:
                values.append(math.nan)  # a gap
                edges.append(p.start)
            if not edges:
                edges.append(p.start)
            values.append(float(p.g_per_kwh))
            edges.append(p.end)
        return cls(np.asarray(edges), np.asarray(values), location, source)

    @classmethod
    def from_series(cls, series: IntensitySeries) -> Forecast:
        return cls.from_points(series.points, location=series.zone, source=series.describe())

    @property
    def start(self) -> float:
        return float(self.edges[0])

    @property
    def end(self) -> float:
        return float(self.edges[-1])

    def _cumulative(self) -> tuple[FloatArray, FloatArray]:
        """(integral of intensity, covered seconds) at each edge; gaps add nothing."""
        widths = np.diff(self.edges)
        gap = np.isnan(self.values)
        integral = np.concatenate(([0.0], np.cumsum(np.where(gap, 0.0, self.values * widths))))
        covered = np.concatenate(([0.0], np.cumsum(np.where(gap, 0.0, widths))))
        return integral, covered

    def integrals(self, a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(∫ intensity dt, covered seconds) over each ``[a, b)``, exact (partial intervals in
        proportion); outside the forecast counts as not covered."""
        integral, covered = self._cumulative()
        vals = np.where(np.isnan(self.values), 0.0, self.values)
        cov = (~np.isnan(self.values)).astype(np.float64)

        def at(t: FloatArray) -> tuple[FloatArray, FloatArray]:
            tt = np.clip(t, self.edges[0], self.edges[-1])
            i = np.clip(np.searchsorted(self.edges, tt, side="right") - 1, 0, len(vals) - 1)
            dt = tt - self.edges[i]
            return integral[i] + vals[i] * dt, covered[i] + cov[i] * dt

        ia, ca = at(np.asarray(a, dtype=np.float64))
        ib, cb = at(np.asarray(b, dtype=np.float64))
        return ib - ia, cb - ca


@dataclass(frozen=True)
class Job:
    """What to place. ``power_profile``: ``(seconds, watts)`` segments over the job's run time
    (a measured run's timeline), in place of constant power; only their shape matters when
    ``energy_kwh`` is given."""

    duration_s: float
    energy_kwh: float | None = None
    interruptible: bool = False
    resume_overhead_s: float = 0.0
    power_profile: tuple[tuple[float, float], ...] = ()

    def segments(self) -> tuple[FloatArray, FloatArray]:
        """(boundaries from the job's start, energy fraction of each segment)."""
        if not self.power_profile:
            return np.array([0.0, self.duration_s]), np.array([1.0])
        secs = np.array([s for s, _ in self.power_profile], dtype=np.float64)
        watts = np.array([w for _, w in self.power_profile], dtype=np.float64)
        if abs(secs.sum() - self.duration_s) > 1e-6 * max(1.0, self.duration_s):
            raise PlanError(
                f"power profile lasts {secs.sum():g} s, the job {self.duration_s:g} s: "
                "they must match"
            )
        energy = secs * watts
        return np.concatenate(([0.0], np.cumsum(secs))), energy / energy.sum()


@dataclass(frozen=True)
class Placement:
    """Where the job runs: ``slots`` (one for a contiguous job), its energy-weighted mean
    intensity, and the energy and carbon when the job's energy is known."""

    slots: tuple[tuple[float, float], ...]
    mean_g_per_kwh: float
    #: Energy including the resume overheads (kWh), when the job's energy is known.
    energy_kwh: float | None = None
    resumes: int = 0

    @property
    def start(self) -> float:
        return self.slots[0][0]

    @property
    def end(self) -> float:
        return self.slots[-1][1]

    @property
    def carbon_g(self) -> float | None:
        return None if self.energy_kwh is None else self.energy_kwh * self.mean_g_per_kwh

    @property
    def impact(self) -> float:
        """Carbon per kWh of the job's own energy (overheads included): what is minimised."""
        return self.mean_g_per_kwh * self.energy_factor

    energy_factor: float = 1.0  # total energy / the job's energy (1 + resume overheads)
