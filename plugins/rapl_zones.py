"""Finding the RAPL zones of a powercap tree: which are packages, which DRAM, which to skip.

Read once, in the hook, by :mod:`green_mlops.plugins.rapl`. See docs/energy-measurement.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CONTROL_TYPES",
    "NOT_EXPOSED_FIX",
    "SAFETY_FACTOR",
    "Zone",
    "permission_fix",
    "power_bound",
    "read_text",
    "scan",
    "select",
]

#: Control types in order of preference; the first with a package zone is the one used.
CONTROL_TYPES = ("intel-rapl", "intel-rapl-tpmi", "intel-rapl-mmio")
_ZONE_RE = re.compile(r"^(intel-rapl(?:-tpmi|-mmio)?):(\d+)(?::(\d+))?$")
#: The bound times this factor is what the wrap logic treats as the most a zone can draw.
SAFETY_FACTOR = 2.0

NOT_EXPOSED_FIX = (
    "RAPL is not exposed in most VMs and containers; the CPU estimate is used instead. On "
    "bare-metal Linux, load the driver (sudo modprobe intel_rapl_msr; it also serves AMD Zen "
    "on recent kernels) or point GREEN_MLOPS_RAPL_ROOT at the powercap tree"
)


@dataclass
class Zone:
    """A powercap zone directory (a package, or a subzone of one)."""

    control: str  # "intel-rapl"
    zone: str  # "intel-rapl:0" or "intel-rapl:0:2"
    path: Path
    name: str = ""
    package: str = ""  # the name of the package zone it is (in)
    subzones: dict[str, Path] = field(default_factory=dict)


def read_text(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def zone_index(zone: str) -> tuple[int, ...]:
    return tuple(int(part) for part in zone.split(":")[1:])


def scan(root: Path) -> list[Zone]:
    """Top-level zones of every RAPL control type, with their subzones (flat or nested)."""
    tops: dict[str, Zone] = {}
    flat_subs: list[tuple[str, str]] = []
    for entry in os.listdir(root):
        match = _ZONE_RE.match(entry)
        if match is None:
            continue
        control, _, sub = match.groups()
        if sub is None:
            tops[entry] = Zone(control, entry, root / entry)
        else:
            flat_subs.append((entry.rsplit(":", 1)[0], entry))
    for parent, entry in flat_subs:
        if parent in tops:
            tops[parent].subzones[entry] = root / entry
    for top in tops.values():
        try:  # in the real tree subzones are also (and in some layouts only) nested
            nested = [e for e in os.listdir(top.path) if e.startswith(top.zone + ":")]
        except OSError:
            nested = []
        for entry in nested:
            top.subzones.setdefault(entry, top.path / entry)
        try:
            top.name = read_text(top.path / "name")
        except OSError:
            top.name = ""
    return sorted(tops.values(), key=lambda z: (CONTROL_TYPES.index(z.control), zone_index(z.zone)))


def select(zones: list[Zone]) -> tuple[list[Zone], list[Zone], list[str], list[str]]:
    """(packages, dram zones, ignored zones with why, packages without dram)."""
    ignored: list[str] = []
    chosen = next(
        (c for c in CONTROL_TYPES if any(z.control == c and _is_package(z) for z in zones)), ""
    )
    packages = [z for z in zones if z.control == chosen and _is_package(z)]
    names = {z.name for z in packages}
    for z in zones:
        if z.control == chosen and _is_package(z):
            z.package = z.name
            continue
        if z.name == "psys":
            why = "whole platform, it includes the packages"
        elif z.control != chosen and z.name in names:
            why = f"same package as {chosen}:*"
        elif z.control != chosen:
            why = f"{chosen} is preferred"
        else:
            why = "not a package zone"
        ignored.append(f"{z.zone} ({z.name or 'no name'}): {why}")
    drams: list[Zone] = []
    no_dram: list[str] = []
    for pkg in packages:
        found = False
        for entry, path in sorted(pkg.subzones.items(), key=lambda item: zone_index(item[0])):
            try:
                name = read_text(path / "name")
            except OSError as exc:
                ignored.append(f"{entry}: name unreadable ({exc.strerror or exc})")
                continue
            if name == "dram" and not found:
                drams.append(Zone(pkg.control, entry, path, name, pkg.name))
                found = True
            elif name in ("core", "uncore"):
                ignored.append(f"{entry} ({name}): part of {pkg.name}")
            else:
                ignored.append(f"{entry} ({name}): not a CPU or DRAM domain")
        if not found:
            no_dram.append(pkg.name)
    return packages, drams, ignored, no_dram


def _is_package(zone: Zone) -> bool:
    return zone.name.startswith("package-")


def power_bound(zone_dir: Path, default_w: float) -> tuple[float, str]:
    """P_max of a zone: its largest ``constraint_*_max_power_uw``, else ``default_w``."""
    best, source = 0, ""
    for i in range(3):
        try:
            value = int(read_text(zone_dir / f"constraint_{i}_max_power_uw"))
        except (OSError, ValueError):
            continue
        if value > best:
            best, source = value, f"constraint_{i}_max_power_uw"
    if best > 0:
        return best / 1e6, f"{source} {best / 1e6:.0f} W x {SAFETY_FACTOR:g}"
    return default_w, f"default {default_w:.0f} W x {SAFETY_FACTOR:g}"


def permission_fix(root: Path, denied: list[Path]) -> str:
    files = sorted({p.name for p in denied})
    globs = sorted({f"{root}/{_ZONE_RE.sub(_glob_zone, p.parent.name)}/{p.name}" for p in denied})
    chmods = " ".join(f"/sys%p/{f}" for f in files)
    return (
        f"run as root, or make the counters readable: sudo chmod a+r {' '.join(globs)} "
        "(until reboot). To keep it, add the udev rule "
        f'\'SUBSYSTEM=="powercap", KERNEL=="intel-rapl*:*", ACTION=="add", '
        f'RUN+="/bin/chmod a+r {chmods}"\' to /etc/udev/rules.d/99-rapl.rules. Readable '
        "counters reopen the PLATYPUS power side channel to local users: on shared machines "
        "grant a group instead (chgrp <group> + chmod g+r)"
    )


def _glob_zone(match: re.Match[str]) -> str:
    return f"{match.group(1)}:*"
