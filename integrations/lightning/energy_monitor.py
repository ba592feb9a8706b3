"""``EnergyMonitor``: energy, carbon, FLOPs, MFU and quality per FLOP of a Lightning run.

See :class:`EnergyMonitor` for the example, the arguments and the metric keys. How it works:

* One :class:`~green_mlops.session.Measurement` per stage (``fit``, ``validate``, ``test``,
  ``predict``) of each process; its :class:`~green_mlops.tracker.Tracker` is told the phase
  boundaries (``tracker.enter``/``exit``: O(1), no syscall). Phases nest and energy goes to the
  innermost one, so the validation that runs inside a training epoch is not in ``train``.
  The stages of one Trainer (fit, then validate, then test) add up: totals continue. The
  totals are checkpointed and restored when a fit resumes from the checkpoint (not when a
  checkpoint is tested, validated or predicted: ``ckpt_path="best"`` never rewinds them).
* Works with both Lightning namespaces (``lightning.pytorch`` and ``pytorch_lightning``).
* Distributed: every process measures only what it owns: its own GPU (matched by UUID, or by
  CUDA index), and, on each node's local rank 0 only, the node's CPU, RAM and other devices (a
  rank training on the CPU treats visible GPUs as node devices). Totals are summed across ranks
  with ``trainer.strategy.reduce(..., reduce_op="sum")`` once per epoch and at each stage end,
  so every rank holds the same numbers; durations are rank 0's.
* One measurement per MLflow run: if the MLflow plugin (``GREEN_MLOPS_ENABLE=1``) already
  measures the ``MLFlowLogger``'s run (:func:`green_mlops.session.lookup`), its measurement gets
  the phases, the plugin logs the totals to that run, and this callback hands it FLOPs, MFU and
  quality in ``measurement.extra_metrics`` (logging only the per-epoch and per-validation series
  itself). Otherwise the callback claims the run and logs everything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from lightning.pytorch.utilities import rank_zero_warn

from green_mlops.config import Settings
from green_mlops.flops import (
    FlopCountError,
    LiveCount,
    compute_dtype,
    count_flops,
    find_peak,
    peak_flops,
    signature,
)
from green_mlops.integrations.lightning._namespaces import Callback, classes
from green_mlops.log import warn_once
from green_mlops.meters import Component, Device, Meter, MeterUnavailable, Readings
from green_mlops.session import Measurement, Result, claim, lookup, release
from green_mlops.snapshot import OTHER_PHASE
from green_mlops.tracker import offers_from_plugins

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from green_mlops.footprint import Footprint

log = logging.getLogger("green_mlops")

__all__ = ["PHASES", "EnergyMonitor", "assign_devices"]

#: Phases marked by the callback, as they appear in ``green/phase/<phase>_kwh``.
PHASES = ("sanity_check", "data_wait", "train", "validation", "test", "predict")
_ALL_PHASES = (*PHASES, OTHER_PHASE)
_COMPONENTS = tuple(c.value for c in Component)
#: Name under which this callback registers the measurements it owns.
OWNER = "lightning"
_MISSING: Any = object()

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


# --- which process measures what -----------------------------------------------------------


class _Subset(Meter):
    """A meter restricted to some of its devices (the others are read but not counted)."""

    def __init__(self, inner: Meter, devices: Sequence[Device]) -> None:
        super().__init__(list(devices))
        self.inner = inner
        self.name = inner.name
        self.max_interval_s = inner.max_interval_s

    def start(self) -> None:
        self.inner.start()

    def sample(self, now: float) -> Readings:
        return self.inner.sample(now)

    def close(self) -> None:
        self.inner.close()

    def notes(self) -> list[str]:
        return self.inner.notes()


def assign_devices(
    offers: Sequence[Meter | MeterUnavailable],
    *,
    local_rank: int,
    gpu_index: int | None = None,
    gpu_uuid: str | None = None,
) -> list[Meter | MeterUnavailable]:
    """The offers restricted to the devices this process measures in a multi-process run.

    A process training on CUDA device ``gpu_index`` measures that GPU: the device whose label
    holds ``gpu_uuid``, else the ``gpu_index``-th GPU device of its meter (NVML lists GPUs in
    ``CUDA_VISIBLE_DEVICES`` order). Node devices (CPU, RAM, other, and GPUs of a process that
    does not train on a GPU) are measured by local rank 0 only. Unavailable meters are kept for
    provenance.
    """
    kept: list[Meter | MeterUnavailable] = []
    for offer in offers:
        if isinstance(offer, MeterUnavailable):
            kept.append(offer)
            continue
        gpus = [d for d in offer.devices if d.component is Component.GPU]
        devices = []
        for device in offer.devices:
            if device.component is Component.GPU and gpu_index is not None:
                if gpu_uuid and any(gpu_uuid in g.label for g in gpus):
                    mine = gpu_uuid in device.label
                else:
                    mine = gpus.index(device) == gpu_index
            else:
                mine = local_rank == 0
            if mine:
                devices.append(device)
        if len(devices) == len(offer.devices):
            kept.append(offer)
        elif devices:
            kept.append(_Subset(offer, devices))
    return kept


# --- the numbers that are summed across ranks ----------------------------------------------


def _additive_keys(unit: str) -> tuple[str, ...]:
    keys = [
        "green/energy_kwh",
        "green/energy_uncertainty_kwh",
        "green/duration_s",
        "green/energy_facility_kwh",
        "green/co2e_g",
        "green/co2e_uncertainty_g",
        "green/cost",
        "green/embodied_g",
        f"green/sci_g_per_{unit}",
        "green/flops",
        "_intensity_x_kwh",
        "_train_loop_s",
        "_peak_x_s",
        "_peak_unknown",
        "_counted_batches",
        "_uncounted_batches",
    ]
    keys += [f"green/energy/{c}_kwh" for c in _COMPONENTS]
    for p in _ALL_PHASES:
        keys += [f"green/phase/{p}_kwh", f"green/phase/{p}_s", f"green/phase/{p}_flops"]
        keys += [f"green/phase/{p}/{c}_kwh" for c in _COMPONENTS]
    return tuple(keys)


def _rank0_only(key: str) -> bool:
    """Durations: every rank lives through the same wall-clock time; rank 0's is reported."""
    return key.endswith("_s") and key != "_peak_x_s"


def derive(additive: Mapping[str, float]) -> dict[str, float]:
    """The metrics to log from additive totals (summed over ranks and segments)."""
    out = {k: v for k, v in additive.items() if not k.startswith("_")}
    kwh = additive.get("green/energy_kwh", 0.0)
    if additive.get("_intensity_x_kwh") and kwh > 0:
        out["green/intensity_g_per_kwh"] = additive["_intensity_x_kwh"] / kwh
    co2e = additive.get("green/co2e_g")
    if co2e is not None and kwh > 0:
        for p in _ALL_PHASES:
            phase_kwh = additive.get(f"green/phase/{p}_kwh")
            if phase_kwh is not None:
                out[f"green/phase/{p}_co2e_g"] = co2e * phase_kwh / kwh
    if additive.get("_counted_batches", 0) <= 0:  # nothing counted: no FLOP metric at all
        for key in [k for k in out if k == "green/flops" or k.endswith("_flops")]:
            del out[key]
        return out
    flops = additive.get("green/flops", 0.0)
    train_flops = additive.get("green/phase/train_flops", 0.0)
    if kwh > 0:
        out["green/flops_per_joule"] = flops / (kwh * 3.6e6)
    loop_s = additive.get("_train_loop_s", 0.0)
    if train_flops > 0 and loop_s > 0:
        out["green/flops_per_s"] = train_flops / loop_s
        peak_s = additive.get("_peak_x_s", 0.0)
        if peak_s > 0 and additive.get("_peak_unknown", 0.0) == 0:
            out["green/mfu"] = train_flops / peak_s
    return out


def _local_values(
    result: Result, *, rank: int, zero_embodied: bool, exclude: Mapping[str, float]
) -> dict[str, float]:
    """This process's additive numbers of a measurement result (before the cross-rank sum)."""
    values = dict(result.metrics)
    values.pop("green/intensity_g_per_kwh", None)
    intensity = result.metrics.get("green/intensity_g_per_kwh")
    if intensity is not None:
        values["_intensity_x_kwh"] = intensity * result.metrics.get("green/energy_kwh", 0.0)
    if zero_embodied and "green/embodied_g" in values:  # the machine's figure: node leader's
        embodied = values.pop("green/embodied_g")
        fp = result.footprint
        for key in [k for k in values if k.startswith("green/sci_g_per_")]:
            units = getattr(fp, "functional_units", None) or 1.0
            values[key] -= embodied / units
    for key, value in exclude.items():
        if key in values:
            values[key] -= value
    if rank != 0:
        for key in [k for k in values if _rank0_only(k)]:
            values[key] = 0.0
    return values


# --- the callback ---------------------------------------------------------------------------


class EnergyMonitor(Callback):
    r"""Logs energy, carbon, FLOPs, MFU and quality per FLOP alongside the run's metrics.

    Example (runs on a CPU in a few seconds)::

        import torch
        from lightning.pytorch import LightningModule, Trainer
        from lightning.pytorch.loggers import CSVLogger
        from green_mlops.integrations.lightning import EnergyMonitor

        class Model(LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(32, 2)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.TensorDataset(torch.randn(256, 32), torch.randint(0, 2, (256,)))
        loader = torch.utils.data.DataLoader(data, batch_size=32)
        trainer = Trainer(
            max_epochs=3,
            logger=CSVLogger("logs"),
            callbacks=[EnergyMonitor(monitor="val_acc", mode="max", target=0.6)],
        )
        trainer.fit(Model(), loader, loader)   # logs/lightning_logs/version_0/metrics.csv

    Args:
        monitor: a metric the module logs at validation (``trainer.callback_metrics``), e.g.
            ``"val_acc"``: enables the quality-per-FLOP and quality-per-kWh metrics.
        mode: ``"max"`` if a higher ``monitor`` is better (accuracy), ``"min"`` if lower is
            better (loss).
        target: the ``monitor`` value to reach (``>= target`` in max mode, ``<=`` in min
            mode): the energy and FLOPs spent until the first validation that reaches it are
            logged once.
        count_flops: count FLOPs automatically (see below). The module's own
            ``flops_per_batch`` attribute, if set, is used for training batches instead
            (the convention of Lightning's ``ThroughputMonitor``).
        log_every_n_steps: also log ``green/step/energy_kwh`` and ``green/step/flops`` every
            n training steps (off by default: each reads the meters in the training thread,
            about 1 us for RAPL, a few ms for an NVML counter; this process's devices only).
        report: write the JSON report (``green/report.json`` artifact in MLflow;
            ``green_report.json`` in the ``log_dir`` of CSV and TensorBoard loggers).
        settings: green-mlops settings as keyword arguments (``{"location": "DE"}``), over
            the ``GREEN_MLOPS_*`` environment variables. Validated here.
        meters: a function returning the meters to use instead of the installed plugins'
            (each process calls it; for tests and custom hardware). The per-rank device
            assignment applies to them as well.
        max_flop_signatures: distinct batch shapes counted per kind (train, evaluation);
            FLOPs of further shapes are scaled from the counted ones by the number of input
            elements, and the tags say so.

    What is logged, through every logger of the Trainer (``logger.log_metrics``), with the
    same keys as green-mlops' MLflow plugin:

    * per epoch and at the end of each stage, run totals (step = ``trainer.global_step``; in
      an ``MLFlowLogger``, step = whole seconds of the run's measurement, the MLflow plugin's
      step, so that MLflow, which shows the value at the highest step, shows the latest total):
      ``green/energy_kwh``, ``green/energy/<gpu|cpu|ram>_kwh``, ``green/phase/<phase>_kwh``,
      ``green/phase/<phase>_s``, ``green/phase/<phase>/<component>_kwh``, ``green/co2e_g``,
      ``green/phase/<phase>_co2e_g``, ``green/intensity_g_per_kwh``, and the footprint keys
      (``green/energy_facility_kwh``, ``green/cost``, ``green/embodied_g``, SCI) when
      configured; phases are ``sanity_check``, ``data_wait``, ``train``, ``validation``,
      ``test``, ``predict`` and ``other`` (energy outside them);
    * FLOPs: ``green/flops`` (all phases), ``green/phase/<phase>_flops``, ``green/flops_per_s``
      (training FLOPs / training time, i.e. ``train`` + ``data_wait``), ``green/flops_per_joule``
      (all FLOPs / all energy) and ``green/mfu`` (training FLOP/s / the devices' summed dense
      peak for the Trainer's precision, from :data:`green_mlops.flops.DENSE_PEAKS`; not logged
      when a device's peak is unknown, e.g. on a CPU: the ``green.mfu`` tag says why);
    * per epoch, the epoch's own share: ``green/epoch/energy_kwh``, ``green/epoch/co2e_g``,
      ``green/epoch/flops``, ``green/epoch/phase/<phase>_kwh``;
    * at each validation, with ``monitor``: ``green/quality/<monitor>_per_pflop`` and
      ``green/quality/<monitor>_per_kwh``: quality / cumulative PFLOPs and / cumulative kWh
      of the run so far (all phases), where quality is the metric in max mode and
      ``1 / metric`` in min mode (a loss of 0.5 is a quality of 2; not logged for a
      metric <= 0); with ``target``, once: ``green/energy_to_target_kwh`` and
      ``green/flops_to_target``;
    * MLflow only: provenance tags (``green.meters``, ``green.intensity.source``,
      ``green.flops.method``, ``green.mfu``, ...) and the ``green/report.json`` artifact.
      Other loggers get no tags (their hyperparameter files are the user's); the JSON
      report in their ``log_dir`` carries the provenance instead.

    Phase carbon (``green/phase/<phase>_co2e_g``) is the phase's share of the run's energy times
    the run's carbon, i.e. phase kWh x the run's mean intensity x PUE, not a time-resolved
    figure per phase. ``data_wait`` is the time from the end of one training batch's hooks to
    the start of the next: data loading plus the loop's own bookkeeping (logging, other
    callbacks). FLOPs are counted once per distinct batch shape on a meta-device copy of the
    module (or a CPU copy; see :mod:`green_mlops.flops`): matmuls, convolutions and attention,
    forward and backward for training, forward only for evaluation.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "max",
        target: float | None = None,
        count_flops: bool = True,
        log_every_n_steps: int | None = None,
        report: bool = True,
        settings: dict[str, Any] | None = None,
        meters: Callable[[], Sequence[Meter | MeterUnavailable]] | None = None,
        max_flop_signatures: int = 16,
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(
                f"EnergyMonitor(mode={mode!r}) is not valid: use mode='max' when a higher "
                f"{monitor or 'metric'} is better (accuracy) or mode='min' when lower is better "
                "(loss)"
            )
        if target is not None and monitor is None:
            raise ValueError(
                f"EnergyMonitor(target={target!r}) needs the metric to compare it with: "
                "pass monitor='<metric logged at validation>'"
            )
        if target is not None and not math.isfinite(target):
            raise ValueError(f"EnergyMonitor(target={target!r}) must be a finite number")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(
                f"EnergyMonitor(log_every_n_steps={log_every_n_steps!r}) must be >= 1, or None "
                "to log nothing per step"
            )
        if max_flop_signatures < 1:
            raise ValueError(
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
        self._overrides = dict(settings or {})
        self.settings = Settings.load(**self._overrides)  # ConfigError now, not mid-run
        self.meters = meters
        self.max_flop_signatures = max_flop_signatures
        self._keys = _additive_keys(self.settings.functional_unit)
        #: Additive totals of earlier stages (and of the checkpoint a run resumed from).
        self._base: dict[str, float] = {}
        #: Latest additive totals (base + this stage, summed over ranks).
        self._totals: dict[str, float] = {}
        self._epoch_mark: dict[str, float] = {}
        self._to_target: dict[str, float] | None = None
        self._validations = 0
        #: The MLflow plugin's measurement whose totals ``_base`` came from (not re-added).
        self._base_source: Measurement | None = None
        self._said: set[str] = set()
        self._last_quality: dict[str, float] = {}
        #: How the FLOPs in the totals were counted (every stage, and the checkpoint's).
        self._flop_methods: set[str] = set()
        self._reset_stage()

    def __getstate__(self) -> dict[str, Any]:
        # Settings refuse pickling when they hold a secret (ddp_spawn pickles callbacks): the
        # child process loads them again from the same arguments and environment.
        state = dict(self.__dict__)
        state["settings"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.settings = Settings.load(**self._overrides)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def _reset_stage(self) -> None:
        #: The stage running (``fit``, ``validate``, ``test``, ``predict``), None between stages.
        self._stage: str | None = None
        self._measurement: Measurement | None = None
        self._own = False
        self._claimed: list[str] = []
        self._skip_loggers: set[int] = set()
        #: Loggers (MLflow's) whose totals are logged at step = seconds, as the plugin does.
        self._seconds_step: set[int] = set()
        self._owner_offsets: dict[str, float] = {}
        self._pushed: dict[str, float] = {}
        self._open: list[str] = []
        self._flops: dict[str, float] = {}
        self._counted = 0
        self._uncounted = 0
        self._flop_cache: dict[tuple[str, Hashable], int | None] = {}
        #: The step being counted live: (counter, cache key, phase, kind, batch elements).
        self._live: tuple[LiveCount, Any, str, str, float] | None = None
        self._flop_problems: dict[str, None] = {}
        self._uncounted_ops: set[str] = set()
        self._per_element: dict[str, tuple[float, float]] = {}
        self._scaled = 0
        self._trainable: int | None = None
        self._peak: float | None = None
        self._peak_text = ""
        self._last_step_logged = -1
        self._world = 1
        self._rank = 0
        self._local_rank = 0
        self._zero_embodied = False

    # -- state (checkpoints) -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "totals": dict(self._totals or self._base),
            "to_target": dict(self._to_target) if self._to_target is not None else None,
            "validations": self._validations,
            "flop_methods": sorted(self._flop_methods),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the totals of a fit resumed from a checkpoint.

        Lightning restores callback state for every stage run with ``ckpt_path``; a test,
        validation or prediction of a checkpoint keeps its own totals (the fit's are already
        counted, or belong to another run), so only a fit (or a call outside a stage) loads it.
        """
        if self._stage not in (None, "fit"):
            return
        self._base = {str(k): float(v) for k, v in state_dict.get("totals", {}).items()}
        self._totals = dict(self._base)
        self._epoch_mark = dict(self._base)
        target = state_dict.get("to_target")
        self._to_target = dict(target) if target else None
        self._validations = int(state_dict.get("validations", 0))
        self._flop_methods |= {str(m) for m in state_dict.get("flop_methods", ())}

    # -- stage lifecycle -------------------------------------------------------------------

    @_safe
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = str(getattr(stage, "value", stage))
        if self._measurement is not None:
            return
        self._world = trainer.world_size
        self._rank = trainer.global_rank
        self._local_rank = trainer.local_rank
        owner: Measurement | None = None
        run_ids: list[str] = []
        if self._rank == 0:
            try:  # must not raise before the broadcast below (the other ranks would hang)
                for logger in trainer.loggers:
                    run_id = _mlflow_run_id(logger)
                    if run_id is None:
                        continue
                    run_ids.append(run_id)
                    self._seconds_step.add(id(logger))
                    found = lookup(run_id)
                    if found is not None and found[1] != OWNER and found[0].running:
                        owner = found[0]
                        self._skip_loggers.add(id(logger))
            except Exception as exc:
                warn_once(f"EnergyMonitor could not read the MLflow run: {exc}")
        covered = owner is not None
        if self._world > 1:  # ranks of node 0 need not measure what rank 0's owner measures
            covered = bool(trainer.strategy.broadcast(covered, src=0))
        self._set_peak(trainer)
        if owner is not None:
            self._measurement = owner
            self._owner_offsets = dict(owner.offsets)
            if owner is self._base_source:  # it measured the earlier stages: keep only ours
                self._base = {k: v for k, v in self._base.items() if _counted_here(k)}
        else:
            if covered and trainer.node_rank == 0:
                offers: list[Meter | MeterUnavailable] = []
            else:
                offers = self._offers(trainer)
            measurement = Measurement(self.settings, meters=offers).start()
            self._measurement = measurement
            self._own = True
            for run_id in run_ids:
                _, created = claim(run_id, OWNER, lambda m=measurement: m)
                if created:
                    self._claimed.append(run_id)
        self._zero_embodied = self._local_rank != 0 and self.settings.embodied_kgco2e is not None
        self._epoch_mark = dict(self._totals or self._base)

    @_safe
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(trainer, failure=None)

    @_safe
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish(trainer, failure=exception)

    def _finish(self, trainer: pl.Trainer, *, failure: BaseException | None) -> None:
        self._live_end(completed=False)
        measurement = self._measurement
        if measurement is None:
            return
        for name in reversed(self._open):
            measurement.tracker.exit(name)
        self._open.clear()
        result = measurement.stop() if self._own else measurement.result()
        # After a failure other ranks may be gone: no collective, this process's numbers only.
        additive = self._combine(trainer, result, collective=failure is None)
        metrics = derive(additive)
        tags = {**result.tags, **self._tags(trainer)}
        if failure is not None:
            tags["green.interrupted"] = f"{type(failure).__name__} during {_stage(trainer)}"
            if self._world > 1:
                tags["green.partial"] = (
                    "interrupted: the totals are this process's only (ranks not combined)"
                )
        if not self._own:
            measurement.extra_metrics.update(
                {k: v for k, v in metrics.items() if _is_flop_or_quality(k)}
                | self._last_quality
                | self._target_metrics()
            )
            measurement.extra_tags.update(self._tags(trainer))
        if self._rank == 0:
            self._log(trainer, metrics, totals=True)
            self._write_reports(trainer, result, metrics, tags)
        for run_id in self._claimed:
            release(run_id)
        self._base = dict(additive)
        self._base_source = None if self._own else measurement
        self._totals = dict(additive)
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

    @_safe
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter("sanity_check")

    @_safe
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("sanity_check")

    @_safe
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if trainable != self._trainable:  # (un)freezing changes the backward FLOPs
            self._trainable = trainable
            for key in [k for k in self._flop_cache if k[0] == "train"]:
                del self._flop_cache[key]
        self._enter("train")
        self._enter("data_wait", precise=False)

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
                self._add_flops("train", float(user), "train: the module's flops_per_batch")
            elif self.count_flops:
                self._count(pl_module, batch, "train", "train", batch_idx, 0)
        except Exception as exc:
            warn_once(f"EnergyMonitor.on_train_batch_start failed: {type(exc).__name__}: {exc}")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        try:
            self._live_end()
            if self._measurement is not None:
                self._measurement.tracker.enter("data_wait", precise=False)
                self._open.append("data_wait")
            n = self.log_every_n_steps
            if n is not None and trainer.global_step % n == 0:
                self._log_step(trainer)
        except Exception as exc:
            warn_once(f"EnergyMonitor.on_train_batch_end failed: {type(exc).__name__}: {exc}")

    @_safe
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("data_wait", precise=False)
        self._exit("train")
        metrics = self._refresh(trainer)
        epoch = {
            f"green/epoch/{key.removeprefix('green/')}": metrics[key] - self._epoch_mark.get(key, 0)
            for key in ("green/energy_kwh", "green/co2e_g", "green/flops")
            if key in metrics
        }
        for p in ("train", "validation", "data_wait"):
            key = f"green/phase/{p}_kwh"
            if key in metrics:
                epoch[f"green/epoch/phase/{p}_kwh"] = metrics[key] - self._epoch_mark.get(key, 0)
        self._epoch_mark = dict(metrics)
        if self._rank == 0:
            self._log(trainer, {**metrics, **epoch}, totals=True)

    def _eval_start(self, trainer: pl.Trainer, phase: str) -> None:
        if not trainer.sanity_checking:
            self._enter(phase)

    def _eval_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        phase: str,
    ) -> None:
        if self.count_flops:
            phase = "sanity_check" if trainer.sanity_checking else phase
            self._count(pl_module, batch, phase, "eval", batch_idx, dataloader_idx)

    @_safe
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "validation")

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "validation")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._live_end()

    @_safe
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._exit("validation")
        metrics = self._refresh(trainer)  # also keeps the checkpointed totals fresh
        if self.monitor is not None and self._rank == 0:
            self._quality(trainer, metrics)

    @_safe
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "test")

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._live_end()

    @_safe
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("test")

    @_safe
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "predict")

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, batch, batch_idx, dataloader_idx, "predict")

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._live_end()

    @_safe
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit("predict")

    # -- FLOPs -----------------------------------------------------------------------------

    def _add_flops(self, phase: str, flops: float, method: str) -> None:
        self._flops[phase] = self._flops.get(phase, 0.0) + flops
        self._counted += 1
        self._flop_methods.add(method)

    def _count(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        phase: str,
        kind: str,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Add the batch's FLOPs (counted once per signature). Never raises."""
        try:
            key = (kind, signature(batch))
            flops = self._flop_cache.get(key, _MISSING)
            if flops is _MISSING:
                if sum(1 for k in self._flop_cache if k[0] == kind) >= self.max_flop_signatures:
                    self._count_scaled(batch, phase, kind)
                    return
                if self._live is None and self.count_live:
                    # count the real step as it runs (ended in the batch-end hook): no copy
                    self._live = (LiveCount(), key, phase, kind, _elements(batch))
                    return
                flops = self._count_new(pl_module, batch, phase, kind, batch_idx, dataloader_idx)
                self._record(key, kind, flops, _elements(batch))
            if flops is None:
                self._uncounted += 1
            else:
                self._flops[phase] = self._flops.get(phase, 0.0) + flops
                self._counted += 1
        except Exception as exc:  # never raise into training
            self._uncounted += 1
            self._flop_problems[f"{type(exc).__name__}: {exc}"] = None

    def _record(self, key: Any, kind: str, flops: int | None, elements: float) -> None:
        self._flop_cache[key] = flops
        if flops is not None:
            total, seen = self._per_element.get(kind, (0.0, 0.0))
            self._per_element[kind] = (total + flops, seen + elements)

    def _live_end(self, *, completed: bool = True) -> None:
        """Stop counting the step begun in a batch-start hook; credit it when it completed."""
        live, self._live = self._live, None
        if live is None:
            return
        counter, key, phase, kind, elements = live
        try:
            found = counter.stop()
        except Exception as exc:
            self._flop_problems[f"live count: {type(exc).__name__}: {exc}"] = None
            return
        if not completed:
            return  # interrupted step: count the next batch of this shape instead
        self._flop_methods.add(f"{kind}: FlopCounterMode on the real step (first of each shape)")
        self._uncounted_ops.update(found.uncounted_ops)
        self._record(key, kind, found.flops, elements)
        self._flops[phase] = self._flops.get(phase, 0.0) + found.flops
        self._counted += 1

    def _count_new(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        phase: str,
        kind: str,
        batch_idx: int,
        dataloader_idx: int,
    ) -> int | None:
        name = {
            "train": "training_step",
            "validation": "validation_step",
            "sanity_check": "validation_step",
            "test": "test_step",
            "predict": "predict_step",
        }[phase]

        def step(module: Any, moved: Any) -> Any:
            if hasattr(module, "_device"):  # LightningModule.device follows the copy
                module._device = next(
                    (p.device for p in module.parameters()), getattr(module, "_device", None)
                )
            args = (moved, batch_idx) if dataloader_idx == 0 else (moved, batch_idx, dataloader_idx)
            return getattr(module, name)(*args)

        try:
            found = count_flops(pl_module, step, batch, backward=kind == "train")
        except FlopCountError as exc:
            self._flop_problems[f"{name}: {exc}"] = None
            return None
        method = "meta-device copy" if found.method == "meta" else "CPU copy with the real batch"
        self._flop_methods.add(f"{name}: FlopCounterMode on a {method}")
        self._uncounted_ops.update(found.uncounted_ops)
        return found.flops

    def _count_scaled(self, batch: Any, phase: str, kind: str) -> None:
        total, elements = self._per_element.get(kind, (0.0, 0.0))
        if elements <= 0:
            self._uncounted += 1
            return
        self._flops[phase] = self._flops.get(phase, 0.0) + total / elements * _elements(batch)
        self._counted += 1
        self._scaled += 1

    def _set_peak(self, trainer: pl.Trainer) -> None:
        root = trainer.strategy.root_device
        dtype = compute_dtype(trainer.precision, float32_matmul_precision=_matmul_precision())
        if root.type != "cuda":
            self._peak, self._peak_text = None, f"not reported: no dense peak for a {root.type}"
            return
        import torch

        name = torch.cuda.get_device_name(root)
        peak = peak_flops(name, dtype) if dtype else None
        figure = find_peak(name)
        if peak is None:
            why = "device not in the peak table" if figure is None else f"no {dtype} figure"
            self._peak_text = (
                f"not reported: {why} ({name}, precision {trainer.precision}); "
                "see green_mlops.flops.DENSE_PEAKS"
            )
        else:
            assert figure is not None
            self._peak_text = (
                f"{name}: {dtype} dense peak {peak / 1e12:g} TFLOP/s ({figure.source})"
            )
        self._peak = peak

    # -- totals ----------------------------------------------------------------------------

    def _offers(self, trainer: pl.Trainer) -> list[Meter | MeterUnavailable]:
        offers = list(self.meters()) if self.meters else offers_from_plugins(self.settings)
        if self._world == 1:
            return offers
        index, uuid = _gpu_identity(trainer)
        return assign_devices(offers, local_rank=self._local_rank, gpu_index=index, gpu_uuid=uuid)

    def _stage_values(self, result: Result) -> dict[str, float]:
        """This process's additive numbers for the current stage."""
        exclude = self._pushed if (not self._own and self._rank == 0) else {}
        values = _local_values(
            result, rank=self._rank, zero_embodied=self._zero_embodied, exclude=exclude
        )
        for phase, flops in self._flops.items():
            values[f"green/phase/{phase}_flops"] = flops
        values["green/flops"] = sum(self._flops.values())
        values["_counted_batches"] = float(self._counted)
        values["_uncounted_batches"] = float(self._uncounted)
        loop_s = result.metrics.get("green/phase/train_s", 0.0) + result.metrics.get(
            "green/phase/data_wait_s", 0.0
        )
        values["_train_loop_s"] = loop_s if self._rank == 0 else 0.0
        values["_peak_x_s"] = (self._peak or 0.0) * loop_s
        values["_peak_unknown"] = 0.0 if self._peak else 1.0
        return values

    def _combine(
        self, trainer: pl.Trainer, result: Result | None, *, collective: bool
    ) -> dict[str, float]:
        """Additive totals: earlier stages + this stage summed over ranks (if ``collective``).

        Every rank must call it at the same points when ``collective``: it always takes part
        in the reduction, whatever went wrong locally.
        """
        local: dict[str, float] = {}
        try:
            if result is not None:
                local = self._stage_values(result)
        except Exception as exc:
            warn_once(f"EnergyMonitor could not read this process's totals: {exc}")
        vector = [local.get(k, 0.0) for k in self._keys] + [
            1.0 if k in local else 0.0 for k in self._keys
        ]
        if collective and self._world > 1:
            vector = _reduce(trainer, vector)
        n = len(self._keys)
        stage = {k: vector[i] for i, k in enumerate(self._keys) if vector[n + i] > 0}
        if not self._own and self._rank == 0 and self._measurement is not None:
            self._push_to_owner(stage, local)
        totals = dict(self._base)
        for key, value in stage.items():
            totals[key] = totals.get(key, 0.0) + value
        return totals

    def _push_to_owner(self, stage: Mapping[str, float], local: Mapping[str, float]) -> None:
        """Give the MLflow plugin's measurement what it cannot see: other ranks' numbers and
        the totals restored from a checkpoint (its ``offsets`` are added to its final totals)."""
        assert self._measurement is not None
        pushed = {
            k: stage.get(k, 0.0) - local.get(k, 0.0) + self._base.get(k, 0.0)
            for k in set(stage) | set(self._base)
            if k.startswith("green/") and not _rank0_only(k)
        }
        offsets = self._measurement.offsets
        for key, value in pushed.items():
            offsets[key] = self._owner_offsets.get(key, 0.0) + value
        self._pushed = {k: v for k, v in pushed.items() if v}

    def _refresh(self, trainer: pl.Trainer) -> dict[str, float]:
        """Current run totals, summed over ranks (a collective: every rank calls it)."""
        result = None
        try:
            if self._measurement is not None:
                result = self._measurement.result()
        except Exception as exc:
            warn_once(f"EnergyMonitor could not read the measurement: {exc}")
        self._totals = self._combine(trainer, result, collective=True)
        return derive(self._totals)

    # -- quality ---------------------------------------------------------------------------

    def _quality(self, trainer: pl.Trainer, totals: Mapping[str, float]) -> None:
        assert self.monitor is not None
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            keys = ", ".join(sorted(trainer.callback_metrics)) or "none"
            self._say(
                "monitor",
                f"EnergyMonitor(monitor={self.monitor!r}): the module did not log "
                f"{self.monitor!r} at validation, so no quality-per-FLOP/kWh is logged. Logged "
                f"metrics: {keys}. Log it with self.log({self.monitor!r}, ...) in "
                "validation_step, or pass one of these names.",
            )
            return
        metric = float(value)
        self._validations += 1
        quality = metric if self.mode == "max" else (1.0 / metric if metric > 0 else None)
        out: dict[str, float] = {}
        kwh = totals.get("green/energy_kwh", 0.0)
        flops = totals.get("green/flops", 0.0)
        if quality is None:
            self._say(
                "quality",
                f"EnergyMonitor: {self.monitor}={metric:g} <= 0 in mode='min': quality is "
                "1/metric, undefined here; quality metrics are not logged",
            )
        else:
            if flops > 0:
                out[f"green/quality/{self.monitor}_per_pflop"] = quality / (flops / 1e15)
            if kwh > 0:
                out[f"green/quality/{self.monitor}_per_kwh"] = quality / kwh
        if self.target is not None and self._to_target is None:
            reached = metric >= self.target if self.mode == "max" else metric <= self.target
            if reached:
                self._to_target = {"green/energy_to_target_kwh": kwh}
                if "green/flops" in totals:
                    self._to_target["green/flops_to_target"] = flops
                out.update(self._to_target)
                if self._validations == 1:
                    better = "higher" if self.mode == "max" else "lower"
                    self._say(
                        "target",
                        f"EnergyMonitor: target {self.monitor}={self.target:g} was reached at "
                        f"the first validation ({self.monitor}={metric:g}, mode={self.mode!r}): "
                        "energy-to-target measures almost nothing. Check that mode is right "
                        f"({better} is better) and that the target is not already met by an "
                        "untrained model.",
                    )
        if out:
            self._last_quality = dict(out)
            self._log(trainer, out, totals=False)

    def _say(self, topic: str, message: str) -> None:
        """Warn once per topic for this callback (through Lightning: rank zero only)."""
        if topic not in self._said:
            self._said.add(topic)
            rank_zero_warn(message)

    def _target_metrics(self) -> dict[str, float]:
        return dict(self._to_target or {})

    # -- output ----------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float], *, totals: bool) -> None:
        """Log through every logger; loggers whose run the MLflow plugin owns get no totals.

        Series (per epoch, per validation, per step) use step = ``global_step``. MLflow shows
        a metric's value at its highest step, so there run totals use step = whole seconds
        of the run's measurement (``green/duration_s``, over every stage and segment), the
        plugin's step: the value shown is the latest total, whoever wrote it.
        """
        for logger in trainer.loggers:
            chosen = dict(metrics)
            if id(logger) in self._skip_loggers and totals:
                chosen = {k: v for k, v in chosen.items() if k.startswith("green/epoch/")}
            batches = [(chosen, trainer.global_step)]
            if totals and id(logger) in self._seconds_step:
                series = {k: v for k, v in chosen.items() if k.startswith("green/epoch/")}
                rest = {k: v for k, v in chosen.items() if k not in series}
                seconds = int(metrics.get("green/duration_s", 0.0))
                batches = [(series, trainer.global_step), (rest, seconds)]
            for batch, step in batches:
                if not batch:
                    continue
                try:
                    logger.log_metrics(batch, step=step)
                except Exception as exc:
                    warn_once(f"EnergyMonitor could not log to {type(logger).__name__}: {exc}")

    def _log_step(self, trainer: pl.Trainer) -> None:
        if self._measurement is None or trainer.global_step == self._last_step_logged:
            return
        self._last_step_logged = trainer.global_step
        if self._rank != 0:
            return
        try:
            kwh = self._measurement.tracker.snapshot().kwh + self._base.get("green/energy_kwh", 0)
            flops = sum(self._flops.values()) + self._base.get("green/flops", 0.0)
            metrics = {"green/step/energy_kwh": kwh}
            if self._counted:
                metrics["green/step/flops"] = flops
            self._log(trainer, metrics, totals=False)
        except Exception as exc:
            warn_once(f"EnergyMonitor per-step logging failed: {exc}")

    def _tags(self, trainer: pl.Trainer) -> dict[str, str]:
        methods = sorted(self._flop_methods) or (
            ["off (count_flops=False)"] if not self.count_flops else ["none"]
        )
        tags = {
            "green.flops.method": "; ".join(methods)
            + " (FlopCounterMode counts matmul, convolution and attention; other ops count 0)",
            "green.mfu": self._peak_text or "not reported",
            "green.phase.co2e": "phase kWh x the run's mean intensity x PUE (not time-resolved)",
            "green.ranks": str(self._world),
        }
        problems = list(self._flop_problems)
        if self._uncounted:
            problems.insert(0, f"{self._uncounted} batch(es) of this stage not counted")
        if problems:
            tags["green.flops.uncounted"] = _clip("; ".join(problems))
        if self._scaled:
            tags["green.flops.scaled"] = (
                f"{self._scaled} batch(es) with more than {self.max_flop_signatures} distinct "
                "shapes: FLOPs scaled from counted shapes by the number of input elements"
            )
        if self._uncounted_ops:
            tags["green.flops.uncounted_ops"] = _clip(
                ", ".join(sorted(self._uncounted_ops)) + ": custom ops, counted as 0 FLOPs"
            )
        if self.monitor is not None:
            quality = "metric" if self.mode == "max" else "1 / metric"
            tags["green.quality"] = f"{self.monitor} ({self.mode}); quality = {quality}"
        if self._world > 1:
            tags["green.ranks"] += (
                " processes; energy, carbon and FLOPs summed over ranks; durations and the "
                "other tags are rank 0's"
            )
        return tags

    def _write_reports(
        self,
        trainer: pl.Trainer,
        result: Result,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
    ) -> None:
        report = result.report()
        if self._world > 1:
            report["rank0_metrics"] = report["metrics"]
        report["metrics"] = dict(metrics)
        if result.footprint is not None:  # the run's stages so far, not the last one only
            from green_mlops.footprint import reporting_sentence

            whole = _whole_footprint(result.footprint, metrics)
            report["footprint"] = dataclasses.asdict(whole)
            report["reporting_sentence"] = reporting_sentence(whole)
        report["tags"] = dict(tags)
        for logger in trainer.loggers:
            try:
                run_id = _mlflow_run_id(logger)
                if run_id is not None:
                    if id(logger) in self._skip_loggers:
                        continue
                    from mlflow.entities import RunTag

                    client = cast(Any, logger).experiment
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])
                    if self.report:
                        client.log_dict(run_id, report, "green/report.json")
                    if self._world == 1 and result.power:
                        _log_power(client, run_id, result.power)
                elif self.report and getattr(logger, "log_dir", None):
                    path = os.path.join(str(logger.log_dir), "green_report.json")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w", encoding="utf-8") as fh:
                        json.dump(report, fh, indent=2, default=str)
            except Exception as exc:
                warn_once(f"EnergyMonitor could not write to {type(logger).__name__}: {exc}")


# --- helpers --------------------------------------------------------------------------------


def _whole_footprint(fp: Footprint, metrics: Mapping[str, float]) -> Footprint:
    """The stage's footprint with the run's totals (earlier stages, checkpoint, ranks)."""
    fields = {
        "duration_s": "green/duration_s",
        "it_kwh": "green/energy_kwh",
        "facility_kwh": "green/energy_facility_kwh",
        "operational_g": "green/co2e_g",
        "operational_uncertainty_g": "green/co2e_uncertainty_g",
        "intensity_g_per_kwh": "green/intensity_g_per_kwh",
        "cost": "green/cost",
        "embodied_g": "green/embodied_g",
        "sci_g": f"green/sci_g_per_{fp.functional_unit}",
    }
    changes: dict[str, Any] = {
        name: metrics[key]
        for name, key in fields.items()
        if key in metrics and getattr(fp, name) is not None
    }
    return dataclasses.replace(fp, **changes)


def _mlflow_run_id(logger: Any) -> str | None:
    if not isinstance(logger, classes("loggers", "MLFlowLogger")):  # of either namespace
        return None
    run_id = logger.run_id
    return str(run_id) if run_id else None


def _log_power(client: Any, run_id: str, power: Sequence[tuple[float, float]]) -> None:
    from mlflow.entities import Metric

    from green_mlops.metrics import POWER_KEY

    points = [Metric(POWER_KEY, watts, int(t * 1000), i) for i, (t, watts) in enumerate(power)]
    for start in range(0, len(points), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=points[start : start + 1000])


def _reduce(trainer: pl.Trainer, vector: list[float]) -> list[float]:
    import torch

    tensor = torch.tensor(vector, dtype=torch.float64, device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(tensor, reduce_op="sum")
    return [float(v) for v in reduced.cpu().tolist()]


def _gpu_identity(trainer: pl.Trainer) -> tuple[int | None, str | None]:
    root = trainer.strategy.root_device
    if root.type != "cuda":
        return None, None
    import torch

    index = root.index if root.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        uuid = None
    return index, uuid or None


def _matmul_precision() -> str:
    import torch

    return str(torch.get_float32_matmul_precision())


def _elements(batch: Any) -> int:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (list, tuple)):
        return sum(_elements(item) for item in batch)
    if isinstance(batch, Mapping):
        return sum(_elements(item) for item in batch.values())
    return 0


def _counted_here(key: str) -> bool:
    """Totals the callback counts itself (FLOPs), not the measurement it shares."""
    return key == "green/flops" or key.endswith("_flops") or key.endswith("_batches")


def _is_flop_or_quality(key: str) -> bool:
    return (
        key in {"green/flops", "green/mfu", "green/flops_per_s", "green/flops_per_joule"}
        or key.endswith("_flops")
        or key.startswith("green/quality/")
    )


def _stage(trainer: pl.Trainer) -> str:
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn) or "unknown stage")


def _clip(text: str, limit: int = 5000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
