"""CPU package and DRAM energy from Linux RAPL counters (the ``powercap`` sysfs interface).

Counters unwrapped with ``max_energy_range_uj`` and read often enough that no wrap passes
unseen; package +/-10 %, DRAM +/-20 %. Zone discovery: :mod:`green_mlops.plugins.rapl_zones`.
See docs/energy-measurement.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
from green_mlops.plugins.rapl_zones import (
    NOT_EXPOSED_FIX,
    SAFETY_FACTOR,
    Zone,
    permission_fix,
    power_bound,
    read_text,
    scan,
    select,
)

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = [
    "DEFAULT_DRAM_MAX_W",
    "DEFAULT_PACKAGE_MAX_W",
    "DRAM_UNCERTAINTY",
    "PACKAGE_UNCERTAINTY",
    "RaplMeter",
    "build_meters",
    "green_mlops_meters",
]

NAME = "rapl"
PACKAGE_UNCERTAINTY = 0.10
DRAM_UNCERTAINTY = 0.20
#: Power bound for a package zone without ``constraint_*_max_power_uw``: the largest server
#: CPU TDPs today are 500 W (AMD EPYC 9005, Intel Xeon 6900P).
DEFAULT_PACKAGE_MAX_W = 500.0
#: Power bound for a DRAM zone without a constraint: 24 DDR5 RDIMMs of ~8 W under load.
DEFAULT_DRAM_MAX_W = 200.0
MAX_INTERVAL_CAP_S = 60.0
#: RAPL counters update about every millisecond; below this the power bound is meaningless.
_MIN_ELAPSED_S = 0.01
#: Floor of :attr:`RaplMeter.max_interval_s`: a zone with a tiny counter range (broken firmware,
#: a misconfigured tree) must not drive the sampler to kHz rates; past it, wraps are inferred.
MIN_INTERVAL_S = 0.1
#: Two zones are one counter seen twice when their readings agree to within what a zone can
#: draw in this time (reads of the two files are microseconds apart, the counter updates ~1 ms).
MIRROR_TOLERANCE_S = 0.002
#: Reads of ``energy_uj`` tried at discovery before a zone is taken as unreadable for now.
_DISCOVERY_READS = 3
_MAX_NOTES = 50
_READ_SIZE = 32
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


# --- reading ---------------------------------------------------------------------------------


class _Domain:
    """One RAPL zone read as one device: its open ``energy_uj`` and its unwrapping state."""

    __slots__ = (
        "base_t",
        "bound_source",
        "device",
        "fd",
        "last_t",
        "last_uj",
        "mirror_of",
        "mirror_seen",
        "name",
        "name_path",
        "over_bound",
        "path",
        "power_hi_uj_s",
        "range_uj",
        "total_uj",
    )

    def __init__(
        self,
        device: Device,
        zone_dir: Path,
        name: str,
        fd: int,
        range_uj: int,
        power_max_w: float,
        bound_source: str,
    ) -> None:
        self.device = device
        self.path = str(zone_dir / "energy_uj")
        self.name_path = str(zone_dir / "name")
        self.name = name
        self.fd = fd
        self.range_uj = range_uj
        #: The most this zone is taken to draw, in uJ per second (P_max x safety factor).
        self.power_hi_uj_s = power_max_w * SAFETY_FACTOR * 1e6
        self.bound_source = bound_source
        self.last_uj = -1  # last good raw reading; -1 = no baseline yet
        self.last_t = 0.0
        self.base_t = 0.0  # when the baseline was taken
        self.total_uj = 0
        self.over_bound = False  # noted once: the zone drew more than the bound
        #: The zone whose counter this one mirrors (counted once, there), while they agree.
        self.mirror_of: _Domain | None = None
        self.mirror_seen = False  # the mirrored counter has moved (and the note is written)

    @property
    def max_interval_s(self) -> float:
        """Longest gap between reads after which one wrap can still be told from two."""
        return min(MAX_INTERVAL_CAP_S, self.range_uj / self.power_hi_uj_s)

    def read(self) -> int:
        """The raw counter in uJ; reopens the file first after a failed read."""
        if self.fd < 0:
            self._reopen()
        return int(os.pread(self.fd, _READ_SIZE, 0))

    def _reopen(self) -> None:
        # After CPU hotplug the zone may come back under another number: check the name.
        with open(self.name_path) as f:
            name = f.read().strip()
        if name != self.name:
            raise OSError(f"zone is now named {name!r}, not {self.name!r}")
        self.fd = os.open(self.path, _OPEN_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _agree(p: _Domain, p_uj: int, d: _Domain, d_uj: int) -> bool:
    """Whether readings ``p_uj`` of ``p`` and ``d_uj`` of ``d`` can be one counter's."""
    tolerance = MIRROR_TOLERANCE_S * max(p.power_hi_uj_s, d.power_hi_uj_s)
    return p.range_uj == d.range_uj and abs(p_uj - d_uj) <= tolerance


def _between(p: _Domain, before_uj: int, value_uj: int) -> bool:
    """Whether ``value_uj``, read after ``p`` read ``before_uj``, lies between that and a read
    of ``p`` now: a mirror read late (the sampler thread waiting for the GIL) is still one
    counter's value. An unreadable ``p`` cannot tell, so the pair stays a mirror for now."""
    try:
        after_uj = p.read()
    except (OSError, ValueError):
        return True
    if after_uj >= before_uj:
        return before_uj <= value_uj <= after_uj
    return value_uj >= before_uj or value_uj <= after_uj  # the counter wrapped in between


def _close_all(domains: list[_Domain]) -> None:
    for domain in domains:
        domain.close()


class RaplMeter(Meter):
    """Cumulative energy of RAPL zones (all packages, or all DRAM domains) since :meth:`start`.

    Built by :func:`build_meters`. Attributes for provenance: :attr:`inferred_wraps` (per device,
    how many readings had their wrap count inferred rather than observed) and :attr:`ignored`
    (zones found and deliberately not read, with why).

    Mirrored zones: some AMD parts expose one zone per die that all read the same package
    counter (CodeCarbon issue #1274, Threadripper 1950X), while Intel's multi-die parts have a
    counter per die, so names cannot tell them apart. Zones of the same range whose readings at
    :meth:`start` agree (to within :data:`MIRROR_TOLERANCE_S` of the zone's power bound) are
    taken as one counter: it is counted once, under the first zone, and the others report 0 J,
    with a note once the counter has moved while they still agree. At every sample they are
    compared again; zones that no longer agree are separate counters, and each is from then on
    reported with all its energy since :meth:`start` (the two may have been equal by chance).
    """

    name = NAME

    def __init__(self, domains: list[_Domain], ignored: Sequence[str] = ()) -> None:
        super().__init__([d.device for d in domains])
        self._domains = list(domains)
        self.ignored: list[str] = list(ignored)
        self.inferred_wraps: dict[str, int] = {d.device.id: 0 for d in self._domains}
        self._notes: list[str] = []
        self._dropped_notes = 0
        needed = min(d.max_interval_s for d in self._domains)
        self.max_interval_s = max(needed, MIN_INTERVAL_S)
        if needed < MIN_INTERVAL_S:
            self._note(
                f"a counter range allows only {needed * 1e3:.2g} ms between reads at the power "
                f"bound; reads are at most every {MIN_INTERVAL_S:g} s (the floor), so wraps "
                "between reads may pass unseen: wrap counts are inferred from average power"
            )
        self._start_t = 0.0
        self._started = False
        self._finalizer = weakref.finalize(self, _close_all, self._domains)

    def start(self) -> None:
        now = time.monotonic()
        self._start_t = now
        self._started = True
        for d in self._domains:
            d.total_uj = 0
            d.last_uj = -1
            try:
                raw = d.read()
            except OSError:
                d.close()  # counted from the first good read, with a note
                continue
            except ValueError:
                continue
            d.last_uj, d.last_t, d.base_t = raw, now, now
        self._find_mirrors()

    def _find_mirrors(self) -> None:
        primaries: list[_Domain] = []
        for d in self._domains:
            d.mirror_of, d.mirror_seen = None, False
            if d.last_uj < 0:
                continue
            d.mirror_of = next((p for p in primaries if _agree(p, p.last_uj, d, d.last_uj)), None)
            if d.mirror_of is None:
                primaries.append(d)

    def sample(self, now: float) -> Readings:
        if not self._started:
            self.start()
        out: dict[str, float | DeviceError] = {}
        raws: dict[int, tuple[int, int]] = {}  # id(domain) -> (previous, current) good reading
        for d in self._domains:
            try:
                raw = d.read()
            except OSError as exc:
                d.close()
                out[d.device.id] = DeviceError(f"cannot read {d.path}: {exc.strerror or exc}")
                continue
            except ValueError:
                out[d.device.id] = DeviceError(f"{d.path} did not hold an integer")
                continue
            raws[id(d)] = (d.last_uj, raw)
            diff = raw - d.last_uj
            limit = (now - d.last_t) * d.power_hi_uj_s
            if d.last_uj < 0:
                self._baseline(d, raw, now)
            elif diff >= 0 and limit < diff + d.range_uj:
                d.total_uj += diff  # the common case: no wrap, and no room for one
                if diff > limit and not d.over_bound:
                    self._over_bound(d, diff, now)
                d.last_uj, d.last_t = raw, now
            else:
                self._unwrap(d, raw, now)
            out[d.device.id] = d.total_uj / 1e6
        self._check_mirrors(raws, out, now)
        return out

    def _check_mirrors(
        self, raws: dict[int, tuple[int, int]], out: dict[str, float | DeviceError], now: float
    ) -> None:
        """Report mirrored zones once; zones that stopped agreeing are counted from then on."""
        for d in self._domains:
            p = d.mirror_of
            if p is None:
                continue
            mine, theirs = raws.get(id(d)), raws.get(id(p))
            if (
                mine is not None
                and theirs is not None
                and not _agree(p, theirs[1], d, mine[1])
                and not _between(p, theirs[1], mine[1])
            ):
                d.mirror_of = None
                self._note(
                    f"{d.device.id} and {p.device.id} were taken as one counter (equal readings)"
                    f" but are no longer equal after {now - self._start_t:.1f} s: counted "
                    f"separately from now on, with all of {d.device.id}'s energy since the start"
                )
                continue
            if isinstance(out.get(d.device.id), float):
                out[d.device.id] = 0.0
            if not d.mirror_seen and theirs is not None and theirs[1] != theirs[0]:
                d.mirror_seen = True
                self._note(
                    f"{d.device.id} reads the same counter as {p.device.id} (equal readings at "
                    "every sample: per-die zones of one package counter, as on some AMD parts):"
                    f" counted once, under {p.device.id}; {d.device.id} reports 0 J"
                )

    def close(self) -> None:
        self._finalizer()

    def notes(self) -> list[str]:
        notes = list(self._notes)
        if self._dropped_notes:
            notes.append(f"{self._dropped_notes} further notes omitted")
        return notes

    # -- the uncommon paths -------------------------------------------------------------------

    def _baseline(self, d: _Domain, raw: int, now: float) -> None:
        d.last_uj, d.last_t, d.base_t = raw, now, now
        self._note(
            f"{d.device.id}: unreadable at start; counted from its first good read "
            f"{now - self._start_t:.1f} s later (energy before that is not included)"
        )

    def _over_bound(self, d: _Domain, diff: int, now: float) -> None:
        elapsed = now - d.last_t
        if diff <= _MIN_ELAPSED_S * d.power_hi_uj_s:
            return  # reads a few ms apart see the counter's ~1 ms update steps, not power
        d.over_bound = True
        self._note(
            f"{d.device.id}: drew {diff / 1e6 / elapsed:.0f} W over {elapsed:.2f} s, above the "
            f"{d.power_hi_uj_s / 1e6:.0f} W bound ({d.bound_source}) that wrap detection "
            "assumes; counted as read, but wrap counts after long gaps may be underestimated"
        )

    def _unwrap(self, d: _Domain, raw: int, now: float) -> None:
        """Add the energy since the last good read when a wrap happened or may have."""
        dev, rng = d.device.id, d.range_uj
        elapsed = now - d.last_t
        bound_uj = max(elapsed, _MIN_ELAPSED_S) * d.power_hi_uj_s
        wrapped = raw < d.last_uj
        base = raw - d.last_uj + (rng if wrapped else 0)
        bound_w = d.power_hi_uj_s / 1e6
        if wrapped and base > bound_uj:
            self._note(
                f"{dev}: counter went back from {d.last_uj} to {raw} uJ in {elapsed:.3f} s, "
                f"which one wrap explains only above {bound_w:.0f} W (bound from "
                f"{d.bound_source}); taken as a counter reset or glitch, 0 J counted for "
                f"that interval"
            )
            d.last_uj, d.last_t = raw, now
            return
        extra_max = max(0, math.floor((bound_uj - base) / rng))
        extra = 0
        if extra_max > 0:
            observed = d.last_t - d.base_t
            if observed > 0 and d.total_uj > 0:
                avg_uj_s = d.total_uj / observed
                extra = min(extra_max, max(0, round((avg_uj_s * elapsed - base) / rng)))
                why = f"closest to its average power so far ({avg_uj_s / 1e6:.1f} W)"
            else:
                why = "the smallest, as there is no average power yet to compare with"
            self.inferred_wraps[dev] += 1
            first = int(wrapped)
            added = base + extra * rng
            self._note(
                f"{dev}: {elapsed:.1f} s between reads; at up to {bound_w:.0f} W (bound from "
                f"{d.bound_source}) the counter (range {rng / 1e6:.0f} J) may have wrapped "
                f"{first} to {first + extra_max} times; inferred {first + extra} wraps, "
                f"{why}: {added / 1e6:.1f} J ({added / 1e6 / elapsed:.1f} W) added"
            )
        d.total_uj += base + extra * rng
        d.last_uj, d.last_t = raw, now

    def _note(self, text: str) -> None:
        if len(self._notes) < _MAX_NOTES:
            self._notes.append(text)
        else:
            self._dropped_notes += 1


# --- discovery -------------------------------------------------------------------------------


class _Denied(Exception):
    """Permission denied on some of a zone's files (all of them listed, for one fix)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(", ".join(str(p) for p in paths))
        self.paths = paths


def _open(zone: Zone, component: Component) -> _Domain:
    """Open a zone for reading; raises _Denied, OSError or ValueError."""
    denied: list[Path] = []
    range_path, energy_path = zone.path / "max_energy_range_uj", zone.path / "energy_uj"
    range_text = ""
    try:
        range_text = read_text(range_path)
    except PermissionError:
        denied.append(range_path)
    try:
        fd = os.open(energy_path, _OPEN_FLAGS)
    except PermissionError:
        raise _Denied([*denied, energy_path]) from None
    try:
        if denied:
            raise _Denied(denied)
        range_uj = int(range_text)
        if range_uj <= 0:
            raise ValueError(f"{range_path} is {range_uj}")
    except BaseException:
        os.close(fd)
        raise
    if not _readable(fd):  # a failed read is treated as it is mid-run: the meter retries it
        os.close(fd)
        fd = -1
    cpu = component is Component.CPU
    power_w, source = power_bound(zone.path, DEFAULT_PACKAGE_MAX_W if cpu else DEFAULT_DRAM_MAX_W)
    device = Device(
        id=f"{'cpu' if cpu else 'ram'}:{zone.package}",
        component=component,
        method=Method.COUNTER,
        uncertainty=PACKAGE_UNCERTAINTY if cpu else DRAM_UNCERTAINTY,
        label=f"RAPL {zone.package}{'' if cpu else ' dram'} ({zone.zone})",
    )
    return _Domain(device, zone.path, zone.name, fd, range_uj, power_w, source)


def _readable(fd: int) -> bool:
    """Whether ``energy_uj`` gives an integer, in one of a few reads (RAPL reads fail at times:
    EIO when the MSR read does, EAGAIN during CPU hotplug)."""
    for _ in range(_DISCOVERY_READS):
        try:
            int(os.pread(fd, _READ_SIZE, 0))
            return True
        except (OSError, ValueError):
            continue
    return False


def _open_all(
    zones: list[Zone], component: Component, domains: list[_Domain]
) -> tuple[list[Path], list[str]]:
    """Open every zone into ``domains``; return (paths denied, other failures)."""
    denied: list[Path] = []
    failed: list[str] = []
    for zone in zones:
        try:
            domains.append(_open(zone, component))
        except _Denied as exc:
            denied.extend(exc.paths)
        except (OSError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            failed.append(f"{zone.zone} ({zone.name}): {text}")
    return denied, failed


def build_meters(root: Path) -> list[Meter | MeterUnavailable]:
    """RAPL meters for the powercap tree at ``root``: one for the packages, one for DRAM.

    Every package (or every DRAM domain) must be readable for its meter to exist: a partial
    sum would undercount silently. What cannot be measured comes back as MeterUnavailable.
    """
    try:
        zones = scan(root)
    except OSError as exc:
        reason = f"no RAPL powercap tree at {root} ({exc.strerror or exc})"
        return [_unavailable(Component.CPU, reason, NOT_EXPOSED_FIX, actionable=False)]
    packages, drams, ignored, no_dram = select(zones)
    if not packages:
        found = ", ".join(f"{z.zone} ({z.name or 'no name'})" for z in zones) or "no zones"
        reason = f"no RAPL package domain under {root} (found: {found})"
        return [_unavailable(Component.CPU, reason, NOT_EXPOSED_FIX, actionable=False)]

    offers: list[Meter | MeterUnavailable] = []
    for component, group in ((Component.CPU, packages), (Component.RAM, drams)):
        if component is Component.RAM and no_dram:
            which = "any package" if len(no_dram) == len(packages) else ", ".join(no_dram)
            reason = f"RAPL exposes no dram domain for {which}; the RAM estimate applies"
            offers.append(_unavailable(component, reason, quiet=True))
            continue
        domains: list[_Domain] = []
        denied, failed = _open_all(group, component, domains)
        if denied:
            _close_all(domains)
            shown = ", ".join(str(p) for p in denied)
            reason = (
                f"permission denied reading {shown} (root only since the CVE-2020-8694 fix); "
                f"the {component.value} estimate is used instead"
            )
            fix = permission_fix(root, denied)
            offers.append(_unavailable(component, reason, fix, extra={"denied": shown}))
        elif failed:
            _close_all(domains)
            reason = f"cannot read {'; '.join(failed)}; the {component.value} estimate is used"
            offers.append(_unavailable(component, reason))
        elif all(d.fd < 0 for d in domains):  # nothing readable at all: not a transient failure
            _close_all(domains)
            which = ", ".join(f"{d.path}/energy_uj" for d in domains)
            reason = f"no read of {which} succeeded; the {component.value} estimate is used"
            offers.append(_unavailable(component, reason))
        else:
            offers.append(RaplMeter(domains, ignored if component is Component.CPU else ()))
    return offers


def _unavailable(
    component: Component,
    reason: str,
    fix: str = "",
    *,
    quiet: bool = False,
    actionable: bool = True,
    extra: dict[str, str] | None = None,
) -> MeterUnavailable:
    return MeterUnavailable(
        name=NAME,
        component=component,
        reason=reason,
        fix=fix,
        quiet=quiet,
        extra=extra or {},
        actionable=actionable,
    )


@hookimpl
def green_mlops_meters(settings: Settings) -> list[Meter | MeterUnavailable]:
    """RAPL package and DRAM meters for this machine, or why they are unavailable."""
    job.warn_scope()  # the counters are this node's: say so in a multi-node job
    return build_meters(Path(settings.rapl_root))
