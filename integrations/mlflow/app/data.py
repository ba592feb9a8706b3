"""What the dashboard reads, inside the tracking server's process: experiments and runs from
MLflow's own tracking store (no HTTP), the experiments the logged-in user may read (with
basic-auth), and a run's ``green/report.json`` from the artifact store.

MLflow's server keeps these behind private helpers (``mlflow.server.handlers``,
``mlflow.server.auth``); they are used here only, each in one place.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from green_mlops.integrations.mlflow.reader import run_record, store_runs
from green_mlops.integrations.mlflow.writer import REPORT_ARTIFACT
from green_mlops.runs import RunRecord

__all__ = ["NotFound", "experiments", "read_report", "run", "runs", "tracking_store"]

SOURCE = "mlflow:this tracking server"


class NotFound(LookupError):
    """No such experiment or run (or the user may not read it)."""


def tracking_store() -> Any:
    from mlflow.server.handlers import _get_tracking_store

    return _get_tracking_store()


def _can_read() -> Callable[[str], bool] | None:
    """The logged-in user's read permission on an experiment id; None: no basic-auth in this
    server (or an admin): every experiment."""
    auth = sys.modules.get("mlflow.server.auth")
    if auth is None or not getattr(auth, "_auth_initialized", False):
        return None
    if auth.sender_is_admin():
        return None
    username = auth.authenticate_request().username
    predicate: Callable[[str], bool] = auth._role_based_read_predicate(username, "experiment")
    return predicate


def experiments() -> dict[str, str]:
    """Active experiments the user may read: id -> name, by name."""
    from mlflow.entities import ViewType

    store = tracking_store()
    found: dict[str, str] = {}
    token = None
    while True:
        page = store.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        found.update({e.experiment_id: e.name for e in page})
        token = getattr(page, "token", None)
        if not token:
            break
    can_read = _can_read()
    if can_read is not None:
        found = {k: v for k, v in found.items() if can_read(k)}
    return dict(sorted(found.items(), key=lambda item: item[1]))


def experiment(experiment_id: str) -> tuple[str, str]:
    """(id, name) of a readable active experiment; :class:`NotFound` otherwise."""
    readable = experiments()
    if experiment_id not in readable:
        raise NotFound(f"no experiment with id {experiment_id!r} (that you may read)")
    return experiment_id, readable[experiment_id]


def runs(chosen: dict[str, str]) -> list[RunRecord]:
    """The active runs of ``chosen`` experiments (id -> name), newest first."""
    return store_runs(tracking_store(), chosen, SOURCE)


def run(run_id: str) -> tuple[RunRecord, Any]:
    """A run of a readable experiment, as a record, with MLflow's run entity."""
    from mlflow.exceptions import MlflowException

    try:
        entity = tracking_store().get_run(run_id)
    except MlflowException:
        raise NotFound(f"no run with id {run_id!r}") from None
    readable = experiments()
    exp_id = entity.info.experiment_id
    if exp_id not in readable or entity.info.lifecycle_stage != "active":
        raise NotFound(f"no run with id {run_id!r} (that you may read)")
    return run_record(entity, {exp_id: readable[exp_id]}, SOURCE), entity


def read_report(entity: Any) -> dict[str, Any] | None:
    """The run's ``green/report.json``, from the artifact store the server serves (proxied
    artifacts) or the run's own artifact URI; None when it has none or it cannot be read."""
    import importlib

    handlers: Any = importlib.import_module("mlflow.server.handlers")  # private helpers, untyped
    uri = entity.info.artifact_uri
    try:
        if handlers._is_servable_proxied_run_artifact_root(uri):
            repo = handlers._get_artifact_repo_mlflow_artifacts()
            path = handlers._get_proxied_run_artifact_destination_path(
                proxied_artifact_root=uri, relative_path=REPORT_ARTIFACT
            )
            scoped = getattr(handlers, "_get_workspace_scoped_repo_path_if_enabled", None)
            path = scoped(path) if scoped is not None else path
        else:
            repo, path = handlers._get_artifact_repo(entity), REPORT_ARTIFACT
        with tempfile.TemporaryDirectory(prefix="green-mlops-") as folder:
            local = repo.download_artifacts(path, folder)
            report = json.loads(Path(local).read_text(encoding="utf-8"))
    except Exception:
        return None
    return report if isinstance(report, dict) else None
