"""RAM estimate: real allocations in this process and in a real child, machine vs process share,
settings through the hook, and the cost of a sample."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pluggy
import psutil
import pytest

from green_mlops import hookspecs
from green_mlops.config import Settings
from green_mlops.meters import Component, Method
from green_mlops.plugins import ram_estimate
from green_mlops.plugins.psutil_probe import psutil_unavailable
from green_mlops.plugins.ram_estimate import DEVICE_ID, GIB, RamEstimateMeter

MB = 1_000_000


def _joules(meter: RamEstimateMeter, now: float | None = None) -> float:
    value = meter.sample(time.monotonic() if now is None else now)[DEVICE_ID]
    assert isinstance(value, float)
    return value


def _rate(meters: list[RamEstimateMeter], seconds: float) -> list[float]:
    """Mean power of each meter over ``seconds`` of real time, sampled every 50 ms."""
    start = time.monotonic()
    first = [_joules(m, start) for m in meters]
    previous = list(first)
    now = start
    while now - start < seconds:
        time.sleep(0.05)
        now = time.monotonic()
        for i, meter in enumerate(meters):
            value = _joules(meter, now)
            assert value >= previous[i]  # cumulative, never decreasing
            previous[i] = value
    return [(p - f) / (now - start) for p, f in zip(previous, first, strict=True)]


def _tree_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may just have exited
            total += child.memory_info().rss
    return total


def test_rss_of_an_allocation_raises_the_process_rate_by_its_size() -> None:
    w_per_gib = 1.0
    process = RamEstimateMeter(w_per_gib, share="process")
    machine = RamEstimateMeter(w_per_gib, share="machine")
    assert [m.devices[0].id for m in (process, machine)] == [DEVICE_ID, DEVICE_ID]
    assert process.devices[0].method is Method.ESTIMATE
    assert process.devices[0].component is Component.RAM
    process.start()
    machine.start()
    before_process, before_machine = _rate([process, machine], 0.3)
    rss = _tree_rss()  # this process and its children (a session-wide MLflow server, say)
    assert before_process == pytest.approx(rss / GIB * w_per_gib, rel=0.2)
    block = b"\x01" * (200 * MB)  # written, so resident; the step falls between the windows
    after_process, after_machine = _rate([process, machine], 0.3)
    del block
    rise = 200 * MB / GIB * w_per_gib  # 1 GB here is 2**30 bytes
    assert after_process - before_process == pytest.approx(rise, rel=0.2)
    # the whole machine uses at least this process's memory (its anonymous pages, here)
    assert before_machine > 0.8 * before_process and after_machine > 0.8 * after_process
    assert after_machine < psutil.virtual_memory().total / GIB * w_per_gib


def test_process_share_includes_a_child_process_rss() -> None:
    meter = RamEstimateMeter(1.0, share="process", children_refresh_s=0.05)
    meter.start()
    code = "import sys, time\nb = b'x' * 150_000_000\nprint('ok', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ok\n"
        time.sleep(0.06)  # past the next refresh of the children list
        _joules(meter)
        [with_child] = _rate([meter], 0.2)
        child_rss = psutil.Process(child.pid).memory_info().rss
        own_rss = _tree_rss() - child_rss  # this process and any other children
    finally:
        child.kill()
        child.wait()
    assert child_rss > 150 * MB
    assert with_child == pytest.approx((child_rss + own_rss) / GIB, rel=0.15)
    time.sleep(0.06)
    _joules(meter)  # the dead child is dropped, not an error
    [without_child] = _rate([meter], 0.2)
    assert without_child == pytest.approx(own_rss / GIB, rel=0.2)


def test_hook_through_pluggy_reads_share_and_w_per_gb_from_settings() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(ram_estimate, name="ram_estimate")
    settings = Settings.load(environ={"GREEN_MLOPS_RAM_W_PER_GB": "0.5"}, share="process")
    [[meter]] = pm.hook.green_mlops_meters(settings=settings)
    assert isinstance(meter, RamEstimateMeter)
    assert (meter.name, meter.share, meter.w_per_gib) == ("ram_estimate", "process", 0.5)
    assert meter.basis == "RSS of this process tree x 0.5 W/GiB (ram_w_per_gb setting), " + (
        "trapezoid over samples"
    )
    [default] = ram_estimate.green_mlops_meters(Settings.load(environ={}))
    assert isinstance(default, RamEstimateMeter)
    assert (default.share, default.w_per_gib) == ("machine", 0.3725)
    assert "Green Algorithms" in default.basis and default.basis in default.devices[0].label
    assert default.devices[0].uncertainty == 0.5
    default.start()
    [rate] = _rate([default], 0.1)
    vm = psutil.virtual_memory()
    assert 0 < rate < vm.total / GIB * 0.3725
    default.close()


@pytest.mark.parametrize("share", ["machine", "process"])
def test_sample_is_cheap(share: str) -> None:
    meter = RamEstimateMeter(0.3725, share=share)
    meter.start()
    calls = 500
    begin = time.perf_counter()
    for _ in range(calls):
        _joules(meter)
    per_call_us = (time.perf_counter() - begin) / calls * 1e6
    assert per_call_us < 500  # measured 13-31 us on this machine; the bound leaves room for load


def test_psutil_probe_names_what_it_cannot_read_and_the_fix() -> None:
    # The probe both estimates share: a read psutil refuses (here: a process that has exited)
    # makes the meter unavailable, with the reason and the fix; reads that work make nothing.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    missing = psutil_unavailable(
        "ram_estimate", Component.RAM, "memory use", lambda: psutil.Process(gone.pid).memory_info()
    )
    assert missing is not None
    assert missing.name == "ram_estimate" and missing.component is Component.RAM
    assert missing.reason.startswith("psutil cannot read memory use here: ")
    assert str(gone.pid) in missing.reason
    assert missing.fix == "check that /proc is mounted (Linux) or psutil supports this platform"
    assert psutil_unavailable("cpu_estimate", Component.CPU, "CPU times", psutil.cpu_times) is None
