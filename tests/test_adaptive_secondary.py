"""AdaptiveValidation with several validation dataloaders (real CPU fits): the first is the
monitored one; ``secondary="lazy"`` evaluates the others only for runs that become the new best
and at the last epoch, so the kept checkpoint's secondary metrics are full validation's."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.integrations.lightning import AdaptiveValidation

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
)

SECONDARY = ("ood_loss/dataloader_idx_1", "ood_loss/dataloader_idx_2")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
        )
        self.steps: Counter[tuple[int, int]] = Counter()  # (epoch, dataloader) -> batches

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        self.steps[self.current_epoch, dataloader_idx] += 1
        loss = F.cross_entropy(self.net(x), y, reduction="none").clamp(max=5.0)
        if dataloader_idx > 0:  # a secondary set: the user's own metric
            self.log("ood_loss", loss.mean(), on_epoch=True, batch_size=len(y))
        return {"per_example_loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-2)


class Recorder(Callback):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def data(n: int, seed: int, shift: float = 0.0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen) + shift
    y = (x[:, 0] + x[:, 1] ** 2 - 1 + 0.8 * torch.randn(n, generator=gen) > 0).long()
    return TensorDataset(x, y)


def fit(
    root: Path, loaders: int = 3, callbacks: tuple[Callback, ...] = (), **adaptive: Any
) -> tuple[tuple[int, int], Recorder, Net, AdaptiveValidation]:
    pl.seed_everything(0, verbose=False)
    train = DataLoader(
        data(400, 0), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    vals = [DataLoader(AdaptiveValidation.permute_once(data(3000, 1)), batch_size=200)]
    vals += [DataLoader(data(400, 2 + k, shift=0.5 * k), batch_size=100) for k in (1, 2)]
    callback = AdaptiveValidation(upper=5.0, **adaptive)
    es = EarlyStopping(monitor="val_loss", patience=3)
    mc = ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=1)
    record, module = Recorder(), Net()
    pl.Trainer(
        max_epochs=14,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[callback, es, mc, record, *callbacks],
    ).fit(module, train, vals[:loaders] if loaders > 1 else vals[0])
    best = int(Path(mc.best_model_path).name.split("-")[0].split("=")[1])
    return (es.stopped_epoch, best), record, module, callback


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("secondary")
    return {
        name: fit(root / name, **kwargs)
        for name, kwargs in {
            "full validation": {"enabled": False},
            "full": {},
            "lazy": {"secondary": "lazy"},
        }.items()
    }


def test_lazy_secondaries_keep_the_checkpoints_numbers_and_skip_the_rest(
    fits: dict[str, Any],
) -> None:
    reference, ref_record, _, _ = fits["full validation"]
    decided, record, module, callback = fits["lazy"]
    assert decided == reference
    _, best = decided
    kept = record.logged[best]
    for key in SECONDARY:  # the kept checkpoint's secondary metrics are full validation's
        assert kept[key] == ref_record.logged[best][key]
    assert record.logged[-1][SECONDARY[0]] == ref_record.logged[-1][SECONDARY[0]]
    # secondaries evaluated in full exactly at new bests and at the last epoch, else skipped
    improved, low = set(), float("inf")
    for epoch, row in enumerate(ref_record.logged):
        if row["val_loss"] < low:
            low, improved = row["val_loss"], improved | {epoch}
    last = len(record.logged) - 1
    for epoch in range(last + 1):
        expected = 4 if epoch in improved or epoch == last else 0
        assert module.steps[epoch, 1] == module.steps[epoch, 2] == expected, epoch
    skipped = sum(1 for e in range(last + 1) if e not in improved and e != last)
    assert skipped >= 2  # the fit has runs to skip
    total = record.logged[-1]["green/validation/secondary_fraction_evaluated_total"]
    assert total == pytest.approx(1 - skipped / (last + 1))
    assert record.logged[1]["green/validation/secondary_examples_skipped"] in (0.0, 800.0)
    assert callback.validator.skipped_total > 0  # the primary still stops early


def test_full_secondaries_run_every_time_while_the_primary_stops_early(
    fits: dict[str, Any],
) -> None:
    reference, ref_record, _, _ = fits["full validation"]
    decided, record, module, callback = fits["full"]
    assert decided == reference
    for ours, theirs in zip(record.logged, ref_record.logged, strict=True):
        assert [ours[k] for k in SECONDARY] == [theirs[k] for k in SECONDARY]
    assert all(module.steps[e, 1] == 4 for e in range(len(record.logged)))
    assert callback.validator.skipped_total > 0
    assert any(module.steps[e, 0] < 15 for e in range(1, len(record.logged)))


def test_a_callback_monitoring_a_lazy_secondary_metric_is_refused(tmp_path: Path) -> None:
    key = SECONDARY[0]
    watcher = ModelCheckpoint(dirpath=tmp_path / "ood", monitor=key, save_top_k=1)
    with pytest.raises(
        MisconfigurationException, match=r"ood_loss/dataloader_idx_1.*secondary='full'"
    ):
        fit(tmp_path, callbacks=(watcher,), secondary="lazy", allow_monitors=[key])


def test_lazy_with_one_dataloader_is_a_no_op_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="green_mlops")
    fit(tmp_path, loaders=1, secondary="lazy")
    said = [r.getMessage() for r in caplog.records if "secondary='lazy'" in r.getMessage()]
    assert len(said) == 1 and "one validation dataloader" in said[0]


def test_a_bad_secondary_setting_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"secondary='sometimes'.*'full' or 'lazy'"):
        AdaptiveValidation(secondary="sometimes")  # type: ignore[arg-type]


def test_a_dataloader_suffix_on_the_monitor_is_refused_at_once() -> None:
    """With several loaders, Lightning suffixes what validation_step logs (``val_loss`` of
    loader 0 is ``val_loss/dataloader_idx_0``); AdaptiveValidation logs ``monitor`` once per
    run, unsuffixed (Lightning refuses to log a suffixed key: it failed after the first
    training epoch). Refused when the callback is made, naming the fix."""
    with pytest.raises(
        MisconfigurationException,
        match=r"monitor='val_loss/dataloader_idx_0'.*monitor='val_loss'",
    ):
        AdaptiveValidation(monitor="val_loss/dataloader_idx_0", upper=5.0)


def test_lazy_knows_an_early_stopping_that_stops_on_divergence() -> None:
    """The last run gets its secondaries: EarlyStopping's divergence_threshold stops the fit
    too (besides patience, stopping_threshold and a non-finite value)."""
    from green_mlops.integrations.lightning.secondary import early_stopping_stops

    es = EarlyStopping(monitor="val_loss", patience=3, divergence_threshold=1.0)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[es])
    assert early_stopping_stops(trainer, "val_loss", 2.0)  # above the threshold: stops
    assert not early_stopping_stops(trainer, "val_loss", 0.5)  # a first value: improves
