"""``green-mlops demo``: a small Lightning fit on synthetic data, measured and stored in MLflow.

The run lands in the embedded default store (``sqlite:///mlflow.db`` in the working directory)
unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from green_mlops.config import Settings
from green_mlops.metrics import POWER_KEY, energy_metrics, power_series, provenance_tags
from green_mlops.snapshot import Snapshot
from green_mlops.tracker import Tracker

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "green-mlops-demo"


@dataclass(frozen=True)
class DemoResult:
    run_id: str
    tracking_uri: str
    snapshot: Snapshot
    val_loss: float


def run_demo(
    *, epochs: int = 3, samples: int = 4096, seed: int = 0, settings: Settings | None = None
) -> DemoResult:
    """Train a small MLP for ``epochs`` epochs, measure it, log everything to MLflow."""
    import lightning as L
    import mlflow
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.entities import Metric, RunTag
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    tracker = Tracker(settings)  # validates settings before anything runs
    L.seed_everything(seed, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 32, generator=generator)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    split = samples * 3 // 4
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=256)

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))

        def training_step(self, batch: Any, _: int) -> Any:
            loss = nn.functional.binary_cross_entropy_with_logits(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            loss = nn.functional.binary_cross_entropy_with_logits(self.net(batch[0]), batch[1])
            self.log("val_loss", loss, prog_bar=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Phases(L.Callback):
        """Marks Lightning's phases on the tracker (the EnergyMonitor callback will replace it)."""

        def on_train_epoch_start(self, *_: Any) -> None:
            tracker.enter("train")

        def on_train_epoch_end(self, *_: Any) -> None:
            tracker.exit("train")

        def on_validation_start(self, trainer: Any, *_: Any) -> None:
            tracker.enter("sanity" if trainer.sanity_checking else "validation")

        def on_validation_end(self, trainer: Any, *_: Any) -> None:
            tracker.exit("sanity" if trainer.sanity_checking else "validation")

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=tracking_uri)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[Phases()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    with tracker:
        trainer.fit(Classifier(), train, val)
    snapshot = tracker.stop()

    client = logger.experiment
    now_ms = int(snapshot.started_at * 1000 + snapshot.duration_s * 1000)
    step = trainer.global_step
    metrics = [Metric(k, v, now_ms, step) for k, v in energy_metrics(snapshot).items()]
    metrics += [
        Metric(POWER_KEY, w, int(t * 1000), i) for i, (t, w) in enumerate(power_series(snapshot))
    ]
    tags = [RunTag(k, v) for k, v in provenance_tags(snapshot).items()]
    client.log_batch(logger.run_id, metrics=metrics, tags=tags, synchronous=True)
    client.log_dict(logger.run_id, snapshot.to_dict(), "green/report.json")
    mlflow.set_tracking_uri(tracking_uri)
    val_loss = float(trainer.callback_metrics["val_loss"])
    return DemoResult(str(logger.run_id), tracking_uri, snapshot, val_loss)
