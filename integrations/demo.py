"""``green-mlops demo``: a small Lightning fit on synthetic data, measured and stored in MLflow;
``make demo`` (``python -m green_mlops.integrations.demo``): a sweep of three such fits
(baseline, a smaller model, adaptive validation), compared, with the command that opens the
dashboard on them.

It uses the same parts a user would: the ``EnergyMonitor`` callback (energy per phase, carbon,
FLOPs, quality per kWh) logging into Lightning's ``MLFlowLogger``, ``AdaptiveValidation``, and
:func:`green_mlops.compare.compare`. The runs land in the embedded default store
(``sqlite:///mlflow.db`` in the working directory) unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from green_mlops.config import Settings

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "green-mlops-demo"


@dataclass(frozen=True)
class DemoResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    tags: dict[str, str]
    val_acc: float


def run_demo(
    *,
    epochs: int = 3,
    samples: int = 8192,
    seed: int = 0,
    settings: Settings | Mapping[str, Any] | None = None,
    hidden: int = 128,
    adaptive: bool = False,
    run_name: str | None = None,
) -> DemoResult:
    """Train a small MLP (``hidden`` units) for ``epochs`` epochs, measure it, log everything
    to MLflow; ``adaptive``: validate with ``AdaptiveValidation`` (it stops a validation once
    the decision is known); then ``test_acc`` on a held-out test set.

    ``settings``: green-mlops settings, or keyword arguments over ``GREEN_MLOPS_*`` variables.
    Needs Lightning and full MLflow (the sqlite store): ``pip install "green-mlops[demo]"``.
    """
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking.client import MlflowClient
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from green_mlops.integrations.lightning import AdaptiveValidation, EnergyMonitor

    # with AdaptiveValidation val_acc covers only the examples evaluated: no quality from it
    # (the sweep compares test_acc, measured on the whole test set)
    if adaptive:
        monitor = EnergyMonitor(settings=settings)
    else:
        monitor = EnergyMonitor(monitor="val_acc", mode="max", target=0.97, settings=settings)
    callbacks: list[Any] = [monitor]
    if adaptive:
        callbacks.append(AdaptiveValidation(monitor="val_loss", mode="min", upper=5.0))
    # Reproducible through generators of its own: seeding the process-wide RNGs
    # (L.seed_everything) would also fix the run names MLflow draws from `random`.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 32, generator=generator)
    y = (x[:, :4].sum(dim=1) > 0).long()
    # a large validation set, as in many real fits: validation is a visible share of the cost
    split, test_split = samples // 4, samples * 7 // 8
    train = DataLoader(
        TensorDataset(x[:split], y[:split]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    val_set: Any = TensorDataset(x[split:test_split], y[split:test_split])
    if adaptive:  # one fixed random order, which its test needs
        val_set = AdaptiveValidation.permute_once(val_set)
    val = DataLoader(val_set, batch_size=256)
    test = DataLoader(TensorDataset(x[test_split:], y[test_split:]), batch_size=256)

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 2))

        def training_step(self, batch: Any, _: int) -> Any:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> Any:
            logits = self.net(batch[0])
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean(), prog_bar=True)
            if adaptive:  # AdaptiveValidation logs val_loss from the per-example values
                loss = nn.functional.cross_entropy(logits, batch[1], reduction="none")
                return {"per_example_loss": loss.clamp(max=5.0)}
            self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))
            return None

        def test_step(self, batch: Any, _: int) -> None:
            logits = self.net(batch[0])
            self.log("test_acc", (logits.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=tracking_uri, run_name=run_name)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=20,
    )
    with torch.random.fork_rng(devices=[]):  # the initial weights, without touching torch's RNG
        torch.manual_seed(seed)
        model = Classifier()
    trainer.fit(model, train, val)
    trainer.test(model, test, verbose=False)
    run = MlflowClient(tracking_uri).get_run(str(logger.run_id))
    green = {k: v for k, v in run.data.metrics.items() if k.startswith("green/")}
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("green.")}
    return DemoResult(str(logger.run_id), tracking_uri, green, tags, run.data.metrics["val_acc"])


#: The sweep of ``make demo``: run name -> run_demo's arguments.
SWEEP: dict[str, dict[str, Any]] = {
    "baseline": {"hidden": 128},
    "smaller-model": {"hidden": 16},
    "adaptive-validation": {"hidden": 128, "adaptive": True},
}


def run_sweep(*, epochs: int = 3, samples: int = 8192) -> list[DemoResult]:
    """The three fits of :data:`SWEEP`, one after the other, into the demo's experiment."""
    return [
        run_demo(epochs=epochs, samples=samples, run_name=name, **kwargs)
        for name, kwargs in SWEEP.items()
    ]


def main(argv: list[str] | None = None) -> int:
    """``make demo``: the sweep, its comparison (test_acc per kWh, savings against the
    baseline), and the command that opens the dashboard on it."""
    import argparse
    import logging
    import warnings

    from rich.console import Console
    from rich.table import Table

    from green_mlops.compare import compare
    from green_mlops.integrations.mlflow.reader import read_runs

    parser = argparse.ArgumentParser(prog="python -m green_mlops.integrations.demo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 110))
    console.print(
        f"Training three configurations ({', '.join(SWEEP)}) of a small MLP for "
        f"{args.epochs} epochs on synthetic data (CPU)..."
    )
    for name in ("lightning", "lightning.pytorch", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_sweep(epochs=args.epochs, samples=args.samples)
    uri = results[0].tracking_uri
    records = read_runs(uri, run_ids=[r.run_id for r in results])
    comparison = compare(records, metric="test_acc", baseline=results[0].run_id)
    table = Table(title=f"experiment {EXPERIMENT!r}: test_acc per kWh, savings vs baseline")
    for header in ("run", "time (s)", "energy (kWh)", "CO2e (g)", "test_acc", "per kWh", "front"):
        table.add_column(header, justify="left" if header == "run" else "right")
    table.add_column("kWh saved", justify="right")
    table.add_column("test_acc change", justify="right")
    for row in comparison.rows:
        delta = row.vs_baseline
        saved, change = "baseline", ""
        if row.run_id != results[0].run_id and delta is not None:
            saved = _shown(delta.saving_kwh_pct, "+.0f") + " %"
            change = _shown(delta.metric_change, "+.4f")
        table.add_row(
            row.name,
            _shown(row.duration_s, ".1f"),
            _shown(row.inclusive_kwh, ".3g"),
            _shown(row.co2e_g, ".3g"),
            _shown(row.metric, ".4f"),
            _shown(row.quality_per_kwh, ".4g"),
            "yes" if row.on_front else "",
            saved,
            change,
        )
    console.print(table)
    for note in comparison.notes:
        console.print(f"[dim]{note}[/]")
    experiment_id = _experiment_id(uri, results[0].run_id)
    console.print(
        "\nOpen the dashboard on these runs:\n"
        f"  [bold]{mlflow_command()} server --app-name green-mlops --backend-store-uri {uri}[/]\n"
        f"  then http://127.0.0.1:5000/green/experiment?experiment_id={experiment_id}"
        f"&metric=test_acc&baseline={results[0].run_id}"
    )
    return 0


def mlflow_command() -> str:
    """The ``mlflow`` script beside this Python (a virtual environment's), else ``mlflow``."""
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("mlflow")
    return str(script) if script.exists() else "mlflow"


def _shown(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _experiment_id(tracking_uri: str, run_id: str) -> str:
    from mlflow.tracking.client import MlflowClient

    return str(MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)


if __name__ == "__main__":
    raise SystemExit(main())
