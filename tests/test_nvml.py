"""The NVML GPU meter. NVIDIA hardware is faked at the ``pynvml`` function boundary only: the real
``pynvml`` module's functions are monkeypatched to a small GPU model, and failures are pynvml's
real ``NVMLError`` subclasses."""

from __future__ import annotations

import ctypes
import logging
import sys
import time
import warnings
from collections.abc import Iterator

import pynvml
import pytest

from green_mlops import GreenMlopsWarning, Tracker
from green_mlops import log as log_module
from green_mlops.config import Settings
from green_mlops.meters import Component, DeviceError, Meter, MeterUnavailable, Method
from green_mlops.plugin_manager import create_plugin_manager
from green_mlops.plugins import nvml
from green_mlops.plugins.nvml import Gap, NvmlMeter, build_meters, select_visible
from green_mlops.snapshot import Snapshot
from tests.conftest import ManualClock

H100 = "NVIDIA H100 80GB HBM3"
UUID0 = "GPU-11111111-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-22222222-aaaa-bbbb-cccc-000000000001"
UUID2 = "GPU-22223333-aaaa-bbbb-cccc-000000000002"


class FakeGpu:
    """One GPU as NVML shows it. ``None`` for energy or power means the read is not supported."""

    def __init__(
        self,
        uuid: str,
        name: str = H100,
        energy_mj: int | None = 5_000_000,
        power_mw: int | None = 250_000,
    ) -> None:
        self.uuid, self.name = uuid, name
        self.energy_mj, self.power_mw = energy_mj, power_mw
        self.error: type[pynvml.NVMLError] | None = None  # raised by every read while set
        self.open_error: type[pynvml.NVMLError] | None = None  # raised by GetHandleByIndex
        self.reads = 0

    def add_energy(self, mj: int) -> None:
        assert self.energy_mj is not None
        self.energy_mj += mj


class CoarseCounterGpu(FakeGpu):
    """A GPU whose total-energy counter changes only every ``update_s`` of its own clock, as
    NVML's does: a read returns the true energy at the last update instant (the GPU's clock
    is ``offset_s`` out of step with the host's). Power reads give the power the test set."""

    def __init__(
        self, uuid: str, clock: ManualClock, *, watts: float, update_s: float, offset_s: float
    ) -> None:
        super().__init__(uuid)
        self.clock, self.update_s, self.offset_s = clock, update_s, offset_s
        # (from, true mJ then, watts since): on since well before the test starts
        self.segments = [(clock() - 100.0, 7_000_000.0, watts)]

    def set_power(self, watts: float) -> None:
        now = self.clock()
        self.segments.append((now, self.true_mj(now), watts))

    def true_mj(self, t: float) -> float:
        start, mj, watts = next(seg for seg in reversed(self.segments) if seg[0] <= t)
        return mj + watts * (t - start) * 1000.0

    @property
    def energy_mj(self) -> int:
        steps = (self.clock() - self.offset_s) // self.update_s
        return int(self.true_mj(self.offset_s + steps * self.update_s))

    @energy_mj.setter
    def energy_mj(self, value: int | None) -> None:  # FakeGpu.__init__ sets it: ignored
        pass

    @property
    def power_mw(self) -> int:
        return int(self.segments[-1][2] * 1000)

    @power_mw.setter
    def power_mw(self, value: int | None) -> None:
        pass


class FakeNvml:
    """The NVML library: reference-counted init/shutdown, GPUs in NVML (PCI bus) order."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.init_error: type[pynvml.NVMLError] | None = None
        self.refcount = 0
        self.inits = 0
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetName",
            "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetPowerUsage",
        ):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _initialised(self) -> None:
        if self.refcount == 0:
            raise pynvml.NVMLError_Uninitialized()

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self.refcount += 1
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._initialised()
        self.refcount -= 1
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._initialised()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._initialised()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        gpu = self.gpus[index]
        if gpu.open_error is not None:
            raise gpu.open_error()
        return gpu

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._initialised()
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._initialised()
        return handle.name

    def _read(self, handle: FakeGpu, value: int | None) -> int:
        self._initialised()
        handle.reads += 1
        if handle.error is not None:
            raise handle.error()
        if value is None:
            raise pynvml.NVMLError_NotSupported()
        return value

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        return self._read(handle, handle.energy_mj)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return self._read(handle, handle.power_mw)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    lib = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
    lib.install(monkeypatch)
    monkeypatch.setattr(log_module, "_warned", set())  # each test sees its warnings once
    yield lib


def only_meter(results: list[Meter | MeterUnavailable]) -> NvmlMeter:
    meters = [r for r in results if isinstance(r, Meter)]
    assert len(meters) == 1, results
    assert isinstance(meters[0], NvmlMeter)
    return meters[0]


def unavailable(results: list[Meter | MeterUnavailable]) -> list[MeterUnavailable]:
    return [r for r in results if isinstance(r, MeterUnavailable)]


# --- methods ----------------------------------------------------------------------------------


def test_counter_path_reports_joules_since_start(fake: FakeNvml) -> None:
    results = build_meters(environ={})
    meter = only_meter(results)
    assert unavailable(results) == []
    assert [d.id for d in meter.devices] == ["gpu:0", "gpu:1"]
    for device, uuid in zip(meter.devices, (UUID0, UUID1), strict=True):
        assert device.component is Component.GPU
        assert device.method is Method.COUNTER
        assert device.uncertainty == nvml.COUNTER_UNCERTAINTY
        assert H100 in device.label and uuid in device.label
    assert meter.max_interval_s == nvml.COUNTER_MAX_INTERVAL_S

    meter.start()
    fake.gpus[0].add_energy(1_500)
    assert meter.sample(time.monotonic()) == {"gpu:0": 1.5, "gpu:1": 0.0}
    fake.gpus[0].add_energy(250_000)
    fake.gpus[1].add_energy(10)
    assert meter.sample(time.monotonic()) == {"gpu:0": 251.5, "gpu:1": 0.01}
    assert meter.gaps == {}
    meter.close()


def test_counter_unsupported_integrates_power_with_trapezoids(fake: FakeNvml) -> None:
    fake.gpus[0].energy_mj = None
    fake.gpus[0].power_mw = 200_000
    meter = only_meter(build_meters(environ={}))
    methods = {d.id: d.method for d in meter.devices}
    assert methods == {"gpu:0": Method.SAMPLED_POWER, "gpu:1": Method.COUNTER}
    assert meter.devices[0].uncertainty == nvml.SAMPLED_POWER_UNCERTAINTY
    assert meter.max_interval_s == nvml.POWER_MAX_INTERVAL_S <= 0.1

    meter.start(now=100.0)
    fake.gpus[0].power_mw = 300_000
    assert meter.sample(100.5)["gpu:0"] == pytest.approx(0.5 * (200 + 300) * 0.5)  # 125 J
    assert meter.sample(101.5)["gpu:0"] == pytest.approx(125 + 300 * 1.0)
    fake.gpus[0].power_mw = 100_000
    assert meter.sample(101.6)["gpu:0"] == pytest.approx(425 + 0.5 * (300 + 100) * 0.1)
    meter.close()


def test_sampled_power_over_real_time(fake: FakeNvml) -> None:
    """start() without ``now`` uses time.monotonic(), the clock the sampler passes to sample()."""
    fake.gpus[0].energy_mj = None
    meter = only_meter(build_meters(environ={"CUDA_VISIBLE_DEVICES": "0"}))
    before = time.monotonic()
    meter.start()
    after = time.monotonic()
    time.sleep(0.05)
    now = time.monotonic()
    joules = meter.sample(now)["gpu:0"]
    assert isinstance(joules, float)
    assert 250.0 * (now - after) <= joules <= 250.0 * (now - before)  # constant 250 W
    meter.close()


# --- a counter that changes every ~100 ms ------------------------------------------------------


def coarse_tracker(
    monkeypatch: pytest.MonkeyPatch, offset_s: float, watts: float = 300.0
) -> tuple[Tracker, CoarseCounterGpu, ManualClock]:
    clock = ManualClock()
    gpu = CoarseCounterGpu(UUID0, clock, watts=watts, update_s=0.1, offset_s=offset_s)
    FakeNvml([gpu]).install(monkeypatch)
    meter = only_meter(build_meters(environ={}))
    return Tracker(meters=[meter], sample_interval_s=60, clock=clock).start(), gpu, clock


def boundary(tracker: Tracker, name: str, entering: bool) -> None:
    """A phase boundary and the counter read it triggers, in this thread (the sampler thread
    would do the same read a moment later)."""
    (tracker.enter if entering else tracker.exit)(name, precise=False)
    tracker.sample_now(counters_only=True)


def run_phases(tracker: Tracker, clock: ManualClock, phases: list[tuple[str, float]]) -> None:
    for name, seconds in phases:
        boundary(tracker, name, True)
        clock.advance(seconds)
        boundary(tracker, name, False)


@pytest.mark.parametrize(
    "offset_s",
    [0.0505, 0.0785, 0.0795, 0.0990],  # the counter changes inside the 29 ms phase, or after
)
def test_a_phase_shorter_than_the_counter_step_gets_power_x_time(
    monkeypatch: pytest.MonkeyPatch, offset_s: float
) -> None:
    """A 29 ms validation at 200 W after 2 s of training at 300 W: 5.8 J, not 0 J or a whole
    counter step (~30 J); the total stays within one step (0.1 s x 300 W) of the counter."""
    tracker, gpu, clock = coarse_tracker(monkeypatch, offset_s)
    start_mj = gpu.energy_mj
    run_phases(tracker, clock, [("train", 2.05)])
    gpu.set_power(200.0)
    run_phases(tracker, clock, [("validation", 0.029)])
    gpu.set_power(300.0)
    run_phases(tracker, clock, [("train", 2.0)])
    snap = tracker.stop()

    val = snap.phases["validation"]
    assert val.duration_s == pytest.approx(0.029)
    assert val.joules == pytest.approx(200.0 * 0.029, rel=0.10)
    assert snap.phases["train"].joules == pytest.approx(300.0 * 4.05, rel=0.02)
    (device,) = snap.devices
    counted = (gpu.energy_mj - start_mj) / 1000.0
    assert counted <= device.joules <= counted + 300.0 * 0.1 + 1e-9
    assert sum(p.joules for p in snap.phases.values()) == pytest.approx(snap.joules, rel=1e-9)
    assert_resolution_provenance(snap)


def assert_resolution_provenance(snap: Snapshot) -> None:
    (device,) = snap.devices
    assert device.method == "counter" and device.resolution_s == nvml.COUNTER_RESOLUTION_S
    (note,) = [n for n in snap.notes if n.startswith("gpu:0")]
    assert "changes every ~0.1 s" in note and "apportioned by power x time" in note


def test_many_short_phases_in_step_with_the_counter_keep_their_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Epochs of exactly 0.5 s: every 29 ms validation sees the counter at the same point of
    its 100 ms step (here: no change inside it). Validation's share must stay 29/500."""
    tracker, _, clock = coarse_tracker(monkeypatch, offset_s=0.0505)
    for _ in range(40):
        run_phases(tracker, clock, [("train", 0.471), ("validation", 0.029)])
    snap = tracker.stop()
    val, train = snap.phases["validation"], snap.phases["train"]
    assert val.joules == pytest.approx(300.0 * 40 * 0.029, rel=0.05)
    assert train.joules == pytest.approx(300.0 * 40 * 0.471, rel=0.02)
    assert_resolution_provenance(snap)


def test_without_power_readings_a_coarse_counter_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, gpu, clock = coarse_tracker(monkeypatch, offset_s=0.05)
    gpu.error = None
    monkeypatch.setattr(
        pynvml,
        "nvmlDeviceGetPowerUsage",
        lambda handle: (_ for _ in ()).throw(pynvml.NVMLError_NotSupported()),
    )
    run_phases(tracker, clock, [("train", 1.0), ("validation", 0.029)])
    snap = tracker.stop()
    (note,) = [n for n in snap.notes if n.startswith("gpu:0")]
    assert "no power reading" in note
    assert snap.devices[0].status == "ok"


def test_power_only_skips_the_counter(fake: FakeNvml) -> None:
    meter = only_meter(build_meters(environ={}, power_only=True))
    assert {d.method for d in meter.devices} == {Method.SAMPLED_POWER}
    assert meter.max_interval_s == nvml.POWER_MAX_INTERVAL_S
    meter.close()


def test_device_supporting_neither_is_unavailable_not_zero(fake: FakeNvml) -> None:
    fake.gpus[1].energy_mj = None
    fake.gpus[1].power_mw = None
    results = build_meters(environ={})
    meter = only_meter(results)
    assert [d.id for d in meter.devices] == ["gpu:0"]
    (missing,) = unavailable(results)
    assert missing.name == "nvml" and missing.component is Component.GPU
    assert missing.extra == {"device": "gpu:1"}
    assert "gpu:1" in missing.reason and "Not Supported" in missing.reason
    assert "Volta" in missing.fix
    meter.close()
    assert fake.refcount == 0


def test_zero_readings_count_as_unsupported(fake: FakeNvml) -> None:
    """vGPUs can answer 0: the counter falls back to power, and 0 W everywhere is unavailable."""
    fake.gpus[0].energy_mj = 0
    fake.gpus[1].energy_mj = 0
    fake.gpus[1].power_mw = 0
    results = build_meters(environ={})
    meter = only_meter(results)
    assert [(d.id, d.method) for d in meter.devices] == [("gpu:0", Method.SAMPLED_POWER)]
    (missing,) = unavailable(results)
    assert "reads 0" in missing.reason
    meter.close()


def test_no_measurable_gpu_gives_no_meter_and_balances_init(fake: FakeNvml) -> None:
    for gpu in fake.gpus:
        gpu.energy_mj = gpu.power_mw = None
    results = build_meters(environ={})
    assert len(unavailable(results)) == 2 and len(results) == 2
    assert (fake.inits, fake.shutdowns, fake.refcount) == (1, 1, 0)


# --- faults -----------------------------------------------------------------------------------


def test_counter_error_mid_run_then_recovery(fake: FakeNvml) -> None:
    meter = only_meter(build_meters(environ={}))
    meter.start(now=0.0)
    fake.gpus[0].add_energy(1_000)
    assert meter.sample(0.1)["gpu:0"] == 1.0

    fake.gpus[0].error = pynvml.NVMLError_Unknown
    fake.gpus[0].add_energy(2_000)
    fake.gpus[1].add_energy(3_000)
    readings = meter.sample(0.2)
    failure = readings["gpu:0"]
    assert isinstance(failure, DeviceError)
    assert "gpu:0" in failure.reason and "Unknown Error" in failure.reason
    assert readings["gpu:1"] == 3.0  # the other GPU continues

    fake.gpus[0].error = None
    assert meter.sample(0.3)["gpu:0"] == 3.0  # the counter is absolute: nothing was lost
    assert meter.gaps == {}
    meter.close()


def test_power_error_mid_run_leaves_a_recorded_gap(fake: FakeNvml) -> None:
    fake.gpus[0].energy_mj = None  # power-sampled at 250 W
    meter = only_meter(build_meters(environ={}))
    meter.start(now=10.0)
    assert meter.sample(10.1)["gpu:0"] == pytest.approx(25.0)

    fake.gpus[0].error = pynvml.NVMLError_Timeout
    for now in (10.2, 10.3):
        failure = meter.sample(now)["gpu:0"]
        assert isinstance(failure, DeviceError)
        assert "Timeout" in failure.reason and "not counted" in failure.reason
    assert meter.sample(10.3)["gpu:1"] == 0.0  # the counter GPU is unaffected

    fake.gpus[0].error = None
    assert meter.sample(10.5)["gpu:0"] == pytest.approx(25.0)  # 10.1..10.5 is not invented
    assert meter.sample(10.6)["gpu:0"] == pytest.approx(50.0)  # integration resumes
    assert meter.gaps == {"gpu:0": Gap(count=1, seconds=pytest.approx(0.4))}
    meter.close()


@pytest.mark.parametrize("error", [pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_NotFound])
def test_vanished_gpu_is_a_lasting_device_error(fake: FakeNvml, error: type) -> None:
    meter = only_meter(build_meters(environ={}))
    meter.start(now=0.0)
    fake.gpus[1].error = error
    readings = meter.sample(0.1)
    assert readings["gpu:0"] == 0.0
    lost = readings["gpu:1"]
    assert isinstance(lost, DeviceError) and "gone" in lost.reason
    reads = fake.gpus[1].reads
    fake.gpus[1].error = None  # a lost handle stays lost: it is not read again
    assert meter.sample(0.2)["gpu:1"] == lost
    assert fake.gpus[1].reads == reads
    meter.close()


def test_failed_start_counts_from_the_first_good_read_as_a_gap(fake: FakeNvml) -> None:
    meter = only_meter(build_meters(environ={}))
    fake.gpus[0].error = pynvml.NVMLError_Unknown
    meter.start(now=1.0)
    assert isinstance(meter.sample(1.5)["gpu:0"], DeviceError)
    fake.gpus[0].error = None
    assert meter.sample(2.0)["gpu:0"] == 0.0
    fake.gpus[0].add_energy(700)
    assert meter.sample(2.5)["gpu:0"] == 0.7
    assert meter.gaps == {"gpu:0": Gap(1, 1.0)}
    meter.close()


def test_counter_going_backwards_keeps_the_total(fake: FakeNvml) -> None:
    meter = only_meter(build_meters(environ={"CUDA_VISIBLE_DEVICES": "0"}))
    meter.start(now=0.0)
    fake.gpus[0].add_energy(4_000)
    assert meter.sample(1.0)["gpu:0"] == 4.0
    fake.gpus[0].energy_mj = 100  # driver reloaded
    assert meter.sample(2.0)["gpu:0"] == 4.0
    fake.gpus[0].energy_mj = 600
    assert meter.sample(3.0)["gpu:0"] == 4.5
    assert meter.gaps == {"gpu:0": Gap(1, 1.0)}
    meter.close()


def test_unopenable_gpu_is_reported_and_others_measured(fake: FakeNvml) -> None:
    fake.gpus[0].open_error = pynvml.NVMLError_NoPermission
    results = build_meters(environ={})
    assert [d.id for d in only_meter(results).devices] == ["gpu:1"]
    (missing,) = unavailable(results)
    assert "gpu:0" in missing.reason and "Insufficient Permissions" in missing.reason


# --- init, close, the hook --------------------------------------------------------------------


def test_library_not_found_is_a_quiet_unavailable(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVMLError_LibraryNotFound
    (missing,) = build_meters(environ={})
    assert isinstance(missing, MeterUnavailable)
    assert missing.reason == "no NVIDIA driver (libnvidia-ml.so not found)"
    assert missing.quiet and missing.component is Component.GPU
    assert fake.shutdowns == 0


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (pynvml.NVMLError_DriverNotLoaded, "driver is not loaded"),
        (pynvml.NVMLError_LibRmVersionMismatch, "versions differ"),
        (pynvml.NVMLError_NoPermission, "no permission"),
        (pynvml.NVMLError_Unknown, "failed to initialise: Unknown Error"),
    ],
)
def test_init_failure_with_a_library_is_explained(
    fake: FakeNvml, error: type[pynvml.NVMLError], words: str
) -> None:
    fake.init_error = error
    (missing,) = build_meters(environ={})
    assert isinstance(missing, MeterUnavailable)
    assert words in missing.reason and missing.fix and not missing.quiet
    assert fake.shutdowns == 0


def test_pynvml_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    (missing,) = build_meters(environ={})
    assert isinstance(missing, MeterUnavailable)
    assert "not installed" in missing.reason and "nvidia-ml-py" in missing.fix


def test_pynvml_missing_warns_the_user_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GPU user without the extra gets a GreenMlopsWarning that says what to install.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(log_module, "_warned", set())
    monkeypatch.setattr(nvml, "driver_present", lambda: True)  # the NVIDIA driver this host lacks
    fix = r'is not installed\. Fix: pip install "green-mlops\[nvidia\]" \(it brings nvidia-ml-py\)'
    with pytest.warns(GreenMlopsWarning, match=fix):
        snap = Tracker(disable_plugins="rapl,cpu_estimate,ram_estimate").start().stop()
    assert any('pip install "green-mlops[nvidia]"' in text for text in snap.unavailable)


def test_pynvml_missing_without_a_driver_is_said_but_is_no_user_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A CPU-only host without the extra has nothing to fix: a log record, no GreenMlopsWarning
    # (which `-W error` or filterwarnings=error would turn against the user's job).
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(log_module, "_warned", set())
    monkeypatch.setattr(nvml, "driver_present", lambda: False)
    caplog.set_level(logging.WARNING, logger="green_mlops")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreenMlopsWarning)
        snap = Tracker(disable_plugins="rapl,cpu_estimate,ram_estimate").start().stop()
    assert any("nvidia-ml-py (module pynvml) is not installed" in t for t in snap.unavailable)
    assert any("is not installed" in r.getMessage() for r in caplog.records)


def test_close_shuts_nvml_down_once(fake: FakeNvml) -> None:
    meter = only_meter(build_meters(environ={}))
    assert fake.refcount == 1
    meter.start()
    meter.close()
    meter.close()
    assert (fake.inits, fake.shutdowns, fake.refcount) == (1, 1, 0)


def test_two_meters_each_own_an_init(fake: FakeNvml) -> None:
    """NVML's init is reference-counted: a counter and a power-only meter can coexist."""
    first = only_meter(build_meters(environ={}))
    second = only_meter(build_meters(environ={}, power_only=True))
    first.close()
    second.start(now=0.0)
    assert second.sample(0.1)["gpu:0"] == pytest.approx(25.0)  # NVML still initialised
    second.close()
    assert fake.refcount == 0


def test_hook_reads_cuda_visible_devices(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    results = nvml.green_mlops_meters(Settings.load(environ={}))
    meter = only_meter(results)
    assert [d.id for d in meter.devices] == ["gpu:1"]
    meter.close()


def _real_nvml_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_real_nvml_present(), reason="this machine has a real NVIDIA driver")
def test_hook_unpatched_without_driver_returns_unavailable() -> None:
    pm = create_plugin_manager()
    results = [
        item
        for batch in pm.hook.green_mlops_meters(settings=Settings.load(environ={}))
        for item in batch or ()
        if item.name == "nvml"
    ]
    assert results == [
        MeterUnavailable(
            name="nvml",
            component=Component.GPU,
            reason="no NVIDIA driver (libnvidia-ml.so not found)",
            fix="nothing to do on a machine without NVIDIA GPUs; otherwise install the NVIDIA "
            "driver",
            quiet=True,
        )
    ]


# --- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------

UUIDS = [UUID0, UUID1, UUID2]


@pytest.mark.parametrize(
    ("value", "indices"),
    [
        (None, (0, 1, 2)),
        ("2", (2,)),
        ("2,0", (2, 0)),
        (" 1 , 0", (1, 0)),
        ("1gpu2", (1,)),  # read like strtoul, as CUDA does
        (UUID1, (1,)),
        (f"{UUID2},{UUID0}", (2, 0)),
        ("GPU-1111", (0,)),  # a unique prefix is enough
        (f"0,{UUID2}", (0, 2)),
    ],
)
def test_select_visible_accepts(value: str | None, indices: tuple[int, ...]) -> None:
    visible = select_visible(value, UUIDS)
    assert visible.indices == indices and visible.problems == ()


@pytest.mark.parametrize(
    ("value", "indices", "problem"),
    [
        ("", (), "is empty: this process uses no GPU"),
        ("0,x,1", (0,), "'x' is not a GPU index; CUDA ignores it and the entries after it (1)"),
        ("1,-1,0", (1,), "'-1' is not a GPU index"),
        ("0,,1", (0,), "'' is not a GPU index"),
        ("2,3", (2,), "'3' is out of range (NVML sees 3 GPU(s))"),
        ("GPU-2222,0", (), "'GPU-2222' matches 2 GPUs; CUDA ignores it"),
        ("GPU-9999", (), "'GPU-9999' matches no GPU"),
        ("0,2,0", (), "lists GPU 0 twice: CUDA then exposes no GPU"),
        (f"{UUID0},GPU-1111", (), "lists GPU 0 twice"),
        ("MIG-abc,1", (1,), "'MIG-abc' is a MIG instance: not measured"),
    ],
)
def test_select_visible_reports(value: str, indices: tuple[int, ...], problem: str) -> None:
    visible = select_visible(value, UUIDS)
    assert visible.indices == indices
    assert len(visible.problems) == 1 and problem in visible.problems[0]


def test_unreadable_uuid_matches_nothing() -> None:
    assert select_visible(UUID1, [UUID0, None]).indices == ()


def test_visible_devices_through_build_meters(fake: FakeNvml) -> None:
    results = build_meters(environ={"CUDA_VISIBLE_DEVICES": f"{UUID1[:12]},7"})
    assert [d.id for d in only_meter(results).devices] == ["gpu:1"]
    (problem,) = unavailable(results)
    assert "'7' is out of range" in problem.reason and problem.fix and not problem.quiet

    (empty,) = build_meters(environ={"CUDA_VISIBLE_DEVICES": ""})
    assert isinstance(empty, MeterUnavailable) and empty.quiet and "no GPU" in empty.reason

    (mig,) = build_meters(environ={"CUDA_VISIBLE_DEVICES": "MIG-4f7e"})
    assert isinstance(mig, MeterUnavailable) and "MIG" in mig.reason
    assert fake.refcount == 1  # only the first call's meter is still open
    only_meter(results).close()
    assert fake.refcount == 0


def test_heterogeneous_indices_warn_once_about_device_order(fake: FakeNvml) -> None:
    fake.gpus[1].name = "NVIDIA A100-SXM4-40GB"
    with pytest.warns(GreenMlopsWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID") as record:
        for _ in range(2):
            only_meter(build_meters(environ={"CUDA_VISIBLE_DEVICES": "1"})).close()
    warnings = [str(w.message) for w in record if issubclass(w.category, GreenMlopsWarning)]
    assert len(warnings) == 1
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in warnings[0] and "A100" in warnings[0]


@pytest.mark.parametrize(
    "environ",
    [
        {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        {"CUDA_VISIBLE_DEVICES": UUID1},
        {},
    ],
)
def test_no_order_warning_when_order_cannot_matter(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture, environ: dict[str, str]
) -> None:
    fake.gpus[1].name = "NVIDIA A100-SXM4-40GB"
    caplog.set_level(logging.WARNING, logger=nvml.__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreenMlopsWarning)  # a warning would raise here
        only_meter(build_meters(environ=environ)).close()
    assert caplog.records == []


def test_same_model_indices_do_not_warn(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=nvml.__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreenMlopsWarning)  # a warning would raise here
        only_meter(build_meters(environ={"CUDA_VISIBLE_DEVICES": "1,0"})).close()
    assert caplog.records == []
