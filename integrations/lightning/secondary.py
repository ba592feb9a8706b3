"""Several validation dataloaders under ``AdaptiveValidation``: the first is the monitored
(primary) one, the others are *secondary*. Ends the primary early without ending the run, and,
with ``secondary="lazy"``, says whether the secondaries run this time.

Lightning runs the dataloaders of a validation run one after the other (a ``CombinedLoader``
in ``"sequential"`` mode) and reads each one's batch limit before every batch: lowering the
primary's limit to the batches seen moves on to the next loader. See
docs/adaptive-validation.md ("Several validation dataloaders").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from green_mlops.integrations.lightning._namespaces import Misconfiguration, classes

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from green_mlops.adaptive import Outcome

__all__ = [
    "SecondaryTally",
    "SequentialLimits",
    "check_unmonitored",
    "early_stopping_stops",
    "loader_examples",
    "wanted",
]


class SequentialLimits:
    """The per-dataloader batch limits of the current validation run (a copy: the loop's own
    list is left untouched for later runs)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        loop: Any = trainer.fit_loop.epoch_loop.val_loop
        fetcher = getattr(loop, "_data_fetcher", None)
        combined = getattr(fetcher, "combined_loader", None)
        iterator = getattr(combined, "_iterator", None)
        limits = getattr(iterator, "limits", None)
        if iterator is None or type(iterator).__name__ != "_Sequential" or limits is None:
            raise Misconfiguration(
                "AdaptiveValidation with several validation dataloaders needs Lightning's "
                "sequential CombinedLoader (the default for a list of dataloaders); got "
                f"{type(iterator).__name__}. Pass the dataloaders as a list."
            )
        if getattr(fetcher, "length", None) is None:
            raise Misconfiguration(
                "AdaptiveValidation with several validation dataloaders needs dataloaders with "
                "a length (map-style datasets): Lightning prefetches a batch of the next "
                "dataloader otherwise"
            )
        self._iterator = iterator
        iterator.limits = list(limits)
        #: Set when ``secondary="lazy"`` skipped the secondary dataloaders in this run.
        self.skipped = False

    @property
    def limits(self) -> list[float]:
        return list(self._iterator.limits)

    def end_primary(self, batches: int) -> None:
        """The primary dataloader (index 0) yields no batch after the first ``batches``."""
        self._iterator.limits[0] = batches


def loader_examples(trainer: pl.Trainer, limits: Iterable[float]) -> list[int | None]:
    """Examples each validation dataloader yields in a full run (within its batch limit);
    None where that is not known."""
    loaders: Any = trainer.val_dataloaders
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    out: list[int | None] = []
    for loader, limit in zip(loaders, limits, strict=False):
        try:
            size = len(loader.dataset)
            batch = loader.batch_size or size
            full = math.ceil(size / batch)
        except (AttributeError, TypeError):
            out.append(None)
            continue
        if isinstance(limit, int) and limit < full:
            size = limit * batch
        out.append(size)
    return out


def wanted(trainer: pl.Trainer, monitor: str, outcome: Outcome) -> bool:
    """``secondary="lazy"``: evaluate the secondaries at a new best and at the last epoch
    (``max_epochs``, an EarlyStopping that stops after this run, or a stop already asked for)."""
    max_epochs = trainer.max_epochs
    last = max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1
    return (
        outcome.improved
        or last
        or bool(trainer.should_stop)
        or early_stopping_stops(trainer, monitor, outcome.value)
    )


class SecondaryTally:
    """Secondary examples evaluated and those full validation would have evaluated."""

    def __init__(self) -> None:
        self.evaluated = 0
        self.total = 0

    def add(
        self, trainer: pl.Trainer, limits: SequentialLimits, *, lazy: bool
    ) -> tuple[int, float]:
        """Count this run; (examples skipped in it, fraction evaluated over the fit so far).
        After a lazy run that evaluated the secondaries, checks what monitors their metrics."""
        size = sum(n or 0 for n in loader_examples(trainer, limits.limits)[1:])
        self.total += size
        skipped = size if limits.skipped else 0
        self.evaluated += size - skipped
        if lazy and not limits.skipped:
            check_unmonitored(trainer)
        return skipped, self.evaluated / max(1, self.total)


def early_stopping_stops(trainer: pl.Trainer, monitor: str, value: float) -> bool:
    """Whether an ``EarlyStopping`` on ``monitor`` stops the fit after a run that logs
    ``value`` (its own test, on its current state)."""
    current = torch.tensor(value, dtype=torch.float64)
    for es in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(es, classes("callbacks", "EarlyStopping")) or es.monitor != monitor:
            continue
        best = es.best_score.to(torch.float64)
        if es.check_finite and not torch.isfinite(current):
            return True
        if es.stopping_threshold is not None and es.monitor_op(current, es.stopping_threshold):
            return True
        threshold = es.divergence_threshold
        if threshold is not None and es.monitor_op(-current, -threshold):
            return True
        if not es.monitor_op(current - es.min_delta, best) and es.wait_count + 1 >= es.patience:
            return True
    return False


def check_unmonitored(trainer: pl.Trainer) -> None:
    """Refuse a callback that monitors a metric logged from a secondary dataloader (those
    skipped runs would leave it stale)."""
    secondary: dict[str, int] = {}
    results: Any = getattr(trainer, "_results", None)
    for metric in [] if results is None else results.values():
        meta: Any = getattr(metric, "meta", None)
        index = getattr(meta, "dataloader_idx", None)
        name = getattr(meta, "name", None)
        if isinstance(index, int) and index > 0 and isinstance(name, str):
            secondary[name] = index
            secondary[f"{name}/dataloader_idx_{index}"] = index
    watched = [
        (type(cb).__name__, cb.monitor)
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(getattr(cb, "monitor", None), str)
    ]
    watched += [
        ("ReduceLROnPlateau", c.monitor)
        for c in trainer.lr_scheduler_configs
        if c.reduce_on_plateau and c.monitor
    ]
    for name, key in watched:
        if key in secondary:
            raise Misconfiguration(
                f"{name} monitors {key!r}, logged from validation dataloader {secondary[key]}, "
                "which AdaptiveValidation(secondary='lazy') evaluates only for runs that become "
                "the new best and at the last epoch (it would see stale values). Pass "
                "AdaptiveValidation(secondary='full'), or monitor the first dataloader's metric."
            )
