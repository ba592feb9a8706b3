"""CPU energy estimate: utilisation x TDP, for machines without RAPL (+/-50 %).

Machine share: the system-wide busy fraction; process share: this process tree's CPU seconds
(all local ranks of a job). TDP lookup: :mod:`green_mlops.plugins.cpu_models`.
See docs/energy-measurement.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from green_mlops import job
from green_mlops.hookspecs import hookimpl
from green_mlops.log import warn_once
from green_mlops.meters import (
    Component,
    Device,
    DeviceError,
    Meter,
    MeterUnavailable,
    Method,
    Readings,
)
from green_mlops.plugins import cpu_models
from green_mlops.plugins.cpu_models import CpuInfo, CpuLimit
from green_mlops.plugins.psutil_probe import CHILDREN_REFRESH_S, psutil_unavailable

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = ["DEVICE_ID", "UNCERTAINTY", "CpuEstimateMeter", "build_meter"]

DEVICE_ID = "cpu:estimate"
#: Relative half-width of the uncertainty band (docs/energy-measurement.md: "CPU estimate").
UNCERTAINTY = 0.5


def _busy_total(times: tuple[float, ...]) -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from a psutil ``scputimes``."""
    total = sum(times)
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # inside user/nice
    idle = getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0)
    idle += getattr(times, "steal", 0.0)
    return total - idle, total


class _TreeCpu:
    """CPU seconds used by this process and its descendants since :meth:`start`.

    Each tracked process contributes its own time (user + system) and the time of the
    descendants it reaped (``children_user`` + ``children_system``). When a tracked process
    disappears, the time already counted for it is set against its parent's next jump in
    reaped time, so that nothing is counted twice.
    """

    def __init__(self, refresh_s: float, root_pid: int | None = None) -> None:
        self._refresh_s = refresh_s
        self._root = psutil.Process(root_pid)
        self._procs: dict[int, psutil.Process] = {}
        self._parent: dict[int, int] = {}
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (own, reaped)
        self._pending: dict[int, float] = {}  # pid -> seconds to set against its reaped time
        self._next_scan = 0.0

    def _times(self, proc: psutil.Process) -> tuple[float, float]:
        t = proc.cpu_times()
        return t.user + t.system, t.children_user + t.children_system

    def start(self, now: float) -> None:
        self._procs = {self._root.pid: self._root}
        self._last = {self._root.pid: self._times(self._root)}
        self._pending.clear()
        self._scan(now, baseline_now=True)

    def _forget(self, pid: int, dead: bool) -> None:
        self._procs.pop(pid, None)
        own, reaped = self._last.pop(pid, (0.0, 0.0))
        parent = self._parent.pop(pid, None)
        self._pending.pop(pid, None)
        if dead and parent is not None and parent in self._procs:
            self._pending[parent] = self._pending.get(parent, 0.0) + own + reaped

    def _scan(self, now: float, baseline_now: bool = False) -> None:
        self._next_scan = now + self._refresh_s
        try:
            children = self._root.children(recursive=True)
        except psutil.Error:
            return
        current = {child.pid: child for child in children}
        for pid in [p for p in self._procs if p != self._root.pid and p not in current]:
            try:  # gone from the tree: dead (its parent may reap it) or reparented elsewhere
                self._procs[pid].cpu_times()
                self._forget(pid, dead=False)
            except psutil.Error:
                self._forget(pid, dead=True)
        for pid, child in current.items():
            if pid in self._procs:
                continue
            try:  # a process not in the tree at start() was born since: count all its time
                parent = child.ppid()
                self._last[pid] = self._times(child) if baseline_now else (0.0, 0.0)
            except psutil.Error:
                continue
            self._procs[pid], self._parent[pid] = child, parent

    def advance(self, now: float) -> float:
        """CPU seconds used by the tree since the previous call (or :meth:`start`).

        All times are read first, parents before children (the scan's order), so that a child
        reaped between two reads is credited against its parent in the same call.
        """
        if now >= self._next_scan:
            self._scan(now)
        readings: dict[int, tuple[float, float]] = {}
        for pid, proc in list(self._procs.items()):
            try:
                readings[pid] = self._times(proc)
            except psutil.Error:
                if pid == self._root.pid:
                    raise
                self._forget(pid, dead=True)
        gained = 0.0
        for pid, (own, reaped) in readings.items():
            if pid not in self._procs:
                continue
            last_own, last_reaped = self._last[pid]
            d_reaped = reaped - last_reaped
            pending = self._pending.get(pid, 0.0)
            if pending and d_reaped > 0:
                taken = min(pending, d_reaped)
                d_reaped -= taken
                self._pending[pid] = pending - taken
            gained += max(own - last_own, 0.0) + max(d_reaped, 0.0)
            self._last[pid] = (own, reaped)
        return gained


class CpuEstimateMeter(Meter):
    """``energy = utilisation x tdp_w``, integrated; see docs/energy-measurement.md."""

    name = "cpu_estimate"
    max_interval_s = 5.0

    def __init__(
        self,
        tdp_w: float,
        basis: str,
        *,
        share: str = "machine",
        logical_cpus: int = 1,
        children_refresh_s: float = CHILDREN_REFRESH_S,
        group: job.LocalGroup | None = None,
    ) -> None:
        if share not in ("machine", "process"):
            raise ValueError(f"share must be 'machine' or 'process', not {share!r}")
        #: TDP of all sockets together, in watts.
        self.tdp_w = float(tdp_w)
        #: How the TDP was obtained and what is measured, in words (for provenance).
        self.basis = basis
        self.share = share
        self.logical_cpus = max(int(logical_cpus), 1)
        self._refresh_s = children_refresh_s
        #: For the process share: the process tree counted (all local ranks of a job).
        self.group = group
        self._joules = 0.0
        self._last_now = 0.0
        self._last_busy = self._last_total = 0.0
        self._tree: _TreeCpu | None = None
        super().__init__(
            [
                Device(
                    id=DEVICE_ID,
                    component=Component.CPU,
                    method=Method.ESTIMATE,
                    uncertainty=UNCERTAINTY,
                    label=f"CPU estimate ({share} share): {basis}",
                )
            ]
        )

    def start(self) -> None:
        self._joules = 0.0
        self._last_now = time.monotonic()
        if self.share == "machine":
            self._last_busy, self._last_total = _busy_total(psutil.cpu_times())
        else:
            root = None if self.group is None else self.group.root_pid
            self._tree = _TreeCpu(self._refresh_s, root)
            self._tree.start(self._last_now)

    def notes(self) -> list[str]:
        return [self.basis]

    def sample(self, now: float) -> Readings:
        try:
            if self._tree is None:
                busy, total = _busy_total(psutil.cpu_times())
                d_total = total - self._last_total
                if d_total > 0:  # else no clock tick yet: keep the interval open
                    fraction = min(max((busy - self._last_busy) / d_total, 0.0), 1.0)
                    self._joules += fraction * self.tdp_w * max(now - self._last_now, 0.0)
                    self._last_busy, self._last_total, self._last_now = busy, total, now
            else:
                cpu_s = self._tree.advance(now)
                self._joules += cpu_s * self.tdp_w / self.logical_cpus
        except (psutil.Error, OSError) as exc:
            return {DEVICE_ID: DeviceError(f"cannot read CPU times: {exc}")}
        return {DEVICE_ID: self._joules}


def build_meter(
    settings: Settings,
    info: CpuInfo | None = None,
    limit: CpuLimit | None = None,
    *,
    children_refresh_s: float = CHILDREN_REFRESH_S,
) -> CpuEstimateMeter:
    """The meter for ``settings`` on a machine described by ``info`` (detected when ``None``).

    ``limit`` (detected when ``info`` is ``None``) adds a note to the basis in machine share.
    """
    if info is None:
        info = cpu_models.detect_cpu()
        limit = cpu_models.cpu_limit(info.logical_cpus)
    estimate = cpu_models.estimate_tdp(
        info, tdp_override=settings.cpu_tdp_w, model_override=settings.cpu_model
    )
    basis = estimate.basis
    if settings.cpu_model is not None and estimate.source == "default":
        # the user named the CPU, and the name is not in the table: not used, said
        warn_once(
            f"GREEN_MLOPS_CPU_MODEL={settings.cpu_model!r} is not in the TDP table: {basis}",
            fix=True,
        )
    group = None
    if settings.share == "process":
        group = job.local_group()
        basis += f"; x CPU time of {group.describe()} / {info.logical_cpus} logical CPUs"
    else:
        basis += f"; x busy fraction of all {info.logical_cpus} logical CPUs"
        if limit is not None:
            basis += (
                f"; note: this process may use only {limit.usable_cpus:g} of them "
                f"({limit.reason}), so the machine share counts other tenants' load: "
                "set share=process on a shared host"
            )
    return CpuEstimateMeter(
        estimate.tdp_w,
        basis,
        share=settings.share,
        logical_cpus=info.logical_cpus,
        children_refresh_s=children_refresh_s,
        group=group,
    )


@hookimpl
def green_mlops_meters(settings: Settings) -> list[Meter | MeterUnavailable]:
    """The CPU estimate meter (the engine drops it where RAPL measures the CPU)."""
    job.warn_scope()
    reads: list[Callable[[], object]] = [psutil.cpu_times]
    if settings.share == "process":
        reads.append(lambda: psutil.Process().cpu_times())
    missing = psutil_unavailable("cpu_estimate", Component.CPU, "CPU times", *reads)
    return [missing] if missing is not None else [build_meter(settings)]
