"""Plugins arrive through entry points: a third-party distribution is used like a built-in one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent(
    '''
    """A third-party meter: a constant-power smart plug."""
    import time

    from green_mlops import Component, Device, Meter, Method, hookimpl


    class PlugMeter(Meter):
        name = "smart_plug"

        def __init__(self):
            super().__init__([Device("plug:0", Component.OTHER, Method.SAMPLED_POWER, 0.01)])

        def start(self):
            self.t0 = time.monotonic()

        def sample(self, now):
            return {"plug:0": 42.0 * (now - self.t0)}


    @hookimpl
    def green_mlops_meters(settings):
        return [PlugMeter()]
    '''
)

RUN = textwrap.dedent(
    """
    import json, time
    from green_mlops import Tracker
    from green_mlops.plugin_manager import get_plugin_manager
    t = Tracker(sample_interval_s=0.05).start()
    time.sleep(0.2)
    s = t.stop()
    pm = get_plugin_manager(t.settings.disable_plugins)
    print(json.dumps({
        "plugins": sorted(n for n, p in pm.list_name_plugin() if p is not None),
        "errors": pm.load_errors,
        "devices": {d.device: d.joules for d in s.devices},
        "duration": s.duration_s,
        "unavailable": list(s.unavailable),
    }))
    """
)


def _install_distribution(site: Path, name: str, module: str, source: str) -> None:
    """A real (unzipped) distribution: a module plus a .dist-info with an entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[green_mlops]\n{name} = {module}\n")
    (info / "RECORD").write_text("")


def _run(site: Path, **env: str) -> dict[str, object]:
    import os

    environ = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", **env}
    proc = subprocess.run(
        [sys.executable, "-c", RUN],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    _install_distribution(tmp_path, "smart_plug", "smart_plug_meter", PLUGIN)
    _install_distribution(tmp_path, "broken_plugin", "broken_meter", "raise ImportError('oops')")
    return tmp_path


def test_third_party_meter_is_used_like_a_builtin(site: Path) -> None:
    result = _run(site)
    assert "smart_plug" in result["plugins"]  # type: ignore[operator]
    devices = result["devices"]
    assert isinstance(devices, dict)
    assert devices["plug:0"] == pytest.approx(42.0 * result["duration"], rel=0.01)  # type: ignore[operator]
    # the built-ins came through the same entry-point group
    assert {"cpu_estimate", "ram_estimate", "rapl", "nvml"} <= set(result["plugins"])  # type: ignore[arg-type]


def test_a_broken_plugin_is_reported_and_does_not_stop_the_others(site: Path) -> None:
    result = _run(site)
    assert "broken_plugin" in result["errors"]  # type: ignore[operator]
    assert "oops" in result["errors"]["broken_plugin"]  # type: ignore[index]
    assert any("broken_plugin" in u for u in result["unavailable"])  # type: ignore[union-attr]
    assert "plug:0" in result["devices"]  # type: ignore[operator]


def test_plugins_can_be_disabled_by_name(site: Path) -> None:
    result = _run(site, GREEN_MLOPS_DISABLE_PLUGINS="smart_plug,broken_plugin")
    assert "smart_plug" not in result["plugins"]  # type: ignore[operator]
    assert "plug:0" not in result["devices"]  # type: ignore[operator]
    assert result["errors"] == {}


def test_builtins_are_declared_as_entry_points_of_this_distribution() -> None:
    eps = {
        ep.name: ep.value
        for ep in distribution("green-mlops").entry_points
        if ep.group == "green_mlops"
    }
    assert eps == {
        "nvml": "green_mlops.plugins.nvml",
        "rapl": "green_mlops.plugins.rapl",
        "cpu_estimate": "green_mlops.plugins.cpu_estimate",
        "ram_estimate": "green_mlops.plugins.ram_estimate",
        "static_intensity": "green_mlops.plugins.static_intensity",
        "constant_intensity": "green_mlops.plugins.constant_intensity",
        "electricitymaps": "green_mlops.plugins.electricitymaps",
        "watttime": "green_mlops.plugins.watttime",
        "uk_carbon_intensity": "green_mlops.plugins.uk_carbon_intensity",
    }


def test_import_green_mlops_is_cheap() -> None:
    code = (
        "import sys, green_mlops; "
        "print(','.join(m for m in ('torch','mlflow','lightning','pluggy','psutil','requests',"
        "'pynvml','green_mlops.tracker') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == ""
