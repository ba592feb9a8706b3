"""The meter contract: what a plugin hands the engine, and what the engine reads from it.

A meter answers :meth:`Meter.sample` with each device's *cumulative* joules (method ``counter``,
``sampled-power`` or ``estimate``), or a :class:`DeviceError`, never 0 J for a failed read.
See docs/energy-measurement.md.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "Component",
    "Device",
    "DeviceError",
    "Meter",
    "MeterUnavailable",
    "Method",
    "Readings",
]


class Method(str, enum.Enum):
    """How a device's energy is obtained, best first."""

    COUNTER = "counter"
    SAMPLED_POWER = "sampled-power"
    ESTIMATE = "estimate"

    @property
    def rank(self) -> int:
        """0 for the most trustworthy method; used to pick one meter per component."""
        return list(Method).index(self)


class Component(str, enum.Enum):
    """What part of the machine a device is. Metric keys use these names."""

    GPU = "gpu"
    CPU = "cpu"
    RAM = "ram"
    OTHER = "other"


@dataclass(frozen=True)
class Device:
    """One measured thing.

    ``id`` is unique within a tracker and stable across runs on the same machine
    (``gpu:0``, ``cpu:package-0``, ``ram:package-0``, ``cpu:estimate``).
    ``uncertainty`` is the relative half-width of the band around the measured energy
    (0.05 means +/-5 %), as documented by the meter.
    ``resolution_s``: for a counter that changes only every so many seconds (NVML total
    energy), that period; the engine then apportions shorter intervals by the power the meter
    reports in :meth:`Meter.power_w`. 0 for counters that follow the energy closely.
    """

    id: str
    component: Component
    method: Method
    uncertainty: float
    label: str = ""
    resolution_s: float = 0.0


@dataclass(frozen=True)
class DeviceError:
    """A device that could not be read in this sample, with the reason (shown to the user)."""

    reason: str


Readings = Mapping[str, "float | DeviceError"]
"""Cumulative joules since ``start()`` per device id, or the error that prevented the read."""


class Meter(abc.ABC):
    """Base class for energy meters provided through the ``green_mlops_meters`` hook.

    Subclasses set :attr:`name` and :attr:`devices` and implement :meth:`sample`.
    All methods are called from the engine's sampler thread, except :meth:`start` and the
    first :meth:`sample` (the tracker's zero point, right after every meter started), which the
    engine calls once from the thread that starts tracking; the engine serialises the calls.
    """

    #: Short name shown in provenance and ``green-mlops doctor`` (usually the plugin's name).
    name: str = ""
    #: Longest interval between two samples that keeps the meter correct (counter wraparound,
    #: power integration resolution). The sampler honours the smallest value of all meters.
    max_interval_s: float = 1.0

    def __init__(self, devices: list[Device]) -> None:
        self.devices: list[Device] = list(devices)

    def start(self) -> None:
        """Take the zero point. Called once before the first :meth:`sample`."""

    @abc.abstractmethod
    def sample(self, now: float) -> Readings:
        """Return cumulative joules per device since :meth:`start`.

        ``now`` is ``time.monotonic()`` at the moment of the call, for meters that integrate
        power. Must not raise for a single failing device: return a :class:`DeviceError` for it.
        If the whole meter fails, raising is fine: every device is then marked failed.
        """

    def power_w(self) -> Mapping[str, float]:
        """Power in watts, as read by the last :meth:`sample` (or :meth:`start`), of devices
        with a ``resolution_s``; the engine uses it for intervals shorter than the resolution.
        Leave a device out when its power could not be read. Default: none."""
        return {}

    def close(self) -> None:
        """Release handles. Called once when the tracker stops."""

    def notes(self) -> list[str]:
        """Provenance notes for the run: the basis of an estimate, inferred counter wraps, gaps.

        Read by the engine when it builds a snapshot; return a fresh list, most recent last.
        """
        return []


@dataclass(frozen=True)
class MeterUnavailable:
    """A meter that a plugin could not provide on this machine, with the reason and the fix.

    Returned from the ``green_mlops_meters`` hook instead of a :class:`Meter`, so that
    ``green-mlops doctor`` and the run's provenance can say what is not measured and why.
    """

    name: str
    component: Component
    reason: str
    fix: str = ""
    #: True when the absence is normal here (no NVIDIA driver on a CPU-only host): listed by
    #: ``green-mlops doctor`` and in provenance, but not warned about at every start.
    quiet: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)
    #: False when ``fix`` is not something to do here (RAPL on a VM: move to bare metal): said
    #: as a log record, not as a :class:`~green_mlops.log.GreenMlopsWarning`.
    actionable: bool = True

    def describe(self) -> str:
        text = f"{self.name} ({self.component.value}): {self.reason}"
        return f"{text}. Fix: {self.fix}" if self.fix else text
