"""The RAPL meter, on fake powercap trees made of real files (laid out like /sys/class/powercap).

Two kernel behaviours that regular files cannot show are reproduced with real kernel objects:
a root-only ``energy_uj`` is read by an unprivileged process (forked and ``setuid`` to
``nobody`` when the tests run as root, since root reads any file), and a zone vanishing under an
open file descriptor is a ``/proc/<pid>/comm`` file whose process exits (reads on the open
descriptor then fail, as they do on a removed sysfs node; an unlinked regular file stays
readable).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from green_mlops import Tracker
from green_mlops.config import Settings
from green_mlops.meters import Component, DeviceError, Meter, MeterUnavailable, Method
from green_mlops.plugin_manager import create_plugin_manager
from green_mlops.plugins import rapl
from green_mlops.plugins.rapl import RaplMeter, build_meters

J = 1_000_000  # uJ per joule
RANGE_J = 1000  # a small counter range, so that tests can wrap it


def zone(
    root: Path,
    zone: str,
    name: str,
    energy_j: float = 0.0,
    *,
    range_j: float = RANGE_J,
    max_power_w: float | None = None,
    under: Path | None = None,
) -> Path:
    """Write one powercap zone (``name``, ``energy_uj``, ``max_energy_range_uj``, optionally
    ``constraint_0_max_power_uw``) at ``root/zone``, or nested in ``under`` like the real tree."""
    path = (under or root) / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{round(energy_j * J)}\n")
    (path / "max_energy_range_uj").write_text(f"{round(range_j * J)}\n")
    if max_power_w is not None:
        (path / "constraint_0_max_power_uw").write_text(f"{round(max_power_w * J)}\n")
    return path


def set_energy(root: Path, zone: str, energy_j: float) -> None:
    """Rewrite the counter in place (same inode, as the meter's open descriptor sees it)."""
    (root / zone / "energy_uj").write_text(f"{round(energy_j * J)}\n")


def two_socket_server(root: Path, max_power_w: float | None = 100.0) -> None:
    """2 packages with dram, core and uncore subzones, a psys zone and an mmio duplicate."""
    for n in (0, 1):
        zone(root, f"intel-rapl:{n}", f"package-{n}", 10.0 * n, max_power_w=max_power_w)
        zone(root, f"intel-rapl:{n}:0", "core", 1.0, max_power_w=max_power_w)
        zone(root, f"intel-rapl:{n}:1", "uncore", 1.0)
        zone(root, f"intel-rapl:{n}:2", "dram", 5.0 * n, max_power_w=max_power_w)
    zone(root, "intel-rapl:2", "psys", 3.0)
    zone(root, "intel-rapl-mmio:0", "package-0", 7.0)


def split(
    offers: list[Meter | MeterUnavailable],
) -> tuple[dict[Component, RaplMeter], list[MeterUnavailable]]:
    meters: dict[Component, RaplMeter] = {}
    for offer in offers:
        if isinstance(offer, RaplMeter):
            (component,) = {d.component for d in offer.devices}
            assert component not in meters
            meters[component] = offer
    return meters, [o for o in offers if isinstance(o, MeterUnavailable)]


@pytest.fixture
def opened() -> Iterator[list[Meter]]:
    """Meters to close after the test, so that no descriptor leaks between tests."""
    meters: list[Meter] = []
    yield meters
    for meter in meters:
        meter.close()


def build(
    root: Path, opened: list[Meter]
) -> tuple[dict[Component, RaplMeter], list[MeterUnavailable]]:
    offers = build_meters(root)
    opened.extend(o for o in offers if isinstance(o, Meter))
    return split(offers)


# --- discovery ---------------------------------------------------------------------------------


def test_discovers_packages_and_dram_and_skips_double_counting_zones(
    tmp_path: Path, opened: list[Meter]
) -> None:
    two_socket_server(tmp_path)
    meters, unavailable = build(tmp_path, opened)
    assert unavailable == []
    cpu, ram = meters[Component.CPU], meters[Component.RAM]
    assert [d.id for d in cpu.devices] == ["cpu:package-0", "cpu:package-1"]
    assert [d.id for d in ram.devices] == ["ram:package-0", "ram:package-1"]
    for device in cpu.devices:
        assert (device.component, device.method) == (Component.CPU, Method.COUNTER)
        assert device.uncertainty == rapl.PACKAGE_UNCERTAINTY
    assert {d.uncertainty for d in ram.devices} == {rapl.DRAM_UNCERTAINTY}
    assert cpu.devices[0].label == "RAPL package-0 (intel-rapl:0)"
    assert ram.devices[1].label == "RAPL package-1 dram (intel-rapl:1:2)"
    ignored = "\n".join(cpu.ignored)
    for skipped in ("intel-rapl:0:0 (core)", "intel-rapl:1:1 (uncore)", "intel-rapl:2 (psys)"):
        assert skipped in ignored
    assert "intel-rapl-mmio:0 (package-0): same package as intel-rapl" in ignored

    # Only package and dram energy is counted: core, uncore, psys and mmio moves are not.
    cpu.start()
    ram.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 0.0 + 12.5)
    set_energy(tmp_path, "intel-rapl:1", 10.0 + 20.0)
    set_energy(tmp_path, "intel-rapl:1:2", 5.0 + 4.0)
    for other in ("intel-rapl:0:0", "intel-rapl:1:1", "intel-rapl:2", "intel-rapl-mmio:0"):
        set_energy(tmp_path, other, 500.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 12.5, "cpu:package-1": 20.0}
    assert ram.sample(t0 + 1.0) == {"ram:package-0": 0.0, "ram:package-1": 4.0}
    assert cpu.notes() == [] and ram.notes() == []


def test_nested_layout_and_multi_die_names(tmp_path: Path, opened: list[Meter]) -> None:
    # Subzones only nested inside their package (the layout under .../powercap/intel-rapl/).
    pkg = zone(tmp_path, "intel-rapl:0", "package-0-die-1")
    zone(tmp_path, "intel-rapl:0:0", "dram", under=pkg)
    meters, unavailable = build(tmp_path, opened)
    assert unavailable == []
    assert [d.id for d in meters[Component.CPU].devices] == ["cpu:package-0-die-1"]
    assert [d.id for d in meters[Component.RAM].devices] == ["ram:package-0-die-1"]


def test_mmio_zone_is_used_when_it_is_the_only_package_interface(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "psys")
    zone(tmp_path, "intel-rapl-mmio:0", "package-0")
    meters, unavailable = build(tmp_path, opened)
    assert [d.id for d in meters[Component.CPU].devices] == ["cpu:package-0"]
    assert meters[Component.CPU].devices[0].label == "RAPL package-0 (intel-rapl-mmio:0)"
    assert [(u.component, u.quiet) for u in unavailable] == [(Component.RAM, True)]


def test_amd_like_tree_without_dram_gives_cpu_and_says_why_ram_is_not_measured(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0")
    zone(tmp_path, "intel-rapl:0:0", "core")
    meters, unavailable = build(tmp_path, opened)
    assert list(meters) == [Component.CPU]
    (ram,) = unavailable
    assert (ram.name, ram.component) == ("rapl", Component.RAM)
    assert "no dram domain" in ram.reason and "RAM estimate" in ram.reason


def test_missing_tree_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    (offer,) = build_meters(tmp_path / "absent")
    assert isinstance(offer, MeterUnavailable)
    assert (offer.name, offer.component) == ("rapl", Component.CPU)
    assert str(tmp_path / "absent") in offer.reason
    assert "VMs and containers" in offer.fix and "CPU estimate" in offer.fix


def test_tree_without_a_package_zone_is_unavailable(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "psys")
    (offer,) = build_meters(tmp_path)
    assert isinstance(offer, MeterUnavailable) and offer.component is Component.CPU
    assert "no RAPL package domain" in offer.reason and "intel-rapl:0 (psys)" in offer.reason


def test_unreadable_range_is_unavailable_not_guessed(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0")
    (tmp_path / "intel-rapl:0" / "max_energy_range_uj").write_text("0\n")
    offers = build_meters(tmp_path)
    (cpu,) = [o for o in offers if o.component is Component.CPU]
    assert isinstance(cpu, MeterUnavailable) and "max_energy_range_uj is 0" in cpu.reason


# --- wraparound -------------------------------------------------------------------------------


def test_max_interval_from_the_power_constraint_or_the_documented_default(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", max_power_w=50.0)  # 1000 J / (2 x 50 W)
    zone(tmp_path, "intel-rapl:1", "package-1")  # default 500 W: 1000 J / 1000 W
    zone(tmp_path, "intel-rapl:0:0", "dram", range_j=65536.0)  # 65536 J / 400 W -> cap 60 s
    zone(tmp_path, "intel-rapl:1:0", "dram", range_j=200.0)  # 200 J / (2 x 200 W)
    meters, _ = build(tmp_path, opened)
    assert meters[Component.CPU].max_interval_s == pytest.approx(1.0)
    assert meters[Component.RAM].max_interval_s == pytest.approx(0.5)


def test_counts_across_a_single_wrap(tmp_path: Path, opened: list[Meter]) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 990.0, max_power_w=50.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 998.0)
    assert cpu.sample(t0 + 0.5) == {"cpu:package-0": 8.0}
    set_energy(tmp_path, "intel-rapl:0", 7.0)  # wrapped: 2 J to the top, 7 J after
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 17.0}
    assert cpu.inferred_wraps == {"cpu:package-0": 0} and cpu.notes() == []


def test_double_wrap_between_sparse_reads_is_resolved_by_average_power_and_noted(
    tmp_path: Path, opened: list[Meter]
) -> None:
    # Range 1000 J, bound 2 x 50 W: within 10 s at most one wrap. A steady 40 W load, then the
    # process is suspended 55 s: 2200 J pass, i.e. two wraps and 200 J. The counter alone says
    # 200 J (+ k x 1000 J, k = 0..5 within 100 W); 40 W of average power says k = 2.
    zone(tmp_path, "intel-rapl:0", "package-0", 0.0, max_power_w=50.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    assert cpu.max_interval_s == pytest.approx(10.0)
    cpu.start()
    t0 = time.monotonic()
    for second in range(1, 11):
        set_energy(tmp_path, "intel-rapl:0", 40.0 * second)
        assert cpu.sample(t0 + second) == {"cpu:package-0": pytest.approx(40.0 * second)}
    set_energy(tmp_path, "intel-rapl:0", (400.0 + 40.0 * 55) % RANGE_J)
    assert cpu.sample(t0 + 65.0) == {"cpu:package-0": pytest.approx(2600.0)}
    assert cpu.inferred_wraps == {"cpu:package-0": 1}
    (note,) = cpu.notes()
    assert note.startswith("cpu:package-0: 55.0 s between reads")
    assert "may have wrapped 0 to 5 times; inferred 2 wraps" in note
    assert "average power so far (40.0 W)" in note and "2200.0 J" in note
    # Afterwards, ordinary reads are not inferences.
    set_energy(tmp_path, "intel-rapl:0", 640.0)
    assert cpu.sample(t0 + 66.0) == {"cpu:package-0": pytest.approx(2640.0)}
    assert cpu.inferred_wraps == {"cpu:package-0": 1}


def test_sparse_first_read_takes_the_smallest_wrap_count_and_says_so(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 900.0, max_power_w=50.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 100.0)  # 200 J, or 1200 J, ... in 30 s
    assert cpu.sample(t0 + 30.0) == {"cpu:package-0": pytest.approx(200.0)}
    assert cpu.inferred_wraps == {"cpu:package-0": 1}
    (note,) = cpu.notes()
    assert "may have wrapped 1 to 3 times; inferred 1 wraps" in note
    assert "no average power yet" in note


def test_a_long_gap_with_room_for_one_count_only_is_not_an_inference(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 0.0, max_power_w=1.0)  # wraps after >= 500 s
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    assert cpu.max_interval_s == 60.0  # the cap
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 300.0)
    assert cpu.sample(t0 + 400.0) == {"cpu:package-0": 300.0}
    assert cpu.inferred_wraps == {"cpu:package-0": 0} and cpu.notes() == []


def test_a_counter_going_back_without_a_plausible_wrap_adds_nothing_and_is_noted(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 500.0, max_power_w=50.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 499.0)  # a wrap would mean 999 J in 0.5 s
    assert cpu.sample(t0 + 0.5) == {"cpu:package-0": 0.0}
    set_energy(tmp_path, "intel-rapl:0", 510.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 11.0}  # counted from the new baseline
    (note,) = cpu.notes()
    assert "went back from 500000000 to 499000000 uJ" in note and "0 J counted" in note


def test_power_above_the_assumed_bound_is_counted_and_noted_once(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 0.0, max_power_w=50.0)  # bound 100 W
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 150.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 150.0}
    set_energy(tmp_path, "intel-rapl:0", 300.0)
    assert cpu.sample(t0 + 2.0) == {"cpu:package-0": 300.0}
    (note,) = cpu.notes()
    assert "drew 150 W over 1.00 s, above the 100 W bound" in note
    assert "constraint_0_max_power_uw 50 W x 2" in note


@settings(max_examples=60, deadline=None)
@given(
    start_j=st.integers(0, RANGE_J - 1),
    steps=st.lists(st.integers(0, 50 * J), min_size=1, max_size=60),
)
def test_cumulative_energy_is_exact_and_monotonic_across_wraps(
    start_j: int, steps: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zone(root, "intel-rapl:0", "package-0", float(start_j), max_power_w=100.0)
        offers = build_meters(root)
        cpu = split(offers)[0][Component.CPU]
        try:
            cpu.start()
            t0 = time.monotonic()
            raw, previous, total = start_j * J, 0.0, 0
            for i, step in enumerate(steps, 1):
                raw = (raw + step) % (RANGE_J * J)
                total += step
                (root / "intel-rapl:0" / "energy_uj").write_text(f"{raw}\n")
                value = cpu.sample(t0 + 0.5 * i)["cpu:package-0"]
                assert isinstance(value, float)
                assert value == total / J
                assert value >= previous
                previous = value
            assert cpu.inferred_wraps == {"cpu:package-0": 0} and cpu.notes() == []
        finally:
            cpu.close()


# --- failures -----------------------------------------------------------------------------


class CommCounter:
    """A counter file backed by a live kernel object: ``/proc/<pid>/comm`` of a child process
    that writes the values it is sent into its own ``comm``. When the child exits, reads on a
    descriptor opened before fail with ESRCH, as reads on a removed sysfs node fail."""

    SCRIPT = (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    with open('/proc/self/comm', 'w') as f:\n"
        "        f.write(line.strip())\n"
        "    print('ok', flush=True)\n"
    )

    def __init__(self, uj: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.path = f"/proc/{self.proc.pid}/comm"
        self.set(uj)

    def set(self, uj: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        assert len(str(uj)) <= 15  # TASK_COMM_LEN - 1
        self.proc.stdin.write(f"{uj}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"
        assert Path(self.path).read_text() == f"{uj}\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def link_counter(root: Path, zone_name: str, counter: CommCounter) -> None:
    link = root / zone_name / "energy_uj"
    link.unlink()
    link.symlink_to(counter.path)


def test_a_zone_vanishing_mid_run_is_a_device_error_then_recovers(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 0.0, max_power_w=100.0)
    zone(tmp_path, "intel-rapl:1", "package-1", max_power_w=100.0)
    first = CommCounter(1 * J)
    second: CommCounter | None = None
    try:
        link_counter(tmp_path, "intel-rapl:1", first)
        meters, _ = build(tmp_path, opened)
        cpu = meters[Component.CPU]
        cpu.start()
        t0 = time.monotonic()
        first.set(3 * J)
        set_energy(tmp_path, "intel-rapl:0", 5.0)
        assert cpu.sample(t0 + 0.5) == {"cpu:package-0": 5.0, "cpu:package-1": 2.0}

        first.stop()  # the zone is gone: its open descriptor now fails
        set_energy(tmp_path, "intel-rapl:0", 6.0)
        readings = cpu.sample(t0 + 1.0)
        assert readings["cpu:package-0"] == 6.0  # the other package carries on
        error = readings["cpu:package-1"]
        assert isinstance(error, DeviceError)
        assert error.reason == f"cannot read {tmp_path / 'intel-rapl:1' / 'energy_uj'}: " + (
            "No such process"
        )
        error = cpu.sample(t0 + 1.5)["cpu:package-1"]  # still gone: reopening fails
        assert isinstance(error, DeviceError) and "No such file or directory" in error.reason

        second = CommCounter(4_500_000)  # back, counter 1.5 J further than last read
        link_counter(tmp_path, "intel-rapl:1", second)
        set_energy(tmp_path, "intel-rapl:0", 7.0)
        assert cpu.sample(t0 + 2.0) == {"cpu:package-0": 7.0, "cpu:package-1": 3.5}
        assert cpu.notes() == []
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_an_unparseable_read_is_a_device_error_and_the_next_good_read_continues(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 995.0, max_power_w=100.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("")
    error = cpu.sample(t0 + 0.5)["cpu:package-0"]
    assert isinstance(error, DeviceError) and "did not hold an integer" in error.reason
    set_energy(tmp_path, "intel-rapl:0", 15.0)  # wrapped meanwhile: unwrapped from 995 J
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 20.0}


def test_unreadable_at_start_counts_from_the_first_good_read_with_a_note(
    tmp_path: Path, opened: list[Meter]
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 1.0, max_power_w=100.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("garbage\n")
    cpu.start()
    t0 = time.monotonic()
    assert isinstance(cpu.sample(t0 + 0.5)["cpu:package-0"], DeviceError)
    set_energy(tmp_path, "intel-rapl:0", 2.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 0.0}
    set_energy(tmp_path, "intel-rapl:0", 3.0)
    assert cpu.sample(t0 + 1.5) == {"cpu:package-0": 1.0}
    (note,) = cpu.notes()
    assert "unreadable at start" in note and "energy before that is not included" in note


def _summary(offer: Meter | MeterUnavailable) -> dict[str, object]:
    if isinstance(offer, MeterUnavailable):
        component = offer.component.value
        return {
            "unavailable": True,
            "component": component,
            "reason": offer.reason,
            "fix": offer.fix,
        }
    return {"unavailable": False, "devices": [d.id for d in offer.devices]}


def _offers_as_unprivileged_user(root: Path) -> list[dict[str, object]]:
    """Build the meters in a child process that has dropped root to ``nobody``."""
    result: list[dict[str, object]] = _as_unprivileged_user(
        lambda: [_summary(o) for o in build_meters(root)]
    )
    return result


def _as_unprivileged_user(work: Callable[[], object]) -> Any:
    """``work()`` (JSON-ready) in a child process that has dropped root to ``nobody``."""
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write_fd, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A tree an unprivileged user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="green-mlops-rapl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_permission_denied_is_unavailable_with_the_exact_fix(world_traversable_dir: Path) -> None:
    root = world_traversable_dir
    two_socket_server(root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
    for energy in root.glob("*/energy_uj"):
        # What the kernel does since the CVE-2020-8694 fix: root may read, nobody else.
        energy.chmod(stat.S_IRUSR if os.geteuid() == 0 else 0)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to drop privileges to")
        offers = _offers_as_unprivileged_user(root)
    else:
        offers = [_summary(o) for o in build_meters(root)]
    assert [(o["unavailable"], o["component"]) for o in offers] == [
        (True, "cpu"),
        (True, "ram"),
    ]
    cpu, ram = offers
    assert f"permission denied reading {root}/intel-rapl:0/energy_uj, " in str(cpu["reason"])
    assert "CVE-2020-8694" in str(cpu["reason"])
    assert f"{root}/intel-rapl:1:2/energy_uj" in str(ram["reason"])
    fix = str(cpu["fix"])
    assert f"sudo chmod a+r {root}/intel-rapl:*/energy_uj (until reboot)" in fix
    assert 'RUN+="/bin/chmod a+r /sys%p/energy_uj"' in fix and "/etc/udev/rules.d/" in fix
    assert fix.startswith("run as root")


def test_permission_denied_warns_the_user_with_the_fix(world_traversable_dir: Path) -> None:
    # The user's situation: an unprivileged training job on bare metal since the CVE-2020-8694
    # fix. The tracker says so with a GreenMlopsWarning that carries the chmod/udev fix.
    root = world_traversable_dir
    two_socket_server(root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
    for energy in root.glob("*/energy_uj"):
        energy.chmod(stat.S_IRUSR if os.geteuid() == 0 else 0)

    def track() -> list[list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Tracker(rapl_root=root, disable_plugins="nvml,cpu_estimate,ram_estimate").start().stop()
        return [[w.category.__name__, str(w.message)] for w in caught]

    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to drop privileges to")
        caught = _as_unprivileged_user(track)
    else:
        caught = track()
    ours = [message for category, message in caught if category == "GreenMlopsWarning"]
    cpu = [m for m in ours if m.startswith("green-mlops: rapl (cpu): permission denied reading")]
    assert len(cpu) == 1, caught
    assert f"Fix: run as root, or make the counters readable: sudo chmod a+r {root}/" in cpu[0]


def test_descriptors_are_opened_once_and_closed(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    two_socket_server(tmp_path)
    before = open_fds()
    meters, _ = split(build_meters(tmp_path))
    assert open_fds() == before + 4  # 2 packages + 2 dram
    for meter in meters.values():
        meter.start()
        for i in range(20):
            meter.sample(time.monotonic() + i)
    assert open_fds() == before + 4
    for meter in meters.values():
        meter.close()
        meter.close()  # idempotent
    assert open_fds() == before

    # A group that cannot be fully opened leaks nothing either.
    (tmp_path / "intel-rapl:1" / "max_energy_range_uj").write_text("nonsense\n")
    offers = build_meters(tmp_path)
    assert [type(o).__name__ for o in offers] == ["MeterUnavailable", "RaplMeter"]
    assert open_fds() == before + 2
    for offer in offers:
        if isinstance(offer, Meter):
            offer.close()
    assert open_fds() == before


# --- the hook ---------------------------------------------------------------------------------


def test_hook_through_the_plugin_manager(tmp_path: Path) -> None:
    two_socket_server(tmp_path)
    pm = create_plugin_manager()
    plugin = pm.get_plugin("rapl")
    assert plugin is rapl
    only_rapl = pm.subset_hook_caller(
        "green_mlops_meters", [p for p in pm.get_plugins() if p is not plugin]
    )
    (offers,) = only_rapl(settings=Settings.load(environ={}, rapl_root=tmp_path))
    meters, unavailable = split(offers)
    try:
        assert unavailable == []
        assert {c: [d.id for d in m.devices] for c, m in meters.items()} == {
            Component.CPU: ["cpu:package-0", "cpu:package-1"],
            Component.RAM: ["ram:package-0", "ram:package-1"],
        }
        assert all(m.name == "rapl" for m in meters.values())
    finally:
        for meter in meters.values():
            meter.close()

    (offers,) = only_rapl(settings=Settings.load(environ={}, rapl_root=tmp_path / "none"))
    assert [(o.name, o.component) for o in offers] == [("rapl", Component.CPU)]


# --- multi-die parts, the interval floor, discovery failures ----------------------------------


def test_mirrored_die_zones_of_one_counter_are_counted_once_and_noted(
    tmp_path: Path, opened: list[Meter]
) -> None:
    # AMD Threadripper 1950X (CodeCarbon issue #1274): two per-die zones read one 68 W package
    # counter. Summing them gave 136 W.
    for n in (0, 1):
        zone(tmp_path, f"intel-rapl:{n}", f"package-0-die-{n}", 500.0, max_power_w=180.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    assert [d.id for d in cpu.devices] == ["cpu:package-0-die-0", "cpu:package-0-die-1"]
    cpu.start()
    t0 = time.monotonic()
    for second in range(1, 6):
        for n in (0, 1):
            set_energy(tmp_path, f"intel-rapl:{n}", (500.0 + 68.0 * second) % RANGE_J)
        readings = cpu.sample(t0 + second)
        assert sum(readings.values()) == pytest.approx(68.0 * second)  # type: ignore[arg-type]
        assert readings["cpu:package-0-die-0"] == pytest.approx(68.0 * second)
    (note,) = cpu.notes()
    assert "cpu:package-0-die-1 reads the same counter as cpu:package-0-die-0" in note
    assert "counted once" in note


def test_a_mirror_read_late_is_still_one_counter(
    tmp_path: Path, opened: list[Meter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One counter read twice, 5 ms apart (the sampler thread waited for the GIL between the
    # two preads): the second read is ahead by 150 W x 5 ms, beyond the equality tolerance.
    # Judged on that alone, the mirror would be counted separately for good: 2x the energy.
    for n in (0, 1):
        zone(tmp_path, f"intel-rapl:{n}", f"package-0-die-{n}", 500.0, max_power_w=180.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    late = {"energy": 0.0}
    original = rapl._Domain.read

    def read(domain: rapl._Domain) -> int:  # the real counter moves on while we read
        value = original(domain)
        if late["energy"] and domain.path.startswith(str(tmp_path / "intel-rapl:1")):
            set_energy(tmp_path, "intel-rapl:0", late["energy"])
        return value

    monkeypatch.setattr(rapl._Domain, "read", read)
    for second in range(1, 6):
        energy = 500.0 + 150.0 * second
        late["energy"] = energy + 150.0 * 0.005 if second == 3 else 0.0
        set_energy(tmp_path, "intel-rapl:0", energy)
        set_energy(tmp_path, "intel-rapl:1", late["energy"] or energy)
        readings = cpu.sample(t0 + second)
    assert sum(readings.values()) == pytest.approx(150.0 * 5, abs=1.0)  # type: ignore[arg-type]
    assert not any("no longer equal" in note for note in cpu.notes())


def test_separate_die_counters_are_both_counted(tmp_path: Path, opened: list[Meter]) -> None:
    # Intel multi-die parts (Cascade Lake-AP, Granite Rapids): one counter per die.
    zone(tmp_path, "intel-rapl:0", "package-0-die-0", 100.0, max_power_w=180.0)
    zone(tmp_path, "intel-rapl:1", "package-0-die-1", 250.0, max_power_w=180.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    for second in range(1, 4):
        set_energy(tmp_path, "intel-rapl:0", 100.0 + 30.0 * second)
        set_energy(tmp_path, "intel-rapl:1", 250.0 + 40.0 * second)
        assert cpu.sample(t0 + second) == {
            "cpu:package-0-die-0": pytest.approx(30.0 * second),
            "cpu:package-0-die-1": pytest.approx(40.0 * second),
        }
    assert cpu.notes() == []


def test_counters_equal_at_start_that_diverge_are_counted_separately_from_the_start(
    tmp_path: Path, opened: list[Meter]
) -> None:
    for n in (0, 1):
        zone(tmp_path, f"intel-rapl:{n}", f"package-{n}", 42.0, max_power_w=180.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    cpu.start()
    t0 = time.monotonic()
    for n in (0, 1):
        set_energy(tmp_path, f"intel-rapl:{n}", 52.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 10.0, "cpu:package-1": 0.0}
    set_energy(tmp_path, "intel-rapl:0", 60.0)
    set_energy(tmp_path, "intel-rapl:1", 75.0)
    assert cpu.sample(t0 + 2.0) == {"cpu:package-0": 18.0, "cpu:package-1": 33.0}
    assert any("no longer equal" in note and "counted separately" in note for note in cpu.notes())


def test_a_tiny_counter_range_does_not_drive_the_sampler_past_the_floor(
    tmp_path: Path, opened: list[Meter]
) -> None:
    # 0.1 J at 2 x 50 W wraps every millisecond: without a floor, reads at 1 kHz.
    zone(tmp_path, "intel-rapl:0", "package-0", range_j=0.1, max_power_w=50.0)
    meters, _ = build(tmp_path, opened)
    cpu = meters[Component.CPU]
    assert cpu.max_interval_s == rapl.MIN_INTERVAL_S == 0.1
    (note,) = cpu.notes()
    assert "floor" in note and "wrap counts are inferred" in note


@pytest.mark.parametrize("bad", ["empty", "directory"])
def test_a_bad_read_at_discovery_does_not_disable_rapl(
    tmp_path: Path, opened: list[Meter], bad: str
) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 1.0, max_power_w=100.0)
    zone(tmp_path, "intel-rapl:1", "package-1", 10.0, max_power_w=100.0)
    energy = tmp_path / "intel-rapl:1" / "energy_uj"
    if bad == "empty":  # a short read, ValueError
        energy.write_text("")
    else:  # a read that fails with an OSError (EISDIR here; EIO on a real failing MSR)
        energy.unlink()
        energy.mkdir()
    meters, unavailable = build(tmp_path, opened)
    assert [(u.component, u.quiet) for u in unavailable] == [(Component.RAM, True)]  # no dram
    cpu = meters[Component.CPU]
    assert [d.id for d in cpu.devices] == ["cpu:package-0", "cpu:package-1"]
    cpu.start()
    t0 = time.monotonic()
    set_energy(tmp_path, "intel-rapl:0", 3.0)
    assert isinstance(cpu.sample(t0 + 0.5)["cpu:package-1"], DeviceError)
    if bad == "directory":
        energy.rmdir()
    set_energy(tmp_path, "intel-rapl:1", 12.0)
    assert cpu.sample(t0 + 1.0) == {"cpu:package-0": 2.0, "cpu:package-1": 0.0}
    set_energy(tmp_path, "intel-rapl:1", 15.0)
    assert cpu.sample(t0 + 1.5) == {"cpu:package-0": 2.0, "cpu:package-1": 3.0}
    assert any("unreadable at start" in note for note in cpu.notes())


def test_counters_that_never_read_at_discovery_leave_the_cpu_to_the_estimate(
    tmp_path: Path, opened: list[Meter]
) -> None:
    # Unlike one transient failure, no package readable at all: a RAPL meter would report 0 J
    # forever and hide the CPU; the estimate must take over instead.
    zone(tmp_path, "intel-rapl:0", "package-0", 1.0, max_power_w=100.0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("")
    meters, unavailable = build(tmp_path, opened)
    assert Component.CPU not in meters
    (cpu,) = [u for u in unavailable if u.component is Component.CPU]
    assert "no read of" in cpu.reason and "estimate is used" in cpu.reason


def test_no_powercap_tree_is_said_once_per_process_whatever_the_number_of_runs(
    tmp_path: Path,
) -> None:
    """No RAPL here: the CPU figure falls back to the ±50 % estimate, said once per process (a
    warning record, not a GreenMlopsWarning: nothing to fix on a VM) and never again at the
    next run; doctor and the run's provenance keep it (trial 7: decided to stay a warning)."""
    code = "from green_mlops import Tracker\nfor _ in range(3):\n    Tracker().start().stop()\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREEN_MLOPS_")}
    out = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        env={**env, "GREEN_MLOPS_RAPL_ROOT": str(tmp_path / "none"), "GREEN_MLOPS_LOCATION": "DE"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "no RAPL powercap tree" in line]
    assert len(said) == 1, out.stderr
    assert said[0].startswith("green-mlops: rapl (cpu): ") and "CPU estimate is used" in said[0]
