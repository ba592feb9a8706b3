"""The ``/green/`` pages and their JSON (``/green/api/...``), a Flask blueprint on MLflow's own
app. Each route is one exact path, its subject in the query (``?experiment_id=``,
``?run_id=``): the names and form basic-auth's permission validators read.

Bad input is a 4xx page (or JSON under ``/green/api/``) that says what was wrong; an
unexpected failure a 500 that names the exception's type (its message, which may hold
a store URI or a server path, goes to the log), never a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, Response, request

from green_mlops.integrations.mlflow.app import data, pages

__all__ = ["PAGES", "blueprint", "register_validators"]

blueprint = Blueprint("green_mlops", __name__, url_prefix="/green")
_log = logging.getLogger(__name__)

#: Path -> what a basic-auth user needs: "experiment" (read it), "run" (read it), "login".
PAGES: dict[str, str] = {}
_STATIC = {"green.css": "text/css", "green.js": "text/javascript"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _route(path: str, needs: str) -> Callable[[Callable[[], Response]], Callable[[], Response]]:
    PAGES["/green" + path] = needs

    def register(view: Callable[[], Response]) -> Callable[[], Response]:
        blueprint.add_url_rule(path, view.__name__, view, methods=["GET"], strict_slashes=True)
        return view

    return register


def _html(text: str, status: int = 200) -> Response:
    response = Response(text, status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = pages.CSP
    return response


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, default=str), status=status, mimetype="application/json")


@blueprint.errorhandler(BadRequest)
def _bad(exc: BadRequest) -> Response:
    return _problem(exc.status, str(exc))


@blueprint.errorhandler(data.NotFound)
def _missing(exc: data.NotFound) -> Response:
    return _problem(404, str(exc))


@blueprint.errorhandler(Exception)
def _failed(exc: Exception) -> Response:
    from werkzeug.exceptions import HTTPException

    if isinstance(exc, HTTPException):
        return _problem(exc.code or 500, exc.description or exc.name)
    # the message may hold a store URI with its password or the server's paths: logged only
    _log.exception("green dashboard: %s failed", request.path)
    return _problem(
        500, f"the dashboard failed: {type(exc).__name__} (the server's log has the details)"
    )


def _problem(status: int, message: str) -> Response:
    if request.path.startswith("/green/api/"):
        return _json({"error": message, "status": status}, status)
    return _html(pages.error_page(status, message), status)


# --- parameters --------------------------------------------------------------------------------


def _arg(name: str, *, required: bool = False) -> str:
    value = request.args.get(name, "")
    if required and not value:
        raise BadRequest(400, f"missing query parameter {name!r} (e.g. ?{name}=...)")
    if len(value) > 500:
        raise BadRequest(400, f"query parameter {name!r} is too long ({len(value)} characters)")
    return value


def _experiment_id() -> str:
    value = _arg("experiment_id", required=True)
    if not value.isdigit():
        raise BadRequest(400, f"experiment_id={value!r}: an experiment id is a number, e.g. 1")
    return value


def _mode() -> Literal["max", "min"]:
    mode = _arg("mode") or "max"
    if mode not in ("max", "min"):
        raise BadRequest(400, f"mode={mode!r}: use 'max' (higher is better) or 'min'")
    return "max" if mode == "max" else "min"


# --- the views ---------------------------------------------------------------------------------


def _overview() -> dict[str, Any]:
    from green_mlops.audit import audit
    from green_mlops.budget import BudgetConfigError, find_config, load_config
    from green_mlops.compare import by_month
    from green_mlops.config import ConfigError

    experiments = data.experiments()
    records = data.runs(experiments)
    budgets, note = None, ""
    path = find_config(Path.cwd())  # the server's paths are not shown: the file's name only
    if path is None:
        note = (
            "No budgets: no green-mlops.toml in the server's working directory or above it "
            "(docs/budgets.md)."
        )
    else:
        try:
            budgets = audit(load_config(path), records, now=time.time())
            note = f"Budgets of {path.name}, over the experiments shown (docs/budgets.md)."
        except (BudgetConfigError, ConfigError) as exc:
            note = f"The budgets cannot be read: {str(exc).replace(str(path), path.name)}"
    return {
        "experiments": experiments,
        "periods": by_month(records),
        "budgets": budgets,
        "budget_note": note,
    }


@_route("/", "login")
def overview() -> Response:
    o = _overview()
    return _html(
        pages.overview_page(o["experiments"], o["periods"], o["budgets"], o["budget_note"])
    )


@_route("/api/experiments", "login")
def api_overview() -> Response:
    import dataclasses

    o = _overview()
    result = o["budgets"]
    budgets = [
        {
            "name": b.budget.name,
            "period": b.budget.period,
            "window": b.window,
            "currency": b.currency,
            "status": b.status,
            "runs": len(b.runs),
            "checks": [dataclasses.asdict(c) | {"percent": c.percent} for c in b.checks],
        }
        for b in (result.budgets if result is not None else ())
    ]
    periods = [dataclasses.asdict(p) | {"measured_share": p.measured_share} for p in o["periods"]]
    return _json(
        {
            "experiments": [{"id": k, "name": v} for k, v in o["experiments"].items()],
            "months": periods,
            "budgets": budgets,
            "budget_note": o["budget_note"],
        }
    )


def _comparison() -> tuple[str, str, Any, list[str]]:
    from green_mlops.compare import UnknownBaseline, compare

    exp_id, name = data.experiment(_experiment_id())
    records = data.runs({exp_id: name})
    metric, mode = _arg("metric"), _mode()
    candidates = sorted(
        {k for r in records for k in r.metrics if not k.startswith(("green/", "system/"))}
    )
    if "metric" not in request.args:  # the quality the runs were monitored by, if logged
        said = Counter(
            r.tags["green.quality"].split(" ")[0] for r in records if "green.quality" in r.tags
        )
        said = Counter({k: n for k, n in said.items() if k in candidates})
        if said:
            metric = said.most_common(1)[0][0]
            if "mode" not in request.args:
                quality = next(
                    r.tags["green.quality"]
                    for r in records
                    if r.tags.get("green.quality", "").split(" ")[0] == metric
                )
                mode = "min" if "(min)" in quality else "max"
    if metric and metric not in candidates:
        raise BadRequest(
            400,
            f"metric={metric!r}: no run of {name!r} has it "
            f"({', '.join(candidates[:10]) or 'no metric'})",
        )
    try:
        comparison = compare(
            records, metric=metric or None, mode=mode, baseline=_arg("baseline") or None
        )
    except UnknownBaseline as exc:
        raise BadRequest(400, str(exc)) from None
    return exp_id, name, comparison, candidates


@_route("/experiment", "experiment")
def experiment() -> Response:
    exp_id, name, comparison, candidates = _comparison()
    return _html(pages.experiment_page(exp_id, name, comparison, candidates))


@_route("/api/compare", "experiment")
def api_compare() -> Response:
    exp_id, name, comparison, _ = _comparison()
    return _json({"experiment": {"id": exp_id, "name": name}, **comparison.as_dict()})


def _run() -> tuple[Any, str, bool]:
    from dataclasses import replace

    run_id = _arg("run_id", required=True)
    if not run_id.isalnum():
        raise BadRequest(400, f"run_id={run_id!r}: a run id is letters and digits")
    record, entity = data.run(run_id)
    report = data.read_report(entity)
    if report is not None:
        record = replace(record, report=report)
    return record, entity.info.experiment_id, report is not None


@_route("/run", "run")
def run() -> Response:
    record, exp_id, has_report = _run()
    return _html(pages.run_page(record, exp_id, has_report))


@_route("/api/run", "run")
def api_run() -> Response:
    import dataclasses

    record, exp_id, _ = _run()
    return _json(dataclasses.asdict(record) | {"experiment_id": exp_id})


def _static(name: str) -> Callable[[], Response]:
    def view() -> Response:
        folder = files("green_mlops.integrations.mlflow.app").joinpath("static")
        text = folder.joinpath(name).read_text(encoding="utf-8")
        response = Response(text, mimetype=_STATIC[name])
        response.headers["Cache-Control"] = "max-age=300"
        return response

    view.__name__ = "static_" + name.replace(".", "_")
    return view


for _name in _STATIC:
    _route(f"/static/{_name}", "login")(_static(_name))


def register_validators() -> None:
    """Give basic-auth a validator for each green path: without one, its fail-closed default
    refuses the path to every user but admins. An experiment's pages need read permission on
    ``?experiment_id=``, a run's on ``?run_id=`` (basic-auth's own validators); the overview
    and the static files a login (the overview then lists the readable experiments only)."""
    from mlflow.server import auth

    validators = {
        "experiment": auth.validate_can_read_experiment,
        "run": auth.validate_can_read_run,
        "login": lambda: True,
    }
    for path, needs in PAGES.items():
        auth.BEFORE_REQUEST_VALIDATORS[(path, "GET")] = validators[needs]
