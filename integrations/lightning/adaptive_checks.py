"""The configuration checks of ``AdaptiveValidation``: what may watch its metric, and the loader.

A configuration under which adaptive validation could change a decision is refused (a
:class:`~green_mlops.integrations.lightning._namespaces.Misconfiguration` naming the fix); one
under which only early "improved" is unsafe turns that off, with the reason. See
docs/adaptive-validation.md ("What the callback accepts").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from green_mlops.adaptive import AdaptiveValidator
from green_mlops.integrations.lightning._namespaces import Misconfiguration, classes
from green_mlops.integrations.lightning.permuted import PermutedDataset

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

log = logging.getLogger(__name__)

__all__ = ["ConfigChecks", "refusing"]


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """A ``ValueError`` of the validator raised as a ``Misconfiguration`` naming the callback
    (a ``Misconfiguration`` raised inside passes through as it is)."""
    try:
        yield
    except Misconfiguration:
        raise
    except ValueError as exc:
        raise Misconfiguration(f"AdaptiveValidation: {exc}") from exc


class ConfigChecks:
    """The checks of one callback, with what they found: ``min_delta`` of the EarlyStopping
    callbacks on ``monitor``, the reasons to keep improving runs complete, the loader's order."""

    def __init__(
        self,
        *,
        monitor: str,
        mode: Literal["min", "max"],
        lower: float | None,
        upper: float | None,
        incumbent: Literal["weights", "values"],
        enabled: bool,
        trust_order: bool,
        allow_monitors: Collection[str],
    ) -> None:
        self.monitor = monitor
        self.mode = mode
        self.lower = lower
        self.upper = upper
        self.incumbent = incumbent
        self.enabled = enabled
        self.trust_order = trust_order
        self.allow_monitors = frozenset(allow_monitors)
        self.min_deltas: set[float] = set()
        self.off_reasons: list[str] = []
        #: ``(seed, size)`` of the validation set's permutation (kept in checkpoints).
        self.order: tuple[int, int] | None = None
        self._checked_loaders: set[int] = set()

    # -- other callbacks (setup, on_fit_start) ---------------------------------------------

    def callbacks(self, trainer: pl.Trainer) -> float:
        """Check the EarlyStopping, ModelCheckpoint and EnergyMonitor callbacks (a monitored
        metric other than ours covers only the examples evaluated); the ``min_delta`` to use."""
        many = not (
            isinstance(trainer.val_check_interval, float) and trainer.val_check_interval == 1.0
        )
        self.min_deltas = set()
        self.off_reasons = []
        early_stopping = classes("callbacks", "EarlyStopping")  # of either namespace
        checkpoint = classes("callbacks", "ModelCheckpoint")
        from green_mlops.integrations.lightning.energy_monitor import EnergyMonitor

        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, early_stopping):
                self._early_stopping(callback, trainer, many)
            elif isinstance(callback, checkpoint):
                self._checkpoint(callback, trainer, many)
            elif isinstance(callback, EnergyMonitor) and callback.monitor is not None:
                # its quality per kWh / FLOP and energy to target would rest on a prefix
                self._other_monitor(
                    f"EnergyMonitor(monitor={callback.monitor!r})", callback.monitor
                )
        if len(self.min_deltas) > 1:
            self.off_reasons.append(
                f"EarlyStopping callbacks with different min_delta {sorted(self.min_deltas)}"
            )
        return max(self.min_deltas, default=0.0)

    def schedulers(self, trainer: pl.Trainer) -> None:
        """Check the ReduceLROnPlateau schedulers (known once the optimizers are set up)."""
        for config in trainer.lr_scheduler_configs:
            if not config.reduce_on_plateau or config.monitor is None:
                continue
            name = f"ReduceLROnPlateau (monitor={config.monitor!r})"
            self._other_monitor(name, config.monitor)
            if config.monitor != self.monitor:
                continue
            scheduler: Any = config.scheduler
            if getattr(scheduler, "mode", self.mode) != self.mode:
                raise Misconfiguration(
                    f"{name} has mode={scheduler.mode!r}, AdaptiveValidation has "
                    f"mode={self.mode!r}: pass the same mode to both"
                )
            threshold = float(getattr(scheduler, "threshold", 0.0))
            relative = getattr(scheduler, "threshold_mode", "rel") == "rel"
            if threshold < 0 or (relative and (self.lower is None or self.lower < 0)):
                raise Misconfiguration(
                    f"{name} needs threshold >= 0 and, with threshold_mode='rel', values that "
                    "cannot be negative (AdaptiveValidation(lower=0.0)); got "
                    f"threshold={threshold}, lower={self.lower}"
                )
            if threshold > 0:
                self.off_reasons.append(
                    f"{name} has threshold={threshold} (pass threshold=0 to let improving runs "
                    "stop early)"
                )

    def early_improved(
        self, trainer: pl.Trainer, validator: AdaptiveValidator, *, announce: bool
    ) -> str | None:
        """Decide (identically on every rank) whether this fit may stop improving runs: sets
        ``validator.early_improved``; returns why not (None when it may)."""
        reasons = list(self.off_reasons)
        if self.incumbent == "values":
            reasons.insert(0, "incumbent='values'")
        elif (self.upper if self.mode == "min" else self.lower) is None:
            bound = "upper" if self.mode == "min" else "lower"
            reasons.insert(
                0,
                f"no {bound}= bound on the improving side (an unseen example could undo any "
                f"improvement; clamp the per-example value and pass {bound}=)",
            )
        elif not self.enabled:
            reasons.insert(0, "enabled=False")
        off = "; ".join(reasons) or None
        validator.early_improved = off is None
        if validator.improves_early and self.enabled:
            strategy = trainer.strategy
            whole = classes("strategies", "SingleDeviceStrategy") + classes(
                "strategies", "DDPStrategy"
            )
            if isinstance(strategy, classes("strategies", "DeepSpeedStrategy")) or not isinstance(
                strategy, whole
            ):
                raise Misconfiguration(
                    f"AdaptiveValidation(incumbent='weights') evaluates a copy of the whole "
                    f"model, which {type(strategy).__name__} shards: pass "
                    "AdaptiveValidation(incumbent='values') (only 'not improved' stops early)"
                )
        if (
            announce
            and self.incumbent == "weights"
            and off
            and self.enabled
            and trainer.is_global_zero
        ):
            log.info(
                "AdaptiveValidation: improving runs are evaluated in full (as with "
                "incumbent='values') because of: %s",
                off,
            )
        return off

    def _other_monitor(self, what: str, monitor: str) -> None:
        if monitor != self.monitor and monitor not in self.allow_monitors:
            raise Misconfiguration(
                f"{what} monitors {monitor!r}, but AdaptiveValidation keeps only "
                f"{self.monitor!r} exact: a metric logged in validation_step covers only the "
                f"examples evaluated. Monitor {self.monitor!r} instead, or, if {monitor!r} is "
                f"not computed by validation, pass AdaptiveValidation(allow_monitors="
                f"[{monitor!r}])."
            )

    def _early_stopping(self, es: EarlyStopping, trainer: pl.Trainer, many: bool) -> None:
        self._other_monitor(f"EarlyStopping(monitor={es.monitor!r})", es.monitor)
        if es.monitor != self.monitor:
            return
        name = f"EarlyStopping(monitor={es.monitor!r})"
        if es.mode != self.mode:
            raise Misconfiguration(
                f"{name} has mode={es.mode!r}, AdaptiveValidation has mode={self.mode!r}: "
                "pass the same mode to both"
            )
        min_delta = es.min_delta if es.mode == "max" else -es.min_delta  # ES stores it signed
        if min_delta < 0:
            raise Misconfiguration(
                f"{name} has min_delta={min_delta}: AdaptiveValidation supports min_delta >= 0"
            )
        self.min_deltas.add(float(min_delta))
        if es.stopping_threshold is not None:
            self.off_reasons.append(
                f"{name} has stopping_threshold={es.stopping_threshold} (an estimate of an "
                "improving run could sit on the other side of it)"
            )
        if es.divergence_threshold is not None:
            raise Misconfiguration(
                f"{name} has divergence_threshold={es.divergence_threshold}: an early-stopped "
                "validation run logs an estimate, which may sit on the other side of that "
                "threshold. Remove divergence_threshold (or use AdaptiveValidation(enabled=False))."
            )
        # None resolves (in EarlyStopping.setup) to True only when validation runs once per epoch,
        # where acting at the end of the training epoch sees every validation run: fine.
        if getattr(es, "_check_on_train_epoch_end", None) and many:
            raise Misconfiguration(
                f"{name} acts at the end of the training epoch, but validation runs more than "
                f"once per epoch (val_check_interval={trainer.val_check_interval!r}): it would "
                "miss runs that AdaptiveValidation counts. Pass "
                "EarlyStopping(..., check_on_train_epoch_end=False)."
            )

    def _checkpoint(self, mc: ModelCheckpoint, trainer: pl.Trainer, many: bool) -> None:
        if mc.monitor is None:
            return
        self._other_monitor(f"ModelCheckpoint(monitor={mc.monitor!r})", mc.monitor)
        if mc.monitor != self.monitor:
            return
        name = f"ModelCheckpoint(monitor={mc.monitor!r})"
        if mc.mode != self.mode:
            raise Misconfiguration(
                f"{name} has mode={mc.mode!r}, AdaptiveValidation has mode={self.mode!r}: "
                "pass the same mode to both"
            )
        if mc.save_top_k not in (-1, 0, 1):
            raise Misconfiguration(
                f"{name} has save_top_k={mc.save_top_k}: keeping the k > 1 best compares with "
                "the k-th best, which AdaptiveValidation does not track. Use save_top_k=1 (the "
                "best checkpoint) or save_top_k=-1 (all; best_model_path stays right)."
            )
        if getattr(mc, "_save_on_train_epoch_end", None) and many:
            raise Misconfiguration(
                f"{name} saves at the end of the training epoch, but validation runs more than "
                f"once per epoch (val_check_interval={trainer.val_check_interval!r}). Pass "
                "ModelCheckpoint(..., save_on_train_epoch_end=False)."
            )

    # -- the validation loader (each validation run of fit) --------------------------------

    def loader(self, trainer: pl.Trainer) -> None:
        """Check the (first, monitored) validation loader: the same random order every run."""
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            if not loaders:
                raise Misconfiguration("AdaptiveValidation: the fit has no validation dataloader")
            loaders = loaders[0]
        if isinstance(loaders, Mapping):
            raise Misconfiguration(
                "AdaptiveValidation supports one validation dataloader; got a mapping of them"
            )
        if id(loaders) in self._checked_loaders:
            return
        if not isinstance(loaders, DataLoader):
            if not self.trust_order:
                raise Misconfiguration(
                    f"AdaptiveValidation cannot check the order of a {type(loaders).__name__}: "
                    "use a torch DataLoader over AdaptiveValidation.permute_once(dataset), or "
                    "pass trust_order=True if it yields the same examples in the same random "
                    "order every run"
                )
            self._checked_loaders.add(id(loaders))
            return
        sampler: Any = loaders.sampler
        batch_sampler = loaders.batch_sampler
        if batch_sampler is not None and hasattr(batch_sampler, "sampler"):
            sampler = batch_sampler.sampler
        fix = (
            "Validation needs the same order every run: build the loader as "
            "DataLoader(AdaptiveValidation.permute_once(dataset, seed=0), batch_size=..., "
            "shuffle=False)."
        )
        if isinstance(sampler, RandomSampler) or (
            isinstance(sampler, DistributedSampler) and sampler.shuffle
        ):
            raise Misconfiguration(
                "AdaptiveValidation: the validation loader shuffles (RandomSampler or "
                f"DistributedSampler(shuffle=True)), so the examples change order every run and "
                f"cannot be paired with the incumbent's. {fix}"
            )
        if trainer.world_size > 1 and not isinstance(sampler, DistributedSampler):
            raise Misconfiguration(
                "AdaptiveValidation in a multi-process run needs Lightning's DistributedSampler "
                "on the validation loader (Trainer(use_distributed_sampler=True), the default) "
                f"to know which rank holds which example; got {type(sampler).__name__}"
            )
        dataset = loaders.dataset
        if isinstance(dataset, PermutedDataset):
            order = (dataset.seed, len(dataset))
            if self.order is not None and order != self.order:
                raise Misconfiguration(
                    f"AdaptiveValidation: the validation order changed during the fit (seed, "
                    f"size) {self.order} -> {order}: the incumbent's values no longer pair with "
                    "the examples. Keep the same dataset and permute_once seed for the whole fit."
                )
            self.order = order
        known = isinstance(sampler, (SequentialSampler, DistributedSampler))
        if not self.trust_order and not (known and isinstance(dataset, PermutedDataset)):
            raise Misconfiguration(
                "AdaptiveValidation's guarantee needs the validation examples in a random order "
                f"fixed once (got {type(dataset).__name__} through "
                f"{type(sampler).__name__}). {fix} If the data are already stored in a random "
                "order, pass AdaptiveValidation(trust_order=True)."
            )
        self._checked_loaders.add(id(loaders))
