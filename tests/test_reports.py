"""``green-mlops report``: every format rendered from real runs, checked against the runs.

Runs made by the real MLflow plugin (``tests/green_runs.py``: one subprocess, constant 300
gCO2e/kWh, DE) and by the real Lightning callback (EnergyMonitor with MLFlowLogger and a
CSVLogger, which gets ``green_report.json``), on the ``mlflow_server`` fixture. A real browser
(Debian's chromium through Playwright, as tests/test_mlflow_ui.py) opens the HTML report with
every request recorded and all but the file itself refused, and reads the numbers it shows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from green_mlops.cli import main
from tests.green_runs import INTENSITY_G_PER_KWH, RunSpec, make_runs
from tests.mlflow_server import MlflowServer
from tests.test_mlflow import experiment
from tests.test_mlflow_ui import launch_chromium, missing, require_chromium

BOAMPS_SCHEMAS = Path(__file__).parent / "data" / "boamps"
BOAMPS_BASE = "https://raw.githubusercontent.com/Boavizta/BoAmps/main/model/"
#: Totals every plugin run here reports (constant intensity and a price are configured).
SHOWN = (
    "green/energy_kwh",
    "green/energy_facility_kwh",
    "green/co2e_g",
    "green/intensity_g_per_kwh",
    "green/cost",
    "green/duration_s",
)


@pytest.fixture(scope="session")
def browser() -> Path:
    """Debian's chromium and Playwright (skipped with the install line, failed where CI is
    set, as in tests/test_mlflow_ui.py), checked before any run is made."""
    return require_chromium()


@dataclasses.dataclass(frozen=True)
class Runs:
    server: MlflowServer
    experiment: str
    ids: dict[str, str]

    def metrics(self, run_id: str) -> dict[str, float]:
        return dict(MlflowClient(self.server.url).get_run(run_id).data.metrics)

    def artifact(self, run_id: str, tmp: Path) -> dict[str, Any]:
        path = MlflowClient(self.server.url).download_artifacts(
            run_id, "green/report.json", str(tmp)
        )
        report: dict[str, Any] = json.loads(Path(path).read_text())
        return report


@pytest.fixture(scope="module")
def runs(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    exp = experiment()
    specs = [
        RunSpec(exp, "fast", params={"lr": "0.1"}, metrics={"val_acc": 0.8}, busy_s=0.6),
        RunSpec(exp, "slow", params={"lr": "0.01"}, metrics={"val_acc": 0.9}, busy_s=1.6),
    ]
    ids = make_runs(mlflow_server, specs, tmp_path_factory.mktemp("plugin-runs"))
    return Runs(mlflow_server, exp, ids)


@pytest.fixture(scope="module")
def lightning_run(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """A real fit with EnergyMonitor, logged to MLflow and to a CSVLogger: (run id, the
    CSVLogger's green_report.json)."""
    import lightning.pytorch as pl
    import torch

    from green_mlops.integrations.lightning import EnergyMonitor

    tmp = tmp_path_factory.mktemp("lightning")

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    settings = {
        "intensity_providers": "constant",
        "intensity_g_per_kwh": INTENSITY_G_PER_KWH,
        "location": "DE",
        "cache_dir": str(tmp / "cache"),
    }
    mlflow_logger = pl.loggers.MLFlowLogger(
        experiment_name=experiment(), tracking_uri=mlflow_server.url
    )
    csv_logger = pl.loggers.CSVLogger(str(tmp / "csv"))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=[mlflow_logger, csv_logger],
        callbacks=[EnergyMonitor(monitor="val_acc", settings=settings)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp),
    )
    trainer.fit(Model(), loader, loader)
    path = Path(csv_logger.log_dir) / "green_report.json"
    assert path.is_file()
    return str(mlflow_logger.run_id), path


def report(tmp_path: Path, *args: str, server: MlflowServer | None = None) -> str:
    """``green-mlops report ARGS --output FILE``; the file's text (exit 0 checked)."""
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}"
    uri = ["--tracking-uri", server.url] if server else []
    assert main(["report", *args, *uri, "--output", str(out)]) == 0
    return out.read_text(encoding="utf-8")


def shown_number(text: str) -> float:
    """The value of a cell such as ``1.234e-05 ± 6.2e-06``."""
    return float(text.split("±")[0].strip())


# --- html ----------------------------------------------------------------------------------------


def open_offline(
    chromium_path: Path, html_file: Path, tmp_path: Path, read: str
) -> tuple[Any, list[str]]:
    """Open ``html_file`` in chromium, refusing every request but the file's own; returns
    what the ``read`` script returns and every URL requested."""
    from playwright.sync_api import sync_playwright

    url = html_file.resolve().as_uri()
    requested: list[str] = []

    def guard(route: Any) -> None:
        requested.append(route.request.url)
        if route.request.url == url:
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as p:
        context = launch_chromium(p, tmp_path / "profile", chromium_path)
        try:
            context.route("**/*", guard)
            page = context.new_page()
            page.goto(url)
            page.wait_for_load_state("load")
            result = page.evaluate(read)
        finally:
            context.close()
    return result, requested


READ_REPORT_JS = """
() => ({
  totals: [...document.querySelectorAll('section.run td[data-key]')].map(
      td => [td.closest('section').dataset.runId, td.dataset.key, td.innerText]),
  power: [...document.querySelectorAll('rect.power')].map(
      r => [r.closest('section').dataset.runId, +r.dataset.watts, +r.dataset.startS,
            +r.dataset.endS]),
  intensity: [...document.querySelectorAll('line.intensity')].map(l => +l.dataset.gPerKwh),
  sentence: [...document.querySelectorAll('.sentence')].map(p => p.innerText),
  provenance: [...document.querySelectorAll('table.provenance tr')].map(tr => tr.innerText),
  comparison: [...document.querySelectorAll('table.comparison tbody tr')].map(
      tr => [...tr.children].map(td => td.innerText)),
  comparisonHead: [...document.querySelectorAll('table.comparison th')].map(th => th.innerText),
  scripts: document.scripts.length,
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)
      .filter(u => !u.startsWith('data:')),
})
"""


@pytest.mark.slow
def test_html_report_opens_offline_and_shows_the_runs_numbers(
    browser: Path,
    runs: Runs,
    tmp_path: Path,
) -> None:
    run_id = runs.ids["slow"]
    html_file = tmp_path / "run.html"
    html_file.write_text(report(tmp_path, run_id, "--format", "html", server=runs.server))
    seen, requested = open_offline(browser, html_file, tmp_path, READ_REPORT_JS)

    assert requested == [html_file.resolve().as_uri()]  # nothing but the file itself
    assert seen["scripts"] == 0 and seen["external"] == []
    metrics = runs.metrics(run_id)
    shown = {key: shown_number(text) for _, key, text in seen["totals"]}
    assert set(SHOWN) <= set(shown)
    for key, value in shown.items():
        assert value == pytest.approx(metrics[key], rel=5e-4), key  # 4 significant digits
    # the power chart's bars integrate to the run's energy
    joules = sum(w * (end - start) for _, w, start, end in seen["power"])
    assert len(seen["power"]) >= 2
    assert joules == pytest.approx(metrics["green/energy_kwh"] * 3.6e6, rel=1e-6)
    # every intensity interval that priced the run is drawn: the constant 300 g/kWh
    assert seen["intensity"] and set(seen["intensity"]) == {INTENSITY_G_PER_KWH}
    artifact = runs.artifact(run_id, tmp_path)
    assert seen["sentence"] == [artifact["reporting_sentence"]]
    provenance = "\n".join(seen["provenance"])
    tags = MlflowClient(runs.server.url).get_run(run_id).data.tags
    for key in ("green.meters", "green.intensity.source", "green.location", "green.pue.source"):
        assert tags[key] in provenance, key


@pytest.mark.slow
def test_html_experiment_report_compares_its_runs(
    browser: Path,
    runs: Runs,
    tmp_path: Path,
) -> None:
    html_file = tmp_path / "experiment.html"
    args = ("--experiment", runs.experiment, "--format", "html", "--metric", "val_acc")
    html_file.write_text(report(tmp_path, *args, server=runs.server))
    seen, requested = open_offline(browser, html_file, tmp_path, READ_REPORT_JS)

    assert requested == [html_file.resolve().as_uri()]
    head = seen["comparisonHead"]
    rows = {cells[0]: dict(zip(head, cells, strict=True)) for cells in seen["comparison"]}
    assert set(rows) == {"fast", "slow"}
    for name, run_id in runs.ids.items():
        metrics = runs.metrics(run_id)
        row = rows[name]
        assert shown_number(row["energy (kWh)"]) == pytest.approx(
            metrics["green/energy_kwh"], rel=5e-4
        )
        assert shown_number(row["CO2e (g)"]) == pytest.approx(metrics["green/co2e_g"], rel=5e-4)
        assert float(row["val_acc"]) == metrics["val_acc"]
    # and each run in full, with its own numbers
    for run_id, key, text in seen["totals"]:
        assert shown_number(text) == pytest.approx(runs.metrics(run_id)[key], rel=5e-4)
    assert {r for r, _, _ in seen["totals"]} == set(runs.ids.values())


@pytest.mark.slow
def test_html_report_of_a_lightning_fit_shows_its_phases(
    browser: Path,
    lightning_run: tuple[str, Path],
    mlflow_server: MlflowServer,
    tmp_path: Path,
) -> None:
    run_id, _ = lightning_run
    html_file = tmp_path / "fit.html"
    html_file.write_text(report(tmp_path, run_id, "--format", "html", server=mlflow_server))
    read = """() => [...document.querySelectorAll('table.energy tbody tr')].map(
        tr => [...tr.children].map(td => td.innerText))"""
    rows, requested = open_offline(browser, html_file, tmp_path, read)
    assert requested == [html_file.resolve().as_uri()]
    metrics = MlflowClient(mlflow_server.url).get_run(run_id).data.metrics
    by_phase = {cells[0]: shown_number(cells[-1]) for cells in rows}
    assert {"train", "validation", "sanity_check"} <= set(by_phase)
    for phase, kwh in by_phase.items():
        key = "green/energy_kwh" if phase == "all phases" else f"green/phase/{phase}_kwh"
        assert kwh == pytest.approx(metrics[key], rel=5e-4), phase


# --- hf-card -------------------------------------------------------------------------------------


def test_hf_card_is_yaml_with_the_runs_grams(runs: Runs, tmp_path: Path) -> None:
    import yaml

    run_id = runs.ids["fast"]
    text = report(
        tmp_path,
        run_id,
        "--format",
        "hf-card",
        "--training-type",
        "fine-tuning",
        server=runs.server,
    )
    block = yaml.safe_load(text)["co2_eq_emissions"]
    metrics = runs.metrics(run_id)
    assert block["emissions"] == pytest.approx(metrics["green/co2e_g"], rel=1e-5)  # grams
    assert block["training_type"] == "fine-tuning"
    assert block["geographical_location"] == "Germany (DE)"
    assert block["source"].startswith("green-mlops ")
    assert block["hardware_used"] == runs.artifact(run_id, tmp_path)["footprint"]["hardware"]
    # an experiment: the runs' exclusive totals summed
    text = report(
        tmp_path, "--experiment", runs.experiment, "--format", "hf-card", server=runs.server
    )
    block = yaml.safe_load(text)["co2_eq_emissions"]
    total = sum(runs.metrics(r)["green/co2e_g"] for r in runs.ids.values())
    assert block["emissions"] == pytest.approx(total, rel=1e-5)
    assert "training_type" not in block  # not guessed: the comment says how to set it
    assert "--training-type" in text


def test_hf_card_of_a_lightning_report_file(
    lightning_run: tuple[str, Path], tmp_path: Path
) -> None:
    import yaml

    _, path = lightning_run
    text = report(tmp_path, str(path), "--format", "hf-card")
    document = json.loads(path.read_text())
    block = yaml.safe_load(text)["co2_eq_emissions"]
    assert block["emissions"] == pytest.approx(document["metrics"]["green/co2e_g"], rel=1e-5)


# --- codecarbon-csv ------------------------------------------------------------------------------


def codecarbon() -> Any:
    try:
        from codecarbon.output_methods import emissions_data, file
    except ImportError:
        missing('codecarbon is not installed: pip install -e ".[bench]"')
    return emissions_data, file


def test_codecarbon_csv_has_codecarbons_columns_and_units(runs: Runs, tmp_path: Path) -> None:
    emissions_data, file = codecarbon()
    text = report(
        tmp_path, "--experiment", runs.experiment, "--format", "codecarbon-csv", server=runs.server
    )
    fields = [f.name for f in dataclasses.fields(emissions_data.EmissionsData)]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == fields
    assert {r["run_id"] for r in rows} == set(runs.ids.values())
    for row in rows:
        m = runs.metrics(row["run_id"])
        assert float(row["duration"]) == pytest.approx(m["green/duration_s"])  # s
        assert float(row["emissions"]) == pytest.approx(m["green/co2e_g"] / 1000)  # kg
        assert float(row["emissions_rate"]) == pytest.approx(
            m["green/co2e_g"] / 1000 / m["green/duration_s"]
        )  # kg/s
        assert float(row["energy_consumed"]) == pytest.approx(m["green/energy_facility_kwh"])
        assert float(row["cpu_energy"]) == pytest.approx(m["green/energy/cpu_kwh"])  # kWh
        assert float(row["cpu_power"]) == pytest.approx(
            m["green/energy/cpu_kwh"] * 3.6e6 / m["green/duration_s"]
        )  # W
        assert row["country_iso_code"] == "DEU" and row["country_name"] == "Germany"
        assert row["water_consumed"] == ""  # not measured: empty, never 0
    # CodeCarbon's own writer accepts the file as one of its own (no backup, rows kept)
    (tmp_path / "cc").mkdir()
    target = tmp_path / "cc" / "emissions.csv"
    target.write_text(text)
    theirs = emissions_data.EmissionsData(
        **{
            f.name: (0.0 if f.type in ("float", float) else "x")
            for f in dataclasses.fields(emissions_data.EmissionsData)
        }
    )
    file.FileOutput("emissions.csv", str(tmp_path / "cc"), on_csv_write="update").out(theirs, None)
    assert sorted(os.listdir(tmp_path / "cc")) == ["emissions.csv"]
    merged = list(csv.DictReader(io.StringIO(target.read_text())))
    assert {r["run_id"] for r in merged} == {*runs.ids.values(), "x"}


# --- boamps --------------------------------------------------------------------------------------


def boamps_validator() -> Any:
    try:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
    except ImportError:
        missing('jsonschema is not installed: pip install -e ".[test]"')
    schemas = {p.name: json.loads(p.read_text()) for p in BOAMPS_SCHEMAS.glob("*_schema.json")}
    registry = Registry().with_resources(
        (BOAMPS_BASE + name, Resource.from_contents(schema)) for name, schema in schemas.items()
    )
    return Draft202012Validator(schemas["report_schema.json"], registry=registry)


def boamps_quality(relative: float) -> str | None:
    """BoAmps' ``quality``: high ±10 %, medium ±25 %, low ±50 % (report_schema.json)."""
    return next(
        (q for q, bound in (("high", 0.1), ("medium", 0.25), ("low", 0.5)) if relative <= bound),
        None,
    )


def test_boamps_report_validates_against_the_boamps_schema(runs: Runs, tmp_path: Path) -> None:
    validator = boamps_validator()
    run_id = runs.ids["slow"]
    document = json.loads(report(tmp_path, run_id, "--format", "boamps", server=runs.server))
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    m = runs.metrics(run_id)
    measure = document["measures"][0]
    assert measure["powerConsumption"] == pytest.approx(m["green/energy_kwh"])  # kWh
    assert measure["measurementDuration"] == pytest.approx(m["green/duration_s"])
    expected = boamps_quality(m["green/energy_uncertainty_kwh"] / m["green/energy_kwh"])
    assert document.get("quality") == expected
    assert document["environment"]["country"] == "Germany"
    assert document["environment"]["powerSourceCarbonIntensity"] == pytest.approx(
        INTENSITY_G_PER_KWH
    )
    # an experiment: one valid report per run
    many = json.loads(
        report(tmp_path, "--experiment", runs.experiment, "--format", "boamps", server=runs.server)
    )
    assert len(many) == 2 and all(validator.is_valid(d) for d in many)


def test_boamps_report_of_a_lightning_fit_validates(
    lightning_run: tuple[str, Path], tmp_path: Path
) -> None:
    validator = boamps_validator()
    document = json.loads(report(tmp_path, str(lightning_run[1]), "--format", "boamps"))
    assert [e.message for e in validator.iter_errors(document)] == []


# --- json, markdown, errors ----------------------------------------------------------------------


def test_json_is_the_runs_report_as_stored(runs: Runs, tmp_path: Path) -> None:
    run_id = runs.ids["fast"]
    text = report(tmp_path, run_id, "--format", "json", server=runs.server)
    assert json.loads(text) == runs.artifact(run_id, tmp_path)


def test_markdown_report_shows_the_runs_totals(runs: Runs, tmp_path: Path) -> None:
    run_id = runs.ids["fast"]
    text = report(tmp_path, run_id, "--format", "markdown", server=runs.server)
    m = runs.metrics(run_id)
    line = next(x for x in text.splitlines() if "`green/co2e_g`" in x)
    assert shown_number(line.split("|")[2]) == pytest.approx(m["green/co2e_g"], rel=5e-4)


def test_report_of_an_unknown_run_says_so_without_a_traceback(
    runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["report", "0" * 32, "--format", "html", "--tracking-uri", runs.server.url])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("green-mlops report: ") and "Traceback" not in err
    assert main(["report", "missing/report.json", "--format", "json"]) == 1
    assert "missing/report.json: no such file or directory" in capsys.readouterr().err


@pytest.mark.slow
def test_html_report_shows_in_mlflows_artifact_viewer(
    browser: Path, runs: Runs, tmp_path: Path
) -> None:
    """Logged as an artifact, the report renders in MLflow's own viewer (a sandboxed iframe
    of a blob: URL), with the same numbers, and asks for nothing from inside it."""
    from playwright.sync_api import sync_playwright

    run_id = runs.ids["fast"]
    html_file = tmp_path / "energy.html"
    html_file.write_text(report(tmp_path, run_id, "--format", "html", server=runs.server))
    client = MlflowClient(runs.server.url)
    client.log_artifact(run_id, str(html_file), "reports")
    exp_id = client.get_run(run_id).info.experiment_id
    url = f"{runs.server.url}/#/experiments/{exp_id}/runs/{run_id}/artifacts/reports/energy.html"
    from_report: list[str] = []
    with sync_playwright() as p:
        context = launch_chromium(p, tmp_path / "profile", browser)
        try:
            page = context.new_page()
            page.on(
                "request",
                lambda r: from_report.append(r.url) if r.frame.url.startswith("blob:") else None,
            )
            page.goto(url)
            cells: list[list[str]] = []
            for _ in range(120):  # the UI loads, fetches the artifact, then makes the frame
                frames = [f for f in page.frames if f.url.startswith("blob:")]
                if frames:
                    cells = frames[0].evaluate(
                        "() => [...document.querySelectorAll('td[data-key]')]"
                        ".map(td => [td.dataset.key, td.innerText])"
                    )
                    if cells:
                        break
                page.wait_for_timeout(250)
        finally:
            context.close()
    metrics = runs.metrics(run_id)
    assert {key for key, _ in cells} >= set(SHOWN)
    for key, text in cells:
        assert shown_number(text) == pytest.approx(metrics[key], rel=5e-4), key
    assert [u for u in from_report if not u.startswith("blob:")] == []


def test_carbon_that_was_not_computed_is_absent_never_zero(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run no intensity provider priced (Electricity Maps without a token): no emissions
    cell in the CSV, no BoAmps intensity, and no model card (its one number is unknown)."""
    exp = experiment()
    ids = make_runs(
        mlflow_server,
        [RunSpec(exp, "unpriced", busy_s=0.3)],
        tmp_path / "runs",
        GREEN_MLOPS_INTENSITY_PROVIDERS="electricitymaps",
    )
    run_id = ids["unpriced"]
    metrics = MlflowClient(mlflow_server.url).get_run(run_id).data.metrics
    assert "green/co2e_g" not in metrics and metrics["green/energy_kwh"] > 0
    row = next(
        csv.DictReader(
            io.StringIO(
                report(tmp_path, run_id, "--format", "codecarbon-csv", server=mlflow_server)
            )
        )
    )
    assert row["emissions"] == "" and row["emissions_rate"] == ""
    assert float(row["energy_consumed"]) == pytest.approx(metrics["green/energy_facility_kwh"])
    document = json.loads(report(tmp_path, run_id, "--format", "boamps", server=mlflow_server))
    assert "powerSourceCarbonIntensity" not in document["environment"]
    capsys.readouterr()
    code = main(["report", run_id, "--format", "hf-card", "--tracking-uri", mlflow_server.url])
    err = capsys.readouterr().err
    assert code == 1 and f"run {run_id}: carbon not reported (co2e:" in err
