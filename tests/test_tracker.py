"""The engine: attribution to phases, lifecycle, faults, fork and exit, with real threads."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from green_mlops import GreenMlopsWarning, Tracker
from green_mlops import log as log_module
from green_mlops.config import ConfigError
from green_mlops.meters import Component, Device, Meter, MeterUnavailable, Method, Readings
from green_mlops.metrics import energy_metrics, power_series, provenance_tags
from green_mlops.sampler import Sampler
from green_mlops.tracker import MeterPart, select_meters
from tests.conftest import ClockMeter, ManualClock


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "green-mlops-sampler"]


class ClockedMeter(ClockMeter):
    """A ClockMeter whose zero point is taken on a ManualClock (the tracker passes the same
    clock's time to ``sample``): energy = watts x the clock's time since start, exactly."""

    def __init__(self, clock: ManualClock, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clock = clock

    def start(self) -> None:
        self._t0 = self.clock()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``condition()`` until true or ``timeout`` seconds pass (real time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_phases_are_exclusive_nested_and_sum_to_the_total() -> None:
    clock = ManualClock()
    clock_meter = ClockedMeter(clock)
    tracker = Tracker(meters=[clock_meter], clock=clock).start()
    with tracker.phase("train"):
        clock.advance(0.3)
        with tracker.phase("validation"):
            clock.advance(0.2)
        clock.advance(0.1)
    clock.advance(0.1)
    assert wait_for(lambda: "green-mlops-sampler" in clock_meter.threads)
    snap = tracker.stop()

    train, val, other = snap.phases["train"], snap.phases["validation"], snap.phases["other"]
    assert train.entries == 1 and val.entries == 1
    # energy = 100 W x time, so each phase's joules must match 100 x its duration
    for phase in (train, val, other):
        assert phase.joules == pytest.approx(100 * phase.duration_s, rel=0.02, abs=0.5)
    assert train.duration_s == pytest.approx(0.4, abs=0.05)
    assert val.duration_s == pytest.approx(0.2, abs=0.05)
    assert sum(p.joules for p in snap.phases.values()) == pytest.approx(snap.joules, rel=1e-9)
    assert snap.joules == pytest.approx(100 * snap.duration_s, abs=1.0)
    assert snap.devices[0].method == "counter" and snap.devices[0].status == "ok"
    assert not snap.running and clock_meter.closed
    # the sampler thread, not the caller, did the periodic reads
    assert "green-mlops-sampler" in clock_meter.threads


class SlowStartMeter(ClockedMeter):
    """A meter whose start takes ``seconds`` of the clock (NVML's first init can take a second)."""

    def __init__(self, clock: ManualClock, seconds: float, **kwargs: object) -> None:
        super().__init__(clock, **kwargs)
        self.seconds = seconds

    def start(self) -> None:
        super().start()
        self.clock.advance(self.seconds)


def test_energy_counts_from_the_trackers_zero_point_not_each_meters_start() -> None:
    # the first meter counts from its own start; the second takes 2 s to start; the run's
    # time begins after both: its energy must cover the same window as its duration
    clock = ManualClock()
    first = ClockedMeter(clock, name="first", device="cpu:first")
    slow = SlowStartMeter(
        clock, 2.0, name="slow", component=Component.RAM, device="ram:slow", watts=10.0
    )
    tracker = Tracker(meters=[first, slow], clock=clock).start()
    with tracker.phase("train"):
        clock.advance(1.0)
    snap = tracker.stop()
    assert snap.duration_s == pytest.approx(1.0)
    by_device = {d.device: d.joules for d in snap.devices}
    assert by_device["cpu:first"] == pytest.approx(100.0)  # not 300: the 2 s before the run
    assert by_device["ram:slow"] == pytest.approx(10.0)
    assert snap.phases["train"].joules == pytest.approx(110.0)


def test_frequent_imprecise_phases_are_attributed_by_time() -> None:
    clock = ManualClock()
    clock_meter = ClockedMeter(clock)
    tracker = Tracker(meters=[clock_meter], sample_interval_s=0.05, clock=clock).start()
    for i in range(200):  # like per-batch data waits: 1 ms wait, 1 ms compute
        with tracker.phase("data_wait", precise=False):
            clock.advance(0.001)
        clock.advance(0.001)
        if i % 50 == 0:  # some samples fall in the middle, as the sampler's would
            tracker.sample_now()
    snap = tracker.stop()
    wait = snap.phases["data_wait"]
    assert wait.entries == 200
    assert 0.25 < wait.joules / snap.joules < 0.75  # about half, given sleep jitter
    assert wait.joules == pytest.approx(100 * wait.duration_s, rel=0.05)


def test_start_and_stop_are_idempotent_and_never_started_is_reported(
    clock_meter: ClockMeter,
) -> None:
    never = Tracker(meters=[ClockMeter()])
    empty = never.stop()
    assert empty.devices == () and "never started" in empty.problems[-1]
    assert "not running" in never.snapshot().problems[-1]

    tracker = Tracker(meters=[clock_meter])
    assert tracker.start() is tracker.start()
    time.sleep(0.05)
    live = tracker.snapshot()
    assert live.running and live.joules > 0
    first = tracker.stop()
    assert tracker.stop() is first
    tracker.enter("late")  # after stop: ignored, no error
    assert "late" not in tracker.stop().phases
    assert first.joules >= live.joules


def test_a_failing_device_is_reported_and_keeps_its_energy() -> None:
    clock = ManualClock()
    clock_meter = ClockedMeter(clock)
    tracker = Tracker(meters=[clock_meter], clock=clock).start()
    clock.advance(0.1)
    tracker.sample_now()  # the last good read, at 0.1 s
    clock_meter.fail = "GPU is lost"
    clock.advance(0.1)
    during = tracker.snapshot()
    device = during.devices[0]
    assert device.status == "failed" and device.problem == "GPU is lost"
    assert device.joules == pytest.approx(10, rel=0.5)  # kept, not zeroed
    assert any("GPU is lost" in p for p in during.problems)
    clock_meter.fail = None  # recovers: a counter catches up with what it missed
    clock.advance(0.05)
    snap = tracker.stop()
    assert snap.devices[0].status == "degraded" and snap.devices[0].problem is None
    assert snap.joules == pytest.approx(100 * snap.duration_s, abs=1.0)


def test_a_meter_raising_does_not_reach_the_caller(clock_meter: ClockMeter) -> None:
    broken = ClockMeter(name="broken", component=Component.GPU, device="gpu:0")
    tracker = Tracker(meters=[clock_meter, broken]).start()
    broken.raise_exc = RuntimeError("driver crashed")
    with tracker.phase("train"):
        time.sleep(0.1)
    snap = tracker.stop()
    by_id = {d.device: d for d in snap.devices}
    assert by_id["gpu:0"].status == "failed"
    assert "RuntimeError: driver crashed" in (by_id["gpu:0"].problem or "")
    assert by_id["cpu:clock"].joules > 5


def test_a_meter_that_fails_to_start_is_left_out(clock_meter: ClockMeter) -> None:
    class NoStart(ClockMeter):
        def start(self) -> None:
            raise PermissionError("no access")

    tracker = Tracker(
        meters=[clock_meter, NoStart(name="nostart", device="gpu:0", component=Component.GPU)]
    ).start()
    snap = tracker.stop()
    assert [d.device for d in snap.devices] == ["cpu:clock"]
    assert any("nostart failed to start: no access" in p for p in snap.problems)


def test_meter_selection_prefers_counters_per_component() -> None:
    rapl = ClockMeter(name="rapl", device="cpu:package-0")
    estimate = ClockMeter(name="cpu_estimate", method=Method.ESTIMATE, device="cpu:estimate")
    gpu = ClockMeter(
        name="nvml", component=Component.GPU, device="gpu:0", method=Method.SAMPLED_POWER
    )
    custom = ClockMeter(name="fpga", component=Component.OTHER, device="fpga:0")
    missing = MeterUnavailable("ram_x", Component.RAM, "not here", fix="do this")
    used, superseded, unavailable = select_meters([estimate, rapl, gpu, custom, missing])
    assert used == [rapl, gpu, custom]
    assert superseded == [estimate]
    assert unavailable == [missing]

    tracker = Tracker(meters=[estimate, rapl, missing]).start()
    snap = tracker.stop()
    assert snap.superseded == ("cpu_estimate (cpu)",)
    assert snap.unavailable == ("ram_x (ram): not here. Fix: do this",)


class GpuWithCpuEstimate(Meter):
    """One meter, two components (a GPU counter plus a CPU estimate), like a vendor plugin
    that also estimates the host: energy = watts x time per device, on a ManualClock."""

    name = "combo"
    max_interval_s = 60.0

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(
            [
                Device("gpu:0", Component.GPU, Method.COUNTER, 0.05),
                Device("cpu:combo", Component.CPU, Method.ESTIMATE, 0.5),
            ]
        )
        self.clock = clock
        self.watts = {"gpu:0": 300.0, "cpu:combo": 40.0}
        self.t0 = 0.0
        self.started = self.closed = 0

    def start(self) -> None:
        self.t0 = self.clock()
        self.started += 1

    def sample(self, now: float) -> Readings:
        return {device: w * (now - self.t0) for device, w in self.watts.items()}

    def close(self) -> None:
        self.closed += 1


def test_a_meter_losing_one_of_its_components_reports_only_the_ones_it_won() -> None:
    """A GPU+CPU-estimate meter beside RAPL: the GPU is the combo's, the CPU RAPL's, once."""
    clock = ManualClock()
    combo = GpuWithCpuEstimate(clock)
    rapl = ClockedMeter(clock, name="rapl", device="cpu:package-0", watts=60.0)
    used, superseded, _ = select_meters([combo, rapl])
    assert [m.name for m in used] == ["combo", "rapl"]
    assert [d.id for d in used[0].devices] == ["gpu:0"]
    assert [(m.name, [d.id for d in m.devices]) for m in superseded] == [("combo", ["cpu:combo"])]
    assert isinstance(used[0], MeterPart) and used[0].meter is combo

    tracker = Tracker(meters=[combo, rapl], clock=clock).start()
    with tracker.phase("train"):
        clock.advance(2.0)
    snap = tracker.stop()
    assert snap.joules_by_component() == {"gpu": pytest.approx(600.0), "cpu": pytest.approx(120.0)}
    assert sorted(d.device for d in snap.devices) == ["cpu:package-0", "gpu:0"]
    assert snap.superseded == ("combo (cpu)",)
    assert snap.phases["train"].joules == pytest.approx(720.0)
    assert (combo.started, combo.closed) == (1, 1)  # the whole meter, once


def test_a_boundary_reads_only_counter_meters_and_the_rest_is_split_by_time() -> None:
    clock = ManualClock()
    counter = ClockedMeter(clock, name="rapl", device="cpu:package-0", watts=100.0)
    estimate = ClockedMeter(
        clock,
        name="ram_estimate",
        device="ram:estimate",
        component=Component.RAM,
        method=Method.ESTIMATE,
        watts=10.0,
    )
    for meter in (counter, estimate):
        meter.max_interval_s = 60.0  # no periodic read during the test
    tracker = Tracker(meters=[counter, estimate], sample_interval_s=60, clock=clock).start()
    durations = {"train": 0.4, "validation": 0.03}
    for _ in range(3):
        for phase, seconds in durations.items():
            before = counter.samples
            tracker.enter(phase)  # precise: wakes the sampler
            assert wait_for(lambda: counter.samples > before)  # noqa: B023
            clock.advance(seconds)
            before = counter.samples
            tracker.exit(phase)
            assert wait_for(lambda: counter.samples > before)  # noqa: B023
    assert estimate.samples == 1  # the zero point at start; boundaries read the counter only
    assert "green-mlops-sampler" in counter.threads
    snap = tracker.stop()
    assert estimate.samples == 2  # and the final read
    for phase, seconds in durations.items():
        by_device = snap.phases[phase].joules_by_device
        assert by_device["cpu:package-0"] == pytest.approx(100.0 * 3 * seconds)
        assert by_device["ram:estimate"] == pytest.approx(10.0 * 3 * seconds)  # by time
    assert sum(p.joules for p in snap.phases.values()) == pytest.approx(snap.joules, rel=1e-9)


def test_a_boundary_without_counter_meters_does_not_wake_the_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests: list[object] = []
    monkeypatch.setattr(Sampler, "request", lambda self, target: requests.append(target))
    estimate = ClockMeter(name="cpu_estimate", method=Method.ESTIMATE, device="cpu:estimate")
    tracker = Tracker(meters=[estimate]).start()
    with tracker.phase("validation"):
        pass
    snap = tracker.stop()
    assert requests == []
    assert snap.phases["validation"].entries == 1


def test_request_adds_under_the_samplers_lock() -> None:
    """The sampler swaps its set of requests under its lock; an insertion outside the lock
    could land in the set being swapped out and be lost."""
    sampler = Sampler()  # no thread: nothing but this test touches it
    target = object()
    with sampler._lock:
        caller = threading.Thread(target=sampler.request, args=(target,), daemon=True)
        caller.start()
        caller.join(1.0)  # the caller waits for the lock (it would finish in microseconds)
        assert caller.is_alive() and target not in sampler._urgent
    caller.join(10.0)
    assert not caller.is_alive() and target in sampler._urgent


def test_one_sampler_thread_for_all_trackers_and_it_leaves_when_idle() -> None:
    trackers = [Tracker(meters=[ClockMeter()]).start() for _ in range(3)]
    time.sleep(0.1)
    assert len(_sampler_threads()) == 1
    for tracker in trackers:
        assert tracker.stop().joules > 0
    deadline = time.monotonic() + 2
    while _sampler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _sampler_threads() == []


def test_sample_interval_honours_the_fastest_meter() -> None:
    slow, fast = ClockMeter(device="cpu:a"), ClockMeter(device="gpu:b", component=Component.GPU)
    slow.max_interval_s, fast.max_interval_s = 10.0, 0.02
    tracker = Tracker(meters=[slow, fast], sample_interval_s=5).start()
    started = time.monotonic()
    # 10 samples take ~0.2 s at 0.02 s, and at least 45 s at the 5 s setting: waiting up to
    # 20 s for them tolerates a loaded machine and still tells the two apart.
    wait_for(lambda: fast.samples >= 10, timeout=20.0)
    elapsed = time.monotonic() - started
    tracker.stop()
    assert tracker.interval_s == 0.02
    assert fast.samples >= 10 and elapsed < 20.0


def test_timeline_is_bounded_and_gives_power(monkeypatch: pytest.MonkeyPatch) -> None:
    import green_mlops.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "_MAX_TIMELINE", 8)
    meter = ClockMeter(watts=50)
    tracker = Tracker(meters=[meter], log_interval_s=0.5, sample_interval_s=60).start()
    t0 = tracker._t0
    for i in range(1, 40):  # drive the engine with explicit times: 20 s in 0.5 s steps
        tracker.sample_now(t0 + i * 0.5)
    snap = tracker.snapshot()
    assert len(snap.timeline) <= 9
    series = power_series(snap)
    assert series and all(w == pytest.approx(50, rel=0.01) for _, w in series[:-1])
    tracker.stop()


def test_a_marked_snapshot_ends_its_timeline_now_and_the_tracker_goes_on() -> None:
    # The values at a run's termination (a run that may be written again keeps its tracker)
    # must cover the run up to now: the power series and report timeline included.
    clock = ManualClock()
    meter = ClockedMeter(clock, watts=40.0)
    tracker = Tracker(meters=[meter], log_interval_s=10.0, sample_interval_s=60, clock=clock)
    tracker.start()
    clock.advance(3.0)  # shorter than the logging interval: no periodic timeline point yet
    assert power_series(tracker.snapshot()) == []
    snap = tracker.snapshot(mark=True)
    assert snap.timeline[-1].time == pytest.approx(snap.started_at + 3.0)
    assert power_series(snap) == [(pytest.approx(snap.started_at + 3.0), pytest.approx(40.0))]
    clock.advance(2.0)
    final = tracker.stop()  # still running after the mark, and the series goes on from it
    assert final.joules == pytest.approx(200.0)
    assert [w for _, w in power_series(final)] == [pytest.approx(40.0)] * 2


def test_metrics_and_tags_follow_the_scheme(clock_meter: ClockMeter) -> None:
    tracker = Tracker(
        meters=[clock_meter, MeterUnavailable("nvml", Component.GPU, "no driver", quiet=True)]
    ).start()
    with tracker.phase("train"):
        time.sleep(0.05)
    snap = tracker.stop()
    metrics = energy_metrics(snap)
    assert metrics["green/energy_kwh"] == pytest.approx(snap.joules / 3.6e6)
    assert metrics["green/energy/cpu_kwh"] == pytest.approx(snap.joules / 3.6e6)
    assert metrics["green/phase/train_kwh"] > 0 and metrics["green/phase/train_s"] > 0
    tags = provenance_tags(snap)
    assert tags["green.meters"] == "clock:counter(cpu)"
    assert tags["green.method.cpu"] == "counter" and tags["green.measured"] == "true"
    assert "no driver" in tags["green.unavailable"]
    assert json.loads(json.dumps(snap.to_dict()))["schema_version"] == 1


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="sample_interval_s"):
        Tracker(meters=[], sample_interval_s=-1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_starts_its_own_tracker_and_leaves_the_parents_alone() -> None:
    parent = Tracker(meters=[ClockMeter()]).start()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not raise, must be able to measure on its own
        code = 1
        try:
            inherited = parent.stop()
            child = Tracker(meters=[ClockMeter()]).start()
            time.sleep(0.2)
            snap = child.stop()
            ok = (
                "another process" in inherited.problems[-1]
                and snap.joules > 5
                and len(_sampler_threads()) <= 1
            )
            code = 0 if ok else 3
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    result = os.read(read, 1)
    os.waitpid(pid, 0)
    assert result == b"\x00"
    time.sleep(0.05)
    snap = parent.stop()  # the parent's tracker kept measuring
    assert snap.joules == pytest.approx(100 * snap.duration_s, abs=1.0) and snap.joules > 20


def test_interpreter_exit_with_a_running_tracker_is_clean(tmp_path: object) -> None:
    script = textwrap.dedent(
        """
        import time
        from green_mlops import Tracker
        from tests.conftest import ClockMeter
        t = Tracker(meters=[ClockMeter()]).start()
        with t.phase("train"):
            time.sleep(0.1)
        print("exiting")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "exiting"
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr
    assert time.monotonic() - started < 30


def test_user_meter_in_twenty_lines() -> None:
    """The README's example of a user meter works as written."""

    class WattMeter(Meter):  # e.g. a smart plug read over the network
        name = "smart_plug"
        max_interval_s = 0.5

        def __init__(self) -> None:
            super().__init__(
                [
                    __import__("green_mlops").Device(
                        "plug:0", Component.OTHER, Method.SAMPLED_POWER, 0.01
                    )
                ]
            )
            self.joules, self.last = 0.0, 0.0

        def start(self) -> None:
            self.last = time.monotonic()

        def sample(self, now: float) -> dict[str, float]:
            self.joules += 230.0 * (now - self.last)  # 230 W read from the plug
            self.last = now
            return {"plug:0": self.joules}

    snap = Tracker(meters=[WattMeter()]).start()
    time.sleep(0.1)
    result = snap.stop()
    assert result.joules_by_component()["other"] == pytest.approx(230 * result.duration_s, abs=2.3)


def test_a_meter_the_user_can_fix_is_a_green_mlops_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A meter that is unavailable with a fix (RAPL permission, nvidia-ml-py missing) is a
    # GreenMlopsWarning, so -W and filterwarnings act on it; one without a fix is a log record;
    # a quiet one (no driver on a CPU-only host) is neither.
    monkeypatch.setattr(log_module, "_warned", set())
    fixable = MeterUnavailable("ram_x", Component.RAM, "not here", fix="do this")
    broken = MeterUnavailable("gpu_x", Component.GPU, "plugin failed to load (boom)")
    normal = MeterUnavailable("gpu_y", Component.GPU, "no driver", fix="install it", quiet=True)
    caplog.set_level(logging.WARNING, logger="green_mlops")
    with pytest.warns(GreenMlopsWarning, match=r"ram_x \(ram\): not here\. Fix: do this") as got:
        Tracker(meters=[ClockMeter(), fixable, broken, normal]).start().stop()
    ours = [str(w.message) for w in got if issubclass(w.category, GreenMlopsWarning)]
    assert ours == ["green-mlops: ram_x (ram): not here. Fix: do this"]
    logged = [r.getMessage() for r in caplog.records if "gpu_" in r.getMessage()]
    assert logged == ["green-mlops: gpu_x (gpu): plugin failed to load (boom)"]


def test_a_user_warning_turned_into_an_error_never_stops_the_measurement(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest's filterwarnings=error (or python -W error) must not cost the user their numbers or
    # raise into training: the warning becomes a log error and the tracker measures on.
    import warnings

    monkeypatch.setattr(log_module, "_warned", set())
    fixable = MeterUnavailable("ram_x", Component.RAM, "not here", fix="do this")
    caplog.set_level(logging.WARNING, logger="green_mlops")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreenMlopsWarning)
        snap = Tracker(meters=[ClockMeter(), fixable]).start().stop()
    assert snap.devices and snap.joules > 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "green-mlops: ram_x (ram): not here. Fix: do this "
        "(GreenMlopsWarning made an error by a filter)"
    ]


def test_a_fix_that_is_not_the_users_to_apply_is_a_log_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # RAPL not exposed (a VM, a container) has a fix text (bare metal), but nothing to do here.
    import warnings

    from green_mlops.plugins.rapl import build_meters

    monkeypatch.setattr(log_module, "_warned", set())
    offers = build_meters(Path("/nonexistent/powercap"))
    assert [o.actionable for o in offers if isinstance(o, MeterUnavailable)] == [False]
    caplog.set_level(logging.WARNING, logger="green_mlops")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreenMlopsWarning)
        Tracker(meters=[ClockMeter(), *offers]).start().stop()
    assert any("no RAPL powercap tree" in r.getMessage() for r in caplog.records)
