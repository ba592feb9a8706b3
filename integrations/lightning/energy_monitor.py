"""``EnergyMonitor``: energy, carbon, FLOPs, MFU and quality per FLOP of a Lightning run.

The callback holds the hooks and the run's state; :mod:`.ranks` decides what each process
measures and sums the totals across ranks, :mod:`.flop_tracking` counts FLOPs and
:mod:`.output` writes to the loggers. How it works (phases, stages, checkpoints, ranks, the
MLflow plugin's measurement): see docs/energy-monitor.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from typing_extensions import override

from green_mlops import references
from green_mlops.config import ConfigError, Secret, Settings
from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration
from green_mlops.integrations.lightning.flop_tracking import (
    FLOP_RATES,
    FlopTracker,
    counted_here,
    is_flop_total,
)
from green_mlops.integrations.lightning.forecasting import FitForecast
from green_mlops.integrations.lightning.output import Output, callback_tags, interrupted_tags
from green_mlops.integrations.lightning.quality import Quality
from green_mlops.integrations.lightning.ranks import (
    RunTotals,
    assign_devices,
    derive,
    epoch_share,
    gpu_identity,
    join_job,
)
from green_mlops.log import warn_once
from green_mlops.meters import Meter, MeterUnavailable
from green_mlops.metrics import additive_keys
from green_mlops.session import Measurement, Result
from green_mlops.snapshot import OTHER_PHASE
from green_mlops.tracker import offers_from_plugins

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

__all__ = ["PHASES", "EnergyMonitor"]

#: Phases marked by the callback, as they appear in ``green/phase/<phase>_kwh``.
PHASES = ("sanity_check", "data_wait", "train", "validation", "test", "predict", "paused")
_ALL_PHASES = (*PHASES, OTHER_PHASE)
#: The callback's own additive numbers, summed across ranks with the metrics.
_INTERNAL = (
    "_intensity_x_kwh",
    "_train_loop_s",
    "_peak_x_s",
    "_peak_unknown",
    "_counted_batches",
    "_uncounted_batches",
)
#: Name under which this callback registers the measurements it owns.
OWNER = "lightning"

_F = TypeVar("_F", bound=Callable[..., Any])


def _safe(hook: _F) -> _F:
    """Run a hook without ever raising into training (a failure is logged once)."""

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception as exc:
            warn_once(f"EnergyMonitor.{hook.__name__} failed: {type(exc).__name__}: {exc}")
            return None

    return wrapper  # type: ignore[return-value]


class EnergyMonitor(Callback):
    r"""Logs energy, carbon, FLOPs, MFU and quality per FLOP alongside the run's metrics.

    Example (a complete one that runs on a CPU in seconds: docs/energy-monitor.md)::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import CSVLogger
        from green_mlops.integrations.lightning import EnergyMonitor

        monitor = EnergyMonitor(monitor="val_acc", mode="max", target=0.6)
        trainer = Trainer(max_epochs=3, logger=CSVLogger("logs"), callbacks=[monitor])
        trainer.fit(model, train_loader, val_loader)  # green/... in logs/.../metrics.csv

    Args:
        monitor: a metric the module logs at validation (``trainer.callback_metrics``), e.g.
            ``"val_acc"``: enables the quality-per-FLOP and quality-per-kWh metrics.
        mode: ``"max"`` if a higher ``monitor`` is better (accuracy), ``"min"`` if lower is
            better (loss).
        target: the ``monitor`` value to reach (``>= target`` in max mode, ``<=`` in min
            mode): the energy and FLOPs spent until the first validation that reaches it are
            logged once.
        count_flops: count FLOPs automatically (matmuls, convolutions, attention; once per
            batch shape, on the real step or a meta-device copy). The module's own
            ``flops_per_batch`` attribute, if set, is used for training batches instead
            (the convention of Lightning's ``ThroughputMonitor``).
        log_every_n_steps: also log ``green/step/energy_kwh`` and ``green/step/flops`` every
            n training steps (off by default: each reads the meters in the training thread,
            about 1 us for RAPL, a few ms for an NVML counter; this process's devices only).
        report: write the JSON report (``green/report.json`` artifact in MLflow;
            ``green_report.json`` in the ``log_dir`` of CSV and TensorBoard loggers).
        settings: green-mlops settings: a :class:`~green_mlops.config.Settings`, or keyword
            arguments (``{"location": "DE"}``) over the ``GREEN_MLOPS_*`` environment
            variables. Validated here.
        meters: a function returning the meters to use instead of the installed plugins'
            (each process calls it; for tests and custom hardware). The per-rank device
            assignment applies to them as well.
        max_flop_signatures: distinct batch shapes counted per kind (train, evaluation);
            FLOPs of further shapes are scaled from the counted ones by the number of input
            elements, and the tags say so.

    Raises:
        Misconfiguration: an argument or a setting outside its accepted form (also a
            ``ConfigError`` and a ``ValueError``; the message says how to fix it).

    Logged through every logger of the Trainer, with the MLflow plugin's keys: run totals
    (``green/energy_kwh``, ``green/phase/<phase>_kwh``, ``green/co2e_g``, ...), FLOPs and MFU
    (``green/flops``, ``green/mfu``, ...), per-epoch shares (``green/epoch/...``) and, with
    ``monitor``, quality per PFLOP and per kWh (``green/quality/...``); in MLflow also the
    provenance tags and ``green/report.json``. Every key, and how each number is obtained:
    docs/energy-monitor.md. During a fit it also forecasts the fit's totals
    (``green/forecast/...``, with the errors at 10/25/50 % at its end) and serves
    ``EnergyBudget``: docs/forecasts.md.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "max",
        target: float | None = None,
        count_flops: bool = True,
        log_every_n_steps: int | None = None,
        report: bool = True,
        settings: Settings | Mapping[str, Any] | None = None,
        meters: Callable[[], Sequence[Meter | MeterUnavailable]] | None = None,
        max_flop_signatures: int = 16,
    ) -> None:
        super().__init__()
        self._quality = Quality(monitor, mode, target)  # checks them
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise Misconfiguration(
                f"EnergyMonitor(log_every_n_steps={log_every_n_steps!r}) must be >= 1, or None "
                "to log nothing per step"
            )
        if max_flop_signatures < 1:
            raise Misconfiguration(
                f"EnergyMonitor(max_flop_signatures={max_flop_signatures!r}) must be >= 1"
            )
        self.monitor = monitor
        self.mode = mode
        self.target = target
        self.count_flops = count_flops
        #: Count the first step of each batch shape as it runs (no copy, no extra step); False
        #: counts on a meta-device copy of the module instead (one extra step per shape).
        self.count_live = True
        self.log_every_n_steps = log_every_n_steps
        self.report = report
        try:
            self.settings = Settings.resolve(settings)  # refused now, not mid-run
        except ConfigError as exc:
            raise Misconfiguration(f"EnergyMonitor(settings=...): {exc}") from exc
        self.meters = meters
        self.max_flop_signatures = max_flop_signatures
        keys = additive_keys(self.settings.functional_unit, _ALL_PHASES) + _INTERNAL
        self._totals = RunTotals(keys)
        self._epoch_mark: dict[str, float] = {}
        #: The MLflow plugin's measurement the base totals came from (not re-added).
        self._base_source: Measurement | None = None
        #: How the FLOPs in the totals were counted (every stage, and the checkpoint's).
        self._flop_methods: set[str] = set()
        #: EnergyBudget callbacks checked at each progress mark (they register in setup).
        self.guards: list[Any] = []
        self._reset_stage()

    def __getstate__(self) -> dict[str, Any]:
        # Settings refuse pickling when they hold a secret (ddp_spawn pickles callbacks): the
        # child process validates the same values again.
        state = dict(self.__dict__)
        state["settings"] = {
            f.name: value.reveal() if isinstance(value, Secret) else value
            for f in dataclasses.fields(self.settings)
            for value in [getattr(self.settings, f.name)]
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.settings = Settings.load(environ={}, **state["settings"])

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def _reset_stage(self) -> None:
        #: The stage running (``fit``, ``validate``, ``test``, ``predict``), None between stages.
        self._stage: str | None = None
        self._measurement: Measurement | None = None
        self._own = False
        self._output = Output(OWNER)
        self._open: list[str] = []
        self._flops = FlopTracker(self.max_flop_signatures, methods=self._flop_methods)
        self._last_step_logged = -1
        self._world = 1
        self._rank = 0
        self._local_rank = 0
        self._zero_embodied = False
        #: The fit's forecast (``fit`` stages only); EnergyBudget reads it.
        self.forecast: FitForecast | None = None

    # -- state (checkpoints) -------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "totals": dict(self._totals.latest or self._totals.base),
            **self._quality.state_dict(),
            "flop_methods": sorted(self._flop_methods),
            **({"forecast": self.forecast.state_dict()} if self.forecast else {}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the totals of a fit resumed from a checkpoint.

        Lightning restores callback state for every stage run with ``ckpt_path``; a test,
        validation or prediction of a checkpoint keeps its own totals (the fit's are already
        counted, or belong to another run), so only a fit (or a call outside a stage) loads it.
        """
        if self._stage not in (None, "fit"):
            return
        self._totals.restore(state_dict.get("totals", {}))
        self._epoch_mark = dict(self._totals.base)
        self._quality.load_state_dict(state_dict)
        self._flop_methods |= {str(m) for m in state_dict.get("flop_methods", ())}
        if self.forecast is not None:
            self.forecast.load_state_dict(state_dict.get("forecast", {}))

    # -- stage lifecycle -------------------------------------------------------------------

    @override
    @_safe
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = str(getattr(stage, "value", stage))
        if self._measurement is not None:
            return
        self._world = trainer.world_size
        self._rank = trainer.global_rank
        self._local_rank = trainer.local_rank
        join_job(trainer)
        self._flops.live = self.count_live
        owner = self._output.find_owner(trainer) if self._rank == 0 else None
        covered = owner is not None
        if self._world > 1:  # ranks of node 0 need not measure what rank 0's owner measures
            covered = bool(trainer.strategy.broadcast(covered, src=0))
        self._flops.set_peak(trainer)
        if owner is not None:
            self._measurement = owner
            self._totals.share(owner)
            if owner is self._base_source:  # it measured the earlier stages: keep only ours
                base = self._totals.base
                self._totals.base = {k: v for k, v in base.items() if counted_here(k)}
        else:
            if covered and trainer.node_rank == 0:
                offers: list[Meter | MeterUnavailable] = []
            else:
                offers = self._offers(trainer)
            measurement = Measurement(self.settings, meters=offers).start()
            self._measurement = measurement
            self._own = True
            self._output.claim(measurement)
        self._zero_embodied = self._local_rank != 0 and self.settings.embodied_kgco2e is not None
        self._epoch_mark = dict(self._totals.latest or self._totals.base)
        self.forecast = FitForecast() if self._stage == "fit" else None

    @override
    @_safe
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(trainer, failure=None)

    @override
    @_safe
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish(trainer, failure=exception)

    def _finish(self, trainer: pl.Trainer, *, failure: BaseException | None) -> None:
        self._flops.live_end(completed=False)
        measurement = self._measurement
        if measurement is None:
            return
        for name in reversed(self._open):
            measurement.tracker.exit(name)
        self._open.clear()
        result = measurement.stop() if self._own else measurement.result()
        # After a failure other ranks may be gone: no collective, this process's numbers only.
        additive = self._update_totals(trainer, result, collective=failure is None)
        metrics = derive(additive, _ALL_PHASES)
        own_tags = self._tags()
        tags = {**result.tags, **own_tags, **interrupted_tags(trainer, failure, self._world)}
        if not self._totals.base:  # a reference (Slurm's) covers this stage only
            metrics.update(references.carried(result.metrics, metrics, tags))
        else:
            references.left_out(tags, "it covers this stage only, the totals earlier ones too")
        if not self._own:
            measurement.extra_metrics.update(
                {k: v for k, v in metrics.items() if _is_flop_or_quality(k)}
                | self._quality.metrics()
            )
            measurement.extra_tags.update(own_tags)
        if self.forecast is not None and failure is None:
            errors = self.forecast.errors(trainer, metrics)
            tags.update(self.forecast.tags(errors))
            for guard in self.guards:
                tags.update(guard.tags())
            if self._rank == 0 and errors:
                self._output.log(trainer, errors, totals=False)
        if failure is None:  # started from a pilot's estimate: its error on the summed totals
            from green_mlops.pilot import attach_estimate

            attach_estimate(metrics, tags)
        if self._rank == 0:
            self._output.log(trainer, metrics, totals=True)
            self._output.write(
                trainer, result, metrics, tags, world=self._world, report=self.report
            )
        self._output.release()
        self._totals.end_stage()
        self._base_source = None if self._own else measurement
        self._reset_stage()

    # -- phases ----------------------------------------------------------------------------

    def _enter(self, name: str, *, precise: bool = True) -> None:
        if self._measurement is not None:
            self._measurement.tracker.enter(name, precise=precise)
            self._open.append(name)

    def _exit(self, name: str, *, precise: bool = True) -> None:
        if self._measurement is not None and name in self._open:
            self._measurement.tracker.exit(name, precise=precise)
            del self._open[len(self._open) - 1 - self._open[::-1].index(name)]

    @override
    @_safe
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter("sanity_check")

    @override
    @_safe
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("sanity_check")

    @override
    @_safe
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.forecast is not None:  # the origin: the sanity check is spent
            self.forecast.mark(trainer, self._refresh(trainer), self._measurement)

    def _forecast_now(self, trainer: pl.Trainer, metrics: dict[str, float] | None = None) -> None:
        if self.forecast is not None:  # metrics given: at the epoch's end, asked by this callback
            after = None if metrics is None else self
            metrics = self._refresh(trainer) if metrics is None else metrics
            found = self.forecast.mark(trainer, metrics, self._measurement, after=after)
            for guard in self.guards:  # on every rank: rank 0 decides, the others follow
                latest = self.forecast.latest if found else None
                found = {**found, **guard.check(trainer, metrics, latest)}
            if found and self._rank == 0:
                self._output.log(trainer, found, totals=False)

    @override
    @_safe
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops.check_trainable(pl_module)
        self._enter("train")
        self._enter("data_wait", precise=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Per batch: O(1) work and no syscall (a phase mark is a deque append); FLOPs are a
        # dictionary look-up of the batch's shapes once they have been counted.
        try:
            if self._open and self._open[-1] == "data_wait":
                self._measurement.tracker.exit("data_wait", precise=False)  # type: ignore[union-attr]
                self._open.pop()
            user = getattr(pl_module, "flops_per_batch", None)
            if user is not None:
                self._flops.add("train", float(user), "train: the module's flops_per_batch")
            elif self.count_flops:
                self._flops.count(pl_module, batch, "train", "train", batch_idx, 0)
        except Exception as exc:
            warn_once(f"EnergyMonitor.on_train_batch_start failed: {type(exc).__name__}: {exc}")

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        try:
            self._flops.live_end()
            if self._measurement is not None:
                self._measurement.tracker.enter("data_wait", precise=False)
                self._open.append("data_wait")
            n = self.log_every_n_steps
            if n is not None and trainer.global_step % n == 0:
                self._log_step(trainer)
            if self.forecast is not None and self.forecast.due(trainer, batch_idx, n):
                self._forecast_now(trainer)
        except Exception as exc:
            warn_once(f"EnergyMonitor.on_train_batch_end failed: {type(exc).__name__}: {exc}")

    @override
    @_safe
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("data_wait", precise=False)
        self._exit("train")
        metrics = self._refresh(trainer)
        epoch = epoch_share(metrics, self._epoch_mark)
        self._epoch_mark = dict(metrics)
        if self._rank == 0:
            self._output.log(trainer, {**metrics, **epoch}, totals=True)
        self._forecast_now(trainer, metrics)

    def _eval_start(self, trainer: pl.Trainer, phase: str) -> None:
        if not trainer.sanity_checking:
            self._enter(phase)

    def _eval_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        idx: int,
        dl: int,
        phase: str,
    ) -> None:
        if self.count_flops:
            phase = "sanity_check" if trainer.sanity_checking else phase
            self._flops.count(pl_module, batch, phase, "eval", idx, dl)

    @override
    @_safe
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "validation")

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "validation")

    @override
    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._flops.live_end()

    @override
    @_safe
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._exit("validation")
        if self.forecast is not None:
            self.forecast.validated()
        metrics = self._refresh(trainer)  # also keeps the checkpointed totals fresh
        if self.monitor is not None and self._rank == 0:
            quality = self._quality.update(trainer.callback_metrics, metrics)
            if quality:
                self._output.log(trainer, quality, totals=False)

    @override
    @_safe
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "test")

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    @override
    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._flops.live_end()

    @override
    @_safe
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("test")

    @override
    @_safe
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "predict")

    @override
    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "predict")

    @override
    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._flops.live_end()

    @override
    @_safe
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("predict")

    # -- totals ----------------------------------------------------------------------------

    def _offers(self, trainer: pl.Trainer) -> list[Meter | MeterUnavailable]:
        offers = list(self.meters()) if self.meters else offers_from_plugins(self.settings)
        if self._world == 1:
            return offers
        index, uuid = gpu_identity(trainer)
        return assign_devices(offers, local_rank=self._local_rank, gpu_index=index, gpu_uuid=uuid)

    def _update_totals(
        self, trainer: pl.Trainer, result: Result | None, *, collective: bool
    ) -> dict[str, float]:
        return self._totals.update(
            trainer,
            result,
            self._flops,
            rank=self._rank,
            zero_embodied=self._zero_embodied,
            collective=collective,
        )

    def _refresh(self, trainer: pl.Trainer) -> dict[str, float]:
        """Current run totals, summed over ranks (a collective: every rank calls it)."""
        result = None
        try:
            if self._measurement is not None:
                result = self._measurement.result()
        except Exception as exc:
            warn_once(f"EnergyMonitor could not read the measurement: {exc}")
        return derive(self._update_totals(trainer, result, collective=True), _ALL_PHASES)

    # -- output ----------------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        flop_tags = self._flops.tags(enabled=self.count_flops)
        return callback_tags(flop_tags, monitor=self.monitor, mode=self.mode, world=self._world)

    def _log_step(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if self._measurement is None or self._rank != 0 or step == self._last_step_logged:
            return
        self._last_step_logged = step
        base = self._totals.base
        try:
            kwh = self._measurement.tracker.snapshot().kwh + base.get("green/energy_kwh", 0)
            metrics = {"green/step/energy_kwh": kwh}
            if self._flops.counted:
                metrics["green/step/flops"] = self._flops.total + base.get("green/flops", 0)
            self._output.log(trainer, metrics, totals=False)
        except Exception as exc:
            warn_once(f"EnergyMonitor per-step logging failed: {exc}")


def _is_flop_or_quality(key: str) -> bool:
    return is_flop_total(key) or key in FLOP_RATES or key.startswith("green/quality/")
