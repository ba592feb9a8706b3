"""``AdaptiveValidation``: stop each validation run as soon as its decision is certain.

The statistics (paired, anytime-valid sequential tests for sampling without replacement,
with alpha spent across comparisons) and the error guarantee are in :mod:`green_mlops.adaptive`.
This module connects them to Lightning; see :class:`AdaptiveValidation`.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from green_mlops.adaptive import AdaptiveValidator, Outcome
from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration, classes

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

log = logging.getLogger("green_mlops")

__all__ = ["AdaptiveValidation", "PermutedDataset"]

T = TypeVar("T")

#: Metric keys logged at each validation run during fit (besides ``monitor``).
FRACTION_KEY = "green/validation/fraction_evaluated"
EXAMPLES_KEY = "green/validation/examples_evaluated"
EXACT_KEY = "green/validation/exact"
TOTAL_FRACTION_KEY = "green/validation/fraction_evaluated_total"
INCUMBENT_KEY = "green/validation/incumbent_examples_evaluated"
SAVED_KEY = "green/validation/saved_kwh_estimate"


class PermutedDataset(Dataset[T], Generic[T]):
    """``dataset`` in one random order drawn once from ``seed`` (numpy's generator, so the
    global torch RNG, and with it training, is untouched). The order is what the guarantee of
    :class:`AdaptiveValidation` rests on: keep the seed fixed for the whole run (and resumes).
    """

    def __init__(self, dataset: Dataset[T], seed: int = 0) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "PermutedDataset needs a map-style dataset (with __len__ and __getitem__); "
                "shuffle an iterable dataset once at its source and pass "
                "AdaptiveValidation(trust_order=True)"
            )
        self.dataset = dataset
        self.seed = seed
        self.indices: list[int] = np.random.default_rng(seed).permutation(len(dataset)).tolist()  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> T:
        return self.dataset[self.indices[index]]


class AdaptiveValidation(Callback):
    r"""Thins validation without changing what ``EarlyStopping`` and ``ModelCheckpoint`` decide.

    Each validation run during ``fit`` compares the current model (the candidate) with the
    best run so far (the incumbent), example by example, on the same validation examples in
    the same fixed random order, and stops as soon as the answer is certain (with the error
    budget ``alpha`` for the whole fit): "not improved", or, with ``incumbent="weights"``
    and a bounded per-example value, "improved". An undecided run is completed. The callback
    logs ``monitor`` itself: the exact mean of the per-example values where it can, and after
    an early stop a value on the decided side of the best logged value, so that stock
    ``EarlyStopping`` and ``ModelCheckpoint`` pick the same best epoch and stop at the same
    epoch as with full validation (with probability at least ``1 - alpha``; proof and
    assumptions in :mod:`green_mlops.adaptive`).

    Example (a CPU fit of 10-20 s)::

        import torch
        import torch.nn.functional as F
        from lightning.pytorch import LightningModule, Trainer
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
        from torch.utils.data import DataLoader, TensorDataset
        from green_mlops.integrations.lightning import AdaptiveValidation

        class Model(LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(16, 2)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch                       # do not log "val_loss": the callback does
                loss = F.cross_entropy(self.net(x), y, reduction="none")
                return {"per_example_loss": loss.clamp(max=5.0)}  # bounded: see upper=

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        x = torch.randn(4000, 16)
        y = (x[:, 0] + 0.5 * torch.randn(4000) > 0).long()
        train = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=50, shuffle=True)
        val = DataLoader(AdaptiveValidation.permute_once(TensorDataset(x[1000:], y[1000:])),
                         batch_size=100)
        trainer = Trainer(max_epochs=20, callbacks=[
            AdaptiveValidation(monitor="val_loss", mode="min", upper=5.0),
            EarlyStopping(monitor="val_loss", mode="min", patience=3),
            ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1),
        ])
        trainer.fit(Model(), train, val)

    Two incumbent modes:

    * ``incumbent="weights"`` (default): an improving run also stops as soon as the
      improvement (by more than ``EarlyStopping``'s ``min_delta``) is certain. The candidate
      becomes the incumbent with its values known on the evaluated prefix only, and the
      callback keeps a copy of its weights (``state_dict``, on the CPU or, with
      ``incumbent_device="module"``, on the module's device). When a later run gets beyond
      that prefix, the callback evaluates the incumbent on the same batches: a shadow copy of
      the LightningModule (``copy.deepcopy``, detached from the trainer, in eval mode, under
      ``no_grad``, the trainer's precision context and a forked RNG) loaded with the kept
      weights runs ``validation_step``. The training model, optimizer, RNG streams and
      BatchNorm statistics are not touched. Those forward passes count as validation cost
      (``green/validation/incumbent_examples_evaluated`` and the fractions below). Early
      "improved" needs a bound on the improving side: ``upper`` in ``mode="min"`` (clamp the
      loss, e.g. ``loss.clamp(max=5.0)`` with ``upper=5.0``: a single unseen example with an
      unbounded loss could undo any improvement), ``lower`` (default 0.0) in ``mode="max"``.
      Without it, and when another callback compares the value with a threshold the callback
      cannot track (``EarlyStopping(stopping_threshold=...)``, ``ReduceLROnPlateau`` with
      ``threshold > 0``, several ``EarlyStopping`` with different ``min_delta``), the mode
      runs like ``"values"`` and says why in ``early_improved_off``. Supported with one
      device and DDP (every rank evaluates its shard of the batch; the values are gathered
      like the candidate's); other strategies (FSDP, DeepSpeed) shard the weights: use
      ``"values"`` there.
    * ``incumbent="values"``: only "not improved" stops early; improving runs are completed,
      and the incumbent's per-example values are all that is kept.

    The contract:

    * ``validation_step`` returns ``{"per_example_loss": values}`` (``key``), ``values`` of
      shape ``[batch_size]``: the loss (``mode="min"``) or correctness (``mode="max"``) of
      each example, e.g. ``F.cross_entropy(logits, y, reduction="none")``. The monitored
      metric is the mean of these values over the validation set. Do not log ``monitor``
      yourself. With ``incumbent="weights"`` ``validation_step`` also runs on the shadow copy,
      which has no trainer: ``self.log`` there is ignored, ``self.trainer`` raises.
    * Every value lies in ``[lower, upper]`` (default ``lower`` 0.0, right for any loss;
      ``upper`` 1.0 in ``mode="max"``, none in ``mode="min"``). A value outside the bounds
      switches the callback to full validation for the rest of the fit, with a warning. The
      bounds are checked on every value evaluated, and assumed for the others.
    * The validation loader yields the same examples in the same order every run, and that
      order is a random permutation fixed once: wrap the dataset with
      :meth:`permute_once` (``shuffle=False``), or pass ``trust_order=True`` if the data are
      already stored in a random order. A shuffling loader (``RandomSampler``) is refused.
    * Non-finite values make that run a full pass; its mean (NaN or inf) is logged as is, so
      ``EarlyStopping(check_finite=True)`` stops exactly as with full validation.

    What may watch ``monitor`` (checked in ``setup``/``on_fit_start``; anything else is
    refused with the fix in the message): ``EarlyStopping`` with the same ``mode``, any
    ``min_delta >= 0``, ``stopping_threshold``, no ``divergence_threshold``;
    ``ModelCheckpoint`` with the same ``mode`` and ``save_top_k`` of 1, 0 or -1 (with -1 the
    scores of early-stopped epochs are estimates; ``best_model_path`` is right);
    ``ReduceLROnPlateau`` with the same ``mode`` and ``threshold >= 0``. They must see every
    validation run: acting at the end of the training epoch
    (``check_on_train_epoch_end`` / ``save_on_train_epoch_end``, Lightning's default when
    validation runs once per epoch) is refused when validation can run more than once per
    epoch (``val_check_interval != 1.0``). Callbacks watching other keys are refused unless
    listed in ``allow_monitors`` (keys that validation does not compute): a metric logged in
    ``validation_step`` covers only the examples evaluated. The checks recognise the classes of
    both Lightning namespaces (``lightning.pytorch`` and ``pytorch_lightning``); a refusal is a
    ``MisconfigurationException`` of both.

    What the logged ``monitor`` means (for charts): where ``green/validation/exact`` is 1 it
    is the exact mean over the validation set. Where it is 0 it is an estimate (the paired
    estimate from the evaluated prefix) moved, if needed, just past the best logged value on
    the decided side (and past ``best - min_delta`` for an improvement): its side of the best
    is certain, its size is not. Once an improving run was logged as an estimate, later exact
    means may also be moved (flagged 0) to keep their order against it.

    Args:
        monitor: the metric key this callback logs.
        mode: ``"min"`` (lower is better) or ``"max"``.
        alpha: probability bound for *any* decision of the fit to differ from full
            validation's (spent as ``alpha * 6 / (pi^2 k^2)`` on the k-th comparison).
        key: the key of the per-example values in ``validation_step``'s output.
        lower, upper: bounds on every per-example value (see above); ``upper="auto"`` is 1.0
            in ``mode="max"`` and unbounded in ``mode="min"``.
        incumbent: ``"weights"`` or ``"values"`` (see above).
        incumbent_device: where ``"weights"`` keeps the incumbent's copy: ``"cpu"`` or
            ``"module"`` (the module's device: no host transfers, device memory instead).
        enabled: ``False`` always runs full validation, logging the same keys (the reference
            to compare against).
        trust_order: accept a validation dataset not wrapped in :class:`PermutedDataset`.
        allow_monitors: keys that other callbacks may monitor (not computed by validation).
        prog_bar: show ``monitor`` in the progress bar.

    Logged at each validation run of ``fit``: ``monitor``; ``green/validation/exact`` (1 if
    ``monitor`` is the exact full-set mean, else 0); ``green/validation/examples_evaluated``
    (validation forward passes of this run, candidate and incumbent) of which
    ``green/validation/incumbent_examples_evaluated`` for the incumbent;
    ``green/validation/fraction_evaluated`` (those per validation example: 1.0 is a full pass,
    and it can exceed 1 when the incumbent was evaluated too);
    ``green/validation/fraction_evaluated_total`` (the fit so far); and, with
    ``EnergyMonitor`` among the callbacks, ``green/validation/saved_kwh_estimate``: the
    validation energy per forward pass so far times the passes saved (an estimate: it assumes
    energy proportional to examples, so fixed per-run costs inflate it slightly).
    ``trainer.validate`` runs in full and logs only ``monitor``.

    Costs: the incumbent's values, N float64 per process (40 kB for N = 5,000); with
    ``incumbent="weights"``, while the incumbent is known on a prefix only, a copy of the
    model's ``state_dict`` per process (CPU by default; one device-to-host copy per improving
    run that stops early), and, during a validation run that evaluates the incumbent, a shadow
    copy of the LightningModule on its device (made once per such run, freed at its end). Both the
    values and the weights are in the checkpoint (resuming restores them), which grows by the
    size of the model's ``state_dict`` while the incumbent is partial. Per batch, a
    device-to-host copy of the batch's values and, with several processes, one
    ``all_gather`` of them (two when the incumbent is evaluated): every rank then decides on
    the same numbers, identically.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        alpha: float = 0.05,
        *,
        key: str = "per_example_loss",
        lower: float | None = 0.0,
        upper: float | Literal["auto"] | None = "auto",
        incumbent: Literal["weights", "values"] = "weights",
        incumbent_device: Literal["cpu", "module"] = "cpu",
        enabled: bool = True,
        trust_order: bool = False,
        allow_monitors: Collection[str] = (),
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise Misconfiguration(
                f"AdaptiveValidation(mode={mode!r}): mode must be 'min' or 'max'"
            )
        if incumbent_device not in ("cpu", "module"):
            raise Misconfiguration(
                f"AdaptiveValidation(incumbent_device={incumbent_device!r}): use 'cpu' or 'module'"
            )
        if upper == "auto":
            upper = 1.0 if mode == "max" else None
        try:
            self.validator = AdaptiveValidator(
                mode=mode,
                alpha=alpha,
                lower=lower,
                upper=upper,
                enabled=enabled,
                incumbent=incumbent,
            )
        except ValueError as exc:
            raise Misconfiguration(f"AdaptiveValidation: {exc}") from exc
        self.monitor = monitor
        self.mode = mode
        self.alpha = alpha
        self.key = key
        self.lower = lower
        self.upper = upper
        self.incumbent = incumbent
        self.incumbent_device = incumbent_device
        self.enabled = enabled
        self.trust_order = trust_order
        self.allow_monitors = frozenset(allow_monitors)
        self.prog_bar = prog_bar
        #: Estimated energy saved so far, kWh (with an EnergyMonitor).
        self.saved_kwh = 0.0
        #: Why early "improved" is off in this fit (None when it is on).
        self.early_improved_off: str | None = None
        self._incumbent_weights: dict[str, torch.Tensor] | None = None
        self._shadow: pl.LightningModule | None = None
        self._fitting_run = False
        self._eval_values: list[np.ndarray[Any, Any]] = []
        self._padded_seen = 0
        self._total: int | None = None
        self._session_evaluated = 0
        self._checked_loaders: set[int] = set()
        self._warned_problem = False
        self._last_value: float | None = None
        self._order: tuple[int, int] | None = None
        self._min_deltas: set[float] = set()
        self._off_reasons: list[str] = []

    @staticmethod
    def permute_once(dataset: Dataset[T], seed: int = 0) -> PermutedDataset[T]:
        """``dataset`` in a random order fixed by ``seed``: use it for the validation loader."""
        return PermutedDataset(dataset, seed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # -- configuration checks --------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.root_device.type == "mps":
            self.validator.precision = "float32"  # no float64 on MPS: logged values are float32
        many = not (
            isinstance(trainer.val_check_interval, float) and trainer.val_check_interval == 1.0
        )
        self._min_deltas = set()
        self._off_reasons = []
        early_stopping = classes("callbacks", "EarlyStopping")  # of either namespace
        checkpoint = classes("callbacks", "ModelCheckpoint")
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, early_stopping):
                self._check_early_stopping(callback, trainer, many)
            elif isinstance(callback, checkpoint):
                self._check_checkpoint(callback, trainer, many)
        if len(self._min_deltas) > 1:
            self._off_reasons.append(
                f"EarlyStopping callbacks with different min_delta {sorted(self._min_deltas)}"
            )
        self.validator.min_delta = max(self._min_deltas, default=0.0)
        self._configure_early_improved(trainer, announce=False)

    def _configure_early_improved(self, trainer: pl.Trainer, *, announce: bool) -> None:
        """Decide (identically on every rank) whether this fit may stop improving runs."""
        reasons = list(self._off_reasons)
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
        self.early_improved_off = "; ".join(reasons) or None
        self.validator.early_improved = self.early_improved_off is None
        if self.validator.improves_early and self.enabled:
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
            and self.early_improved_off
            and self.enabled
            and trainer.is_global_zero
        ):
            log.info(
                "AdaptiveValidation: improving runs are evaluated in full (as with "
                "incumbent='values') because of: %s",
                self.early_improved_off,
            )

    def _other_monitor(self, what: str, monitor: str) -> None:
        if monitor != self.monitor and monitor not in self.allow_monitors:
            raise Misconfiguration(
                f"{what} monitors {monitor!r}, but AdaptiveValidation keeps only "
                f"{self.monitor!r} exact: a metric logged in validation_step covers only the "
                f"examples evaluated. Monitor {self.monitor!r} instead, or, if {monitor!r} is "
                f"not computed by validation, pass AdaptiveValidation(allow_monitors="
                f"[{monitor!r}])."
            )

    def _check_early_stopping(self, es: EarlyStopping, trainer: pl.Trainer, many: bool) -> None:
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
        self._min_deltas.add(float(min_delta))
        if es.stopping_threshold is not None:
            self._off_reasons.append(
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

    def _check_checkpoint(self, mc: ModelCheckpoint, trainer: pl.Trainer, many: bool) -> None:
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
                self._off_reasons.append(
                    f"{name} has threshold={threshold} (pass threshold=0 to let improving runs "
                    "stop early)"
                )
        self._configure_early_improved(trainer, announce=True)

    def _check_loader(self, trainer: pl.Trainer) -> None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            if len(loaders) != 1:
                raise Misconfiguration(
                    f"AdaptiveValidation supports one validation dataloader; got {len(loaders)}"
                )
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
            if self._order is not None and order != self._order:
                raise Misconfiguration(
                    f"AdaptiveValidation: the validation order changed during the fit (seed, "
                    f"size) {self._order} -> {order}: the incumbent's values no longer pair with "
                    "the examples. Keep the same dataset and permute_once seed for the whole fit."
                )
            self._order = order
        known = isinstance(sampler, (SequentialSampler, DistributedSampler))
        if not self.trust_order and not (known and isinstance(dataset, PermutedDataset)):
            raise Misconfiguration(
                "AdaptiveValidation's guarantee needs the validation examples in a random order "
                f"fixed once (got {type(dataset).__name__} through "
                f"{type(sampler).__name__}). {fix} If the data are already stored in a random "
                "order, pass AdaptiveValidation(trust_order=True)."
            )
        self._checked_loaders.add(id(loaders))

    # -- validation runs -------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_loader(trainer)
        if trainer.sanity_checking:
            return
        self._padded_seen = 0
        self._eval_values = []
        self._shadow = None
        self._total = _dataset_length(trainer)
        self._fitting_run = trainer.state.fn == TrainerFn.FITTING
        if self._fitting_run:
            self.validator.begin()

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._fitting_run and not trainer.sanity_checking and self.validator.should_stop:
            # Ends the run cleanly: Lightning's evaluation loop catches StopIteration around
            # the step (for dataloader_iter support) and goes on to the epoch-end hooks.
            raise StopIteration

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        values = self._per_example(outputs)
        if trainer.sanity_checking:
            return
        start = self._padded_seen
        array = self._gather(trainer, values, start)
        self._padded_seen += values.numel() * max(1, trainer.world_size)
        if not self._fitting_run:
            self._eval_values.append(array)
            return
        try:
            if self.validator.incumbent_missing(array.size):  # same answer on every rank
                mine = self._incumbent_values(trainer, pl_module, batch, batch_idx)
                if mine.shape != values.shape:
                    raise Misconfiguration(
                        f"AdaptiveValidation: the incumbent's copy returned {tuple(mine.shape)} "
                        f"values for a batch where the model returned {tuple(values.shape)}"
                    )
                self.validator.extend_incumbent(self._gather(trainer, mine, start))
            self.validator.observe(array)
        except ValueError as exc:
            raise Misconfiguration(f"AdaptiveValidation: {exc}") from exc
        if self.validator.problem is not None and not self._warned_problem:
            self._warned_problem = True
            rank_zero_warn(f"AdaptiveValidation: {self.validator.problem}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._shadow = None  # free its device memory before training resumes
        if not self._fitting_run:
            values = np.concatenate(self._eval_values) if self._eval_values else np.empty(0)
            self._eval_values = []
            mean = float(np.mean(values)) if values.size else math.nan
            self._log(pl_module, self.monitor, mean, prog_bar=self.prog_bar)
            return
        self._fitting_run = False
        try:
            outcome = self.validator.end()
        except ValueError as exc:
            raise Misconfiguration(f"AdaptiveValidation: {exc}") from exc
        if not self.validator.needs_weights:
            self._incumbent_weights = None
        elif outcome.improved:  # a new incumbent, known on a prefix: keep its weights
            self._incumbent_weights = self._copy_weights(pl_module)
        elif self._incumbent_weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the incumbent's weights are missing (restored from a "
                "checkpoint without them?)"
            )
        passes = outcome.evaluated + outcome.incumbent_evaluated
        self._session_evaluated += passes
        self._last_value = outcome.value
        self._log(pl_module, self.monitor, outcome.value, prog_bar=self.prog_bar)
        self._log(pl_module, FRACTION_KEY, outcome.fraction_evaluated)
        self._log(pl_module, EXAMPLES_KEY, float(passes))
        self._log(pl_module, INCUMBENT_KEY, float(outcome.incumbent_evaluated))
        self._log(pl_module, EXACT_KEY, 1.0 if outcome.exact else 0.0)
        total = self.validator.evaluated_total / max(1, self.validator.population_total)
        self._log(pl_module, TOTAL_FRACTION_KEY, total)
        saved = self._energy_saved(trainer, outcome)
        if saved is not None:
            self._log(pl_module, SAVED_KEY, saved)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "AdaptiveValidation: %s after %d/%d examples (+%d of the incumbent; "
                "comparison %d, alpha %.3g); %s=%r%s",
                outcome.decision.value,
                outcome.evaluated,
                outcome.population,
                outcome.incumbent_evaluated,
                outcome.comparison,
                outcome.alpha,
                self.monitor,
                outcome.value,
                "" if outcome.exact else " (estimate)",
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        logged = trainer.callback_metrics.get(self.monitor)
        ours = self._last_value
        if logged is None or ours is None:
            return
        seen = float(logged)
        if seen != ours and not (math.isnan(seen) and math.isnan(ours)):
            raise Misconfiguration(
                f"AdaptiveValidation logged {self.monitor}={ours!r} but the trainer holds "
                f"{seen!r}: something else logs {self.monitor!r} after it (e.g. the "
                "LightningModule's on_validation_epoch_end). Only AdaptiveValidation may log "
                f"{self.monitor!r}; return the per-example values from validation_step instead."
            )

    # -- helpers ---------------------------------------------------------------------------

    def _per_example(self, outputs: Any) -> torch.Tensor:
        how = (
            f"validation_step must return {{{self.key!r}: values}} with values of shape "
            "[batch_size], one "
            + ("loss" if self.mode == "min" else "score (e.g. correctness)")
            + " per example: e.g. {'per_example_loss': F.cross_entropy(logits, y, "
            "reduction='none')}"
        )
        if not isinstance(outputs, Mapping) or self.key not in outputs:
            got = (
                f"a dict with keys {sorted(map(str, outputs))}"
                if isinstance(outputs, Mapping)
                else type(outputs).__name__
            )
            raise Misconfiguration(f"AdaptiveValidation: {how}; got {got}")
        values = outputs[self.key]
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(values)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.numel() == 0:
            raise Misconfiguration(
                f"AdaptiveValidation: {how}; got a tensor of shape {tuple(values.shape)}"
            )
        return values.detach()

    def _gather(
        self, trainer: pl.Trainer, values: torch.Tensor, start: int
    ) -> np.ndarray[Any, Any]:
        """This batch's values of every rank, in the global order, without sampler padding
        (``start``: the batch's first position in the padded global order).

        Lightning's ``DistributedSampler(shuffle=False)`` gives rank r the examples r, r + W,
        r + 2W, ... (padded at the end with the first examples so that all ranks have as many);
        so position q of rank r is example q * W + r.
        """
        if trainer.world_size > 1:
            gathered = trainer.strategy.all_gather(values)  # [W, B]
            values = gathered.transpose(0, 1).reshape(-1)
        array = values.to(torch.float64).cpu().numpy()
        if self._total is not None and start + array.size > self._total:
            array = array[: max(0, self._total - start)]
        return array

    # -- the incumbent's weights -----------------------------------------------------------

    def _copy_weights(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """A copy of the module's ``state_dict`` (CPU, or the module's device)."""
        device = torch.device("cpu") if self.incumbent_device == "cpu" else pl_module.device
        with torch.inference_mode(False), torch.no_grad():
            return {
                name: tensor.detach().to(device, copy=True)
                for name, tensor in pl_module.state_dict().items()
            }

    def _incumbent_values(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> torch.Tensor:
        """The incumbent's per-example values on this (local) batch, from a shadow copy of the
        module loaded with the kept weights. The training module is not touched."""
        weights = self._incumbent_weights
        if weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the incumbent must be evaluated but its weights are missing "
                "(restored from a checkpoint without them?)"
            )
        if self._shadow is None:
            with torch.inference_mode(False), torch.no_grad():
                # LightningModule.__getstate__ drops the trainer reference: the copy is detached
                shadow = copy.deepcopy(pl_module)
                shadow.load_state_dict(weights)
            shadow.eval()
            shadow.requires_grad_(False)
            self._shadow = shadow
        device = pl_module.device
        devices = [] if device.type == "cpu" else [device]
        device_type = None if device.type == "cpu" else device.type
        with (
            torch.random.fork_rng(devices=devices, device_type=device_type),
            trainer.precision_plugin.val_step_context(),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            # the shadow has no trainer: its self.log(...) calls warn and do nothing
            warnings.filterwarnings("ignore", message=".*self.log\\(\\)")
            outputs = self._shadow.validation_step(batch, batch_idx)
        return self._per_example(outputs)

    def _log(
        self, pl_module: pl.LightningModule, name: str, value: float, *, prog_bar: bool = False
    ) -> None:
        dtype = torch.float64 if self.validator.precision == "float64" else torch.float32
        tensor = torch.tensor(value, dtype=dtype, device=pl_module.device)
        # The value is identical on every rank: a max-reduction keeps it bit for bit.
        pl_module.log(
            name,
            tensor,
            on_step=False,
            on_epoch=True,
            prog_bar=prog_bar,
            sync_dist=True,
            reduce_fx="max",
        )

    def _energy_saved(self, trainer: pl.Trainer, outcome: Outcome) -> float | None:
        monitor = _energy_monitor(trainer)
        if monitor is None:
            return None
        joules = _validation_joules(monitor)
        if trainer.world_size > 1:  # collective: every rank takes part, whatever it read
            local = torch.tensor(
                [joules if joules is not None else 0.0, 1.0 if joules is None else 0.0],
                dtype=torch.float64,
                device=trainer.strategy.root_device,
            )
            total = trainer.strategy.reduce(local, reduce_op="sum")
            joules = None if float(total[1]) > 0 else float(total[0])
        if joules is None or self._session_evaluated <= 0:
            return None
        skipped = outcome.population - outcome.evaluated - outcome.incumbent_evaluated
        self.saved_kwh += joules / self._session_evaluated * skipped / 3.6e6
        return self.saved_kwh

    # -- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The validator's state, plus the incumbent's weights while it is known on a prefix
        only (``incumbent_weights``: a CPU copy of the model's ``state_dict``)."""
        state = self.validator.state_dict()
        incumbent = state["incumbent"]
        state["incumbent"] = None if incumbent is None else torch.from_numpy(incumbent)
        weights = self._incumbent_weights if self.validator.needs_weights else None
        state["incumbent_weights"] = (
            None if weights is None else {k: v.detach().cpu() for k, v in weights.items()}
        )
        state["saved_kwh"] = self.saved_kwh
        state["order"] = None if self._order is None else list(self._order)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        incumbent = state.get("incumbent")
        if isinstance(incumbent, torch.Tensor):
            state["incumbent"] = incumbent.to(torch.float64).cpu().numpy()
        self.saved_kwh = float(state.pop("saved_kwh", 0.0))
        order = state.pop("order", None)
        self._order = None if order is None else (int(order[0]), int(order[1]))
        weights = state.pop("incumbent_weights", None)
        try:
            self.validator.load_state_dict(state)
        except ValueError as exc:
            raise Misconfiguration(f"AdaptiveValidation: {exc}") from exc
        if self.validator.needs_weights and weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the checkpoint's incumbent is known on a prefix only but "
                "its weights are not in the checkpoint"
            )
        # (restored on the CPU: the shadow copy loads them onto the module's device)
        self._incumbent_weights = None if weights is None else dict(weights)
        self._shadow = None


def _dataset_length(trainer: pl.Trainer) -> int | None:
    loaders: Any = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
        loaders = loaders[0]
    dataset = getattr(loaders, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def _energy_monitor(trainer: pl.Trainer) -> Any:
    callbacks: Sequence[Any] = trainer.callbacks  # type: ignore[attr-defined]
    for callback in callbacks:
        if type(callback).__name__ == "EnergyMonitor" and type(callback).__module__.startswith(
            "green_mlops"
        ):
            return callback
    return None


def _validation_joules(monitor: Any) -> float | None:
    """Validation energy this process measured so far in the current stage, or None."""
    try:
        getter = getattr(monitor, "phase_joules", None)
        if callable(getter):
            value = getter("validation")
            return None if value is None else float(value)
        measurement = getattr(monitor, "_measurement", None)
        tracker = getattr(measurement, "tracker", None)
        if tracker is None:
            return None
        phase = tracker.snapshot().phases.get("validation")
        return 0.0 if phase is None else float(phase.joules)
    except Exception as exc:  # energy is a bonus: never break validation for it
        log.debug("AdaptiveValidation: no validation energy: %s", exc)
        return None
