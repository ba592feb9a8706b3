"""Read finished MLflow runs as :class:`~green_mlops.runs.RunRecord` objects (the decision
layer's one shape): experiments by name or glob, runs by MLflow's own ``filter_string``."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from green_mlops.integrations.mlflow.writer import REPORT_ARTIFACT, shown_uri
from green_mlops.runs import RunRecord, RunsUnavailable

__all__ = ["find_experiments", "load_report", "read_runs", "run_record", "store_runs"]

#: Runs asked of the server per request (MLflow's search_runs accepts up to 50,000).
PAGE_SIZE = 1000
#: MLflow's request settings while reading, unless the user set them: one retry, not MLflow's
#: seven (about four minutes before a down server is reported).
REQUEST_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def read_runs(
    tracking_uri: str | None,
    experiments: Sequence[str] = (),
    *,
    filter_string: str = "",
    run_ids: Sequence[str] = (),
) -> list[RunRecord]:
    """The runs of the experiments named (names or ``fnmatch`` globs; all when empty) that
    match ``filter_string``, plus the runs named in ``run_ids``, newest first.

    Raises :class:`~green_mlops.runs.RunsUnavailable` naming the tracking URI (without its
    credentials) when the server cannot be read, or when a name matches no experiment.
    """
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        uri = shown_uri(str(client.tracking_uri))
    except Exception as exc:  # a malformed or unsupported URI: never a traceback with it
        shown = shown_uri(str(tracking_uri or "(MLFLOW_TRACKING_URI)"))
        raise RunsUnavailable(f"MLflow at {shown}: {type(exc).__name__}") from None
    with _bounded():
        try:
            records: dict[str, RunRecord] = {}
            if experiments or not run_ids:
                found = find_experiments(client, experiments)
                names = {e.experiment_id: e.name for e in found}
                for run in _search(client, list(names), filter_string):
                    records[run.info.run_id] = run_record(run, names, uri)
            for run_id in run_ids:
                if run_id not in records:
                    run = client.get_run(run_id)
                    experiment = client.get_experiment(run.info.experiment_id)
                    records[run_id] = run_record(
                        run, {experiment.experiment_id: experiment.name}, uri
                    )
        except RunsUnavailable:
            raise
        except Exception as exc:
            raise RunsUnavailable(_problem(exc, str(client.tracking_uri))) from None
    return sorted(records.values(), key=lambda r: r.start_time or 0.0, reverse=True)


def store_runs(store: Any, experiments: dict[str, str], source: str) -> list[RunRecord]:
    """The active runs of ``experiments`` (id -> name) read from a tracking store of this
    process (the tracking server's own: no HTTP), newest first."""
    from mlflow.entities import ViewType

    if not experiments:
        return []
    runs = _pages(
        lambda token: store.search_runs(
            list(experiments),
            "",
            ViewType.ACTIVE_ONLY,
            max_results=PAGE_SIZE,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
    )
    return [run_record(run, experiments, source) for run in runs]


def find_experiments(client: Any, patterns: Sequence[str]) -> list[Any]:
    """Experiments whose name equals or matches (``fnmatch``) one of ``patterns``; every
    active experiment when ``patterns`` is empty. A pattern that matches none is an error."""
    from mlflow.entities import ViewType

    every = list(
        _pages(
            lambda token: client.search_experiments(
                view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token
            )
        )
    )
    if not patterns:
        return every
    chosen = []
    for pattern in patterns:
        matched = [e for e in every if fnmatch.fnmatchcase(e.name, pattern)]
        if not matched:
            known = ", ".join(sorted(e.name for e in every)[:10]) or "none"
            raise RunsUnavailable(
                f"no experiment matches {pattern!r} (experiments: {known}); names and globs "
                "such as 'resnet-*' are accepted"
            )
        chosen += [e for e in matched if e not in chosen]
    return chosen


def load_report(tracking_uri: str | None, record: RunRecord) -> RunRecord:
    """``record`` with its ``green/report.json`` artifact read (unchanged when it has none)."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    if record.report is not None:
        return record
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="green-mlops-") as folder:
        try:
            path = client.download_artifacts(record.run_id, REPORT_ARTIFACT, folder)
        except Exception:
            return record
        return replace(record, report=json.loads(Path(path).read_text(encoding="utf-8")))


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    """:data:`REQUEST_SETTINGS` for the requests made inside (the user's own settings win)."""
    added = [k for k in REQUEST_SETTINGS if k not in os.environ]
    os.environ.update({k: REQUEST_SETTINGS[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _problem(exc: Exception, tracking_uri: str) -> str:
    """One line: where, what went wrong, the fix; never the URI's credentials."""
    uri = shown_uri(tracking_uri)
    text = re.sub(r"//[^/@\s]+@", "//***@", str(exc)).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, OSError) or "failed with exception" in first:  # no answer
        cause = re.findall(r"\[Errno -?\d+\] [^'\")]+", first)
        why = cause[-1] if cause else type(exc).__name__
        return (
            f"MLflow at {uri} does not answer ({why}): check --tracking-uri (or "
            "MLFLOW_TRACKING_URI) and that the server is running"
        )
    return f"MLflow at {uri}: {type(exc).__name__}: {first[:300]}"


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> Iterator[Any]:
    if not experiment_ids:
        return iter(())
    return _pages(
        lambda token: client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=PAGE_SIZE,
            page_token=token,
        )
    )


def _pages(fetch: Any) -> Iterator[Any]:
    token = None
    while True:
        page = fetch(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def run_record(run: Any, experiments: dict[str, str], source: str) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        name=info.run_name or info.run_id,
        experiment=experiments.get(info.experiment_id, info.experiment_id),
        status=str(info.status),
        start_time=info.start_time / 1000 if info.start_time else None,
        end_time=info.end_time / 1000 if info.end_time else None,
        metrics={k: float(v) for k, v in data.metrics.items()},
        tags=dict(data.tags),
        params=dict(data.params),
        parent_id=data.tags.get("mlflow.parentRunId"),
        source=f"mlflow:{source}",
    )
