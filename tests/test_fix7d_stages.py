"""Trial 7, defect 3: after ``fit`` then ``test`` on one Trainer (EnergyMonitor alone, an
``MLFlowLogger``), the run's ``green/report.json``, ``green/power.png`` and report.html cover
both stages, and ``green-mlops verify`` passes on the report.

Real parts: a Lightning fit and test on the CPU, a real MLflow store (sqlite), meters of known
power (ClockMeter), the ``verify`` command's own check.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from green_mlops.commands.verify import verify_file
from green_mlops.integrations.lightning import EnergyMonitor
from green_mlops.integrations.mlflow.chart import between_stages, draw_power, power_steps
from green_mlops.units import J_PER_KWH
from green_mlops.verify import verify_report
from tests.test_energy_monitor import CPU_W, Classifier, loader, meters, monitor, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
)


def _artifact(client: Any, run_id: str, name: str, into: Path) -> Path:
    return Path(client.download_artifacts(run_id, name, str(into)))


def test_fit_then_test_report_and_chart_cover_both_stages(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = pl.loggers.MLFlowLogger(
        experiment_name="fix7d", tracking_uri=uri, artifact_location=str(tmp_path / "art")
    )
    mon = monitor()
    tr = trainer(tmp_path, [mon], max_epochs=2, logger=logger)
    model = Classifier()
    tr.fit(model, loader(), loader(1))
    tr.test(model, loader(2), verbose=False)

    client = MlflowClient(uri)
    run_metrics = client.get_run(logger.run_id).data.metrics
    rep = json.loads(_artifact(client, logger.run_id, "green/report.json", tmp_path).read_text())
    energy = rep["energy"]
    # the report's measurement is the run's: both stages, every joule
    assert energy["kwh"] == pytest.approx(run_metrics["green/energy_kwh"], rel=1e-9)
    assert energy["duration_s"] == pytest.approx(run_metrics["green/duration_s"], rel=1e-6)
    assert {"train", "validation", "test"} <= set(energy["phases"])
    stages = energy["stages"]
    assert [s["stage"] for s in stages] == ["fit", "test"]
    assert sum(s["joules"] for s in stages) == pytest.approx(energy["joules"], rel=1e-9)
    # the timeline spans both stages: from the fit's start to the test's end
    times = [p["time"] for p in energy["timeline"]]
    assert times[0] == pytest.approx(stages[0]["started_at"], abs=1e-3)
    assert times[-1] == pytest.approx(stages[1]["started_at"] + stages[1]["duration_s"], abs=1e-3)
    assert times[0] < stages[0]["started_at"] + stages[0]["duration_s"] <= stages[1]["started_at"]
    joules = [sum(p["joules_by_component"].values()) for p in energy["timeline"]]
    assert joules == sorted(joules)  # cumulative over the stages
    assert joules[-1] == pytest.approx(energy["joules"], rel=1e-9)
    assert rep["accounting"]["figures"]["energy_kwh"] == pytest.approx(
        energy["joules"] / J_PER_KWH, rel=1e-9
    )
    # verify recomputes every figure (exit code 0)
    outcome = verify_report(rep)
    assert outcome.mismatches == [] and outcome.unverifiable == [], (
        outcome.mismatches,
        outcome.unverifiable,
    )
    assert outcome.exit_code == 0
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(rep))
    assert verify_file(report_path, Console(file=io.StringIO())) == 0  # `green-mlops verify`
    # the chart and the HTML report are drawn from the merged timeline
    png = _artifact(client, logger.run_id, "green/power.png", tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = power_steps(rep)
    assert set(steps) == {"cpu", "ram"}
    fit_end = stages[0]["started_at"] + stages[0]["duration_s"] - times[0]
    test_start = stages[1]["started_at"] - times[0]
    assert between_stages(rep) == [pytest.approx((fit_end, test_start))]
    cpu = steps["cpu"]
    assert cpu[0][0] == 0 and cpu[-1][1] == pytest.approx(times[-1] - times[0])
    assert any(x1 <= fit_end for _, x1, _ in cpu) and any(x0 >= test_start for x0, _, _ in cpu)
    assert all(w == pytest.approx(CPU_W, rel=0.05) for _, _, w in cpu)  # no 0 W between stages
    html = _artifact(client, logger.run_id, "green/report.html", tmp_path).read_text()
    ends = [float(x) for x in re.findall(r'data-end-s="([0-9.e+-]+)"', html)]
    assert max(ends) == pytest.approx(times[-1] - times[0], abs=1e-3)


def test_stage_that_does_not_continue_the_reported_ones_is_reported_alone(
    tmp_path: Path,
) -> None:
    """A second Trainer (a new EnergyMonitor, totals from zero) testing into the same run: its
    report is its own stage's (the fit's report is not merged into totals that leave it out)."""
    import lightning.pytorch as pl
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = pl.loggers.MLFlowLogger(
        experiment_name="fix7d-b", tracking_uri=uri, artifact_location=str(tmp_path / "art")
    )
    model = Classifier()
    trainer(tmp_path, [monitor()], max_epochs=1, logger=logger).fit(model, loader(), loader(1))
    again = pl.loggers.MLFlowLogger(
        experiment_name="fix7d-b", tracking_uri=uri, run_id=logger.run_id
    )
    trainer(tmp_path, [monitor()], logger=again).test(model, loader(2), verbose=False)

    client = MlflowClient(uri)
    rep = json.loads(_artifact(client, logger.run_id, "green/report.json", tmp_path).read_text())
    assert [s["stage"] for s in rep["energy"].get("stages", [{"stage": "test"}])] == ["test"]
    assert set(rep["energy"]["phases"]) <= {"test", "other"}
    assert verify_report(rep).exit_code == 0


def test_a_one_interval_or_one_point_measurement_still_draws(tmp_path: Path) -> None:
    """The test stage of the trial: one timeline point and the measurement's end (one interval):
    its level is drawn; a measurement with no interval at all draws its point."""
    energy = {
        "started_at": 100.0,
        "duration_s": 0.005,
        "joules": 1.0,
        "joules_by_component": {"cpu": 1.0},
        "timeline": [{"time": 100.0, "joules_by_component": {}}],
    }
    assert power_steps({"energy": energy}) == {"cpu": [pytest.approx((0.0, 0.005, 200.0))]}
    assert draw_power({"energy": energy}, tmp_path / "one.png")
    point = {**energy, "duration_s": 0.0}
    assert power_steps({"energy": point}) == {"cpu": []}
    assert draw_power({"energy": point}, tmp_path / "point.png")
    assert (tmp_path / "point.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_then_validate_with_price_and_embodied_verifies_in_log_dir(tmp_path: Path) -> None:
    """The ``log_dir`` report (CSVLogger) of fit then validate, with cost, embodied carbon and
    SCI: every figure is recomputed from the merged report (it was exit 2 before)."""
    settings = {
        "intensity_providers": "constant",
        "intensity_g_per_kwh": 300,
        "location": "DE",
        "price_per_kwh": 0.25,
        "embodied_kgco2e": 120,
    }
    tr = trainer(tmp_path, [EnergyMonitor(settings=settings, meters=meters)], max_epochs=1)
    model = Classifier()
    tr.fit(model, loader(), loader(1))
    tr.validate(model, loader(1), verbose=False)
    assert tr.logger is not None and tr.logger.log_dir is not None
    path = Path(tr.logger.log_dir) / "green_report.json"
    rep = json.loads(path.read_text())
    assert [s["stage"] for s in rep["energy"]["stages"]] == ["fit", "validate"]
    assert rep["metrics"]["green/sci_g_per_run"] > 0 and rep["metrics"]["green/cost"] > 0
    out = io.StringIO()
    assert verify_file(path, Console(file=out, width=200)) == 0, out.getvalue()


def cpu(joules: float) -> dict[str, float]:
    return {"cpu": joules}


def test_the_chart_starts_at_the_run_start_whatever_the_intervals(tmp_path: Path) -> None:
    """Trial 7 with GREEN_MLOPS_ENABLE=1: a 0.94 s run whose timeline has a long first interval
    (0 to 0.76 s) was drawn from 0.76 s on (each level at its interval's end only). Each
    interval is drawn over its whole span."""
    energy = {
        "started_at": 50.0,
        "duration_s": 0.94,
        "joules": 9.4,
        "joules_by_component": cpu(9.4),
        "timeline": [
            {"time": 50.0, "joules_by_component": {}},
            {"time": 50.76, "joules_by_component": cpu(7.6)},
            {"time": 50.94, "joules_by_component": cpu(9.4)},
        ],
    }
    steps = power_steps({"energy": energy})["cpu"]
    assert steps == [pytest.approx((0.0, 0.76, 10.0)), pytest.approx((0.76, 0.94, 10.0))]
    assert draw_power({"energy": energy}, tmp_path / "p.png")


def _stage_report(start: float, seconds: float, joules: float, run_s: float, pue: float) -> Any:
    """A one-stage report as Result.report() writes it (constant power, 400 g/kWh)."""
    from green_mlops.session import accounting_block
    from green_mlops.verify import report_digests

    energy = {
        "started_at": start,
        "duration_s": seconds,
        "devices": [{"device": "cpu:0", "component": "cpu", "joules": joules, "uncertainty": 0.1}],
        "phases": {
            "test": {
                "name": "test",
                "duration_s": seconds,
                "entries": 1,
                "joules_by_device": {"cpu:0": joules},
                "joules": joules,
            }
        },
        "timeline": [{"time": start, "joules_by_component": {}}],
        "joules": joules,
        "kwh": joules / J_PER_KWH,
        "joules_by_component": {"cpu": joules},
    }
    accounting = accounting_block(
        None, [(start, 0.0), (start + seconds, joules)], None, None, {}, {}
    )
    accounting["pue"] = pue
    return {
        "schema": "green-mlops/report/v2",
        "metrics": {"green/duration_s": run_s},
        "energy": energy,
        "accounting": accounting,
        "digests": report_digests(accounting),
    }


def test_a_stage_that_cannot_be_merged_keeps_the_earlier_report_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from green_mlops.integrations.lightning.stages import report_for_run

    key = ("test", "unmergeable")
    first = report_for_run(key, _stage_report(10.0, 2.0, 20.0, 2.0, 1.2), "fit")
    assert first["energy"]["stages"] == [
        {"stage": "fit", "started_at": 10.0, "duration_s": 2.0, "joules": 20.0}
    ]
    second = report_for_run(key, _stage_report(13.0, 1.0, 5.0, 3.0, 1.5), "test")
    assert "could not be merged" in caplog.text and "accounting.pue differs" in caplog.text
    assert second["energy"]["joules"] == 5.0
    assert second["earlier_stage_reports"] == [first]  # nothing measured is lost
    merged = report_for_run(("test", "same-pue"), _stage_report(10.0, 2.0, 20.0, 2.0, 1.2), "fit")
    merged = report_for_run(("test", "same-pue"), _stage_report(13.0, 1.0, 5.0, 3.0, 1.2), "test")
    assert merged["energy"]["joules"] == 25.0 and merged["energy"]["duration_s"] == 3.0
    assert merged["accounting"]["timeline"] == [
        [10.0, 0.0],
        [12.0, 20.0],
        [13.0, 20.0],
        [14.0, 25.0],
    ]
    assert merged["energy"]["devices"][0]["joules"] == 25.0
