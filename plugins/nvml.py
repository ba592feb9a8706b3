"""NVIDIA GPU energy through NVML (package ``nvidia-ml-py``, module ``pynvml``).

The board energy counter where supported (+/-5 %), else power sampled at 10 Hz (+/-10 %), for
the GPUs this process may use (``CUDA_VISIBLE_DEVICES``). See docs/energy-measurement.md.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from green_mlops.extras import install_command
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

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = [
    "COUNTER_RESOLUTION_S",
    "COUNTER_UNCERTAINTY",
    "SAMPLED_POWER_UNCERTAINTY",
    "Gap",
    "NvmlGpu",
    "NvmlMeter",
    "VisibleDevices",
    "build_meters",
    "green_mlops_meters",
    "select_visible",
]

log = logging.getLogger(__name__)

NAME = "nvml"
COUNTER_UNCERTAINTY = 0.05
SAMPLED_POWER_UNCERTAINTY = 0.10
#: Power sampling at >= 10 Hz (the sensor itself updates every 20-100 ms or averages over 1 s).
POWER_MAX_INTERVAL_S = 0.1
#: The 64-bit mJ counter does not wrap (2**64 mJ is ~585 million years at 1 kW).
COUNTER_MAX_INTERVAL_S = 60.0
#: How often the total-energy counter changes: ~100 ms as observed (NVIDIA documents no
#: figure); phases shorter than ~10x this are apportioned by power (green_mlops.tracker).
COUNTER_RESOLUTION_S = 0.1


# --- CUDA_VISIBLE_DEVICES --------------------------------------------------------------------


@dataclass(frozen=True)
class VisibleDevices:
    """``CUDA_VISIBLE_DEVICES`` resolved against NVML's GPUs.

    ``indices``: NVML indices of the GPUs this process may use, in CUDA's order.
    ``problems``: entries that select nothing measurable, and why (shown to the user).
    ``by_ordinal``: whether an entry was a number (interpreted in NVML = PCI bus order).
    """

    indices: tuple[int, ...]
    problems: tuple[str, ...] = ()
    by_ordinal: bool = False


_ORDINAL = re.compile(r"[+-]?\d+")


def select_visible(value: str | None, uuids: Sequence[str | None]) -> VisibleDevices:
    """The GPUs selected by ``CUDA_VISIBLE_DEVICES=value`` among NVML GPUs with ``uuids``.

    Mirrors CUDA as ``torch.cuda._parse_visible_devices`` documents it: unset -> every GPU;
    empty -> none; a comma list of ordinals (read like ``strtoul``: ``1gpu2`` is 1), of
    ``GPU-<uuid>`` (a unique prefix is enough) or ``MIG-...`` entries; the first invalid entry
    (negative, out of range, unknown or ambiguous UUID) ends the list; a repeated GPU yields
    no GPU at all. ``uuids[i]`` is the UUID of NVML index ``i``, ``None`` if unreadable.
    """
    if value is None:
        return VisibleDevices(tuple(range(len(uuids))))
    if not value.strip():
        return VisibleDevices(
            (), ("CUDA_VISIBLE_DEVICES is empty: this process uses no GPU, so none is measured",)
        )
    entries = value.split(",")
    chosen: list[int] = []
    problems: list[str] = []
    by_ordinal = False
    for position, raw in enumerate(entries):
        entry = raw.strip()
        ignored = ",".join(e.strip() for e in entries[position + 1 :])
        after = f"; CUDA ignores it and the entries after it ({ignored})" if ignored else ""
        if entry.startswith("MIG-"):
            problems.append(
                f"CUDA_VISIBLE_DEVICES entry {entry!r} is a MIG instance: not measured (NVML "
                "energy and power are per physical GPU, shared by all of its MIG instances)"
            )
            continue
        if entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u is not None and u.startswith(entry)]
            if len(matches) != 1:
                why = "matches no GPU" if not matches else f"matches {len(matches)} GPUs"
                problems.append(f"CUDA_VISIBLE_DEVICES entry {entry!r} {why}{after}")
                break
            index = matches[0]
        else:
            match = _ORDINAL.match(entry)
            number = int(match.group()) if match else -1
            if number < 0 or number >= len(uuids):
                why = (
                    "is not a GPU index"
                    if number < 0
                    else f"is out of range (NVML sees {len(uuids)} GPU(s))"
                )
                problems.append(f"CUDA_VISIBLE_DEVICES entry {entry!r} {why}{after}")
                break
            index, by_ordinal = number, True
        if index in chosen:
            return VisibleDevices(
                (),
                (
                    f"CUDA_VISIBLE_DEVICES={value!r} lists GPU {index} twice: CUDA then exposes "
                    "no GPU, so none is measured",
                ),
                by_ordinal,
            )
        chosen.append(index)
    return VisibleDevices(tuple(chosen), tuple(problems), by_ordinal)


# --- the meter --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvmlGpu:
    """One NVML device to measure, with the method to use for it."""

    index: int
    uuid: str
    name: str
    handle: Any
    method: Method

    @property
    def device_id(self) -> str:
        return f"gpu:{self.index}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.uuid})"


@dataclass(frozen=True)
class Gap:
    """Time during which a power-sampled device could not be read: its energy is not counted."""

    count: int = 0
    seconds: float = 0.0


class _Channel:
    """Mutable reading state of one device."""

    __slots__ = (
        "base_j",
        "energy_j",
        "gap_count",
        "gap_from",
        "gap_s",
        "gpu",
        "last_mj",
        "last_t",
        "last_w",
        "lost",
        "power_w",
        "start_mj",
    )

    def __init__(self, gpu: NvmlGpu) -> None:
        self.gpu = gpu
        self.start_mj: int | None = None  # counter at start() (or at the first good read)
        self.last_mj = 0
        self.base_j = 0.0  # energy carried over a counter reset (driver reload)
        self.energy_j = 0.0  # integrated energy (sampled power)
        self.last_t: float | None = None
        self.last_w = 0.0
        self.gap_from: float | None = None  # an open gap started at this time
        self.gap_count = 0
        self.gap_s = 0.0
        self.lost: str | None = None  # set when the GPU is gone for good
        self.power_w: float | None = None  # power at the last counter read, if readable

    def close_gap(self, now: float) -> None:
        if self.gap_from is not None:
            self.gap_count += 1
            self.gap_s += max(0.0, now - self.gap_from)
            self.gap_from = None


class NvmlMeter(Meter):
    """Energy of NVIDIA GPUs: the NVML energy counter, or integrated power where unsupported.

    Build it with :func:`build_meters`, which initialises NVML; :meth:`close` shuts NVML down
    (once per meter, balancing that ``nvmlInit``).
    """

    name = NAME

    def __init__(self, gpus: Sequence[NvmlGpu]) -> None:
        import pynvml

        super().__init__(
            [
                Device(
                    id=gpu.device_id,
                    component=Component.GPU,
                    method=gpu.method,
                    uncertainty=COUNTER_UNCERTAINTY
                    if gpu.method is Method.COUNTER
                    else SAMPLED_POWER_UNCERTAINTY,
                    label=gpu.label,
                    resolution_s=COUNTER_RESOLUTION_S if gpu.method is Method.COUNTER else 0.0,
                )
                for gpu in gpus
            ]
        )
        self._nvml: Any = pynvml
        self._vanished: tuple[type[BaseException], ...] = tuple(
            cls
            for cls in (
                getattr(pynvml, "NVMLError_GpuIsLost", None),
                getattr(pynvml, "NVMLError_NotFound", None),
                getattr(pynvml, "NVMLError_GpuNotFound", None),
            )
            if cls is not None
        )
        self._channels = [_Channel(gpu) for gpu in gpus]
        sampled = any(gpu.method is Method.SAMPLED_POWER for gpu in gpus)
        self.max_interval_s = POWER_MAX_INTERVAL_S if sampled else COUNTER_MAX_INTERVAL_S
        self._closed = False

    @property
    def gpus(self) -> tuple[NvmlGpu, ...]:
        """The measured GPUs (NVML index, UUID, name, handle, method), in device order."""
        return tuple(ch.gpu for ch in self._channels)

    @property
    def gaps(self) -> dict[str, Gap]:
        """Per device id: unread periods whose energy is missing from the readings.

        Power-sampled devices get a gap for every run of failed reads; counter devices only
        when the zero point could not be read at start or the counter went backwards (driver
        reload). Devices without gaps are left out.
        """
        return {
            ch.gpu.device_id: Gap(ch.gap_count, ch.gap_s) for ch in self._channels if ch.gap_count
        }

    def notes(self) -> list[str]:
        return [
            f"{device}: {gap.count} unread period(s), {gap.seconds:.1f} s of energy not counted"
            for device, gap in self.gaps.items()
        ]

    def power_w(self) -> dict[str, float]:
        """Power (W) of the counter devices at their last read (see ``COUNTER_RESOLUTION_S``);
        a device whose power could not be read then is left out."""
        return {
            ch.gpu.device_id: ch.power_w
            for ch in self._channels
            if ch.gpu.method is Method.COUNTER and ch.power_w is not None
        }

    def start(self, now: float | None = None) -> None:
        """Take the zero point (``now`` defaults to ``time.monotonic()``, like ``sample``'s)."""
        t = time.monotonic() if now is None else now
        for ch in self._channels:
            try:
                if ch.gpu.method is Method.COUNTER:
                    ch.start_mj = ch.last_mj = int(
                        self._nvml.nvmlDeviceGetTotalEnergyConsumption(ch.gpu.handle)
                    )
                    ch.last_t = t
                    self._read_power(ch)
                else:
                    ch.last_w = self._nvml.nvmlDeviceGetPowerUsage(ch.gpu.handle) / 1000.0
                    ch.last_t = t
            except self._nvml.NVMLError as exc:
                self._failed(ch, exc)
                ch.gap_from = t  # counted from the first good read: the time before is missing

    def sample(self, now: float) -> Readings:
        return {ch.gpu.device_id: self._read(ch, now) for ch in self._channels}

    def _read(self, ch: _Channel, now: float) -> float | DeviceError:
        if ch.lost is not None:
            return DeviceError(ch.lost)
        gpu = ch.gpu
        if gpu.method is Method.COUNTER:
            try:
                mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
            except self._nvml.NVMLError as exc:
                ch.power_w = None
                return self._failed(ch, exc)
            self._read_power(ch)
            if ch.start_mj is None or mj < ch.last_mj:
                # No zero point yet, or the counter went backwards (driver reloaded): keep what
                # was counted and restart from here; the time since the last good read is a gap.
                if ch.start_mj is not None:
                    ch.base_j += (ch.last_mj - ch.start_mj) / 1000.0
                    ch.gap_from = now if ch.last_t is None else ch.last_t
                ch.start_mj = mj
                ch.close_gap(now)
            ch.last_mj, ch.last_t = mj, now
            return ch.base_j + (mj - ch.start_mj) / 1000.0
        try:
            watts = self._nvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000.0
        except self._nvml.NVMLError as exc:
            if ch.gap_from is None:
                ch.gap_from = now if ch.last_t is None else ch.last_t
            return self._failed(
                ch, exc, note="; its energy until the next good read is not counted"
            )
        if ch.last_t is not None and ch.gap_from is None:
            ch.energy_j += 0.5 * (ch.last_w + watts) * max(0.0, now - ch.last_t)
        else:
            ch.close_gap(now)
        ch.last_t, ch.last_w = now, watts
        return ch.energy_j

    def _read_power(self, ch: _Channel) -> None:
        """Power beside a counter read (~1 us): only for apportioning; a failure is no error."""
        try:
            ch.power_w = self._nvml.nvmlDeviceGetPowerUsage(ch.gpu.handle) / 1000.0
        except self._nvml.NVMLError:
            ch.power_w = None

    def _failed(self, ch: _Channel, exc: BaseException, note: str = "") -> DeviceError:
        reason = f"{ch.gpu.device_id} ({ch.gpu.label}): NVML: {_text(exc)}"
        if isinstance(exc, self._vanished):
            ch.lost = f"{reason} (the GPU is gone; a reset or driver reload is needed)"
            return DeviceError(ch.lost)
        return DeviceError(reason + note)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _shutdown(self._nvml)


# --- discovery and the hook ----------------------------------------------------------------


def _text(value: object) -> str:
    """NVML strings as ``str`` (old bindings return bytes); errors as their message."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, BaseException):
        try:
            return str(value) or type(value).__name__
        except Exception:  # pynvml's __str__ asks the library, which may be unusable
            return type(value).__name__
    return str(value)


def _unavailable(
    reason: str, fix: str = "", *, quiet: bool = False, actionable: bool = True, **extra: str
) -> MeterUnavailable:
    return MeterUnavailable(
        name=NAME,
        component=Component.GPU,
        reason=reason,
        fix=fix,
        quiet=quiet,
        extra=extra,
        actionable=actionable,
    )


def driver_present() -> bool:
    """An NVIDIA kernel driver is loaded here (so a missing nvidia-ml-py is the user's to fix)."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl"))


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as exc:
        log.debug("nvmlShutdown failed: %s", _text(exc))


def _init_failure(nvml: Any, exc: BaseException) -> MeterUnavailable:
    def is_(name: str) -> bool:
        cls = getattr(nvml, name, None)
        return cls is not None and isinstance(exc, cls)

    if is_("NVMLError_LibraryNotFound"):
        return _unavailable(
            "no NVIDIA driver (libnvidia-ml.so not found)",
            "nothing to do on a machine without NVIDIA GPUs; otherwise install the NVIDIA driver",
            quiet=True,  # the normal state of a CPU-only host
        )
    if is_("NVMLError_DriverNotLoaded"):
        return _unavailable(
            "the NVIDIA kernel driver is not loaded (libnvidia-ml.so is present)",
            "check `nvidia-smi`; load the driver (modprobe nvidia) or reinstall it",
        )
    if is_("NVMLError_LibRmVersionMismatch"):
        return _unavailable(
            "NVML library and kernel driver versions differ (driver updated without reboot)",
            "reboot, or reload the nvidia kernel modules",
        )
    if is_("NVMLError_NoPermission"):
        return _unavailable(
            "no permission to use NVML",
            "check permissions on /dev/nvidia*; in a container, expose the GPUs to it",
        )
    return _unavailable(f"NVML failed to initialise: {_text(exc)}", "check `nvidia-smi`")


def _probe(
    nvml: Any, index: int, uuid: str, name: str, handle: Any, *, power_only: bool
) -> NvmlGpu | MeterUnavailable:
    """Pick the best method a device supports, by reading it once."""
    counter = "not tried (power sampling forced)"
    if not power_only:
        try:
            if int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) > 0:
                return NvmlGpu(index, uuid, name, handle, Method.COUNTER)
            counter = "reads 0 (as on vGPUs)"
        except nvml.NVMLError as exc:
            counter = _text(exc)
    try:
        if nvml.nvmlDeviceGetPowerUsage(handle) > 0:
            return NvmlGpu(index, uuid, name, handle, Method.SAMPLED_POWER)
        power = "reads 0 (as on vGPUs)"
    except nvml.NVMLError as exc:
        power = _text(exc)
    return _unavailable(
        f"gpu:{index} ({name} {uuid}) is not measured: energy counter: {counter}; "
        f"power reading: {power}",
        "the energy counter needs a Volta or newer GPU and power readings need power "
        "management support (see `nvidia-smi -q -d POWER`)",
        device=f"gpu:{index}",
    )


def _warn_order(value: str, names: Sequence[str], environ: Mapping[str, str]) -> None:
    if len(set(names)) < 2 or environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return
    warn_once(
        f"nvml: CUDA_VISIBLE_DEVICES={value} uses indices and this machine has different GPU "
        f"models ({', '.join(sorted(set(names)))}). green-mlops reads indices in NVML (PCI bus) "
        "order, but CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so the "
        "GPUs measured may not be the GPUs used. Set CUDA_DEVICE_ORDER=PCI_BUS_ID, or list "
        "GPU-<uuid> entries.",
        fix=True,
    )


def _discover(
    nvml: Any, environ: Mapping[str, str], power_only: bool
) -> list[Meter | MeterUnavailable]:
    count = int(nvml.nvmlDeviceGetCount())
    if count == 0:
        return [_unavailable("NVML works but reports no GPU", "check `nvidia-smi`")]
    found: list[tuple[Any, str, str] | str] = []  # (handle, uuid, name), or why not readable
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            found.append(
                (
                    handle,
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                )
            )
        except nvml.NVMLError as exc:
            found.append(_text(exc))
    value = environ.get("CUDA_VISIBLE_DEVICES")
    visible = select_visible(value, [g[1] if isinstance(g, tuple) else None for g in found])
    hidden = value is not None and not value.strip()  # no GPU on purpose: not worth a warning
    results: list[Meter | MeterUnavailable] = [
        _unavailable(problem, "" if hidden else "correct CUDA_VISIBLE_DEVICES", quiet=hidden)
        for problem in visible.problems
    ]
    if value is not None and visible.by_ordinal:
        _warn_order(value, [g[2] for g in found if isinstance(g, tuple)], environ)
    gpus: list[NvmlGpu] = []
    for index in visible.indices:
        entry = found[index]
        if isinstance(entry, str):
            results.append(
                _unavailable(
                    f"gpu:{index} cannot be opened: NVML: {entry}",
                    "check `nvidia-smi`",
                    device=f"gpu:{index}",
                )
            )
            continue
        probed = _probe(nvml, index, entry[1], entry[2], entry[0], power_only=power_only)
        if isinstance(probed, NvmlGpu):
            gpus.append(probed)
        else:
            results.append(probed)
    if gpus:
        results.insert(0, NvmlMeter(gpus))
    return results


def build_meters(
    environ: Mapping[str, str] | None = None, *, power_only: bool = False
) -> list[Meter | MeterUnavailable]:
    """Initialise NVML and return one :class:`NvmlMeter` for the visible GPUs, plus a
    :class:`MeterUnavailable` for everything that cannot be measured and why.

    ``environ`` defaults to ``os.environ`` (for ``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``).
    ``power_only=True`` skips the energy counter and integrates sampled power on every GPU
    (for comparing the two methods, as ``benchmarks/gpu_check.py`` does).
    """
    env = os.environ if environ is None else environ
    try:
        import pynvml
    except ImportError:
        return [
            _unavailable(
                "nvidia-ml-py (module pynvml) is not installed",
                f"{install_command('nvidia')} (it brings nvidia-ml-py)",
                actionable=driver_present(),
            )
        ]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [_init_failure(pynvml, exc)]
    try:
        results = _discover(pynvml, env, power_only)
    except pynvml.NVMLError as exc:
        results = [_unavailable(f"NVML failed to list GPUs: {_text(exc)}", "check `nvidia-smi`")]
    except BaseException:
        _shutdown(pynvml)
        raise
    if not any(isinstance(r, NvmlMeter) for r in results):
        _shutdown(pynvml)  # no meter owns this nvmlInit
    return results


@hookimpl
def green_mlops_meters(settings: Settings) -> list[Meter | MeterUnavailable]:
    """NVML meters for the GPUs of ``CUDA_VISIBLE_DEVICES`` (``settings`` has nothing for it)."""
    return build_meters(os.environ)
