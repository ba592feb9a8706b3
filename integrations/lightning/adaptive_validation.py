"""``AdaptiveValidation``: stop each validation run as soon as its decision is certain.

The callback's hooks and state; the statistics are in :mod:`green_mlops.adaptive`, the
configuration checks in :mod:`.adaptive_checks`, the incumbent's copy in :mod:`.incumbent`.
See docs/adaptive-validation.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Dataset
from typing_extensions import override

from green_mlops.adaptive import AdaptiveValidator, Outcome
from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration
from green_mlops.integrations.lightning.adaptive_checks import ConfigChecks, refusing
from green_mlops.integrations.lightning.incumbent import IncumbentCopy
from green_mlops.integrations.lightning.permuted import PermutedDataset
from green_mlops.integrations.lightning.secondary import (
    SecondaryTally,
    SequentialLimits,
    wanted,
)
from green_mlops.integrations.lightning.validation_energy import validation_joules
from green_mlops.integrations.lightning.validation_set import dataset_length, full_pass
from green_mlops.log import warn_user
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

__all__ = ["AdaptiveValidation", "PermutedDataset"]

T = TypeVar("T")

#: Metric keys logged at each validation run during fit (besides ``monitor``).
FRACTION_KEY = "green/validation/fraction_evaluated"
EXAMPLES_KEY = "green/validation/examples_evaluated"
EXACT_KEY = "green/validation/exact"
TOTAL_FRACTION_KEY = "green/validation/fraction_evaluated_total"
INCUMBENT_KEY = "green/validation/incumbent_examples_evaluated"
SAVED_KEY = "green/validation/saved_kwh_estimate"
TOLERANCE_KEY = "green/validation/tolerance"
SECONDARY_SKIPPED_KEY = "green/validation/secondary_examples_skipped"
SECONDARY_TOTAL_KEY = "green/validation/secondary_fraction_evaluated_total"


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
    epoch as with full validation (with probability at least ``1 - alpha``). Method, proof,
    what may watch ``monitor`` and costs: docs/adaptive-validation.md.

    Example (a runnable one: docs/adaptive-validation.md)::

        class Model(LightningModule):
            ...
            def validation_step(self, batch, batch_idx):
                x, y = batch                       # do not log "val_loss": the callback does
                loss = F.cross_entropy(self.net(x), y, reduction="none")
                return {"per_example_loss": loss.clamp(max=5.0)}  # bounded: see upper=

        val = DataLoader(AdaptiveValidation.permute_once(val_dataset), batch_size=100)
        Trainer(callbacks=[
            AdaptiveValidation(monitor="val_loss", mode="min", upper=5.0),
            EarlyStopping(monitor="val_loss", mode="min", patience=3),
            ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1),
        ]).fit(Model(), train, val)

    Two incumbent modes: ``incumbent="weights"`` (default) also stops an improving run once
    the improvement (by more than ``EarlyStopping``'s ``min_delta``) is certain, keeping a copy
    of the weights to evaluate the incumbent later where needed (those forward passes count as
    validation cost); it needs a bound on the improving side (``upper`` in ``mode="min"``,
    ``lower`` in ``mode="max"``), one device or DDP, and otherwise runs like ``"values"``,
    saying why in ``early_improved_off``. ``incumbent="values"``: only "not improved" stops
    early.

    The contract:

    * ``validation_step`` returns ``{"per_example_loss": values}`` (``key``), ``values`` of
      shape ``[batch_size]``: the loss (``mode="min"``) or correctness (``mode="max"``) of
      each example, e.g. ``F.cross_entropy(logits, y, reduction="none")``. The monitored
      metric is the mean of these values over the validation set. Do not log ``monitor``
      yourself. With ``incumbent="weights"`` ``validation_step`` also runs on the shadow copy,
      which has no trainer: ``self.log`` there is ignored, ``self.trainer`` raises.
    * Every value lies in ``[lower, upper]`` (default ``lower`` 0.0, right for any loss;
      ``upper`` 1.0 in ``mode="max"``, none in ``mode="min"``). A value outside the bounds
      switches the callback to full validation for the rest of the fit, with a
      ``GreenMlopsWarning``. The
      bounds are checked on every value evaluated, and assumed for the others.
    * The validation loader yields the same examples in the same order every run, and that
      order is a random permutation fixed once: wrap the dataset with
      :meth:`permute_once` (``shuffle=False``), or pass ``trust_order=True`` if the data are
      already stored in a random order. A shuffling loader (``RandomSampler``) is refused.
    * Non-finite values make that run a full pass; its mean (NaN or inf) is logged as is, so
      ``EarlyStopping(check_finite=True)`` stops exactly as with full validation.

    ``EarlyStopping`` (same ``mode``, ``min_delta >= 0``, no ``divergence_threshold``),
    ``ModelCheckpoint`` (same ``mode``, ``save_top_k`` of 1, 0 or -1) and ``ReduceLROnPlateau``
    (same ``mode``, ``threshold >= 0``) may watch ``monitor``, of either Lightning namespace;
    other keys only if listed in ``allow_monitors``. Anything else is refused in
    ``setup``/``on_fit_start`` with the fix in the message.

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
        tolerance: ``None`` (default: strict) or ``eps`` in the metric's units: runs within
            ``eps`` of the best (of the best minus ``min_delta``) may be called either way;
            every other decision is full validation's, except with probability ``alpha``.
            Caps the examples a near tie needs (docs/adaptive-validation.md, "Tolerance").
        horizon: ``None`` or the most validation runs of the fit (e.g. ``max_epochs``):
            alpha is spent evenly over them (``alpha / horizon`` each) instead of
            ``6 / (pi^2 k^2)``; runs beyond it are full passes.
        secondary: with several validation dataloaders (the first is the monitored one):
            ``"full"`` evaluates the others every run; ``"lazy"`` only for runs that become
            the new best and at the last epoch (the kept checkpoint's numbers stay exact).

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
    With a ``tolerance``, also ``green/validation/tolerance``.
    ``trainer.validate`` runs in full and logs only ``monitor``.

    Raises:
        Misconfiguration: a bad argument (here), or a configuration that could change a
            decision (at ``setup``, ``on_fit_start`` and during validation runs): a
            ``MisconfigurationException`` of both Lightning namespaces and a
            :class:`~green_mlops.config.ConfigError` (a ``ValueError``).
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
        tolerance: float | None = None,
        horizon: int | None = None,
        secondary: Literal["full", "lazy"] = "full",
    ) -> None:
        super().__init__()
        if secondary not in ("full", "lazy"):
            raise Misconfiguration(
                f"AdaptiveValidation(secondary={secondary!r}): pass 'full' or 'lazy'"
            )
        self.secondary = secondary
        if "/dataloader_idx_" in monitor:
            base = monitor.split("/dataloader_idx_")[0]
            raise Misconfiguration(
                f"AdaptiveValidation(monitor={monitor!r}): the monitored metric is logged by "
                "AdaptiveValidation once per validation run, without Lightning's dataloader "
                f"suffix (the first dataloader is the monitored one): pass monitor={base!r} "
                "and have EarlyStopping/ModelCheckpoint monitor that"
            )
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
        with refusing():
            self.validator = AdaptiveValidator(
                mode=mode,
                alpha=alpha,
                lower=lower,
                upper=upper,
                enabled=enabled,
                incumbent=incumbent,
                tolerance=tolerance,
                horizon=horizon,
            )
        self.tolerance = self.validator.tolerance
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
        self._checks = ConfigChecks(
            monitor=monitor,
            mode=mode,
            lower=lower,
            upper=upper,
            incumbent=incumbent,
            enabled=enabled,
            trust_order=trust_order,
            allow_monitors=self.allow_monitors,
        )
        self._incumbent_copy = IncumbentCopy(incumbent_device)
        self._fitting_run = False
        self._eval_values: list[np.ndarray[Any, Any]] = []
        self._padded_seen = 0
        self._total: int | None = None
        self._session_evaluated = 0
        self._warned_problem = False
        self._last_value: float | None = None
        self._limits: SequentialLimits | None = None  # several dataloaders: this run's limits
        self._outcome: Outcome | None = None  # the primary's, once it is finished
        self._tally = SecondaryTally()
        self._said_single = False
        self._first_batch: int | None = None  # a lazy first run: the batch size to check

    @staticmethod
    def permute_once(dataset: Dataset[T], seed: int = 0) -> PermutedDataset[T]:
        """``dataset`` in a random order fixed by ``seed``: use it for the validation loader."""
        return PermutedDataset(dataset, seed)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # -- configuration checks --------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.root_device.type == "mps":
            self.validator.precision = "float32"  # no float64 on MPS: logged values are float32
        self.validator.min_delta = self._checks.callbacks(trainer)
        self.early_improved_off = self._checks.early_improved(
            trainer, self.validator, announce=False
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checks.schedulers(trainer)
        self.early_improved_off = self._checks.early_improved(
            trainer, self.validator, announce=True
        )
        if self.tolerance is not None and self.early_improved_off and trainer.is_global_zero:
            log.warning(
                "AdaptiveValidation(tolerance=%g): only runs shown not to beat the best by %g "
                "or more stop early (as 'not improved'); improving runs and near ties are "
                "evaluated in full (%s), so the tolerance caps only the 'not improved' side. "
                "For both: clamp "
                "the per-example value and pass upper= (mode='min') or lower= (mode='max').",
                self.tolerance,
                self.tolerance,
                self.early_improved_off,
            )

    # -- validation runs -------------------------------------------------------------------

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._checks.loader(trainer)
        if trainer.sanity_checking:
            return
        self._padded_seen = 0
        self._eval_values = []
        self._incumbent_copy.release()
        self._total = dataset_length(trainer)
        self._fitting_run = trainer.state.fn == TrainerFn.FITTING
        self._limits, self._outcome = None, None
        if self._fitting_run:
            loaders = trainer.val_dataloaders
            several = isinstance(loaders, (list, tuple)) and len(loaders) > 1
            with refusing():
                self._limits = SequentialLimits(trainer) if several else None
            if self.secondary == "lazy" and not several and not self._said_single:
                self._said_single = True
                rank_zero_only(log.info)(
                    "AdaptiveValidation(secondary='lazy') does nothing here: the fit has one "
                    "validation dataloader (it applies to the second and later ones)"
                )
            population, self._first_batch = full_pass(trainer, self._total)
            self.validator.begin(population=population)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._fitting_run or trainer.sanity_checking:
            return
        if dataloader_idx > 0:  # a secondary dataloader: the primary is done
            if self._outcome is None:
                self._finish_primary(trainer, pl_module)
            outcome = self._outcome
            assert outcome is not None and self._limits is not None
            if self.secondary == "lazy" and not wanted(trainer, self.monitor, outcome):
                self._limits.skipped = True
                raise StopIteration  # (the secondaries come last: this ends the run)
            return
        if self._limits is None and self.validator.should_stop:
            # Ends the run cleanly: Lightning's evaluation loop catches StopIteration around
            # the step (for dataloader_iter support) and goes on to the epoch-end hooks.
            raise StopIteration

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx > 0:
            return  # a secondary dataloader: not the monitored metric
        values = self._per_example(outputs)
        if trainer.sanity_checking or (self._fitting_run and self._outcome is not None):
            return
        if self._fitting_run and self._limits is not None and self.validator.should_stop:
            return  # (decided already)
        start = self._padded_seen
        array = self._gather(trainer, values, start)
        self._padded_seen += values.numel() * max(1, trainer.world_size)
        if not self._fitting_run:
            self._eval_values.append(array)
            return
        if self._first_batch is not None:  # a first run stopping after this batch
            if values.numel() != self._first_batch:  # not one value per example: no N
                self.validator.full_first()
            self._first_batch = None
        with refusing():
            if self.validator.incumbent_missing(array.size):  # same answer on every rank
                theirs = self._incumbent_copy.outputs(trainer, pl_module, batch, batch_idx)
                mine = self._per_example(theirs)
                if mine.shape != values.shape:
                    raise Misconfiguration(
                        f"AdaptiveValidation: the incumbent's copy returned {tuple(mine.shape)} "
                        f"values for a batch where the model returned {tuple(values.shape)}"
                    )
                self.validator.extend_incumbent(self._gather(trainer, mine, start))
            self.validator.observe(array)
        if self._limits is not None and self.validator.should_stop:
            self._limits.end_primary(batch_idx + 1)  # on to the secondary dataloaders
        if self.validator.problem is not None and not self._warned_problem:
            self._warned_problem = True
            rank_zero_only(warn_user)(f"AdaptiveValidation: {self.validator.problem}")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._incumbent_copy.release()  # free its device memory before training resumes
        if not self._fitting_run:
            values = np.concatenate(self._eval_values) if self._eval_values else np.empty(0)
            self._eval_values = []
            mean = float(np.mean(values)) if values.size else math.nan
            self._log(pl_module, self.monitor, mean, prog_bar=self.prog_bar)
            return
        self._fitting_run = False
        outcome = self._outcome or self._finish_primary(trainer, pl_module)
        if self._limits is not None:
            self._log_secondary(trainer, pl_module)
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
        if self.tolerance is not None:
            self._log(pl_module, TOLERANCE_KEY, self.tolerance)
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

    @override
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

    def _finish_primary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Outcome:
        """Close the monitored dataloader's comparison (at its end or the first secondary
        batch): the outcome, and the incumbent's weights kept where needed."""
        with refusing():
            outcome = self.validator.end()
        self._outcome = outcome
        if not self.validator.needs_weights:
            self._incumbent_copy.weights = None
        elif outcome.improved:  # a new incumbent, known on a prefix: keep its weights
            self._incumbent_copy.keep(pl_module)
        elif self._incumbent_copy.weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the incumbent's weights are missing (restored from a "
                "checkpoint without them?)"
            )
        return outcome

    def _log_secondary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._limits is not None
        with refusing():
            skipped, total = self._tally.add(trainer, self._limits, lazy=self.secondary == "lazy")
        self._log(pl_module, SECONDARY_SKIPPED_KEY, float(skipped))
        self._log(pl_module, SECONDARY_TOTAL_KEY, total)

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
        # (only DistributedSampler pads; with one process every value returned is kept)
        if trainer.world_size > 1 and self._total is not None and start + array.size > self._total:
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
        joules = validation_joules(trainer)  # (a collective: before the early returns)
        if joules is None or self._session_evaluated <= 0:
            return None
        skipped = outcome.population - outcome.evaluated - outcome.incumbent_evaluated
        self.saved_kwh += joules / self._session_evaluated * skipped / J_PER_KWH
        return self.saved_kwh

    # -- persistence -----------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """The validator's state, plus the incumbent's weights while it is known on a prefix
        only (``incumbent_weights``: a CPU copy of the model's ``state_dict``)."""
        state = self.validator.state_dict()
        incumbent = state["incumbent"]
        state["incumbent"] = None if incumbent is None else torch.from_numpy(incumbent)
        weights = self._incumbent_copy.weights if self.validator.needs_weights else None
        state["incumbent_weights"] = (
            None if weights is None else {k: v.detach().cpu() for k, v in weights.items()}
        )
        state["saved_kwh"] = self.saved_kwh
        order = self._checks.order
        state["order"] = None if order is None else list(order)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        incumbent = state.get("incumbent")
        if isinstance(incumbent, torch.Tensor):
            state["incumbent"] = incumbent.to(torch.float64).cpu().numpy()
        self.saved_kwh = float(state.pop("saved_kwh", 0.0))
        order = state.pop("order", None)
        self._checks.order = None if order is None else (int(order[0]), int(order[1]))
        weights = state.pop("incumbent_weights", None)
        with refusing():
            self.validator.load_state_dict(state)
        if self.validator.needs_weights and weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the checkpoint's incumbent is known on a prefix only but "
                "its weights are not in the checkpoint"
            )
        self._incumbent_copy.restore(weights)
