"""The distribution: its packages, and what a missing extra says (the whole claim, wheel to
tracking server, is scripts/check-install.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from green_mlops.extras import EXTRAS, install_command, missing_modules
from tests.test_plugin_manager import _run_uninstalled, _uninstalled

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_in_the_distribution() -> None:
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+

    config = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    found = {
        ".".join((package, *init.parent.relative_to(ROOT / folder).parts))
        for package, folder in config["package-dir"].items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert sorted(config["packages"]) == sorted(found)


def test_install_command_names_the_extra() -> None:
    assert install_command("plot") == 'pip install "green-mlops[plot]"'
    with pytest.raises(ValueError, match="unknown extra 'gpu': one of mlflow, lightning"):
        install_command("gpu")
    assert all(missing_modules(extra) == [] for extra in EXTRAS)  # the test install has all


CHART = """
import json, sys, warnings
from pathlib import Path
from green_mlops.integrations.mlflow.chart import draw_power

point = {"time": 0.0, "joules_by_component": {"cpu": 0.0}}
report = {"energy": {"timeline": [point, {"time": 1.0, "joules_by_component": {"cpu": 5.0}}]}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    drawn = [draw_power(report, Path(sys.argv[1]) / f"{i}.png") for i in range(2)]
print(json.dumps({"drawn": drawn, "said": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_the_chart_without_matplotlib_names_the_plot_extra_once(tmp_path: Path) -> None:
    path = _uninstalled(tmp_path, without=("matplotlib",))
    proc = _run_uninstalled(path, "-c", CHART, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "drawn": [False, False],
        "said": [
            "GreenMlopsWarning: green-mlops: no power chart: matplotlib is missing: "
            'pip install "green-mlops[plot]"'
        ],
    }
    assert list(tmp_path.glob("*.png")) == []


def test_the_chart_is_drawn_where_matplotlib_is_installed(tmp_path: Path) -> None:
    from green_mlops.integrations.mlflow.chart import draw_power

    point = {"time": 0.0, "joules_by_component": {"cpu": 0.0}}
    later = {"time": 1.0, "joules_by_component": {"cpu": 5.0}}
    assert draw_power({"energy": {"timeline": [point, later]}}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
