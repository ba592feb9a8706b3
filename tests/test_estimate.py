"""``green-mlops estimate --pilot RUN_ID``: a real pilot fit (EnergyMonitor + MLFlowLogger) on a
real MLflow server prices the full run; pilots and hardware that cannot are refused with the fix."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from green_mlops.cli import main
from green_mlops.integrations.lightning import EnergyMonitor
from green_mlops.pilot import PilotError, estimate, estimate_trend, parse_scale
from tests.mlflow_server import MlflowServer
from tests.test_energy_monitor import IN, OUT, Classifier, H


@dataclass(frozen=True)
class Pilots:
    server: MlflowServer
    pilot: str
    metrics: Mapping[str, float]
    no_flops: str
    wide: str
    wide_metrics: Mapping[str, float]


@pytest.fixture(scope="module")
def pilots(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Pilots:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from tests.test_energy_monitor import SETTINGS, Classifier, loader, meters, trainer

    # in this process (a subprocess paid ~40 s of imports): a real fit, logged to the server
    logger = MLFlowLogger(
        experiment_name="pilots", run_name="pilot", tracking_uri=mlflow_server.url
    )
    mon = EnergyMonitor(settings={**SETTINGS, "price_per_kwh": 0.25}, meters=meters)
    tr = trainer(tmp_path_factory.mktemp("pilot"), [mon], max_epochs=2, logger=logger)
    tr.fit(Classifier(), loader(), loader())
    client = MlflowClient(mlflow_server.url)
    run_id = logger.run_id
    assert run_id is not None
    metrics = dict(client.get_run(run_id).data.metrics)
    # the same data, a 4x wider hidden layer: a second pilot of another size (two-pilot trend)
    wide_logger = MLFlowLogger(
        experiment_name="pilots", run_name="wide", tracking_uri=mlflow_server.url
    )
    mon = EnergyMonitor(settings={**SETTINGS, "price_per_kwh": 0.25}, meters=meters)
    tr = trainer(tmp_path_factory.mktemp("wide"), [mon], max_epochs=2, logger=wide_logger)
    tr.fit(Wide(), loader(), loader())
    assert wide_logger.run_id is not None
    wide_metrics = dict(client.get_run(wide_logger.run_id).data.metrics)
    bare = client.create_run(client.get_experiment_by_name("pilots").experiment_id)
    client.log_metric(bare.info.run_id, "green/energy_kwh", 0.001)
    client.set_terminated(bare.info.run_id)
    return Pilots(
        mlflow_server, run_id, metrics, bare.info.run_id, wide_logger.run_id, wide_metrics
    )


class Wide(Classifier):
    """``Classifier`` with a 4x wider hidden layer: the same family, another size."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN, 4 * H), torch.nn.ReLU(), torch.nn.Linear(4 * H, OUT)
        )


def cli(p: Pilots, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["estimate", "--tracking-uri", p.server.url, *args])
    out, err = capsys.readouterr()
    return code, " ".join((out + err).split())


def number(text: str, label: str) -> float:
    found = re.search(rf"{label}\s+([0-9.e+-]+)", text)
    assert found, text
    return float(found.group(1))


def test_epochs_scale_the_pilots_energy_time_and_carbon(
    pilots: Pilots, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--epochs", "10", "--pilot-epochs", "2"
    )
    assert code == 0, out
    m = pilots.metrics
    assert number(out, "energy") == pytest.approx(5 * m["green/energy_kwh"], rel=1e-3)
    assert number(out, "FLOPs") == pytest.approx(5 * m["green/flops"], rel=1e-3)
    assert number(out, "time") == pytest.approx(5 * m["green/duration_s"], rel=1e-3)
    assert number(out, "carbon") == pytest.approx(5 * m["green/co2e_g"], rel=1e-2)
    low, high = re.search(r"kWh \(([0-9.e+-]+) \.\. ([0-9.e+-]+)\)", out).groups()  # type: ignore[union-attr]
    assert float(low) < number(out, "energy") < float(high)
    assert "MFU held constant" in out and "J/FLOP" in out and "train" in out


def test_scale_multiplies_the_flops_by_params_and_tokens(pilots: Pilots) -> None:
    result = estimate(pilots.metrics, {}, scale={"params": 4.0, "tokens": 10.0})
    m = pilots.metrics
    assert result.flops == pytest.approx(40 * m["green/flops"])
    # the data wait and the loop's overhead grow with the tokens only, the sanity check with
    # the params only; the rest (train, validation) with the FLOPs (benchmarks/pilot.py)
    assert m["green/phase/data_wait_kwh"] > 0 and m["green/phase/other_kwh"] > 0
    kept = {"data_wait": 10.0, "other": 10.0, "sanity_check": 4.0}
    rest = m["green/energy_kwh"] - sum(m.get(f"green/phase/{p}_kwh", 0.0) for p in kept)
    expected = 40 * rest + sum(f * m.get(f"green/phase/{p}_kwh", 0.0) for p, f in kept.items())
    assert result.energy_kwh == pytest.approx(expected, rel=1e-9)
    assert result.energy_kwh < 0.99 * 40 * m["green/energy_kwh"]
    seconds = m["green/duration_s"] - sum(m.get(f"green/phase/{p}_s", 0.0) for p in kept)
    seconds = 40 * seconds + sum(f * m.get(f"green/phase/{p}_s", 0.0) for p, f in kept.items())
    assert result.duration_s == pytest.approx(seconds, rel=1e-9)
    assert any("6 x params x tokens" in a for a in result.assumptions)
    assert any("data_wait, other) x 10 (tokens" in a for a in result.assumptions)
    assert result.high_kwh / result.energy_kwh - 1 > 0.25  # extrapolating a size: wider band


def test_a_pilot_without_flops_is_refused_with_what_to_log(
    pilots: Pilots, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(pilots, capsys, "--pilot", pilots.no_flops, "--flops", "1e18")
    assert code == 2
    assert "has no FLOPs (green/flops): log them with EnergyMonitor(count_flops=True)" in out


def test_hardware_names_are_checked_and_a_pilot_without_mfu_cannot_move(
    pilots: Pilots, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--flops", "1e15", "--hardware", "Potato 9000"
    )
    assert (
        code == 2 and "'Potato 9000' is not in green_mlops/flops_peaks.py: expected one of" in out
    )
    assert "H100" in out
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--flops", "1e15", "--hardware", "NVIDIA H100 SXM"
    )
    assert code == 2 and "the pilot has no MFU (green/mfu" in out  # a CPU pilot
    # a pilot with an MFU: time at its MFU x the other device's peak
    gpu = {**pilots.metrics, "green/mfu": 0.4, "green/flops_per_s": 0.4 * 312e12}  # an A100
    moved = estimate(gpu, {}, flops=2 * gpu["green/flops"], hardware="NVIDIA H100 SXM")
    assert moved.duration_s == pytest.approx(2 * gpu["green/duration_s"] * 312 / 989.4, rel=0.01)
    with pytest.raises(PilotError, match=r"--scale 'params=four' is not valid"):
        from green_mlops.pilot import parse_scale

        parse_scale("params=four")


def test_an_unknown_run_is_said(
    pilots: Pilots, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _ = cli(pilots, capsys, "--pilot", "0" * 32, "--flops", "1e15")
    assert code == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flops": 0.0}, r"--flops 0.0 is not valid: expected a number of FLOPs > 0"),
        ({"epochs": -1.0, "pilot_epochs": 2.0}, r"--epochs -1.0 is not valid: expected .* > 0"),
        ({"epochs": math.nan, "pilot_epochs": 2.0}, r"--epochs nan is not valid"),
        ({"epochs": 10.0, "pilot_epochs": -2.0}, r"--pilot-epochs -2.0 is not valid: .* > 0"),
        ({"epochs": 10.0, "pilot_epochs": 0.0}, r"--pilot-epochs 0.0 is not valid"),
    ],
)
def test_bad_numbers_are_refused_with_the_accepted_form(
    pilots: Pilots, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(PilotError, match=message):
        estimate(pilots.metrics, {}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["params=--4", "tokens=4e", "params=.", "params=4x,params=2x"])
def test_a_malformed_scale_is_refused_not_a_traceback(text: str) -> None:
    with pytest.raises(PilotError, match=r"--scale .* is not valid: expected params=<factor>x"):
        parse_scale(text)


def test_the_full_run_is_tagged_with_its_pilot_and_reports_the_estimates_error(
    pilots: Pilots,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from tests.test_energy_monitor import SETTINGS, Classifier, loader, meters, trainer

    saved = tmp_path / "estimate.json"
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--epochs", "4", "--pilot-epochs", "2",
        "--save", str(saved),
    )  # fmt: skip
    assert code == 0 and "GREEN_MLOPS_ESTIMATE=" in out, out
    estimated = json.loads(saved.read_text())["energy_kwh"]
    monkeypatch.setenv("GREEN_MLOPS_ESTIMATE", str(saved))
    logger = MLFlowLogger(experiment_name="pilots", run_name="full", tracking_uri=pilots.server.url)
    mon = EnergyMonitor(settings=SETTINGS, meters=meters)
    trainer(tmp_path, [mon], max_epochs=4, logger=logger).fit(Classifier(), loader(), loader())
    run = MlflowClient(pilots.server.url).get_run(logger.run_id)  # type: ignore[arg-type]
    measured = run.data.metrics["green/energy_kwh"]
    assert run.data.tags["green.estimate.pilot_run_id"] == pilots.pilot
    assert run.data.metrics["green/estimate/energy_kwh"] == pytest.approx(estimated)
    error = run.data.metrics["green/estimate/error"]
    assert error == pytest.approx((measured - estimated) / estimated, rel=1e-6)
    assert "green.estimate.inside_band" in run.data.tags


def test_an_unreadable_estimate_file_is_said_and_the_error_is_absent(tmp_path: Path) -> None:
    from green_mlops.pilot import attach_estimate

    metrics, tags = {"green/energy_kwh": 0.002}, {"green.problems": "other"}
    attach_estimate(metrics, tags, {"GREEN_MLOPS_ESTIMATE": str(tmp_path / "missing.json")})
    assert "green/estimate/error" not in metrics and "green.estimate.pilot_run_id" not in tags
    assert tags["green.problems"].startswith("other; GREEN_MLOPS_ESTIMATE=")
    assert "is not a `green-mlops estimate --save` file" in tags["green.problems"]
    assert tags["green.not_reported"].startswith("green/estimate/error: GREEN_MLOPS_ESTIMATE=")
    (tmp_path / "zero.json").write_text('{"pilot_run_id": "p", "energy_kwh": 0, "low_kwh": 0, '
                                        '"high_kwh": 0}')  # fmt: skip
    attach_estimate(metrics, tags, {"GREEN_MLOPS_ESTIMATE": str(tmp_path / "zero.json")})
    assert "energy_kwh=0.0 is not > 0" in tags["green.problems"]
    assert "green/estimate/error" not in metrics


def synthetic(flops_per_batch: float, law: str) -> tuple[dict[str, float], dict[str, str]]:
    """A pilot's metrics from a known law: per batch, ``overhead`` a fixed 20 mJ (train) or
    10 mJ (validation) plus 0.1 nJ/FLOP (validation: forward only, a third of the FLOPs), a
    data wait that does not grow with the model; or (``power``) J ~ FLOPs^0.8."""
    phases = {"train": (30, 0.02, flops_per_batch), "validation": (10, 0.01, flops_per_batch / 3)}
    m: dict[str, float] = {"green/phase/data_wait_kwh": 2 / 3.6e6, "green/phase/data_wait_s": 0.2}
    for name, (batches, overhead, f) in phases.items():
        joules = batches * (overhead + 1e-10 * f if law == "overhead" else 3e-8 * f**0.8)
        m[f"green/phase/{name}_kwh"] = joules / 3.6e6
        m[f"green/phase/{name}_s"] = joules / 50  # 50 W
        m[f"green/phase/{name}_flops"] = batches * f
    m["green/flops"] = m["green/phase/train_flops"] + m["green/phase/validation_flops"]
    m["green/energy_kwh"] = sum(v for k, v in m.items() if k.endswith("_kwh"))
    m["green/duration_s"] = sum(v for k, v in m.items() if k.endswith("_s"))
    return m, {"green.devices": "cpu"}


@pytest.mark.parametrize("law", ["overhead", "power"])
def test_two_pilots_separate_the_per_batch_overhead_from_the_flops(law: str) -> None:
    small, mid, full = (synthetic(f, law) for f in (2.5e7, 1e8, 4e8))
    result = estimate_trend([small, mid], scale={"params": 4.0})
    truth = full[0]["green/energy_kwh"]
    assert result.flops == pytest.approx(full[0]["green/flops"])
    assert result.low_kwh <= truth <= result.high_kwh
    if law == "overhead":  # the law the point assumes: exact, and so is the time
        assert result.energy_kwh == pytest.approx(truth, rel=1e-9)
        assert result.duration_s == pytest.approx(full[0]["green/duration_s"], rel=1e-9)
    # one pilot holds its J/FLOP: its overheads grow with the FLOPs, an over-estimate
    single = estimate(*mid, scale={"params": 4.0})
    assert single.energy_kwh > 1.1 * truth
    assert any("per-batch overhead" in a for a in result.assumptions)
    assert any("power law in the FLOPs" in a for a in result.assumptions)
    assert any("second pilot" in a for a in single.assumptions)


def test_two_real_pilots_price_the_full_run_on_the_server(
    pilots: Pilots, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--pilot", pilots.wide, "--scale", "params=4x"
    )
    assert code == 0, out
    expected = estimate_trend(
        [(pilots.metrics, {}), (pilots.wide_metrics, {})], scale={"params": 4}
    )
    assert number(out, "energy") == pytest.approx(expected.energy_kwh, rel=1e-3)
    assert number(out, "FLOPs") == pytest.approx(4 * pilots.wide_metrics["green/flops"], rel=1e-3)
    assert "per-batch overhead" in out and "power law in the FLOPs" in out
    # the order of the pilots does not matter: the larger one (by FLOPs) is the reference
    code, again = cli(
        pilots, capsys, "--pilot", pilots.wide, "--pilot", pilots.pilot, "--scale", "params=4x"
    )
    assert code == 0 and number(again, "energy") == number(out, "energy")


def test_two_pilots_that_cannot_give_a_trend_are_refused(
    pilots: Pilots, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--pilot", pilots.pilot, "--flops", "1e15"
    )
    assert code == 2 and "the two pilots' FLOPs differ by x1 (" in out, out
    assert "need x1.5 or more" in out
    code, out = cli(
        pilots, capsys, "--pilot", pilots.pilot, "--pilot", pilots.no_flops, "--flops", "1e15"
    )
    assert code == 2 and "has no FLOPs (green/flops)" in out, out
    three = ["--pilot", pilots.pilot, "--pilot", pilots.wide, "--pilot", pilots.no_flops]
    code, out = cli(pilots, capsys, *three, "--flops", "1e15")
    assert code == 2 and "at most two pilots" in out, out
    small, mid = synthetic(2.5e7, "overhead"), synthetic(1e8, "overhead")
    with pytest.raises(PilotError, match=r"different hardware \('cpu' and 'cuda:0"):
        estimate_trend([small, (mid[0], {"green.devices": "cuda:0 NVIDIA H100"})], flops=1e12)
    with pytest.raises(
        PilotError, match=r"--hardware 'NVIDIA H100 SXM' with two pilots is not supported"
    ):
        estimate_trend([small, mid], flops=1e12, hardware="NVIDIA H100 SXM")


def test_a_phase_without_flops_does_not_grow_with_the_model_nor_with_a_disturbed_pilot() -> None:
    # the larger pilot's data wait disturbed (another tenant: 3x): the phase runs no model, so
    # no trend in the FLOPs is fitted through it; the undisturbed pilot's value is the point
    small, mid, full = (synthetic(f, "overhead") for f in (2.5e7, 1e8, 4e8))
    disturbed = dict(mid[0])
    disturbed["green/phase/data_wait_kwh"] *= 3
    disturbed["green/energy_kwh"] += 2 * mid[0]["green/phase/data_wait_kwh"]
    result = estimate_trend([small, (disturbed, mid[1])], scale={"params": 4.0})
    truth = full[0]["green/energy_kwh"]
    assert result.energy_kwh == pytest.approx(truth, rel=1e-9)
    assert result.high_kwh > truth + 2 * full[0]["green/phase/data_wait_kwh"]  # the disturbed
