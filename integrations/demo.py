"""``green-mlops demo``: a small Lightning fit on synthetic data, measured and stored in MLflow.

It uses the same parts a user would: the ``EnergyMonitor`` callback (energy per phase, carbon,
FLOPs, quality per kWh) logging into Lightning's ``MLFlowLogger``. The run lands in the
embedded default store (``sqlite:///mlflow.db`` in the working directory) unless
``MLFLOW_TRACKING_URI`` says otherwise.
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
) -> DemoResult:
    """Train a small MLP for ``epochs`` epochs, measure it, log everything to MLflow.

    ``settings``: green-mlops settings, or keyword arguments over ``GREEN_MLOPS_*`` variables.
    Needs Lightning and full MLflow (the sqlite store): ``pip install "green-mlops[demo]"``.
    """
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking.client import MlflowClient
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from green_mlops.integrations.lightning import EnergyMonitor

    monitor = EnergyMonitor(monitor="val_acc", mode="max", target=0.97, settings=settings)
    # Reproducible through generators of its own: seeding the process-wide RNGs
    # (L.seed_everything) would also fix the run names MLflow draws from `random`.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 32, generator=generator)
    y = (x[:, :4].sum(dim=1) > 0).long()
    split = samples * 3 // 4
    train = DataLoader(
        TensorDataset(x[:split], y[:split]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=256)

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 2))

        def training_step(self, batch: Any, _: int) -> Any:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            logits = self.net(batch[0])
            self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean(), prog_bar=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=tracking_uri)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=20,
    )
    with torch.random.fork_rng(devices=[]):  # the initial weights, without touching torch's RNG
        torch.manual_seed(seed)
        model = Classifier()
    trainer.fit(model, train, val)
    run = MlflowClient(tracking_uri).get_run(str(logger.run_id))
    green = {k: v for k, v in run.data.metrics.items() if k.startswith("green/")}
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("green.")}
    return DemoResult(str(logger.run_id), tracking_uri, green, tags, run.data.metrics["val_acc"])
