"""Plugins arrive through entry points: a third-party distribution is used like a built-in one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer

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
    # and the built-ins beside it
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


def test_builtins_are_registered_by_module_not_through_this_distributions_entry_points() -> None:
    from green_mlops.plugin_manager import DEFAULT_PLUGINS

    assert {module.rpartition(".")[2]: module for module in DEFAULT_PLUGINS} == {
        "nvml": "green_mlops.plugins.nvml",
        "rapl": "green_mlops.plugins.rapl",
        "slurm_energy": "green_mlops.plugins.slurm_energy",
        "cpu_estimate": "green_mlops.plugins.cpu_estimate",
        "ram_estimate": "green_mlops.plugins.ram_estimate",
        "static_intensity": "green_mlops.plugins.static_intensity",
        "constant_intensity": "green_mlops.plugins.constant_intensity",
        "electricitymaps": "green_mlops.plugins.electricitymaps",
        "watttime": "green_mlops.plugins.watttime",
        "uk_carbon_intensity": "green_mlops.plugins.uk_carbon_intensity",
    }
    # declared twice they would be two sources of truth: the group is for other distributions
    assert [
        ep for ep in distribution("green-mlops").entry_points if ep.group == "green_mlops"
    ] == []


def _uninstalled(tmp_path: Path, without: tuple[str, ...] = ()) -> list[str]:
    """``sys.path`` of a copy of green-mlops that is not installed: the package laid out as
    files (symlinks into this checkout, as a wheel lays it out) with no distribution metadata,
    beside this environment's other packages, less the distributions named in ``without``.
    Run with ``python -S`` (no site: neither the editable install's finder nor its metadata)."""
    import site

    tree = tmp_path / "copy" / "green_mlops"
    tree.mkdir(parents=True)
    for entry in (ROOT / "green_mlops").iterdir():
        if entry.name != "__pycache__":
            (tree / entry.name).symlink_to(entry)
    (tree / "plugins").symlink_to(ROOT / "plugins")
    (tree / "integrations").symlink_to(ROOT / "integrations")
    deps = tmp_path / "deps"
    deps.mkdir()
    left_out = ("green_mlops", "__editable__", *without)
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            name = entry.name.replace("-", "_").lower()
            if not name.startswith(left_out) and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    return [str(tree.parent), str(deps)]


def _run_uninstalled(path: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    import os

    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GREEN_MLOPS_", "MLFLOW_", "PYTHON"))
    }
    return subprocess.run(
        [sys.executable, "-S", *args],
        env={**base, "PYTHONPATH": os.pathsep.join(path), "COLUMNS": "250"},
        cwd=path[0],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_builtins_load_from_a_copy_that_is_not_installed(tmp_path: Path) -> None:
    path = _uninstalled(tmp_path)
    probe = (
        "import importlib.metadata as m, json; "
        "from green_mlops.plugin_manager import get_plugin_manager; "
        "pm = get_plugin_manager(); "
        "print(json.dumps({'eps': len(m.entry_points(group='green_mlops')), "
        "'dists': [d.metadata['Name'] for d in m.distributions() "
        "if d.metadata['Name'] == 'green-mlops'], "
        "'plugins': sorted(n for n, p in pm.list_name_plugin() if p is not None), "
        "'origins': sorted(set(pm.origins.values())), 'errors': pm.load_errors}))"
    )
    proc = _run_uninstalled(path, "-c", probe)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eps"] == 0 and result["dists"] == []  # really not installed
    assert result["plugins"] == [
        "constant_intensity",
        "cpu_estimate",
        "electricitymaps",
        "nvml",
        "ram_estimate",
        "rapl",
        "slurm_energy",
        "static_intensity",
        "uk_carbon_intensity",
        "watttime",
    ]
    from green_mlops import __version__

    assert result["origins"] == [f"green-mlops {__version__}"]
    assert result["errors"] == {}


def test_a_missing_extra_is_named_with_its_install_command(tmp_path: Path) -> None:
    path = _uninstalled(tmp_path, without=("lightning", "pytorch_lightning", "matplotlib"))
    proc = _run_uninstalled(path, "-m", "green_mlops", "doctor", "--sample", "0")
    assert proc.returncode == 0, proc.stderr
    said = {
        line.split(":")[0]: line for line in (" ".join(x.split()) for x in proc.stdout.splitlines())
    }
    assert said["lightning"].startswith(
        'lightning: missing (lightning): pip install "green-mlops[lightning]" for '
    )
    assert said["plot"].startswith('plot: missing (matplotlib): pip install "green-mlops[plot]" ')
    assert said["mlflow"].startswith("mlflow: installed ")
    assert said["nvidia"].startswith("nvidia: installed ")
    proc = _run_uninstalled(
        path, "-c", "from green_mlops.integrations.lightning import EnergyMonitor"
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and 'pip install "green-mlops[lightning]"' in last


def test_a_distribution_listing_a_builtin_again_does_not_register_it_twice(
    tmp_path: Path,
) -> None:
    info = tmp_path / "nvml_again-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvml_again\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[green_mlops]\nnvml_again = green_mlops.plugins.nvml\nrapl = green_mlops.plugins.rapl\n"
    )
    result = _run(tmp_path)
    assert result["errors"] == {}
    assert "nvml_again" not in result["plugins"]  # type: ignore[operator]
    assert {"nvml", "rapl"} <= set(result["plugins"])  # type: ignore[arg-type]


def test_doctor_says_which_distribution_each_plugin_comes_from(site: Path) -> None:
    import os

    from green_mlops import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "green_mlops", "doctor", "--sample", "0"],
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("│")[1:-1] for line in proc.stdout.splitlines() if line.startswith("│")]
    plugins = {
        cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows if len(cells) == 3
    }
    assert plugins["smart_plug"] == ["smart_plug 1.0", "loaded"]
    assert plugins["rapl"] == [f"green-mlops {__version__}", "loaded"]
    assert plugins["broken_plugin"] == ["broken_plugin 1.0", "failed: ImportError: oops"]


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


# --- a plugin whose hook raises, or that misspells a hook, harms nobody else -----------------

RAISING = textwrap.dedent(
    '''
    """A third-party plugin whose hooks raise (a bug in it, or a missing library at call time)."""
    from green_mlops import hookimpl


    @hookimpl
    def green_mlops_meters(settings):
        raise RuntimeError("meter hook exploded")


    @hookimpl
    def green_mlops_intensity_providers(settings):
        raise RuntimeError("provider hook exploded")
    '''
)

MISSPELLED = textwrap.dedent(
    '''
    """A plugin with a typo in a hook name: pluggy would silently never call it."""
    from green_mlops import hookimpl


    @hookimpl
    def green_mlops_meter(settings):
        return []
    '''
)

MLFLOW_RUN = textwrap.dedent(
    """
    import json, time, mlflow
    mlflow.set_experiment("raising-plugin")
    with mlflow.start_run() as run:
        time.sleep(0.6)
    print(json.dumps({"run_id": run.info.run_id}))
    """
)


@pytest.fixture
def raising_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    _install_distribution(site, "raising_plugin", "raising_plugin_mod", RAISING)
    _install_distribution(site, "misspelled_plugin", "misspelled_plugin_mod", MISSPELLED)
    return site


def _environ(site: Path, tmp_path: Path, **env: str) -> dict[str, str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    return {
        **base,
        "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
        "COLUMNS": "250",
        **env,
    }


def test_a_raising_hook_leaves_the_run_its_numbers_and_says_which_plugin(
    raising_site: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking.client import MlflowClient

    script = tmp_path / "train.py"
    script.write_text(MLFLOW_RUN)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=_environ(
            raising_site,
            tmp_path,
            GREEN_MLOPS_ENABLE="1",
            GREEN_MLOPS_LOCATION="DE",
            MLFLOW_TRACKING_URI=mlflow_server.url,
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    # the built-in meters and providers still measured and priced the run
    assert metrics["green/energy_kwh"] > 0 and metrics["green/co2e_g"] > 0
    assert "static" in tags["green.intensity.source"]
    # each failure is said, with the plugin's name and the error
    assert "raising_plugin" in tags["green.unavailable"]
    assert "meter hook exploded" in tags["green.unavailable"]
    assert "raising_plugin" in tags["green.intensity.fallbacks"]
    assert "provider hook exploded" in tags["green.intensity.fallbacks"]
    # the misspelled hook is reported (pluggy's check_pending), not silently ignored
    assert "misspelled_plugin" in tags["green.unavailable"]
    assert "green_mlops_meter" in tags["green.unavailable"]


def test_doctor_shows_raising_and_misspelled_plugins_and_still_measures(
    raising_site: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "green_mlops", "doctor", "--sample", "0.2"],
        env=_environ(raising_site, tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # rich wraps long cells
    assert "meter hook exploded" in text and "provider hook exploded" in text
    assert "raising_plugin" in text and "misspelled_plugin" in text
    assert "green_mlops_meter" in text and "did you mean green_mlops_meters" in text
    assert "Power over 0.2 s" in text


def test_hooks_are_called_one_by_one_in_entry_point_order() -> None:
    from green_mlops import hookimpl
    from green_mlops.config import Settings
    from green_mlops.meters import Component, MeterUnavailable
    from green_mlops.plugin_manager import PluginManager, call_hook

    class Good:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def green_mlops_meters(self, settings: Settings) -> list[MeterUnavailable]:
            return [MeterUnavailable(self.name, Component.OTHER, "here")]

    class Bad:
        @hookimpl
        def green_mlops_meters(self, settings: Settings) -> object:
            return 42  # not a list of meters

    pm = PluginManager()
    pm.register(Good("first"), name="first")
    pm.register(Bad(), name="bad")
    pm.register(Good("second"), name="second")
    items, failures = call_hook(
        pm, "green_mlops_meters", (MeterUnavailable,), settings=Settings.load(environ={})
    )
    assert [(plugin, item.name) for plugin, item in items] == [
        ("first", "first"),
        ("second", "second"),
    ]
    assert [(f.plugin, f.hook) for f in failures] == [("bad", "green_mlops_meters")]
    assert "int" in failures[0].error


def test_a_misspelled_disabled_plugin_is_said_with_the_names_there_are() -> None:
    # GREEN_MLOPS_DISABLE_PLUGINS=raple left rapl on without a word
    from green_mlops.log import GreenMlopsWarning
    from green_mlops.plugin_manager import create_plugin_manager

    with pytest.warns(
        GreenMlopsWarning, match=r"'raple', which is no plugin here \(did you mean 'rapl'\?\)"
    ):
        pm = create_plugin_manager(frozenset({"raple"}))
    assert pm.has_plugin("rapl")  # nothing was disabled, and that is what was said
