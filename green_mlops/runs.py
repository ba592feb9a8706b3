"""Finished runs as the decision layer reads them: one shape, whichever store they come from.

MLflow runs are read by ``green_mlops.integrations.mlflow.reader``; runs without MLflow by
:func:`read_report_files` from the JSON reports the integrations write (``green/report.json``
artifacts, the Lightning callback's ``green_report.json``). Compare, report and audit take
:class:`RunRecord` objects and know nothing of where they came from.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPORT_FILE_NAMES",
    "RunRecord",
    "RunsUnavailable",
    "read_report_files",
    "record_from_report",
]

#: File names a report is written under (the MLflow artifact, the Lightning callback's file).
REPORT_FILE_NAMES = ("report.json", "green_report.json")


class RunsUnavailable(Exception):
    """The runs could not be read (the message says which source and why, with the fix)."""


@dataclass(frozen=True)
class RunRecord:
    """One run: its identity, its ``green/*`` and user metrics, tags and params.

    ``metrics`` are the run's latest values (MLflow's ``run.data.metrics``); a parent run's
    ``green/*`` totals are exclusive of its nested runs, so sums over runs count each joule once.
    """

    run_id: str
    name: str
    experiment: str
    status: str
    #: Unix seconds; None when the store does not say.
    start_time: float | None
    end_time: float | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    parent_id: str | None = None
    #: Where it was read: ``mlflow:<tracking URI without credentials>`` or a file path.
    source: str = ""
    #: The JSON report, when it was read with the run (report files; MLflow on request).
    report: Mapping[str, Any] | None = None

    @property
    def measured(self) -> bool:
        """Every meter of the run measured (no estimate)."""
        return self.tags.get("green.measured") == "true"

    def value(self, key: str) -> float | str | None:
        """A metric, else a tag, else a param called ``key`` (what ``--by`` and filters read)."""
        if key in self.metrics:
            return self.metrics[key]
        if key in self.tags:
            return self.tags[key]
        return self.params.get(key)


def read_report_files(paths: Iterable[str | os.PathLike[str]]) -> list[RunRecord]:
    """The runs of report files: each path a report file or a directory searched recursively
    for :data:`REPORT_FILE_NAMES`. A report carries the ``green/*`` metrics only; the user's
    metrics (``val_acc``) are read from Lightning's ``metrics.csv`` beside a
    ``green_report.json`` (a ``CSVLogger``'s ``log_dir``: the latest value of each).
    Raises :class:`RunsUnavailable` for a path that does not exist or a file that is not a
    green-mlops report."""
    records = []
    for path in _report_paths(paths):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunsUnavailable(f"{path}: not readable as a JSON report ({exc})") from None
        if not isinstance(report, dict) or not str(report.get("schema", "")).startswith(
            "green-mlops/report/"
        ):
            raise RunsUnavailable(f"{path}: not a green-mlops report (no 'schema' field)")
        records.append(_from_report(path, report))
    return records


def _report_paths(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for name in REPORT_FILE_NAMES for p in path.rglob(name))
            if not found:
                raise RunsUnavailable(
                    f"{path}: no {' or '.join(REPORT_FILE_NAMES)} under this directory"
                )
            yield from found
        elif path.is_file():
            yield path
        else:
            raise RunsUnavailable(f"{path}: no such file or directory")


def _from_report(path: Path, report: Mapping[str, Any]) -> RunRecord:
    metrics = dict(_csv_metrics(path.parent / "metrics.csv"))
    if path.name == "green_report.json":  # <save_dir>/<name>/<version>/ of a Lightning logger
        name, experiment = f"{path.parent.parent.name}/{path.parent.name}", path.parent.parent.name
    else:
        name, experiment = path.parent.name or path.stem, str(path.parent)
    return record_from_report(
        report, run_id=str(path), name=name, experiment=experiment, source=str(path), extra=metrics
    )


def record_from_report(
    report: Mapping[str, Any],
    *,
    run_id: str,
    name: str,
    experiment: str,
    source: str,
    extra: Mapping[str, float] | None = None,
) -> RunRecord:
    """The run a JSON report describes; its tags (``green.run_id``, ``mlflow.runName``,
    ``green.experiment``) win over ``run_id``, ``name`` and ``experiment``; ``extra`` metrics
    (the user's) fill in what the report does not carry."""
    energy = report.get("energy") or {}
    started = energy.get("started_at")
    duration = energy.get("duration_s")
    tags = {str(k): str(v) for k, v in (report.get("tags") or {}).items()}
    metrics = {
        str(k): float(v)
        for k, v in (report.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for key, value in (extra or {}).items():
        metrics.setdefault(key, value)
    return RunRecord(
        run_id=tags.get("green.run_id", run_id),
        name=tags.get("mlflow.runName") or name,
        experiment=tags.get("green.experiment", experiment),
        status="FINISHED" if report.get("final") else "RUNNING",
        start_time=float(started) if isinstance(started, (int, float)) else None,
        end_time=(
            float(started) + float(duration)
            if isinstance(started, (int, float)) and isinstance(duration, (int, float))
            else None
        ),
        metrics=metrics,
        tags=tags,
        source=source,
        report=report,
    )


def _csv_metrics(path: Path) -> dict[str, float]:
    """The latest value of each column of a Lightning ``metrics.csv`` (none: no file)."""
    latest: dict[str, float] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for key, text in row.items():
                    if key in (None, "epoch", "step") or not text:
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        continue
                    if math.isfinite(value):
                        latest[key] = value
    except OSError:
        return {}
    return latest
