"""``AdaptiveValidation``: stop each validation run as soon as its decision is certain.

The statistics (a paired, anytime-valid confidence sequence for sampling without replacement,
with alpha spent across comparisons) and the error guarantee are in :mod:`green_mlops.adaptive`.
This module connects them to Lightning; see :class:`AdaptiveValidation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
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

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("green_mlops")

__all__ = ["AdaptiveValidation", "PermutedDataset"]

T = TypeVar("T")

#: Metric keys logged at each validation run during fit (besides ``monitor``).
FRACTION_KEY = "green/validation/fraction_evaluated"
EXAMPLES_KEY = "green/validation/examples_evaluated"
EXACT_KEY = "green/validation/exact"
TOTAL_FRACTION_KEY = "green/validation/fraction_evaluated_total"
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
    the same fixed random order. The run stops as soon as "not improved" is certain (with the
    error budget ``alpha`` for the whole fit); an undecided or improving run is completed.
    The callback logs ``monitor`` itself: the exact mean of the per-example values after a
    full run, and after an early stop an estimate that is certainly worse than the best, so
    that stock ``EarlyStopping`` and ``ModelCheckpoint`` pick the same best epoch and stop at
    the same epoch as with full validation (with probability at least ``1 - alpha``; proof
    and assumptions in :mod:`green_mlops.adaptive`).

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
                return {"per_example_loss": F.cross_entropy(self.net(x), y, reduction="none")}

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        x = torch.randn(4000, 16)
        y = (x[:, 0] + 0.5 * torch.randn(4000) > 0).long()
        train = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=50, shuffle=True)
        val = DataLoader(AdaptiveValidation.permute_once(TensorDataset(x[1000:], y[1000:])),
                         batch_size=100)
        trainer = Trainer(max_epochs=20, callbacks=[
            AdaptiveValidation(monitor="val_loss", mode="min"),
            EarlyStopping(monitor="val_loss", mode="min", patience=3),
            ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1),
        ])
        trainer.fit(Model(), train, val)

    What it saves: only runs that end "not improved" stop early, and only when the gap to the
    best is clear; near-ties and improving runs are evaluated in full (an improving run
    becomes the incumbent, whose every value the next comparisons need). The share of
    validation forward passes saved is therefore at most the share of non-improving runs, and
    in ``benchmarks/results/adaptive_validation.md`` it was 0.2-14 % (more with larger
    validation sets and noisier training curves), with decisions identical to full validation
    in every seed.

    The contract:

    * ``validation_step`` returns ``{"per_example_loss": values}`` (``key``), ``values`` of
      shape ``[batch_size]``: the loss (``mode="min"``) or correctness (``mode="max"``) of
      each example, e.g. ``F.cross_entropy(logits, y, reduction="none")``. The monitored
      metric is the mean of these values over the validation set. Do not log ``monitor``
      yourself.
    * Every value lies in ``[lower, upper]``. Only the bound on the worse side is used:
      ``lower`` (default 0.0, right for any loss) in ``mode="min"``, ``upper`` (default 1.0,
      right for correctness) in ``mode="max"``. A value outside the bounds switches the
      callback to full validation for the rest of the fit, with a warning (decisions stay
      exact). The bounds are checked, not estimated.
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
    ``validation_step`` covers only the examples evaluated.

    Args:
        monitor: the metric key this callback logs.
        mode: ``"min"`` (lower is better) or ``"max"``.
        alpha: probability bound for *any* decision of the fit to differ from full
            validation's (spent as ``alpha * 6 / (pi^2 k^2)`` on the k-th comparison).
        key: the key of the per-example values in ``validation_step``'s output.
        lower, upper: bounds on every per-example value (see above); ``upper="auto"`` is 1.0
            in ``mode="max"`` and unbounded in ``mode="min"``.
        enabled: ``False`` always runs full validation, logging the same keys (the reference
            to compare against).
        trust_order: accept a validation dataset not wrapped in :class:`PermutedDataset`.
        allow_monitors: keys that other callbacks may monitor (not computed by validation).
        prog_bar: show ``monitor`` in the progress bar.

    Logged at each validation run of ``fit``: ``monitor``; ``green/validation/fraction_evaluated``
    and ``green/validation/examples_evaluated`` (this run); ``green/validation/exact`` (1 if
    ``monitor`` is the exact full-set mean, 0 if it is the early-stop estimate);
    ``green/validation/fraction_evaluated_total`` (the fit so far); and, with
    ``EnergyMonitor`` among the callbacks, ``green/validation/saved_kwh_estimate``: the
    validation energy per example evaluated so far times the examples skipped (an estimate:
    it assumes energy proportional to examples, so fixed per-run costs inflate it slightly).
    ``trainer.validate`` runs in full and logs only ``monitor``.

    Costs: the incumbent's values, N float64 per process (40 kB for N = 5,000), kept in the
    checkpoint (resuming restores them); per batch, a device-to-host copy of the batch's
    values and, with several processes, one ``all_gather`` of them (every rank then decides
    on the same numbers, identically).
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
        enabled: bool = True,
        trust_order: bool = False,
        allow_monitors: Collection[str] = (),
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise MisconfigurationException(
                f"AdaptiveValidation(mode={mode!r}): mode must be 'min' or 'max'"
            )
        if upper == "auto":
            upper = 1.0 if mode == "max" else None
        try:
            self.validator = AdaptiveValidator(
                mode=mode, alpha=alpha, lower=lower, upper=upper, enabled=enabled
            )
        except ValueError as exc:
            raise MisconfigurationException(f"AdaptiveValidation: {exc}") from exc
        self.monitor = monitor
        self.mode = mode
        self.alpha = alpha
        self.key = key
        self.lower = lower
        self.upper = upper
        self.enabled = enabled
        self.trust_order = trust_order
        self.allow_monitors = frozenset(allow_monitors)
        self.prog_bar = prog_bar
        #: Estimated energy saved so far, kWh (with an EnergyMonitor).
        self.saved_kwh = 0.0
        self._fitting_run = False
        self._eval_values: list[np.ndarray[Any, Any]] = []
        self._padded_seen = 0
        self._total: int | None = None
        self._run_evaluated = 0
        self._session_evaluated = 0
        self._checked_loaders: set[int] = set()
        self._warned_problem = False
        self._last_value: float | None = None
        self._order: tuple[int, int] | None = None

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
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, EarlyStopping):
                self._check_early_stopping(callback, trainer, many)
            elif isinstance(callback, ModelCheckpoint):
                self._check_checkpoint(callback, trainer, many)

    def _other_monitor(self, what: str, monitor: str) -> None:
        if monitor != self.monitor and monitor not in self.allow_monitors:
            raise MisconfigurationException(
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
            raise MisconfigurationException(
                f"{name} has mode={es.mode!r}, AdaptiveValidation has mode={self.mode!r}: "
                "pass the same mode to both"
            )
        min_delta = es.min_delta if es.mode == "max" else -es.min_delta  # ES stores it signed
        if min_delta < 0:
            raise MisconfigurationException(
                f"{name} has min_delta={min_delta}: AdaptiveValidation supports min_delta >= 0"
            )
        if es.divergence_threshold is not None:
            raise MisconfigurationException(
                f"{name} has divergence_threshold={es.divergence_threshold}: an early-stopped "
                "validation run logs an estimate, which may sit on the other side of that "
                "threshold. Remove divergence_threshold (or use AdaptiveValidation(enabled=False))."
            )
        # None resolves (in EarlyStopping.setup) to True only when validation runs once per epoch,
        # where acting at the end of the training epoch sees every validation run: fine.
        if getattr(es, "_check_on_train_epoch_end", None) and many:
            raise MisconfigurationException(
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
            raise MisconfigurationException(
                f"{name} has mode={mc.mode!r}, AdaptiveValidation has mode={self.mode!r}: "
                "pass the same mode to both"
            )
        if mc.save_top_k not in (-1, 0, 1):
            raise MisconfigurationException(
                f"{name} has save_top_k={mc.save_top_k}: keeping the k > 1 best compares with "
                "the k-th best, which AdaptiveValidation does not track. Use save_top_k=1 (the "
                "best checkpoint) or save_top_k=-1 (all; best_model_path stays right)."
            )
        if getattr(mc, "_save_on_train_epoch_end", None) and many:
            raise MisconfigurationException(
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
                raise MisconfigurationException(
                    f"{name} has mode={scheduler.mode!r}, AdaptiveValidation has "
                    f"mode={self.mode!r}: pass the same mode to both"
                )
            threshold = float(getattr(scheduler, "threshold", 0.0))
            relative = getattr(scheduler, "threshold_mode", "rel") == "rel"
            if threshold < 0 or (relative and (self.lower is None or self.lower < 0)):
                raise MisconfigurationException(
                    f"{name} needs threshold >= 0 and, with threshold_mode='rel', values that "
                    "cannot be negative (AdaptiveValidation(lower=0.0)); got "
                    f"threshold={threshold}, lower={self.lower}"
                )

    def _check_loader(self, trainer: pl.Trainer) -> None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            if len(loaders) != 1:
                raise MisconfigurationException(
                    f"AdaptiveValidation supports one validation dataloader; got {len(loaders)}"
                )
            loaders = loaders[0]
        if isinstance(loaders, Mapping):
            raise MisconfigurationException(
                "AdaptiveValidation supports one validation dataloader; got a mapping of them"
            )
        if id(loaders) in self._checked_loaders:
            return
        if not isinstance(loaders, DataLoader):
            if not self.trust_order:
                raise MisconfigurationException(
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
            raise MisconfigurationException(
                "AdaptiveValidation: the validation loader shuffles (RandomSampler or "
                f"DistributedSampler(shuffle=True)), so the examples change order every run and "
                f"cannot be paired with the incumbent's. {fix}"
            )
        if trainer.world_size > 1 and not isinstance(sampler, DistributedSampler):
            raise MisconfigurationException(
                "AdaptiveValidation in a multi-process run needs Lightning's DistributedSampler "
                "on the validation loader (Trainer(use_distributed_sampler=True), the default) "
                f"to know which rank holds which example; got {type(sampler).__name__}"
            )
        dataset = loaders.dataset
        if isinstance(dataset, PermutedDataset):
            order = (dataset.seed, len(dataset))
            if self._order is not None and order != self._order:
                raise MisconfigurationException(
                    f"AdaptiveValidation: the validation order changed during the fit (seed, "
                    f"size) {self._order} -> {order}: the incumbent's values no longer pair with "
                    "the examples. Keep the same dataset and permute_once seed for the whole fit."
                )
            self._order = order
        known = isinstance(sampler, (SequentialSampler, DistributedSampler))
        if not self.trust_order and not (known and isinstance(dataset, PermutedDataset)):
            raise MisconfigurationException(
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
        self._run_evaluated = 0
        self._eval_values = []
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
        array = self._gather(trainer, values)
        self._run_evaluated += array.size
        if not self._fitting_run:
            self._eval_values.append(array)
            return
        try:
            self.validator.observe(array)
        except ValueError as exc:
            raise MisconfigurationException(f"AdaptiveValidation: {exc}") from exc
        if self.validator.problem is not None and not self._warned_problem:
            self._warned_problem = True
            rank_zero_warn(f"AdaptiveValidation: {self.validator.problem}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
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
            raise MisconfigurationException(f"AdaptiveValidation: {exc}") from exc
        self._session_evaluated += outcome.evaluated
        self._last_value = outcome.value
        self._log(pl_module, self.monitor, outcome.value, prog_bar=self.prog_bar)
        self._log(pl_module, FRACTION_KEY, outcome.fraction_evaluated)
        self._log(pl_module, EXAMPLES_KEY, float(outcome.evaluated))
        self._log(pl_module, EXACT_KEY, 1.0 if outcome.exact else 0.0)
        evaluated, skipped = self.validator.evaluated_total, self.validator.skipped_total
        self._log(pl_module, TOTAL_FRACTION_KEY, evaluated / max(1, evaluated + skipped))
        saved = self._energy_saved(trainer, outcome)
        if saved is not None:
            self._log(pl_module, SAVED_KEY, saved)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "AdaptiveValidation: %s after %d/%d examples (comparison %d, alpha %.3g); %s=%r%s",
                outcome.decision.value,
                outcome.evaluated,
                outcome.population,
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
            raise MisconfigurationException(
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
            raise MisconfigurationException(f"AdaptiveValidation: {how}; got {got}")
        values = outputs[self.key]
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(values)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.numel() == 0:
            raise MisconfigurationException(
                f"AdaptiveValidation: {how}; got a tensor of shape {tuple(values.shape)}"
            )
        return values.detach()

    def _gather(self, trainer: pl.Trainer, values: torch.Tensor) -> np.ndarray[Any, Any]:
        """This batch's values of every rank, in the global order, without sampler padding.

        Lightning's ``DistributedSampler(shuffle=False)`` gives rank r the examples r, r + W,
        r + 2W, ... (padded at the end with the first examples so that all ranks have as many);
        so position q of rank r is example q * W + r.
        """
        if trainer.world_size > 1:
            gathered = trainer.strategy.all_gather(values)  # [W, B]
            values = gathered.transpose(0, 1).reshape(-1)
        array = values.to(torch.float64).cpu().numpy()
        start = self._padded_seen
        self._padded_seen += array.size
        if self._total is not None and self._padded_seen > self._total:
            array = array[: max(0, self._total - start)]
        return array

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
        skipped = outcome.population - outcome.evaluated
        self.saved_kwh += joules / self._session_evaluated * skipped / 3.6e6
        return self.saved_kwh

    # -- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.validator.state_dict()
        incumbent = state["incumbent"]
        state["incumbent"] = None if incumbent is None else torch.from_numpy(incumbent)
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
        self.validator.load_state_dict(state)


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
