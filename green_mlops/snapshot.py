"""What a tracker reports: an immutable snapshot of energy per device, component and phase.

Every number carries its provenance: which meter, which method (counter, sampled power,
estimate), the uncertainty band, and whether the device was read without trouble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from green_mlops.units import joules_to_kwh

__all__ = [
    "OTHER_PHASE",
    "DeviceEnergy",
    "PhaseEnergy",
    "Snapshot",
    "TimelinePoint",
]

#: Name of the phase that collects energy spent outside any named phase.
OTHER_PHASE = "other"

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DeviceEnergy:
    """Energy of one device since the tracker started."""

    device: str
    component: str
    meter: str
    method: str
    joules: float
    #: Relative half-width of the uncertainty band (0.05 = +/-5 %).
    uncertainty: float
    #: ``ok``; ``degraded`` (some reads failed, value may miss energy); ``failed`` (failing now).
    status: str = "ok"
    problem: str | None = None
    label: str = ""
    #: Seconds between changes of the device's counter (0: follows the energy closely).
    resolution_s: float = 0.0

    @property
    def uncertainty_j(self) -> float:
        return self.joules * self.uncertainty


@dataclass(frozen=True)
class PhaseEnergy:
    """Energy spent while ``name`` was the innermost active phase (exclusive of nested phases)."""

    name: str
    duration_s: float
    entries: int
    joules_by_device: Mapping[str, float]

    @property
    def joules(self) -> float:
        return sum(self.joules_by_device.values())


@dataclass(frozen=True)
class TimelinePoint:
    """Cumulative joules per component at a wall-clock time (Unix seconds)."""

    time: float
    joules_by_component: Mapping[str, float]


@dataclass(frozen=True)
class Snapshot:
    """Energy since the tracker started, with provenance. ``running`` is False once stopped."""

    started_at: float
    duration_s: float
    devices: tuple[DeviceEnergy, ...]
    phases: Mapping[str, PhaseEnergy]
    timeline: tuple[TimelinePoint, ...] = ()
    #: Meters that could not be used here, each with the reason and the fix.
    unavailable: tuple[str, ...] = ()
    #: Meters that were available but superseded by a better method for the same component.
    superseded: tuple[str, ...] = ()
    #: Things that went wrong while measuring (read failures, inferred counter wraps, ...).
    problems: tuple[str, ...] = ()
    #: Basis of estimates and other facts a reader needs to interpret the numbers.
    notes: tuple[str, ...] = ()
    running: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def joules(self) -> float:
        return sum(d.joules for d in self.devices)

    @property
    def kwh(self) -> float:
        return joules_to_kwh(self.joules)

    @property
    def uncertainty_j(self) -> float:
        """Absolute uncertainty of the total: bands added linearly (errors may be correlated)."""
        return sum(d.uncertainty_j for d in self.devices)

    def joules_by_component(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for d in self.devices:
            totals[d.component] = totals.get(d.component, 0.0) + d.joules
        return totals

    def phase_joules_by_component(self, phase: str) -> dict[str, float]:
        components = {d.device: d.component for d in self.devices}
        totals: dict[str, float] = {}
        entry = self.phases.get(phase)
        if entry is not None:
            for device, joules in entry.joules_by_device.items():
                key = components.get(device, "other")
                totals[key] = totals.get(key, 0.0) + joules
        return totals

    @property
    def methods(self) -> dict[str, str]:
        """Method per component; ``mixed`` when devices of one component differ."""
        out: dict[str, str] = {}
        for d in self.devices:
            out[d.component] = d.method if out.get(d.component, d.method) == d.method else "mixed"
        return out

    @property
    def measured(self) -> bool:
        """True when no number in the total is an estimate."""
        return bool(self.devices) and all(d.method != "estimate" for d in self.devices)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready, versioned representation (used for reports and artifacts)."""
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION
        data["joules"] = self.joules
        data["kwh"] = self.kwh
        data["uncertainty_j"] = self.uncertainty_j
        data["joules_by_component"] = self.joules_by_component()
        data["phases"] = {
            name: {**asdict(p), "joules": p.joules} for name, p in self.phases.items()
        }
        return data
