"""The engine: attribution to phases, lifecycle, faults, fork and exit, with real threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from green_mlops import Tracker
from green_mlops.config import ConfigError
from green_mlops.meters import Component, Meter, MeterUnavailable, Method
from green_mlops.metrics import energy_metrics, power_series, provenance_tags
from green_mlops.tracker import select_meters
from tests.conftest import ClockMeter


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "green-mlops-sampler"]


def test_phases_are_exclusive_nested_and_sum_to_the_total(clock_meter: ClockMeter) -> None:
    tracker = Tracker(meters=[clock_meter]).start()
    with tracker.phase("train"):
        time.sleep(0.3)
        with tracker.phase("validation"):
            time.sleep(0.2)
        time.sleep(0.1)
    time.sleep(0.1)
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


def test_frequent_imprecise_phases_are_attributed_by_time(clock_meter: ClockMeter) -> None:
    tracker = Tracker(meters=[clock_meter], sample_interval_s=0.05).start()
    for _ in range(200):  # like per-batch data waits: 1 ms wait, 1 ms compute
        with tracker.phase("data_wait", precise=False):
            time.sleep(0.001)
        time.sleep(0.001)
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


def test_a_failing_device_is_reported_and_keeps_its_energy(clock_meter: ClockMeter) -> None:
    tracker = Tracker(meters=[clock_meter]).start()
    time.sleep(0.1)
    clock_meter.fail = "GPU is lost"
    time.sleep(0.1)
    during = tracker.snapshot()
    device = during.devices[0]
    assert device.status == "failed" and device.problem == "GPU is lost"
    assert device.joules == pytest.approx(10, rel=0.5)  # kept, not zeroed
    assert any("GPU is lost" in p for p in during.problems)
    clock_meter.fail = None  # recovers: a counter catches up with what it missed
    time.sleep(0.05)
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
    time.sleep(0.5)
    tracker.stop()
    assert tracker.interval_s == 0.02
    assert fast.samples >= 10  # ~25 expected; generous for a loaded 2-core machine


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
