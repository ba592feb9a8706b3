"""Where ``EnergyMonitor``'s numbers go: the Trainer's loggers, and MLflow runs through the
plugin's :class:`~green_mlops.integrations.mlflow.writer.RunWriter` (one step convention,
batching, report and chart, spool).

See docs/energy-monitor.md ("Where the numbers go") and docs/mlflow-plugin.md ("Steps").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from green_mlops.config import Settings
from green_mlops.integrations.lightning._namespaces import classes
from green_mlops.integrations.lightning.stages import report_for_run
from green_mlops.integrations.mlflow.writer import RunWriter
from green_mlops.log import warn_once
from green_mlops.session import Measurement, Result, claim, lookup, release

if TYPE_CHECKING:
    import lightning.pytorch as pl


__all__ = ["Output", "callback_tags", "interrupted_tags"]


class Output:
    """The Trainer's loggers during one stage: which are MLflow runs (written through a
    ``RunWriter``: totals at step = seconds), and which of those the MLflow plugin measures
    (it logs their totals, tags, report and power series).

    ``owner``: the name under which the callback registers the measurements it owns
    (:func:`green_mlops.session.claim`), so that an MLflow run has one measurement.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Loggers whose run the MLflow plugin owns: no totals from the callback.
        self._shared: set[int] = set()
        #: MLflow loggers (by id) and the writer of each one's run (made on first use).
        self._mlflow: dict[int, RunWriter | None] = {}
        self._run_ids: list[str] = []
        self._claimed: list[str] = []
        #: The stage's measurement settings (the spool's directory).
        self._settings: Settings | None = None

    def find_owner(self, trainer: pl.Trainer) -> Measurement | None:
        """The running measurement another integration (the MLflow plugin) has of an
        ``MLFlowLogger``'s run: its loggers then get no totals from the callback. Never raises
        (rank 0 calls it before a broadcast)."""
        owner = None
        try:
            for logger in trainer.loggers:
                run_id = _mlflow_run_id(logger)
                if run_id is None:
                    continue
                self._run_ids.append(run_id)
                self._mlflow[id(logger)] = None
                found = lookup(run_id)
                if found is not None and found[1] != self.owner and found[0].running:
                    owner = found[0]
                    self._settings = owner.settings
                    self._shared.add(id(logger))
        except Exception as exc:
            warn_once(f"EnergyMonitor could not read the MLflow run: {exc}")
        return owner

    @property
    def run_ids(self) -> tuple[str, ...]:
        """The MLflow runs of the stage's loggers."""
        return tuple(self._run_ids)

    def claim(self, measurement: Measurement) -> None:
        """Register ``measurement`` as the one of the MLflow runs found (unless one exists)."""
        self._settings = measurement.settings
        for run_id in self._run_ids:
            _, created = claim(run_id, self.owner, lambda m=measurement: m)
            if created:
                self._claimed.append(run_id)

    def release(self) -> None:
        """The stage is over: the runs claimed are free for another measurement."""
        for run_id in self._claimed:
            release(run_id)

    def log(self, trainer: pl.Trainer, metrics: Mapping[str, float], *, totals: bool) -> None:
        """Log through every logger; loggers whose run the MLflow plugin owns get no totals.

        Series (per epoch, per validation, per step) use step = ``global_step``. In MLflow,
        which shows a metric's value at its highest step, run totals use step = whole seconds
        of the run's measurement (``green/duration_s``, over every stage and segment), the
        plugin's step: the value shown is the latest total, whoever wrote it.
        """
        for logger in trainer.loggers:
            chosen = dict(metrics)
            if id(logger) in self._shared and totals:
                chosen = {k: v for k, v in chosen.items() if k.startswith("green/epoch/")}
            if not chosen:
                continue
            try:
                if id(logger) not in self._mlflow:
                    logger.log_metrics(chosen, step=trainer.global_step)
                    continue
                writer = self._writer(logger)
                series = {k: v for k, v in chosen.items() if k.startswith("green/epoch/")}
                if totals:
                    rest = {k: v for k, v in chosen.items() if k not in series}
                    writer.totals(rest, metrics.get("green/duration_s", 0.0))
                else:
                    series = chosen
                writer.series(series, trainer.global_step)
                writer.flush()
            except Exception as exc:
                warn_once(f"EnergyMonitor could not log to {type(logger).__name__}: {exc}")

    def _writer(self, logger: Any) -> RunWriter:
        """The writer of an MLflow logger's run (its tracking URI and run id)."""
        writer = self._mlflow.get(id(logger))
        if writer is None:
            settings = self._settings or Settings.resolve(None)
            tracking_uri = str(logger.experiment.tracking_uri)
            writer = RunWriter(tracking_uri, str(logger.run_id), settings)
            self._mlflow[id(logger)] = writer
        return writer

    def write(
        self,
        trainer: pl.Trainer,
        result: Result,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        *,
        world: int,
        report: bool,
    ) -> None:
        """Tags, the JSON report (with ``report``) and the power series (one process only)
        to each MLflow run the callback logs; the report into other loggers' ``log_dir``."""
        document = result.report()
        if world > 1:
            document["rank0_metrics"] = document["metrics"]
        document["metrics"] = dict(metrics)
        if result.footprint is not None:  # the run's stages so far, not the last one only
            from green_mlops.footprint import reporting_sentence, with_totals

            whole = with_totals(result.footprint, metrics)
            document["footprint"] = dataclasses.asdict(whole)
            document["reporting_sentence"] = reporting_sentence(whole)
        document["tags"] = dict(tags)
        stage = _stage(trainer)
        for logger in trainer.loggers:
            try:
                if id(logger) in self._mlflow:
                    if id(logger) in self._shared:
                        continue
                    writer = self._writer(logger)
                    writer.tags(tags)
                    if report:  # with the run's earlier stages in this process (.stages)
                        key = ("mlflow", writer.tracking_uri, writer.run_id)
                        writer.report(report_for_run(key, document, stage))
                    if world == 1:  # at step = seconds since the run's measurement began
                        earlier = metrics.get("green/duration_s", 0.0) - result.snapshot.duration_s
                        writer.power(result.power, result.snapshot.started_at - earlier)
                    writer.flush()
                elif report and getattr(logger, "log_dir", None):
                    path = os.path.join(str(logger.log_dir), "green_report.json")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    merged = report_for_run(("dir", os.path.abspath(path)), document, stage)
                    with open(path, "w", encoding="utf-8") as fh:
                        json.dump(merged, fh, indent=2, default=str)
            except Exception as exc:
                warn_once(f"EnergyMonitor could not write to {type(logger).__name__}: {exc}")


def callback_tags(
    flop_tags: Mapping[str, str], *, monitor: str | None, mode: str, world: int
) -> dict[str, str]:
    """The callback's provenance tags: FLOPs and MFU, phase carbon, quality, ranks."""
    tags = {
        **flop_tags,
        "green.phase.co2e": "phase kWh x the run's mean intensity x PUE (not time-resolved)",
        "green.ranks": str(world),
    }
    if monitor is not None:
        quality = "metric" if mode == "max" else "1 / metric"
        tags["green.quality"] = f"{monitor} ({mode}); quality = {quality}"
    if world > 1:
        tags["green.ranks"] += (
            " processes; energy, carbon and FLOPs summed over ranks; durations and the "
            "other tags are rank 0's"
        )
    return tags


def interrupted_tags(
    trainer: pl.Trainer, failure: BaseException | None, world: int
) -> dict[str, str]:
    """``green.interrupted`` (and ``green.partial`` with several ranks) after a failure."""
    if failure is None:
        return {}
    fn = trainer.state.fn
    stage = str(getattr(fn, "value", fn) or "unknown stage")
    tags = {"green.interrupted": f"{type(failure).__name__} during {stage}"}
    if world > 1:
        tags["green.partial"] = (
            "interrupted: the totals are this process's only (ranks not combined)"
        )
    return tags


def _stage(trainer: pl.Trainer) -> str:
    """The stage ending (``fit``, ``validate``, ``test``, ``predict``)."""
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn) or "unknown")


def _mlflow_run_id(logger: Any) -> str | None:
    if not isinstance(logger, classes("loggers", "MLFlowLogger")):  # of either namespace
        return None
    run_id = logger.run_id
    return str(run_id) if run_id else None
