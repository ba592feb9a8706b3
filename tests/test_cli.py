"""The `green-mlops` command, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking.client import MlflowClient

from green_mlops.config import settings_table


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    environ.update({"COLUMNS": "200", **env})  # COLUMNS=80 in env: a narrow terminal
    return subprocess.run(
        [sys.executable, "-m", "green_mlops", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def fake_rapl(root: Path, microjoules: int = 1_000_000) -> None:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{microjoules}\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")


def test_doctor_lists_active_and_unavailable_meters_with_fixes(tmp_path: Path) -> None:
    out = cli("doctor", "--sample", "0.2", GREEN_MLOPS_RAPL_ROOT=str(tmp_path / "none"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "cpu_estimate" in text and "active" in text
    assert "rapl" in text and "unavailable" in text and "fix:" in text
    assert "Carbon intensity for location unknown" in text and "static" in text
    assert "Power over 0.2 s" in text


def test_doctor_says_each_problem_once_in_its_table_not_again_as_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    out = cli("doctor", "--sample", "0.2", GREEN_MLOPS_RAPL_ROOT=str(missing))
    assert out.returncode == 0, out.stderr
    assert str(missing) in " ".join(out.stdout.split())  # the meter table says it, with the fix
    assert "Power over 0.2 s" in out.stdout
    assert out.stderr == ""


def test_doctor_prefers_a_rapl_counter_over_the_estimate(tmp_path: Path) -> None:
    fake_rapl(tmp_path)
    out = cli("doctor", "--sample", "0", GREEN_MLOPS_RAPL_ROOT=str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert any("rapl" in r and "active" in r and "cpu:package-0" in r for r in rows)
    assert any("cpu_estimate" in r and "superseded" in r for r in rows)
    # each entry's detail is on the lines under its fields
    at = next(i for i, r in enumerate(rows) if "rapl" in r and "unavailable" in r)
    assert "no dram domain" in rows[at + 1]


def test_help_says_what_the_tool_is_for_and_lists_every_command() -> None:
    from green_mlops.cli import COMMANDS

    out = cli("--help")
    assert out.returncode == 0
    assert "``" not in out.stdout  # no raw reStructuredText (a new user read it)
    assert "energy and carbon" in out.stdout
    for command in ("doctor", "demo", "config", "sync", *COMMANDS):
        assert f"    {command} " in out.stdout, command


def test_config_lists_every_setting() -> None:
    out = cli("config")
    assert out.returncode == 0
    for variable, *_ in settings_table():
        assert variable in out.stdout


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    out = cli("doctor", GREEN_MLOPS_SHARE="everyone")
    assert out.returncode == 2
    assert "GREEN_MLOPS_SHARE='everyone' is not valid" in out.stderr
    assert "machine or process" in out.stderr


@pytest.mark.slow
def test_demo_trains_measures_and_stores_in_the_local_mlflow_store(tmp_path: Path) -> None:
    out = cli(
        "demo",
        "--epochs",
        "2",
        cwd=tmp_path,
        GREEN_MLOPS_LOCATION="FR",
        GREEN_MLOPS_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mlflow.db").exists()
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out.stdout
    assert f"{Path(sys.executable).parent / 'mlflow'} ui" in out.stdout  # this environment's
    assert "val_acc" in out.stdout and "phase train" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("green-mlops-demo").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["green/energy_kwh"] > 0 and metrics["green/co2e_g"] > 0
    assert metrics["green/phase/train_kwh"] > 0 and metrics["green/phase/validation_kwh"] > 0
    assert runs[0].data.tags["green.location"].startswith("FR")


def test_demo_runs_get_different_names_and_stay_reproducible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from green_mlops.integrations.demo import EXPERIMENT, run_demo

    # the demo's own store: with the embedded sqlite store MLflow names runs in this process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GREEN_MLOPS_CACHE_DIR", str(tmp_path / "cache"))
    first = run_demo(epochs=1, samples=512)
    second = run_demo(epochs=1, samples=512)
    client = MlflowClient(uri)
    names = {client.get_run(r.run_id).info.run_name for r in (first, second)}
    assert len(names) == 2, names
    assert client.get_experiment_by_name(EXPERIMENT) is not None
    # still reproducible: the same seed trains the same model
    assert first.val_acc == second.val_acc


@pytest.mark.parametrize(
    ("without", "named"),
    [
        (("lightning", "pytorch_lightning"), "lightning"),
        (("sqlalchemy", "alembic"), "sqlalchemy, alembic"),
    ],
)
def test_demo_without_its_extra_says_how_to_install_it(
    tmp_path: Path, without: tuple[str, ...], named: str
) -> None:
    """Without Lightning, or with mlflow-skinny (no server side: no sqlite store)."""
    from tests.test_plugin_manager import _run_uninstalled, _uninstalled

    path = _uninstalled(tmp_path, without=without)
    out = _run_uninstalled(path, "-m", "green_mlops", "demo", "--epochs", "1")
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"green-mlops demo: not installed: {named}; the demo needs Lightning and MLflow with "
        'its local store (sqlite:///mlflow.db): pip install "green-mlops[demo]"'
    ]
    assert out.stdout == ""
    assert not (Path(path[0]) / "mlflow.db").exists()


def test_sync_without_mlflow_says_how_to_install_it(tmp_path: Path) -> None:
    import os

    from tests.test_plugin_manager import _uninstalled

    path = _uninstalled(tmp_path, without=("mlflow", "filelock"))
    spool = tmp_path / "cache" / "spool"
    spool.mkdir(parents=True)
    (spool / "0123abcd.jsonl").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "PYTHON"))}
    out = subprocess.run(
        [sys.executable, "-S", "-m", "green_mlops", "sync"],
        env={
            **env,
            "PYTHONPATH": os.pathsep.join(path),
            "GREEN_MLOPS_CACHE_DIR": str(spool.parent),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "green-mlops sync: 1 run(s) wait in the spool, but MLflow is not installed (mlflow, "
        'filelock): pip install "green-mlops[mlflow]"'
    ]
    assert (spool / "0123abcd.jsonl").read_text() == "{}\n"  # kept for when it is


def test_the_printed_mlflow_command_is_the_one_next_to_this_python(tmp_path: Path) -> None:
    from green_mlops.cli import mlflow_command

    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.touch()
    assert mlflow_command(str(python)) == "mlflow"  # not installed beside it: the PATH's
    (python.parent / "mlflow").touch()
    assert mlflow_command(str(python)) == str(python.parent / "mlflow")
    assert mlflow_command(sys.executable) == str(Path(sys.executable).parent / "mlflow")


def test_doctor_sample_is_quiet_even_after_the_logger_was_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from green_mlops.cli import doctor
    from green_mlops.config import Settings

    caplog.set_level(logging.WARNING, logger="green_mlops")
    logging.getLogger("green_mlops").warning("an earlier warning")  # fills logging's cache
    root = tmp_path / "no-rapl-here"
    before = len(caplog.records)
    assert doctor(Settings.load(environ={}, rapl_root=root), 0.1) == 0
    said = [r.getMessage() for r in caplog.records[before:] if r.name.startswith("green_mlops")]
    assert not any(str(root) in message for message in said), said
    assert logging.getLogger("green_mlops").level == logging.WARNING  # restored
