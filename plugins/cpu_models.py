"""CPU model detection and TDP lookup, for the ``cpu_estimate`` plugin.

The model from ``/proc/cpuinfo`` (or ``sysctl``, the registry), looked up in the bundled
CodeCarbon table; an unknown model gets 12 W per physical core. See docs/energy-measurement.md.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import io
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "DEFAULT_W_PER_CORE",
    "DEFAULT_W_PER_CORE_SOURCE",
    "TDP_TABLE_SOURCE",
    "CpuInfo",
    "CpuLimit",
    "TdpEstimate",
    "TdpMatch",
    "TdpTable",
    "cpu_limit",
    "detect_cpu",
    "estimate_tdp",
    "load_tdp_table",
    "lookup_tdp",
    "model_tokens",
]

#: Default TDP per physical core for a CPU model not in the table (watts).
DEFAULT_W_PER_CORE = 12.0
DEFAULT_W_PER_CORE_SOURCE = "Green Algorithms TDP_cpu.csv 'Any' row, CC BY 4.0"
TDP_TABLE_SOURCE = "CodeCarbon cpu_power.csv v3.3.2 (MIT), bundled as green_mlops/data/cpu-tdp.csv"

# --- normalisation --------------------------------------------------------------------------

_MARKS = re.compile(r"\((?:r|tm|c)\)|[®™©\u200b]", re.IGNORECASE)
_PARENS = re.compile(r"\([^)]*\)")
_GRAPHICS = re.compile(r"\s(?:with|w/|radeon)\s.*$", re.IGNORECASE)
_COMMA = re.compile(r",.*$")
_AT = re.compile(r"@.*$")
_FREQ = re.compile(r"\b\d+(?:\.\d+)?\s*[gm]hz\b", re.IGNORECASE)
_N_CORE = re.compile(r"\b\w+-cores?\b", re.IGNORECASE)
_GEN = re.compile(r"\b\d+(?:st|nd|rd|th)\s+gen(?:eration)?\b", re.IGNORECASE)
_SPLIT = re.compile(r"[\s\-_/]+")
_EDGE = re.compile(r"^[^a-z0-9]+|[^a-z0-9+]+$")
_MINOR = re.compile(r"\d|x\d{1,2}")
_STOP = frozenset({"cpu", "processor", "processors", "apu", "soc", "gen"})
# Suffix words that make a different part with a different TDP (AMD Opteron 240 vs 240 EE).
_VARIANTS = frozenset({"he", "ee", "se"})
_VENDORS = {"intel": "intel", "amd": "amd", "apple": "apple", "arm": "arm", "cortex": "arm"}
_FAMILIES = frozenset(
    {
        "xeon", "core", "celeron", "pentium", "atom", "itanium", "quark",
        "epyc", "ryzen", "threadripper", "opteron", "athlon", "phenom", "sempron", "turion",
        "duron", "fx", "cortex", "neoverse",
    }
)  # fmt: skip
# Arm "CPU part" numbers (implementer 0x41) -> core name, as the table and Arm's TRMs spell them.
_ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD40: "Neoverse-V1",
    0xD49: "Neoverse-N2",
    0xD4F: "Neoverse-V2",
}


def model_tokens(name: str) -> tuple[str, ...]:
    """The normalised tokens of a CPU model name.

    >>> model_tokens("Intel(R) Xeon(R) CPU E5-2630 v4 @ 2.20GHz")
    ('intel', 'xeon', 'e5', '2630', 'v4')
    >>> model_tokens("AMD EPYC 7763 64-Core Processor")
    ('amd', 'epyc', '7763')
    """
    text = _MARKS.sub(" ", name)
    text = _PARENS.sub(" ", text)
    for pattern in (_GRAPHICS, _COMMA, _AT, _FREQ, _N_CORE, _GEN):
        text = pattern.sub(" ", text)
    tokens = (_EDGE.sub("", raw) for raw in _SPLIT.split(text.lower()))
    return tuple(token for token in tokens if token and token not in _STOP)


@dataclass(frozen=True)
class _Key:
    """What matching compares: tokens with a digit, the other words, vendor and families."""

    digits: frozenset[str]
    major: frozenset[str]
    words: frozenset[str]
    vendor: str | None
    families: frozenset[str]

    @classmethod
    def of(cls, tokens: Iterable[str], vendor: str | None = None) -> _Key:
        tokens = tuple(tokens)
        digits = frozenset(t for t in tokens if any(c.isdigit() for c in t))
        words = frozenset(t for t in tokens if t not in digits)
        if vendor is None:
            vendor = next((_VENDORS[t] for t in tokens if t in _VENDORS), None)
        return cls(
            digits=digits,
            major=frozenset(t for t in digits if not _MINOR.fullmatch(t)),
            words=words - set(_VENDORS),
            vendor=vendor,
            families=words & _FAMILIES,
        )


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdpMatch:
    """A table row for a CPU model. ``tdp_w`` is per socket."""

    name: str
    tdp_w: float
    #: Other rows that match equally well with a different TDP (the highest TDP was taken).
    alternatives: tuple[tuple[str, float], ...] = ()


class TdpTable:
    """The TDP table. Rows are normalised on demand: only those whose name contains the
    model number being looked up (every normalised token is a substring of the lower-case
    name), so that loading costs a CSV parse and a lookup a few hundred microseconds."""

    def __init__(self, rows: Iterable[tuple[str, float]]) -> None:
        self.rows: list[tuple[str, float]] = [(name.strip(), tdp) for name, tdp in rows]
        self._lower = [name.lower() for name, _ in self.rows]
        self._keys: dict[int, _Key] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _key(self, i: int) -> _Key:
        key = self._keys.get(i)
        if key is None:
            name = self.rows[i][0]
            tokens = model_tokens(name)
            vendor = next((_VENDORS[t] for t in tokens if t in _VENDORS), None)
            if vendor is None and name.startswith(("ARM", "Cortex")):
                vendor = "arm"
            key = self._keys[i] = _Key.of(tokens, vendor or "amd")  # vendor-less rows: AMD's
        return key

    def lookup(self, model: str, vendor: str | None = None) -> TdpMatch | None:
        """The row for ``model`` (any spelling), or ``None`` when no row matches safely."""
        want = _Key.of(model_tokens(model), vendor)
        if not want.major:
            return None  # "AMD EPYC", "Intel(R) Xeon(R) CPU @ 2.20GHz": no model number
        first = max(want.major, key=len)
        best: list[tuple[str, float]] = []
        best_rank: tuple[int, int, int] | None = None
        for i, lower in enumerate(self._lower):
            if first not in lower:
                continue
            name, tdp = self.rows[i]
            key = self._key(i)
            if not (want.major <= key.digits <= want.digits):
                continue
            if want.vendor and key.vendor and want.vendor != key.vendor:
                continue
            if want.families and key.families and not (want.families & key.families):
                continue
            if (want.words & _VARIANTS) != (key.words & _VARIANTS):
                continue
            rank = (len(key.digits), len(key.words & want.words), -len(key.words - want.words))
            if best_rank is None or rank > best_rank:
                best, best_rank = [(name, tdp)], rank
            elif rank == best_rank:
                best.append((name, tdp))
        if not best:
            return None
        name, tdp = max(best, key=lambda row: row[1])
        others = tuple(sorted({(n, t) for n, t in best if t != tdp}))
        return TdpMatch(name=name, tdp_w=tdp, alternatives=others)


@functools.lru_cache(maxsize=1)
def load_tdp_table() -> TdpTable:
    """Read the bundled table (once per process; about 5,000 rows)."""
    text = importlib.resources.files("green_mlops").joinpath("data/cpu-tdp.csv").read_text("utf-8")
    rows: list[tuple[str, float]] = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            tdp = float(row["TDP"])
        except (KeyError, TypeError, ValueError):
            continue
        if tdp > 0 and row.get("Name"):
            rows.append((row["Name"], tdp))
    return TdpTable(rows)


def lookup_tdp(model: str, vendor: str | None = None) -> TdpMatch | None:
    """Look ``model`` up in the bundled table; ``vendor`` ("intel", "amd", ...) if known."""
    return load_tdp_table().lookup(model, vendor)


# --- detection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU estimate needs to know about the machine's processors."""

    model: str | None
    vendor: str | None
    sockets: int
    physical_cores: int
    logical_cpus: int
    #: Where ``model`` came from ("/proc/cpuinfo", "sysctl", "registry", "platform").
    source: str
    #: False when the socket count could not be read and 1 was assumed.
    sockets_known: bool = True


def _parse_cpuinfo(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if current:
                blocks.append(current)
                current = {}
            continue
        current.setdefault(key.strip().lower(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def _vendor_of(vendor_id: str) -> str | None:
    return {"genuineintel": "intel", "authenticamd": "amd"}.get(vendor_id.strip().lower())


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _sysfs_topology(sysfs_cpu: Path) -> tuple[set[int], set[tuple[int, int]]]:
    packages: set[int] = set()
    cores: set[tuple[int, int]] = set()
    try:
        cpus = [p for p in sysfs_cpu.iterdir() if re.fullmatch(r"cpu\d+", p.name)]
    except OSError:
        return packages, cores
    for cpu in cpus:
        package = _read_int(cpu / "topology" / "physical_package_id")
        core = _read_int(cpu / "topology" / "core_id")
        if package is not None:
            packages.add(package)
            if core is not None:
                cores.add((package, core))
    return packages, cores


def _command(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _windows_model() -> str | None:
    if sys.platform != "win32":
        return None
    import winreg

    try:
        with winreg.OpenKey(
            winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
        ) as key:
            value = winreg.QueryValueEx(key, "ProcessorNameString")[0]
    except OSError:
        return None
    return str(value).strip() or None


def detect_cpu(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    sysfs_cpu: Path = Path("/sys/devices/system/cpu"),
) -> CpuInfo:
    """Detect the CPU model, sockets and cores of this machine (paths are for tests)."""
    try:
        blocks = [
            b for b in _parse_cpuinfo(cpuinfo.read_text(errors="replace")) if "processor" in b
        ]
    except OSError:
        blocks = []
    model = vendor = None
    source = "/proc/cpuinfo"
    packages: set[str] = set()
    cores: set[tuple[str, str]] = set()
    for block in blocks:
        if model is None:
            model = block.get("model name") or None
            vendor = _vendor_of(block.get("vendor_id", ""))
            implementer, part = block.get("cpu implementer"), block.get("cpu part")
            if implementer and part and (model is None or model.lower().startswith("armv")):
                try:
                    arm = _ARM_PARTS.get(int(part, 16)) if int(implementer, 16) == 0x41 else None
                except ValueError:
                    arm = None
                if arm:
                    model, vendor = arm, "arm"
        if "physical id" in block:
            packages.add(block["physical id"])
            if "core id" in block:
                cores.add((block["physical id"], block["core id"]))
    logical = len(blocks) or os.cpu_count() or 1
    sockets, physical = len(packages), len(cores)
    if not sockets:
        sys_packages, sys_cores = _sysfs_topology(sysfs_cpu)
        sockets, physical = len(sys_packages), len(sys_cores)
    if model is None and sys.platform == "darwin":
        model, source = _command("sysctl", "-n", "machdep.cpu.brand_string") or None, "sysctl"
        n_packages = _command("sysctl", "-n", "hw.packages")
        n_cores = _command("sysctl", "-n", "hw.physicalcpu")
        sockets = sockets or (int(n_packages) if n_packages.isdigit() else 0)
        physical = physical or (int(n_cores) if n_cores.isdigit() else 0)
    if model is None and sys.platform == "win32":
        model, source = _windows_model(), "registry"
    if model is None:
        model, source = platform.processor().strip() or None, "platform"
    if not physical:
        physical = psutil.cpu_count(logical=False) or logical
    if vendor is None and model:
        vendor = _Key.of(model_tokens(model)).vendor
    return CpuInfo(
        model=model,
        vendor=vendor,
        sockets=max(sockets, 1),
        physical_cores=physical,
        logical_cpus=logical,
        source=source,
        sockets_known=sockets > 0,
    )


# --- the TDP of this machine ----------------------------------------------------------------


@dataclass(frozen=True)
class TdpEstimate:
    """The TDP of all sockets together, and the basis of that number in words."""

    tdp_w: float
    basis: str
    match: TdpMatch | None = None
    #: "setting" (cpu_tdp_w), "table" (matched model) or "default" (per-core default).
    source: str = "table"


def estimate_tdp(
    info: CpuInfo, *, tdp_override: float | None = None, model_override: str | None = None
) -> TdpEstimate:
    """The TDP for the CPU estimate: ``cpu_tdp_w`` > table row x sockets > default x cores."""
    if tdp_override is not None:
        return TdpEstimate(
            tdp_override, f"TDP {tdp_override:g} W for all sockets (cpu_tdp_w setting)", None,
            "setting",
        )  # fmt: skip
    model: str | None
    if model_override is not None:
        model, origin, vendor = model_override, "cpu_model setting", None
    else:
        model, origin, vendor = info.model, f"detected from {info.source}", info.vendor
    sockets = f"{info.sockets} socket{'s' if info.sockets != 1 else ''}"
    if not info.sockets_known:
        sockets += " (assumed: socket count not readable)"
    match = lookup_tdp(model, vendor) if model else None
    if match is not None:
        total = match.tdp_w * info.sockets
        basis = (
            f"{match.name} ({origin}: {model!r}): TDP {match.tdp_w:g} W x {sockets} = "
            f"{total:g} W, from {TDP_TABLE_SOURCE}"
        )
        if match.alternatives:
            others = ", ".join(f"{n} {t:g} W" for n, t in match.alternatives)
            basis += f"; also matches {others}: took the highest"
        return TdpEstimate(total, basis, match, "table")
    total = DEFAULT_W_PER_CORE * info.physical_cores
    what = f"unknown CPU model {model!r} ({origin})" if model else "CPU model not detected"
    basis = (
        f"{what}: default {DEFAULT_W_PER_CORE:g} W/core x {info.physical_cores} physical "
        f"cores = {total:g} W ({DEFAULT_W_PER_CORE_SOURCE}); set GREEN_MLOPS_CPU_TDP_W (watts) or "
        "GREEN_MLOPS_CPU_MODEL (its name in the TDP table)"
    )
    return TdpEstimate(total, basis, None, "default")


# --- CPUs this process may use ------------------------------------------------------------


@dataclass(frozen=True)
class CpuLimit:
    """This process may use fewer CPUs than the machine has (affinity mask or cgroup quota)."""

    usable_cpus: float
    logical_cpus: int
    reason: str


def _cgroup_quota(cgroup_root: Path, proc_cgroup: Path) -> tuple[float, str] | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best: tuple[float, str] | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        relative = Path(path.lstrip("/"))
        candidates: list[tuple[Path, Path | None]]
        if controllers == "":  # cgroup v2: cpu.max is "max 100000" or "<quota> <period>"
            candidates = [
                (cgroup_root / p / "cpu.max", None) for p in (relative, *relative.parents)
            ]
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us
            base = cgroup_root / controllers
            candidates = [(base / p / "cpu.cfs_quota_us", base / p / "cpu.cfs_period_us")
                          for p in (relative, *relative.parents)]  # fmt: skip
        else:
            continue
        for quota_path, period_path in candidates:
            try:
                if period_path is None:
                    quota_text, _, period_text = quota_path.read_text().strip().partition(" ")
                else:
                    quota_text, period_text = quota_path.read_text(), period_path.read_text()
                quota, period = float(quota_text), float(period_text)
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0 and (best is None or quota / period < best[0]):
                kind = "cpu.max" if period_path is None else "cpu.cfs_quota_us"
                best = (quota / period, f"cgroup {kind} quota of {quota / period:g} CPUs")
    return best


def cpu_limit(
    logical_cpus: int,
    *,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    affinity: int | None = None,
) -> CpuLimit | None:
    """How many of the machine's ``logical_cpus`` this process may use, if fewer; else ``None``.

    The smaller of the affinity mask (:func:`os.sched_getaffinity`) and the cgroup CPU quota
    (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``, this cgroup and its ancestors).
    """
    limits: list[tuple[float, str]] = []
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
    if affinity is not None and affinity < logical_cpus:
        limits.append((float(affinity), f"CPU affinity of {affinity} CPUs"))
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None and quota[0] < logical_cpus:
        limits.append(quota)
    if not limits:
        return None
    usable, reason = min(limits)
    return CpuLimit(usable, logical_cpus, reason)
