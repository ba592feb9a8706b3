"""RAM energy estimate: memory in use x watts per GiB, integrated over the sample intervals.

Machine share: ``total - available``; process share: the RSS of this process tree. 0.3725 W per
GiB (Green Algorithms), +/-50 %. See docs/energy-measurement.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from green_mlops import job
from green_mlops.hookspecs import hookimpl
from green_mlops.meters import (
    Component,
    Device,
    DeviceError,
    Meter,
    MeterUnavailable,
    Method,
    Readings,
)
from green_mlops.plugins.psutil_probe import CHILDREN_REFRESH_S, psutil_unavailable

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = ["DEVICE_ID", "GIB", "UNCERTAINTY", "RamEstimateMeter"]

DEVICE_ID = "ram:estimate"
UNCERTAINTY = 0.5
GIB = float(2**30)
W_PER_GB_SOURCE = "Green Algorithms memoryPower 0.3725 W/GB, CC BY 4.0"


class RamEstimateMeter(Meter):
    """``energy = bytes in use / 2**30 x w_per_gib``, trapezoid-integrated."""

    name = "ram_estimate"
    max_interval_s = 2.0

    def __init__(
        self,
        w_per_gib: float,
        *,
        share: str = "machine",
        children_refresh_s: float = CHILDREN_REFRESH_S,
        group: job.LocalGroup | None = None,
    ) -> None:
        """``group``: the process tree of the process share (found from the job's environment
        by default: all local ranks of a distributed job)."""
        if share not in ("machine", "process"):
            raise ValueError(f"share must be 'machine' or 'process', not {share!r}")
        self.w_per_gib = float(w_per_gib)
        self.share = share
        #: For the process share: the process tree counted (all local ranks of a job).
        self.group = (group or job.local_group()) if share == "process" else None
        what = (
            "machine memory in use (total - available)"
            if self.group is None
            else f"RSS of {self.group.describe()}"
        )
        source = W_PER_GB_SOURCE if w_per_gib == 0.3725 else "ram_w_per_gb setting"
        #: What is measured and with which constant, in words (for provenance).
        self.basis = f"{what} x {w_per_gib:g} W/GiB ({source}), trapezoid over samples"
        self._refresh_s = children_refresh_s
        self._root: psutil.Process | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._next_scan = 0.0
        self._last_bytes = 0.0
        self._last_now = 0.0
        self._joules = 0.0
        super().__init__(
            [
                Device(
                    id=DEVICE_ID,
                    component=Component.RAM,
                    method=Method.ESTIMATE,
                    uncertainty=UNCERTAINTY,
                    label=f"RAM estimate ({share} share): {self.basis}",
                )
            ]
        )

    def _scan(self, now: float) -> None:
        assert self._root is not None
        self._next_scan = now + self._refresh_s
        try:
            children = self._root.children(recursive=True)
        except psutil.Error:
            return
        procs = {self._root.pid: self._root}
        for child in children:
            procs[child.pid] = self._procs.get(child.pid, child)
        self._procs = procs

    def in_use_bytes(self, now: float) -> float:
        """Memory in use now, in bytes, for this meter's share."""
        if self.share == "machine":
            vm = psutil.virtual_memory()
            return float(vm.total - vm.available)
        if now >= self._next_scan:
            self._scan(now)
        total = 0
        for pid, proc in list(self._procs.items()):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                if self._root is not None and pid == self._root.pid:
                    raise
                del self._procs[pid]
        return float(total)

    def start(self) -> None:
        self._joules = 0.0
        self._last_now = time.monotonic()
        if self.share == "process":
            assert self.group is not None
            self._root = psutil.Process(self.group.root_pid)
            self._procs = {self._root.pid: self._root}
            self._scan(self._last_now)
        self._last_bytes = self.in_use_bytes(self._last_now)

    def notes(self) -> list[str]:
        return [self.basis]

    def sample(self, now: float) -> Readings:
        try:
            in_use = self.in_use_bytes(now)
        except (psutil.Error, OSError) as exc:
            return {DEVICE_ID: DeviceError(f"cannot read memory use: {exc}")}
        dt = max(now - self._last_now, 0.0)
        self._joules += (self._last_bytes + in_use) / 2 / GIB * self.w_per_gib * dt
        self._last_bytes, self._last_now = in_use, now
        return {DEVICE_ID: self._joules}


@hookimpl
def green_mlops_meters(settings: Settings) -> list[Meter | MeterUnavailable]:
    """The RAM estimate meter for ``settings.share`` with ``settings.ram_w_per_gb``."""
    job.warn_scope()
    reads: list[Callable[[], object]] = [psutil.virtual_memory]
    if settings.share == "process":
        reads.append(lambda: psutil.Process().memory_info())
    missing = psutil_unavailable("ram_estimate", Component.RAM, "memory use", *reads)
    if missing is not None:
        return [missing]
    return [RamEstimateMeter(settings.ram_w_per_gb, share=settings.share)]
