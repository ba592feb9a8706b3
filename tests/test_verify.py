"""``green-mlops verify``: the report v2 carries what a third party needs to recompute the
figures, and verify recomputes them (docs/report-format.md).

Reports come from real runs: the MLflow plugin in a subprocess against a real server
(tests/green_runs.py) and a real Lightning fit with EnergyMonitor and a CSVLogger. Tampered
copies of them must fail, naming the figure.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from green_mlops.carbon import account, resolve
from green_mlops.cli import main
from green_mlops.config import ConfigError, Settings
from green_mlops.intensity import IntensityPoint, IntensitySeries
from green_mlops.session import Measurement
from green_mlops.verify import digest, price_timeline, verify_report
from tests.green_runs import INTENSITY_G_PER_KWH, PRICE_PER_KWH, RunSpec, make_runs, plugin_env
from tests.mlflow_server import MlflowServer

EMBODIED_KG = 120.0


def download(server: MlflowServer, run_id: str, folder: Path) -> Path:
    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(server.url)
    return Path(client.download_artifacts(run_id, "green/report.json", str(folder)))


@pytest.fixture(scope="module")
def plugin_reports(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """green/report.json of real plugin runs: a parent with a nested child (location-based,
    embodied set, so SCI is reported), and a run priced by a market-based constant only."""
    work = tmp_path_factory.mktemp("verify-runs")
    ids = make_runs(
        mlflow_server,
        [RunSpec("verify", "parent", busy_s=1.2, children=[RunSpec("verify", "child")])],
        work / "location",
        GREEN_MLOPS_EMBODIED_KGCO2E=f"{EMBODIED_KG:g}",
    )
    ids |= make_runs(
        mlflow_server,
        [RunSpec("verify-market", "market")],
        work / "market",
        GREEN_MLOPS_INTENSITY_BASIS="market-based",
        GREEN_MLOPS_EMBODIED_KGCO2E=f"{EMBODIED_KG:g}",
    )
    return {name: download(mlflow_server, run_id, work / name) for name, run_id in ids.items()}


def verify_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["verify", str(path)])
    out = capsys.readouterr().out
    return code, " ".join(out.split())  # rich wraps long lines


def tampered(path: Path, tmp_path: Path, change: Any) -> Path:
    report = json.loads(path.read_text())
    change(report)
    out = tmp_path / "tampered.json"
    out.write_text(json.dumps(report))
    return out


# --- real runs verify -------------------------------------------------------------------------


def test_a_real_plugin_run_verifies(
    plugin_reports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("parent", "child"):
        code, out = verify_cli(plugin_reports[name], capsys)
        assert code == 0, out
        assert "verified" in out and "MISMATCH" not in out
    report = json.loads(plugin_reports["parent"].read_text())
    acc = report["accounting"]
    assert report["schema"] == "green-mlops/report/v2"
    # what a third party needs is in the file: the inputs as configured in the run's process
    assert acc["pue"] == 1.0 and acc["price_per_kwh"] == PRICE_PER_KWH
    assert acc["currency"] == "EUR" and acc["embodied"]["total_kgco2e"] == EMBODIED_KG
    assert acc["functional_unit"] == "run" and acc["functional_units"] == 1.0
    assert [i["g_per_kwh"] for i in acc["intervals"]] == [INTENSITY_G_PER_KWH]
    (interval,) = acc["intervals"]
    assert interval["source"] == "constant" and interval["zone"] == "DE"
    assert interval["start"] == acc["timeline"][0][0]  # clipped to the priced span
    assert interval["end"] == acc["timeline"][-1][0]
    assert acc["market_intervals"] is None
    # the parent's logged totals leave out the child's: the adjustment says by how much
    child = json.loads(plugin_reports["child"].read_text())
    nested = acc["adjustments"]["nested_runs"]
    assert nested["green/co2e_g"] == pytest.approx(child["metrics"]["green/co2e_g"])
    assert report["metrics"]["green/co2e_g"] == pytest.approx(
        acc["figures"]["co2e_g"] - nested["green/co2e_g"]
    )
    assert report["digests"]["timeline"] == digest(acc["timeline"])


def test_a_tampered_timeline_value_fails_naming_it(
    plugin_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def change(report: dict[str, Any]) -> None:
        timeline = report["accounting"]["timeline"]
        timeline[-1][1] *= 1.5  # the run's last cumulative joules

    code, out = verify_cli(tampered(plugin_reports["parent"], tmp_path, change), capsys)
    assert code == 1
    assert "MISMATCH digests.timeline" in out
    assert "vs energy.timeline" in out  # the timeline no longer is the snapshot's
    assert "MISMATCH accounting.figures.energy_kwh" in out and "MISMATCH green/co2e_g" in out


def test_a_tampered_intermediate_point_is_caught_by_the_digest(
    plugin_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At a constant intensity an inner point changes no total: the digest still catches it."""

    def change(report: dict[str, Any]) -> None:
        timeline = report["accounting"]["timeline"]
        assert len(timeline) >= 3  # 1.2 s at a 0.5 s interval: inner points exist
        timeline[1][1] += 1.0

    code, out = verify_cli(tampered(plugin_reports["parent"], tmp_path, change), capsys)
    assert code == 1 and "MISMATCH digests.timeline" in out
    assert "MISMATCH green/co2e_g" not in out  # the figures still add up


def test_a_shifted_time_is_caught_against_the_snapshot(plugin_reports: dict[str, Path]) -> None:
    report = json.loads(plugin_reports["parent"].read_text())
    assert len(report["accounting"]["timeline"]) >= 3  # an inner point: the span stays
    report["accounting"]["timeline"][1][0] += 0.1  # far below a relative 1e-9 of a Unix time
    names = [c.name for c in verify_report(report).mismatches]
    assert names == ["digests.timeline", "accounting.timeline[1] vs energy.timeline"]


def test_a_tampered_intensity_fails_naming_the_carbon(
    plugin_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def change(report: dict[str, Any]) -> None:
        report["accounting"]["intervals"][0]["g_per_kwh"] = 150.0

    code, out = verify_cli(tampered(plugin_reports["parent"], tmp_path, change), capsys)
    assert code == 1
    assert "MISMATCH digests.intervals" in out
    for name in ("accounting.figures.co2e_g", "green/co2e_g", "green/sci_g_per_run"):
        assert f"MISMATCH {name}" in out
    assert "MISMATCH green/cost" not in out and "MISMATCH green/energy_kwh" not in out


def test_a_tampered_reported_carbon_fails_with_both_values(
    plugin_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(plugin_reports["child"].read_text())
    real = report["metrics"]["green/co2e_g"]

    def change(report: dict[str, Any]) -> None:
        report["metrics"]["green/co2e_g"] = real * 0.9

    code, out = verify_cli(tampered(plugin_reports["child"], tmp_path, change), capsys)
    assert code == 1
    assert f"MISMATCH green/co2e_g: reported {real * 0.9:.12g}, recomputed {real:.12g}" in out
    assert out.count("MISMATCH") == 2  # the table's mark and the line; nothing else
    assert "digests" not in out.split("MISMATCH green/co2e_g:")[1]


@pytest.mark.slow
def test_a_resumed_run_verifies_with_its_earlier_segment(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = make_runs(mlflow_server, [RunSpec("verify-resumed", "resumed")], tmp_path)
    code = (
        "import mlflow, time\n"
        f"with mlflow.start_run(run_id={ids['resumed']!r}):\n"
        "    end = time.perf_counter() + 0.3\n"
        "    while time.perf_counter() < end: pass\n"
    )
    env = plugin_env(mlflow_server, tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = download(mlflow_server, ids["resumed"], tmp_path / "after")
    report = json.loads(path.read_text())
    earlier = report["accounting"]["adjustments"]["earlier_segments"]
    assert earlier["green/co2e_g"] > 0  # the first segment's carbon is in the logged total
    assert report["metrics"]["green/co2e_g"] == pytest.approx(
        report["accounting"]["figures"]["co2e_g"] + earlier["green/co2e_g"]
    )
    exit_code, out = verify_cli(path, capsys)
    assert exit_code == 0, out


def test_a_v1_report_cannot_be_verified_and_says_so(
    plugin_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def to_v1(report: dict[str, Any]) -> None:
        report["schema"] = "green-mlops/report/v1"
        del report["accounting"], report["digests"]

    code, out = verify_cli(tampered(plugin_reports["parent"], tmp_path, to_v1), capsys)
    assert code == 2
    assert "cannot verify schema 'green-mlops/report/v1'" in out and "intensity intervals" in out
    missing = tmp_path / "missing.json"
    assert main(["verify", str(missing)]) == 2
    assert "not a readable JSON report" in capsys.readouterr().out


def test_a_missing_input_cannot_be_verified(plugin_reports: dict[str, Path]) -> None:
    report = json.loads(plugin_reports["parent"].read_text())
    del report["accounting"]["pue"]
    outcome = verify_report(report)
    assert outcome.exit_code == 2 and outcome.unverifiable == [
        "pue: missing or not a finite number (got None)"
    ]


# --- SCI correctness: market-based intensity -----------------------------------------------


def test_market_based_constant_only_reports_market_carbon_and_no_sci(
    plugin_reports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(plugin_reports["market"].read_text())
    metrics, tags = report["metrics"], report["tags"]
    kwh = metrics["green/energy_kwh"]
    assert metrics["green/co2e_market_g"] == pytest.approx(INTENSITY_G_PER_KWH * kwh)
    assert "green/co2e_g" not in metrics and "green/sci_g_per_run" not in metrics
    assert "green/embodied_g" in metrics  # the other term is there: SCI is absent for the basis
    assert "sci: SCI excludes market-based intensity" in tags["green.not_reported"]
    assert "co2e: only market-based intensity" in tags["green.not_reported"]
    assert tags["green.intensity.market"].startswith("market-based (green/co2e_market_g")
    assert report["accounting"]["intervals"] == []
    assert report["accounting"]["market_intervals"][0]["basis"] == "market-based"
    code, out = verify_cli(plugin_reports["market"], capsys)
    assert code == 0, out


def test_market_based_constant_with_a_grid_figure_gives_sci_from_the_grid(tmp_path: Path) -> None:
    settings = Settings.load(
        environ={},
        intensity_providers="constant,static",
        intensity_g_per_kwh=10,
        intensity_basis="market",
        location="DE",
        embodied_kgco2e=EMBODIED_KG,
        cache_dir=tmp_path,
        log_interval_s=0.5,
    )
    measurement = Measurement(settings).start()
    busy(0.3)
    result = measurement.stop()
    metrics, tags = result.metrics, result.tags
    kwh = metrics["green/energy_kwh"]
    grid = metrics["green/intensity_g_per_kwh"]
    assert grid > 100  # Germany's yearly figure (static), not the contract's 10
    assert tags["green.intensity.source"].startswith("static/")
    assert metrics["green/co2e_g"] == pytest.approx(grid * kwh)
    assert metrics["green/co2e_market_g"] == pytest.approx(10 * kwh)
    assert metrics["green/sci_g_per_run"] == pytest.approx(
        metrics["green/co2e_g"] + metrics["green/embodied_g"]
    )
    assert verify_report(json.loads(json.dumps(result.report()))).exit_code == 0


def test_the_basis_setting_fails_early_with_the_accepted_form() -> None:
    assert Settings.load(environ={}).intensity_basis == "location-based"
    contract = {"GREEN_MLOPS_INTENSITY_BASIS": "Market", "GREEN_MLOPS_INTENSITY_G_PER_KWH": "20"}
    assert Settings.load(environ=contract).intensity_basis == "market-based"
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_INTENSITY_BASIS": "ppa"})
    assert str(info.value) == (
        "GREEN_MLOPS_INTENSITY_BASIS='ppa' is not valid: expected location-based or market-based"
    )


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({}, "GREEN_MLOPS_INTENSITY_G_PER_KWH is not set: set it to the contract's gCO2e/kWh"),
        (
            {"GREEN_MLOPS_INTENSITY_G_PER_KWH": "20", "GREEN_MLOPS_INTENSITY_PROVIDERS": "static"},
            "GREEN_MLOPS_INTENSITY_PROVIDERS lacks `constant`: add it (e.g. constant,static)",
        ),
    ],
)
def test_a_market_basis_without_a_contract_figure_fails_early(
    environ: dict[str, str], missing: str
) -> None:
    """The basis qualifies the user's constant: without one, no contract figure would ever be
    reported, and the user would believe their PPA was counted."""
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_INTENSITY_BASIS": "market-based", **environ})
    assert str(info.value) == (
        "GREEN_MLOPS_INTENSITY_BASIS=market-based names the basis of a contract's figure, but "
        f"{missing}, or unset GREEN_MLOPS_INTENSITY_BASIS"
    )


# --- the Lightning callback's report --------------------------------------------------------


@pytest.mark.slow
def test_a_lightning_report_verifies_and_so_does_it_after_a_second_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lightning.pytorch as pl

    from green_mlops.integrations.lightning import EnergyMonitor
    from tests.test_energy_monitor import Classifier, loader

    settings = {
        "intensity_providers": "constant",
        "intensity_g_per_kwh": INTENSITY_G_PER_KWH,
        "location": "DE",
        "price_per_kwh": PRICE_PER_KWH,
        "embodied_kgco2e": EMBODIED_KG,
        "log_interval_s": 0.5,
    }
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[EnergyMonitor(settings=settings)],
        logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Classifier(), loader(), loader(1))
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    path = Path(trainer.logger.log_dir) / "green_report.json"
    code, out = verify_cli(path, capsys)
    assert code == 0, out
    report = json.loads(path.read_text())
    assert report["metrics"]["green/sci_g_per_run"] > 0
    code, out = verify_cli(
        tampered(path, tmp_path, lambda r: r["metrics"].update({"green/cost": 1.0})), capsys
    )
    assert code == 1 and "MISMATCH green/cost" in out
    # a second stage: the report covers both stages, as the run's totals do
    trainer.validate(trainer.lightning_module, loader(1))
    code, out = verify_cli(path, capsys)
    assert code == 0 and "MISMATCH" not in out, out
    assert [s["stage"] for s in json.loads(path.read_text())["energy"]["stages"]] == [
        "fit",
        "validate",
    ]


@pytest.mark.slow
def test_a_lightning_run_priced_by_a_contract_keeps_its_market_carbon(tmp_path: Path) -> None:
    """The callback's totals (summed over stages and ranks) carry green/co2e_market_g too."""
    import lightning.pytorch as pl

    from green_mlops.integrations.lightning import EnergyMonitor
    from tests.test_energy_monitor import Classifier, loader

    settings = {
        "intensity_providers": "constant,static",
        "intensity_g_per_kwh": 10,
        "intensity_basis": "market-based",
        "location": "DE",
        "cache_dir": str(tmp_path / "cache"),
    }
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[EnergyMonitor(settings=settings)],
        logger=pl.loggers.CSVLogger(tmp_path, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Classifier(), loader(), loader(1))
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    report = json.loads((Path(trainer.logger.log_dir) / "green_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["green/co2e_market_g"] == pytest.approx(10 * metrics["green/energy_kwh"])
    assert metrics["green/co2e_g"] > metrics["green/co2e_market_g"]  # the grid's, not the PPA's
    assert verify_report(report).exit_code == 0


# --- the verifier's own pricing is account()'s --------------------------------------------


def series(points: list[tuple[float, float, float]], name: str) -> IntensitySeries:
    pts = tuple(IntensityPoint(a, b, g) for a, b, g in points)
    return IntensitySeries(pts, name, "test", "DE", "average", "lifecycle", False, "test")


@pytest.mark.parametrize("steps", [[(600, 4e5), (1800, 2e6), (1200, 0), (3, 5e3)], [(7200, 9e6)]])
def test_priced_intervals_reproduce_account(steps: list[tuple[float, float]]) -> None:
    """The intervals the report carries (resolve: first series wins, clipped to the span)
    price the timeline to the same grams as account() on the chain itself."""
    t0 = 1_700_000_000.0
    points = [(t0, 0.0)]
    for dt, joules in steps:
        points.append((points[-1][0] + dt, points[-1][1] + joules))
    hourly = series([(t0 + h * 3600 + 900, t0 + (h + 1) * 3600, 100.0 + h) for h in range(2)], "a")
    gappy = series([(t0 + 300, t0 + 1000, 700.0)], "b")
    table = series([(-math.inf, math.inf, 321.0)], "c")
    for chain in ([hourly, gappy, table], [gappy, hourly], [table]):
        result = account(points, chain)
        intervals = [(p.start, p.end, p.g_per_kwh) for p in result.intervals]
        assert result.intervals == resolve(chain, points[0][0], points[-1][0])
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals))
        grams, priced, unpriced = price_timeline(points, intervals)
        assert grams == pytest.approx(result.grams, rel=1e-12)
        assert unpriced == pytest.approx(result.unpriced_kwh, rel=1e-12, abs=1e-15)
        assert priced + unpriced == pytest.approx(result.kwh, rel=1e-12)


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_digest_is_of_the_canonical_encoding() -> None:
    value = {"b": [1.5, 2], "a": None}
    same = copy.deepcopy({"a": None, "b": [1.5, 2]})
    assert digest(value) == digest(same)
    expected = hashlib.sha256(b'{"a":null,"b":[1.5,2]}').hexdigest()
    assert digest(value) == f"sha256:{expected}"


@pytest.mark.parametrize(
    ("edit", "caught"),
    [
        (lambda r: r["energy"].update(kwh=2 * r["energy"]["kwh"]), "energy.kwh"),
        (
            lambda r: r["energy"]["devices"][0].update(
                joules=2 * r["energy"]["devices"][0]["joules"]
            ),
            "(its devices)",
        ),
        (
            lambda r: r["energy"]["joules_by_component"].update(
                cpu=2 * r["energy"]["joules_by_component"]["cpu"]
            ),
            "energy.joules_by_component (sum)",
        ),
        (lambda r: r["metrics"].update({"green/energy/cpu_kwh": 1.0}), "green/energy/cpu_kwh"),
        (lambda r: r["metrics"].update({"green/phase/other_kwh": 1.0}), "green/phase/other_kwh"),
        (
            lambda r: r["metrics"].update({"green/intensity_g_per_kwh": 40.0}),
            "green/intensity_g_per_kwh",
        ),
        (
            lambda r: r["footprint"].update(intensity_g_per_kwh=40.0),
            "footprint.intensity_g_per_kwh",
        ),
    ],
)
def test_a_part_edited_alone_no_longer_adds_up(
    plugin_reports: dict[str, Path], edit: Any, caught: str
) -> None:
    # a new user doubled one figure at a time: verify said "25 checks match"
    report = json.loads(plugin_reports["child"].read_text())
    assert verify_report(report).exit_code == 0
    edit(report)
    mismatches = [c.name for c in verify_report(report).mismatches]
    assert any(caught in name for name in mismatches), mismatches
