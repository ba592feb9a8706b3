"""What AdaptiveValidation reads off the monitored validation dataloader: its dataset's length
and whether a full pass is certain to yield one value per example of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["dataset_length", "full_pass"]


def full_pass(trainer: pl.Trainer, total: int | None) -> tuple[int | None, int | None]:
    """(N, the per-rank batch size) where a full pass over the monitored dataloader yields
    ``len(dataset)`` values: a map-style dataset, no ``limit_val_batches`` cut, a plain
    ``batch_size`` whose batches hold exactly the dataset (no ``drop_last``), and more than one
    batch; else (None, None)."""
    loaders: Any = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)) and loaders:
        loaders = loaders[0]
    size = getattr(loaders, "batch_size", None)
    batches = trainer.num_val_batches[0] if trainer.num_val_batches else None
    try:
        whole = batches == len(loaders)
    except TypeError:
        whole = False
    if total is None or not isinstance(size, int) or not whole or batches is None or batches < 2:
        return None, None
    # the batches must hold exactly the dataset's examples: not so with drop_last, a custom
    # sampler, or a DistributedSampler that drops (each rank gets ceil(total / W) otherwise)
    per_rank = -(-total // max(1, trainer.world_size))
    if not (batches - 1) * size < per_rank <= batches * size:
        return None, None
    return total, size


def dataset_length(trainer: pl.Trainer) -> int | None:
    """``len`` of the monitored dataloader's dataset; None for an iterable or unsized one."""
    loaders: Any = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)) and loaders:
        loaders = loaders[0]  # the monitored one
    dataset = getattr(loaders, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None
