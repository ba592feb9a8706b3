"""Real runs on a real MLflow server, made by the real plugin (``GREEN_MLOPS_ENABLE=1``) in one
subprocess: for the tests of the commands that read finished runs (compare, report, audit).

    ids = make_runs(mlflow_server, [RunSpec("exp-a", "fast", params={"lr": "0.1"},
                                            metrics={"val_acc": 0.9})], tmp_path)
    ids["fast"]  # the run id

Carbon is deterministic: the ``constant`` intensity provider at :data:`INTENSITY_G_PER_KWH`
(override with ``GREEN_MLOPS_INTENSITY_PROVIDERS=...`` in ``env``), location DE, a 0.5 s
logging interval. Each run busies the CPU for ``busy_s`` so its energy is > 0. Call it from a
session- or module-scoped fixture: one subprocess makes every run of a call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.mlflow_server import MlflowServer

__all__ = [
    "INTENSITY_G_PER_KWH",
    "PRICE_PER_KWH",
    "LightningRun",
    "RunSpec",
    "make_lightning_run",
    "make_runs",
    "plugin_env",
]

#: The constant grid intensity every run is priced with (gCO2e/kWh), unless ``env`` says else.
INTENSITY_G_PER_KWH = 300.0
#: The electricity price (per kWh), so ``green/cost`` is reported.
PRICE_PER_KWH = 0.25


@dataclass(frozen=True)
class RunSpec:
    """One run to make. ``name`` is the run name and the key of its id in the result (unique
    within one :func:`make_runs` call, children included). ``metrics`` are logged at the end
    (after the busy loop), like a final validation metric; ``children`` are nested runs made
    inside this one, after its own busy loop."""

    experiment: str
    name: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    busy_s: float = 0.3
    children: Sequence[RunSpec] = ()


_SCRIPT = """
import json, sys, time
import mlflow

def busy(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x

def make(spec, ids, nested):
    mlflow.set_experiment(spec["experiment"])
    with mlflow.start_run(run_name=spec["name"], nested=nested) as run:
        ids[spec["name"]] = run.info.run_id
        if spec["params"]:
            mlflow.log_params(spec["params"])
        if spec["tags"]:
            mlflow.set_tags(spec["tags"])
        busy(spec["busy_s"])
        for child in spec["children"]:
            make(child, ids, True)
        if spec["metrics"]:
            mlflow.log_metrics(spec["metrics"])

ids = {}
for spec in json.loads(sys.argv[1]):
    make(spec, ids, False)
print(json.dumps(ids))
"""


def plugin_env(server: MlflowServer, workdir: Path, **env: str) -> dict[str, str]:
    """The environment of a user process with the plugin on, against ``server``: no
    ``GREEN_MLOPS_*`` or ``MLFLOW_*`` of the caller's, deterministic carbon, then ``env``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "GREEN_MLOPS_ENABLE": "1",
        "GREEN_MLOPS_CACHE_DIR": str(workdir / "green-cache"),
        "GREEN_MLOPS_LOCATION": "DE",
        "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
        "GREEN_MLOPS_INTENSITY_PROVIDERS": "constant",
        "GREEN_MLOPS_INTENSITY_G_PER_KWH": f"{INTENSITY_G_PER_KWH:g}",
        "GREEN_MLOPS_PRICE_PER_KWH": f"{PRICE_PER_KWH:g}",
        # the same meters on every host (estimates): a runner with readable RAPL or a GPU
        # would otherwise make runs "measured" and change what the tests compare
        "GREEN_MLOPS_DISABLE_PLUGINS": "rapl,nvml",
        "MLFLOW_TRACKING_URI": server.url,
        "PYTHONUNBUFFERED": "1",
        **env,
    }


def make_runs(
    server: MlflowServer,
    specs: Sequence[RunSpec],
    workdir: Path,
    *,
    timeout: float = 300,
    **env: str,
) -> dict[str, str]:
    """Make the runs of ``specs`` (in order) with the real plugin in one subprocess; returns
    run name -> run id (children included). Raises ``RuntimeError`` with the process's output
    when it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([_plain(spec) for spec in specs])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), payload],
        cwd=workdir,
        env=plugin_env(server, workdir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"making runs failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    ids: dict[str, str] = json.loads(lines[-1])
    return ids


def _plain(spec: RunSpec) -> dict[str, Any]:
    plain = asdict(spec)
    plain["params"] = {str(k): str(v) for k, v in spec.params.items()}
    plain["tags"] = {str(k): str(v) for k, v in spec.tags.items()}
    plain["metrics"] = {str(k): float(v) for k, v in spec.metrics.items()}
    plain["children"] = [_plain(child) for child in spec.children]
    return plain


_LIGHTNING = """
import json, sys
import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.integrations.lightning import EnergyMonitor

spec = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 16, generator=g)
y = (x[:, :2].sum(dim=1) > 0).long()
train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64)
val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)

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

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=spec["lr"])

loggers = []
if spec["experiment"]:
    loggers.append(MLFlowLogger(experiment_name=spec["experiment"], run_name=spec["name"]))
if spec["csv_dir"]:
    loggers.append(CSVLogger(spec["csv_dir"], name=spec["name"], version=0))
torch.manual_seed(0)
model = Classifier()
trainer = L.Trainer(
    max_epochs=spec["epochs"], accelerator="cpu", logger=loggers,
    callbacks=[EnergyMonitor(monitor="val_acc", mode="max")], enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
)
trainer.fit(model, train, val)
out = {"val_acc": float(trainer.callback_metrics["val_acc"])}
for logger in loggers:
    if isinstance(logger, MLFlowLogger):
        out["run_id"] = logger.run_id
    else:
        out["report"] = logger.log_dir + "/green_report.json"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class LightningRun:
    """What :func:`make_lightning_run` made: the MLflow run id (with ``experiment``), the
    ``green_report.json`` path (with ``csv_dir``) and the final ``val_acc``."""

    run_id: str | None
    report: Path | None
    val_acc: float


def make_lightning_run(
    server: MlflowServer,
    workdir: Path,
    *,
    name: str,
    experiment: str | None = None,
    csv_dir: Path | None = None,
    epochs: int = 2,
    lr: float = 0.01,
    timeout: float = 300,
    **env: str,
) -> LightningRun:
    """A tiny CPU fit (``val_acc`` logged at validation) with the real ``EnergyMonitor``
    (monitor ``val_acc``), logging to an ``MLFlowLogger`` run named ``name`` in
    ``experiment`` and/or a ``CSVLogger`` under ``csv_dir`` (which writes the callback's
    ``green_report.json`` and Lightning's ``metrics.csv``), in one subprocess with the
    environment of :func:`plugin_env` (plugin off: the callback measures)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "experiment": experiment,
        "name": name,
        "csv_dir": str(csv_dir) if csv_dir else None,
        "epochs": epochs,
        "lr": lr,
    }
    environ = plugin_env(server, workdir, **{"GREEN_MLOPS_ENABLE": "0", **env})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LIGHTNING), json.dumps(spec)],
        cwd=workdir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the Lightning fit failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    out = json.loads(lines[-1])
    return LightningRun(
        run_id=out.get("run_id"),
        report=Path(out["report"]) if "report" in out else None,
        val_acc=float(out["val_acc"]),
    )
