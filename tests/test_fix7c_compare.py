"""``green-mlops compare`` defects a new-user trial found (TRIAL-7 items 1, 7, 8), on real runs
made by the real plugin on a real MLflow server:

- runs measured at the same time in one process (threads, like Optuna's ``n_jobs=2`` with
  ``track_in_mlflow``; the nested runs of an ``mlflow.sklearn`` parameter search) each measured
  the whole machine: the total must not sum them as if disjoint;
- the default table at 80 columns (non-tty, CI) cut every cell;
- a Lightning run tested after fit has two quality-per-kWh figures: compare says which energy
  it divides by.

Every expected number is computed here from the runs' own metrics, read back with
``MlflowClient``.
"""

from __future__ import annotations

import html
import json
import math
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from green_mlops.cli import main
from green_mlops.compare import EXCLUSIVE_NOTE, by_month, compare
from green_mlops.integrations.mlflow.reader import read_runs
from tests.green_runs import plugin_env
from tests.mlflow_server import MlflowServer

REL = 1e-9

_RUNS = """
import json, sys, threading, time
import mlflow

def busy(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x

par, grid = sys.argv[1], sys.argv[2]
ids = {}

# Optuna's shape (study.optimize(n_jobs=2) with track_in_mlflow): MLflow's active run is
# thread-local, so each trial is a top-level run that overlaps the study's run
mlflow.set_experiment(par)
def trial(i, wait):
    time.sleep(wait)
    with mlflow.start_run(run_name=f"trial-{i}") as run:
        ids[f"trial-{i}"] = run.info.run_id
        busy(0.8)
        mlflow.log_metric("score", (i - 1.5) ** 2 + 0.1)

with mlflow.start_run(run_name="study") as run:
    ids["study"] = run.info.run_id
    busy(0.3)
    for pair in ((0, 1), (2, 3)):
        threads = [threading.Thread(target=trial, args=(i, 0.4 * k)) for k, i in enumerate(pair)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    busy(0.3)

# the trial's ml/sk.py: GridSearchCV with mlflow.sklearn autologging (parent + nested runs,
# created after the search with the search's start as their start_time); each fit is made to
# last 0.1 s so the search always ends more than BACKDATED_S (1 s) after that start, however
# fast or loaded the machine
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier
import mlflow.sklearn

class SlowTree(DecisionTreeClassifier):
    def fit(self, X, y, **kwargs):
        busy(0.1)
        return super().fit(X, y, **kwargs)

mlflow.set_experiment(grid)
mlflow.sklearn.autolog(log_models=False, max_tuning_runs=10, silent=True)
X, y = load_digits(return_X_y=True)
gs = GridSearchCV(SlowTree(random_state=0), {"max_depth": [2, 4, 8, 16]}, cv=3)
gs.fit(X, y)
print(json.dumps(ids))
"""


@dataclass(frozen=True)
class Made:
    server: MlflowServer
    par: str
    grid: str
    ids: dict[str, str]

    def metrics(self, run_id: str) -> dict[str, float]:
        return dict(MlflowClient(self.server.url).get_run(run_id).data.metrics)


@pytest.fixture(scope="module")
def made(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Made:
    work = tmp_path_factory.mktemp("fix7c")
    tag = uuid.uuid4().hex[:8]
    par, grid = f"par-{tag}", f"grid-{tag}"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RUNS), par, grid],
        cwd=work,
        env=plugin_env(mlflow_server, work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return Made(mlflow_server, par, grid, json.loads(lines[-1]))


# --- 1. concurrent runs are not summed as if disjoint -----------------------------------------


def test_top_level_runs_inside_a_concurrent_run_are_counted_once(made: Made) -> None:
    records = read_runs(made.server.url, [made.par])
    c = compare(records, metric="score", mode="min")
    study = made.metrics(made.ids["study"])
    trials = [made.metrics(made.ids[f"trial-{i}"]) for i in range(4)]
    tags = {r.name: r.tags for r in records}
    # what the trial saw: every run measured the whole machine and says it ran concurrently
    assert all(int(tags[name]["green.concurrent_runs"]) >= 2 for name in tags)
    summed = study["green/energy_kwh"] + math.fsum(t["green/energy_kwh"] for t in trials)
    assert summed > 1.2 * study["green/energy_kwh"]  # the old total: +20 % or more
    # the study was measured throughout the trials' time: its figures already hold theirs
    assert math.isclose(c.total.energy_kwh or 0.0, study["green/energy_kwh"], rel_tol=REL)
    assert math.isclose(c.total.co2e_g or 0.0, study["green/co2e_g"], rel_tol=REL)
    assert math.isclose(c.total.cost or 0.0, study["green/cost"], rel_tol=REL)
    assert c.total.upper_bound is None
    assert EXCLUSIVE_NOTE in c.notes
    once = [n for n in c.notes if "inside study's measured time" in n]
    assert len(once) == 1 and all(f"trial-{i}" in once[0] for i in range(4))
    assert all(any(m.startswith("concurrent (") for m in r.marks) for r in c.rows)


def test_the_dashboard_says_a_months_total_is_an_upper_bound_not_counted_once(made: Made) -> None:
    # the overview printed "every joule is counted once" under every month, overlaps or not
    from green_mlops.integrations.mlflow.app.pages import overview_page

    records = read_runs(made.server.url, [made.par], filter_string="attributes.run_name != 'study'")
    periods = by_month(records)
    assert any(p.total.upper_bound for p in periods)
    page = overview_page({"1": made.par}, periods, None, "")
    note = html.escape(EXCLUSIVE_NOTE)
    assert "upper bound" in page and note not in page
    whole = overview_page(
        {"1": made.par}, by_month(read_runs(made.server.url, [made.par])), None, ""
    )
    assert note in whole and "upper-bound" not in whole


def test_overlapping_runs_that_no_run_covers_make_the_total_an_upper_bound(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    # without the study, trial-0 and trial-1 overlap (and 2 with 3): how much is not known
    records = read_runs(made.server.url, [made.par], filter_string="attributes.run_name != 'study'")
    c = compare(records)
    assert sorted(r.name for r in c.rows) == [f"trial-{i}" for i in range(4)]
    bound = c.total.upper_bound
    assert bound is not None and bound.startswith("totals are upper bounds")
    assert all(f"trial-{i}" in bound for i in range(4))
    assert EXCLUSIVE_NOTE not in c.notes and bound in c.notes
    summed = math.fsum(made.metrics(made.ids[f"trial-{i}"])["green/energy_kwh"] for i in range(4))
    assert math.isclose(c.total.energy_kwh or 0.0, summed, rel_tol=REL)
    code = main(
        [
            "compare",
            "--tracking-uri",
            made.server.url,
            "--experiment",
            made.par,
            "--filter",
            "attributes.run_name != 'study'",
            "--format",
            "markdown",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "every joule is counted once" not in out
    assert f"| all runs | 4 | ≤ {summed:.3g} |" in out and "totals are upper bounds" in out


def test_a_parameter_search_family_counts_the_search_once_in_its_parent(made: Made) -> None:
    """mlflow.sklearn's search candidates are created after the search, backdated to its
    start: they are not measured (their energy is the parent's), so the family's total is the
    parent's own figure, not the parent plus children measured over the same seconds."""
    records = read_runs(made.server.url, [made.grid])
    parents = [r for r in records if r.parent_id is None]
    assert len(parents) == 1, [r.name for r in records]
    parent = parents[0]
    children = [r for r in records if r.parent_id == parent.run_id]
    assert len(children) == 4
    for child in children:
        assert "green/energy_kwh" not in child.metrics
        assert "after the work it records" in child.tags["green.not_reported"]
    energy = parent.metrics["green/energy_kwh"]
    assert energy > 0
    c = compare(records)
    assert math.isclose(c.total.energy_kwh or 0.0, energy, rel_tol=REL)
    assert math.isclose(c.total.co2e_g or 0.0, parent.metrics["green/co2e_g"], rel_tol=REL)
    assert c.total.upper_bound is None
    (month,) = by_month(records)  # the dashboard's overview: measured, nothing unknown
    assert math.isclose(month.total.energy_kwh or 0.0, energy, rel_tol=REL)
    assert month.unknown_kwh == 0.0


# --- 2. the default table at 80 columns ---------------------------------------------------------


def _table(made: Made, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["compare", "--tracking-uri", made.server.url, "--experiment", made.par, *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("columns", [80, 100])
def test_the_default_table_shows_every_cell_whole_at_80_columns(
    made: Made,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))  # what a CI job (no terminal) gets: rich's 80
    args = ("--metric", "score", "--mode", "min", "--baseline", "trial-0", "--by", "green.measured")
    out = _table(made, capsys, *args)
    assert "…" not in out
    c = compare(read_runs(made.server.url, [made.par]), metric="score", mode="min")
    for row in c.rows:
        assert row.name in out
        per_kwh = [row.quality_per_kwh] if row.name != "study" else []  # study: no score
        for value in (row.energy_kwh, row.co2e_g, row.cost, *per_kwh):
            assert value is not None and format(value, ".3g") in out
        assert ", ".join(row.marks) in out
    assert format(c.total.energy_kwh or 0.0, ".3g") in out
    # wide enough, it stays one table
    monkeypatch.setenv("COLUMNS", "400")
    wide = _table(made, capsys, *args)
    assert "┃" in wide and "…" not in wide


# --- 3. which energy quality per kWh divides by ---------------------------------------------------

_FIT_THEN_TEST = """
import json, sys
import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.integrations.lightning import EnergyMonitor

g = torch.Generator().manual_seed(0)
x = torch.randn(1024, 16, generator=g)
y = (x[:, :2].sum(dim=1) > 0).long()
train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64)
val = DataLoader(TensorDataset(x[512:768], y[512:768]), batch_size=128)
test = DataLoader(TensorDataset(x[768:].repeat(20, 1), y[768:].repeat(20)), batch_size=64)

class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))

    def training_step(self, batch, _):
        xb, yb = batch
        return nn.functional.cross_entropy(self.net(xb), yb)

    def validation_step(self, batch, _):
        xb, yb = batch
        self.log("val_acc", (self.net(xb).argmax(dim=1) == yb).float().mean())

    def test_step(self, batch, _):
        xb, yb = batch
        self.log("test_acc", (self.net(xb).argmax(dim=1) == yb).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

logger = MLFlowLogger(experiment_name=sys.argv[1], run_name="fit-then-test")
torch.manual_seed(0)
trainer = L.Trainer(
    max_epochs=2, accelerator="cpu", logger=logger,
    callbacks=[EnergyMonitor(monitor="val_acc", mode="max")], enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
)
model = Classifier()
trainer.fit(model, train, val)
trainer.test(model, test)
print(json.dumps({"run_id": logger.run_id}))
"""


def test_compare_says_which_energy_quality_per_kwh_divides_by(
    mlflow_server: MlflowServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    experiment = f"fit-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(  # the callback alone (plugin off), as in the trial's lt/pl_train.py
        [sys.executable, "-c", textwrap.dedent(_FIT_THEN_TEST), experiment],
        cwd=tmp_path,
        env=plugin_env(mlflow_server, tmp_path, GREEN_MLOPS_ENABLE="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    m = dict(MlflowClient(mlflow_server.url).get_run(json.loads(lines[-1])["run_id"]).data.metrics)
    own = m["green/quality/val_acc_per_kwh"]
    whole = m["val_acc"] / m["green/energy_kwh"]
    assert own > whole * 1.001  # the callback's figure leaves out the test stage's energy
    c = compare(read_runs(mlflow_server.url, [experiment]), metric="val_acc")
    (row,) = c.rows
    assert math.isclose(row.quality_per_kwh or 0.0, whole, rel_tol=REL)
    said = [n for n in c.notes if n.startswith("quality/kWh divides val_acc")]
    assert said and "every stage (fit, test)" in said[0]
    (differs,) = [n for n in c.notes if n.startswith("green/quality/val_acc_per_kwh differs")]
    assert f"fit-then-test {own:.4g} (compare: {whole:.4g})" in differs
    code = main(
        [
            *("compare", "--tracking-uri", mlflow_server.url, "--experiment", experiment),
            *("--metric", "val_acc", "--format", "markdown"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and said[0] in out and differs in out


def test_a_months_measured_and_estimated_shares_count_concurrent_runs_once(made: Made) -> None:
    (period,) = by_month(read_runs(made.server.url, [made.par]))
    study = made.metrics(made.ids["study"])["green/energy_kwh"]
    assert math.isclose(period.total.energy_kwh or 0.0, study, rel_tol=REL)
    # every run here is an estimate (rapl, nvml disabled): the estimated share is the total
    assert math.isclose(period.estimated_kwh or 0.0, study, rel_tol=REL)
    assert period.measured_kwh == 0.0 and period.unknown_kwh == 0.0
