"""MLflow integration: every run gets energy, carbon and efficiency metrics, with no code change.

    GREEN_MLOPS_ENABLE=1 python train.py          # any script that uses MLflow
    # or, from code:
    from green_mlops.integrations.mlflow import autolog
    autolog()

How it works: the public ``MlflowClient.create_run`` and ``MlflowClient.set_terminated`` are
wrapped (every path goes through them: fluent ``start_run``/``end_run``, ``with start_run()``,
MLflow's own atexit ``end_run``, Lightning's ``MLFlowLogger``), and ``start_run`` too, for runs
resumed with ``start_run(run_id=...)``, which do not create a run. Each run gets a
:class:`~green_mlops.session.Measurement` from creation to termination; a single background
thread sends each run's totals and power series with one ``log_batch`` per logging interval,
and the final values are sent synchronously *before* the run is marked terminated.

If the tracking server is unreachable or fails, training goes on: the batch is appended to a
spool file (``<cache_dir>/spool/<run_id>.jsonl``) and replayed at the next interval, at the
end, or by ``green-mlops sync``. Metric writes are idempotent in MLflow (same key, value,
timestamp and step), so a replay never duplicates a value.

Nested runs: a run's ``green/energy_kwh`` (and carbon, cost, embodied) is its *exclusive*
energy: the energy of its nested child runs in this process is subtracted and reported in
the children, so summing ``green/energy_kwh`` over all runs never double counts. A parent
also logs ``green/inclusive/...`` totals. Concurrent sibling runs in threads each measure the
whole machine while they run (energy cannot be split between them): their sum double counts,
and each carries the tag ``green.concurrent_runs``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from green_mlops import session
from green_mlops.config import Settings
from green_mlops.metrics import POWER_KEY
from green_mlops.session import Measurement, Result

log = logging.getLogger("green_mlops")

__all__ = ["OWNER", "autolog", "disable", "replay_spool", "tracked_runs"]

#: Owner name in the session registry: runs measured by this integration.
OWNER = "mlflow"
REPORT_ARTIFACT = "green/report.json"
TIMELINE_ARTIFACT = "green/power.png"
_MAX_METRICS = 1000  # MLflow's log_batch limits
_MAX_TAGS = 100


@dataclass
class _Run:
    """A measured run and what has been sent for it."""

    run_id: str
    tracking_uri: str
    measurement: Measurement
    parent: _Run | None = None
    sent_power_until: float = 0.0
    sent_tags: dict[str, str] = field(default_factory=dict)
    dead: str | None = None  # the run was deleted or is unwritable: stop sending
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings: Settings | None = None
        self.originals: dict[str, Any] = {}
        self.runs: dict[str, _Run] = {}
        self.error: Exception | None = None  # a ConfigError to raise at run creation
        self.sink: _Sink | None = None


_state = _State()


# --- enabling -------------------------------------------------------------------------------


def autolog(settings: Settings | None = None, **overrides: Any) -> None:
    """Measure every MLflow run created or resumed from now on in this process.

    Raises ConfigError at once for a bad setting (nothing is instrumented then). Idempotent;
    a second call replaces the settings for runs created afterwards.
    """
    resolved = (
        settings.replace(**overrides)
        if settings and overrides
        else (settings or Settings.load(**overrides))
    )
    with _state.lock:
        _state.settings = resolved
        _state.error = None
        _instrument()


def autolog_from_env() -> None:
    """The entry-point path: GREEN_MLOPS_ENABLE is set. A bad configuration is raised when a run
    is about to be created (so no run is left RUNNING), not during ``import mlflow``."""
    from green_mlops.config import ConfigError

    with _state.lock:
        if _state.originals:
            return
        try:
            settings = Settings.load()
        except ConfigError as exc:
            _state.error = exc
            _instrument()
            return
        if settings.enable:
            _state.settings = settings
            _instrument()


def disable() -> None:
    """Undo :func:`autolog`: restore MLflow's functions. Runs being measured are finished."""
    with _state.lock:
        runs = list(_state.runs.values())
        _restore()
        _state.settings = None
        _state.error = None
    for run in runs:
        _finish(run, status="FINISHED")


def tracked_runs() -> list[str]:
    """Ids of the runs measured right now."""
    with _state.lock:
        return list(_state.runs)


def _instrument() -> None:
    import mlflow
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking.client import MlflowClient

    if _state.originals:
        return
    _state.originals = {
        "create_run": MlflowClient.create_run,
        "set_terminated": MlflowClient.set_terminated,
        "start_run": fluent.start_run,
    }
    MlflowClient.create_run = _wrap_create_run(MlflowClient.create_run)  # type: ignore[method-assign]
    MlflowClient.set_terminated = _wrap_set_terminated(MlflowClient.set_terminated)  # type: ignore[method-assign]
    wrapped = _wrap_start_run(fluent.start_run)
    fluent.start_run = wrapped
    if getattr(mlflow, "start_run", None) is _state.originals["start_run"]:
        mlflow.start_run = wrapped


def _restore() -> None:
    if not _state.originals:
        return
    import mlflow
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking.client import MlflowClient

    MlflowClient.create_run = _state.originals["create_run"]  # type: ignore[method-assign]
    MlflowClient.set_terminated = _state.originals["set_terminated"]  # type: ignore[method-assign]
    if getattr(mlflow, "start_run", None) is fluent.start_run:
        mlflow.start_run = _state.originals["start_run"]
    fluent.start_run = _state.originals["start_run"]
    _state.originals = {}


# --- the wrappers ---------------------------------------------------------------------------


def _wrap_create_run(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = _active_settings()  # raises ConfigError before any run exists
        run = original(self, *args, **kwargs)
        if settings is not None:
            _begin(self, run.info.run_id, settings, parent_id=_parent_id(run))
        return run

    create_run.__green_mlops__ = True  # type: ignore[attr-defined]
    return create_run


def _wrap_set_terminated(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_terminated(self: Any, run_id: str, *args: Any, **kwargs: Any) -> Any:
        with _state.lock:
            run = _state.runs.get(run_id)
        if run is not None:
            status = kwargs.get("status") or (args[0] if args else None) or "FINISHED"
            _finish(run, status=str(status))  # final values land before FINISHED
        return original(self, run_id, *args, **kwargs)

    return set_terminated


def _wrap_start_run(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def start_run(*args: Any, **kwargs: Any) -> Any:
        run_id = kwargs.get("run_id") or (args[0] if args else None)
        if run_id:
            _active_settings()  # a bad configuration fails before the run is resumed
        active = original(*args, **kwargs)
        settings = _state.settings
        if run_id and settings is not None:
            with _state.lock:
                known = run_id in _state.runs
            if not known:
                from mlflow.tracking.client import MlflowClient

                _begin(MlflowClient(), str(run_id), settings, resumed=True)
        return active

    return start_run


def _active_settings() -> Settings | None:
    with _state.lock:
        if _state.error is not None:
            raise _state.error
        return _state.settings


def _parent_id(run: Any) -> str | None:
    try:
        return run.data.tags.get("mlflow.parentRunId")  # type: ignore[no-any-return]
    except Exception:
        return None


# --- per-run lifecycle ----------------------------------------------------------------------


def _begin(
    client: Any,
    run_id: str,
    settings: Settings,
    *,
    parent_id: str | None = None,
    resumed: bool = False,
) -> None:
    """Start measuring ``run_id``. Never raises into the caller."""
    try:
        tracking_uri = str(client.tracking_uri)
        measurement, created = session.claim(run_id, OWNER, lambda: Measurement(settings).start())
        if not created:
            return  # another integration (the Lightning callback) measures and logs it
        run = _Run(run_id, tracking_uri, measurement)
        if resumed:
            run.measurement.offsets = _previous_totals(client, run_id)
        with _state.lock:
            run.parent = _state.runs.get(parent_id) if parent_id else None
            if run.parent is not None:
                run.parent.measurement.tracker.enter("nested_runs")
            _state.runs[run_id] = run
            concurrent = sum(1 for r in _state.runs.values() if r.parent is None)
            if _state.sink is None or not _state.sink.is_alive():
                _state.sink = _Sink(settings.log_interval_s)
                _state.sink.start()
        if concurrent > 1:
            for other in list(_state.runs.values()):
                other.measurement.extra_tags["green.concurrent_runs"] = str(concurrent)
    except Exception:
        log.exception("green-mlops: could not start measuring MLflow run %s", run_id)


def _previous_totals(client: Any, run_id: str) -> dict[str, float]:
    """The green totals an earlier segment of a resumed run logged (added to the new ones)."""
    try:
        metrics = client.get_run(run_id).data.metrics
    except Exception:
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("green/") and k.endswith(("_kwh", "_g", "_s", "/cost", "/flops"))
    }


def _finish(run: _Run, *, status: str) -> None:
    """Stop measuring and send the final values synchronously. Never raises."""
    try:
        with _state.lock:
            if _state.runs.get(run.run_id) is not run:
                return
            del _state.runs[run.run_id]
        result = run.measurement.stop()
        if run.parent is not None:
            run.parent.measurement.add_child(result)
            run.parent.measurement.tracker.exit("nested_runs")
        extra = {"green.run_status": status}
        _send(run, result, final=True, extra_tags=extra)
    except Exception:
        log.exception("green-mlops: could not finish MLflow run %s", run.run_id)
    finally:
        session.release(run.run_id)


# --- sending ---------------------------------------------------------------------------------


class _Sink(threading.Thread):
    """Sends every measured run's values once per logging interval (one ``log_batch`` each)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name="green-mlops-mlflow", daemon=True)
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            with _state.lock:
                runs = list(_state.runs.values())
                if not runs:
                    _state.sink = None
                    return
            for run in runs:
                try:
                    _send(run, run.measurement.result(), final=False)
                except Exception:
                    log.exception("green-mlops: periodic logging failed for run %s", run.run_id)


def _batch(run: _Run, result: Result, *, final: bool, extra_tags: dict[str, str]) -> dict[str, Any]:
    """One log_batch payload as plain data (so it can be spooled as JSON)."""
    now_ms = int(time.time() * 1000)
    # step = seconds since the run began (a resumed run continues from its earlier segments)
    step = int(result.metrics.get("green/duration_s", result.snapshot.duration_s))
    metrics = [(k, v, now_ms, step) for k, v in result.metrics.items()]
    for t, watts in result.power:
        if t > run.sent_power_until:
            offset = step - int(result.snapshot.duration_s)
            metrics.append(
                (POWER_KEY, watts, int(t * 1000), offset + int(t - result.snapshot.started_at))
            )
    tags = {**result.tags, **run.measurement.extra_tags, **extra_tags}
    tags = {k: v for k, v in tags.items() if run.sent_tags.get(k) != v}
    return {
        "run_id": run.run_id,
        "tracking_uri": run.tracking_uri,
        "metrics": metrics,
        "tags": tags,
        "report": result.report() if final else None,
        "power_until": max((t for t, _ in result.power), default=run.sent_power_until),
    }


def _send(
    run: _Run, result: Result, *, final: bool, extra_tags: dict[str, str] | None = None
) -> None:
    with run.lock:
        if run.dead or run.finished:
            return
        run.finished = final
        batch = _batch(run, result, final=final, extra_tags=extra_tags or {})
        spool = _spool_path(run.measurement.settings, run.run_id)
        try:
            replay_spool(spool)
            _deliver(batch, final=final)
        except _RunGone as exc:
            run.dead = str(exc)
            log.warning(
                "green-mlops: run %s can no longer be written (%s); green metrics for it stop here",
                run.run_id,
                exc,
            )
            return
        except Exception as exc:
            _append(spool, batch)
            log.warning(
                "green-mlops: could not send green metrics of run %s to %s (%s); kept in %s "
                "and sent when the server answers again (or run `green-mlops sync`)",
                run.run_id,
                run.tracking_uri,
                type(exc).__name__,
                spool,
            )
        run.sent_power_until = batch["power_until"]
        run.sent_tags.update(batch["tags"])


class _RunGone(Exception):
    pass


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking.client import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _deliver(batch: dict[str, Any], *, final: bool) -> None:
    """Send one spooled-format batch. Raises _RunGone for a deleted run, else any error."""
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    client = _client(batch["tracking_uri"])
    run_id = batch["run_id"]
    metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in batch["metrics"]]
    tags = [RunTag(k, str(v)) for k, v in batch["tags"].items()]
    metric_chunks = [metrics[i : i + _MAX_METRICS] for i in range(0, len(metrics), _MAX_METRICS)]
    tag_chunks = [tags[i : i + _MAX_TAGS] for i in range(0, len(tags), _MAX_TAGS)]
    try:
        for i in range(max(len(metric_chunks), len(tag_chunks))):
            client.log_batch(
                run_id,
                metrics=metric_chunks[i] if i < len(metric_chunks) else [],
                tags=tag_chunks[i] if i < len(tag_chunks) else [],
                synchronous=True,
            )
        if batch.get("report") is not None:
            client.log_dict(run_id, batch["report"], REPORT_ARTIFACT)
            if final:
                _log_power_figure(client, run_id, batch["report"])
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or _deleted(client, run_id):
            raise _RunGone(f"{exc.error_code}: the run was deleted") from None
        raise


def _deleted(client: Any, run_id: str) -> bool:
    try:
        return bool(client.get_run(run_id).info.lifecycle_stage == "deleted")
    except Exception:
        return False


def _log_power_figure(client: Any, run_id: str, report: dict[str, Any]) -> None:
    """A power-over-time image per component, from the report's timeline."""
    timeline = report["energy"]["timeline"]
    if len(timeline) < 2:
        return
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:
        return
    t0 = timeline[0]["time"]
    components = sorted({c for p in timeline for c in p["joules_by_component"]})
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for component in components:
        xs, ys = [], []
        for a, b in itertools.pairwise(timeline):
            dt = b["time"] - a["time"]
            if dt > 0:
                joules = b["joules_by_component"].get(component, 0.0) - a[
                    "joules_by_component"
                ].get(component, 0.0)
                xs.append(b["time"] - t0)
                ys.append(joules / dt)
        ax.step(xs, ys, where="pre", label=component)
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("power (W)")
    ax.set_title("green-mlops: power by component")
    ax.legend()
    fig.tight_layout()
    try:
        client.log_figure(run_id, fig, TIMELINE_ARTIFACT)
    finally:
        plt.close(fig)


# --- spool ----------------------------------------------------------------------------------

_spool_lock = threading.Lock()


def _spool_path(settings: Settings, run_id: str) -> Path:
    return settings.cache_dir / "spool" / f"{run_id}.jsonl"


def _append(path: Path, batch: dict[str, Any]) -> None:
    with _spool_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(batch) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def replay_spool(path: Path) -> int:
    """Send the batches kept in ``path`` (oldest first); delete it when all went through.

    Returns the number of batches sent. Raises on the first failure, keeping what is unsent.
    """
    with _spool_lock:
        if not path.exists():
            return 0
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    sent = 0
    for line in lines:
        batch = json.loads(line)
        try:
            _deliver(batch, final=batch.get("report") is not None)
        except _RunGone:
            pass  # the run was deleted: its values cannot land anywhere
        except Exception:
            with _spool_lock:
                path.write_text("\n".join(lines[sent:]) + "\n")
            raise
        sent += 1
    with _spool_lock:
        path.unlink(missing_ok=True)
    return sent
