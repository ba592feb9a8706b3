"""The MLflow plugin: every MLflow run of the process gets energy, carbon and efficiency metrics.

Wraps ``MlflowClient.create_run``/``set_terminated`` (and ``start_run`` for resumed runs), gives
each run a :class:`~green_mlops.session.Measurement`, written by :class:`~.writer.RunWriter`.
Lifecycle, nested runs, SIGTERM, rates, the spool: docs/mlflow-plugin.md."""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from green_mlops import job, nodes, session
from green_mlops.config import Settings
from green_mlops.extras import install_command
from green_mlops.integrations.mlflow.writer import (
    UPLOAD_WAIT_S,
    RunWriter,
    on_sigterm,
    wait_uploads,
)
from green_mlops.log import warn_once
from green_mlops.metrics import EXCLUSIVE_KEYS, is_additive
from green_mlops.pilot import check_estimate
from green_mlops.session import Measurement, Result

log = logging.getLogger(__name__)

__all__ = ["OWNER", "autolog", "autolog_from_env", "disable", "flush", "tracked_runs"]

#: Owner name in the session registry: runs measured by this integration.
OWNER = "mlflow"
#: Totals are sent at most every max(logging interval, this fraction of the run's age).
TOTALS_AGE_FRACTION = 0.005
#: A run created this many seconds after the ``start_time`` it is given records work done before
#: it existed (mlflow.sklearn's search candidates): it is not measured (docs/mlflow-plugin.md).
BACKDATED_S = 1.0
_LATE = "(e.g. mlflow.sklearn's search candidates): not measured, its energy is in the parent's"


@dataclass
class _Run:
    """A measured run, its writer, and its place among nested runs."""

    run_id: str
    writer: RunWriter
    measurement: Measurement
    parent: _Run | None = None
    # nested-run accounting: what the parent already left out for this run
    subtracted: dict[str, float] = field(default_factory=dict)
    in_parent: bool = False  # counted in the parent's open children
    # as a parent: children alive now, the finished ones of the current overlap cluster,
    # and this run's own (inclusive) energy when the cluster began
    open_children: int = 0
    cluster: list[dict[str, float]] = field(default_factory=list)
    cluster_start_kwh: float = 0.0
    concurrent: int = 1
    # rank 0 of a multi-node job: the other nodes' totals for this (top-level) run
    gather: nodes.RunGather | None = None


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings: Settings | None = None
        self.originals: dict[str, Any] = {}
        self.runs: dict[str, _Run] = {}
        self.lingering: dict[str, _Run] = {}  # terminated, still measured (may be revived)
        self.error: Exception | None = None  # a ConfigError to raise at run creation
        self.sink: _Sink | None = None
        self.exit_registered = False
        self.job: job.Job | None = None  # a multi-node job whose rank 0 gathers the nodes
        self.agent: nodes.NodeAgent | None = None  # another node's measuring process


# --- enabling -------------------------------------------------------------------------------


def autolog(settings: Settings | Mapping[str, Any] | None = None, **overrides: Any) -> None:
    """Measure every MLflow run created or resumed from now on in this process. Raises
    ConfigError at once for a bad setting (nothing instrumented). Idempotent; a second call sets
    later runs' settings. Without MLflow, a :class:`~green_mlops.GreenMlopsWarning` says so."""
    resolved = Settings.resolve(settings, **overrides)
    check_estimate()
    with _state.lock:
        if _instrument():
            _state.settings = resolved
            _state.error = None
            _join_nodes(resolved)


def autolog_from_env() -> None:
    """The entry-point path (GREEN_MLOPS_ENABLE): a bad configuration is raised at run creation."""
    from green_mlops.config import ConfigError

    with _state.lock:
        if _state.originals:
            return
        try:
            settings = Settings.load()
        except ConfigError as exc:
            if _instrument():
                _state.error = exc
            return
        if settings.enable and _instrument():
            _state.settings = settings
            _join_nodes(settings)


def _join_nodes(settings: Settings) -> None:
    """A multi-node job: rank 0 gathers the nodes' totals into its runs; each other node's
    measuring process measures its node for them (docs/multi-node.md). Holds ``_state.lock``."""
    current = job.Job.current()
    if not current.multi_node or _state.agent is not None or _state.job is not None:
        return
    if current.rank == 0:
        _state.job = current
        job.set_gathered(True)
    elif current.node != 0:  # each local rank may measure the node: the lowest alive does
        _state.agent = nodes.NodeAgent(
            current,
            lambda: Measurement(settings).start(),
            interval_s=settings.log_interval_s,
            location=settings.location,
            claim_delay_s=nodes.CLAIM_DELAY_S * (current.local_rank or 0),
        )
        job.set_gathered(True)
        _state.agent.start()


def disable() -> None:
    """Undo :func:`autolog`: restore MLflow's functions. Runs being measured end their
    measurement and their reports are sent (waiting at most :data:`~.writer.UPLOAD_WAIT_S`);
    the runs themselves go on, so no outcome (``green.run_status``) is claimed for them."""
    with _state.lock:
        runs = list(_state.runs.values())
        _restore()
        _state.settings = None
        _state.error = None
    for run in runs:
        _finish(run, status=None)
    _discard_lingering(keep=None)
    flush()


def tracked_runs() -> list[str]:
    """Ids of the runs measured right now."""
    with _state.lock:
        return list(_state.runs)


def forecast(
    progress: float,
    *,
    run_id: str | None = None,
    step: int | None = None,
    max_duration_s: float | None = None,
) -> Any:
    """The totals of run ``run_id`` (default: the active run) when ``progress`` (0, 1] of its
    loop is done: a :class:`~green_mlops.forecast.Forecast` with a band (docs/forecasts.md),
    also logged as ``green/forecast/*`` at ``step`` (default: the run's seconds). None before a
    steady state or for a run not measured (said once). Call it every few hundred steps.
    Raises ValueError for a ``progress`` outside (0, 1]."""
    from green_mlops.forecast import check_request

    check_request(progress, max_duration_s)
    if run_id is None:
        import mlflow

        active = mlflow.active_run()
        run_id = active.info.run_id if active is not None else None
    with _state.lock:
        run = _state.runs.get(run_id) if run_id is not None else None
    if run is None:
        what = f"run {run_id}" if run_id is not None else "no active MLflow run"
        warn_once(
            f"forecast(): {what} is not measured by green-mlops: start it with "
            "GREEN_MLOPS_ENABLE=1 (or autolog()) and call forecast() inside it",
            fix=True,
        )
        return None
    found = run.measurement.forecast(progress, max_duration_s=max_duration_s)
    if found is not None:
        run.writer.series(found.metrics(), int(found.elapsed_s) if step is None else step)
    return found


def flush(timeout: float = UPLOAD_WAIT_S) -> bool:
    """Wait (at most ``timeout`` s; done at exit) for ended runs' reports to be sent: all were?"""
    return wait_uploads(timeout)


def _instrument() -> bool:
    """Wrap MLflow's functions (once). False, said once, when MLflow is not installed."""
    try:
        import mlflow
        import mlflow.tracking.fluent as fluent
        from mlflow.tracking.client import MlflowClient
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("mlflow"):
            raise
        warn_once(
            f"MLflow is not installed, so no run is measured (GREEN_MLOPS_ENABLE, autolog()); "
            f"install it with: {install_command('mlflow')}",
            fix=True,
            stacklevel=3,  # the caller of autolog()
        )
        return False
    if _state.originals:
        return True
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
    if not _state.exit_registered:
        _state.exit_registered = True
        atexit.register(_at_exit)
    return True


def _restore() -> None:
    if not _state.originals:
        return
    import mlflow
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking.client import MlflowClient

    for name in ("create_run", "set_terminated"):
        setattr(MlflowClient, name, _state.originals[name])
    if getattr(mlflow, "start_run", None) is fluent.start_run:
        mlflow.start_run = _state.originals["start_run"]
    fluent.start_run = _state.originals["start_run"]
    _state.originals = {}


# --- the wrappers ---------------------------------------------------------------------------


def _wrap_create_run(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = _active_settings()  # raises ConfigError before any run exists
        call = signature.bind(self, *args, **kwargs)
        start = call.arguments.get("start_time")
        late = time.time() - start / 1000 if settings is not None and start else 0.0
        if late > BACKDATED_S:  # its work is over: a number for the logging seconds would lie
            call.arguments["tags"] = {**(call.arguments.get("tags") or {}), **_backdated(late)}
        run = original(*call.args, **call.kwargs)
        if settings is not None and late <= BACKDATED_S:
            _begin(self, run.info.run_id, settings, parent_id=_parent_id(run))
        return run

    create_run.__green_mlops__ = True  # type: ignore[attr-defined]
    return create_run


def _wrap_set_terminated(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def set_terminated(self: Any, run_id: str, *args: Any, **kwargs: Any) -> Any:
        with _state.lock:
            run = _state.runs.get(run_id) or _state.lingering.get(run_id)
        if run is not None:
            status = kwargs.get("status") or (args[0] if args else None) or "FINISHED"
            # final values land before the status; server down: the termination is spooled
            if _finish(run, status=str(status), terminating=True):
                return None
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
                lingering = _state.lingering.get(run_id)
            if lingering is not None:
                _revive(lingering)
            elif not known:
                from mlflow.tracking.client import MlflowClient

                _begin(MlflowClient(), str(run_id), settings, resumed=True)
        return active

    return start_run


def _active_settings() -> Settings | None:
    with _state.lock:
        if _state.error is not None:
            raise _state.error
        if _state.settings is not None:
            check_estimate()  # GREEN_MLOPS_ESTIMATE: a file made before the run, or refused
        return _state.settings


def _backdated(late: float) -> dict[str, str]:
    why = f"created {late:.3g} s after its start_time, after the work it records {_LATE}"
    return {"green.not_reported": f"green/*: {why}", "green.measured_span": f"none: {why}"}


def _parent_id(run: Any) -> str | None:
    tags = getattr(getattr(run, "data", None), "tags", None) or {}
    return tags.get("mlflow.parentRunId")


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
        _discard_lingering(keep=run_id)
        previous = None
        if resumed:
            with contextlib.suppress(Exception):
                previous = client.get_run(run_id)
            parent_id = parent_id or _parent_id(previous)
        measurement, created = session.claim(run_id, OWNER, lambda: Measurement(settings).start())
        if not created:
            return  # another integration (the Lightning callback) measures and logs it
        run = _Run(run_id, RunWriter(str(client.tracking_uri), run_id, settings), measurement)
        if previous is not None:
            run.measurement.extra_tags["green.run_status"] = "RUNNING"  # not the last end's
            run.measurement.offsets = _previous_totals(previous)
            # the earlier segments are not in this process's parent: it leaves out ours only
            run.subtracted = {
                k: v for k, v in run.measurement.offsets.items() if k in EXCLUSIVE_KEYS
            }
        with _state.lock:
            run.parent = _state.runs.get(parent_id) if parent_id else None
            if _state.job is not None and run.parent is None:
                run.gather = nodes.RunGather(_state.job, interval_s=settings.log_interval_s)
                run.gather.open()
            _state.runs[run_id] = run
            _activate(run)
            on_sigterm(_kill_runs)
            _start_sink(settings.log_interval_s)
    except Exception:
        log.exception("green-mlops: could not start measuring MLflow run %s", run_id)


def _start_sink(interval_s: float) -> None:
    if _state.sink is None or not _state.sink.is_alive():  # holds ``_state.lock``
        _state.sink = _Sink(interval_s)
        _state.sink.start()


def _activate(run: _Run) -> None:
    """Bookkeeping of a run that starts (or resumes) being measured. Holds ``_state.lock``."""
    parent = run.parent
    if parent is not None and _state.runs.get(parent.run_id) is parent:
        if parent.open_children == 0:
            parent.cluster_start_kwh = parent.measurement.tracker.snapshot().kwh
        parent.open_children += 1
        parent.measurement.tracker.enter("nested_runs")
        run.in_parent = True
    siblings = [r for r in _state.runs.values() if r.parent is run.parent]
    if len(siblings) > 1:
        for other in siblings:
            other.concurrent = max(other.concurrent, len(siblings))
            other.measurement.extra_tags["green.concurrent_runs"] = str(other.concurrent)


def _child_done(run: _Run, result: Result) -> None:
    """Leave a nested run's energy out of its parent: exactly its totals when it ran alone,
    the parent's own energy over the union of their time when several overlapped."""
    parent = run.parent
    if parent is None:
        return
    inclusive = {
        k: result.metrics.get(k.replace("green/", "green/inclusive/", 1), result.metrics[k])
        for k in EXCLUSIVE_KEYS
        if k in result.metrics
    }
    delta = {k: v - run.subtracted.get(k, 0.0) for k, v in inclusive.items()}
    run.subtracted = inclusive
    with _state.lock:
        if not run.in_parent:
            parent.measurement.subtract(delta)
            return
        run.in_parent = False
        parent.cluster.append(delta)
        parent.open_children -= 1
        parent.measurement.tracker.exit("nested_runs")
        if parent.open_children > 0:
            return
        cluster, parent.cluster = parent.cluster, []
        if len(cluster) == 1:
            parent.measurement.subtract(cluster[0])
            return
        union = parent.measurement.tracker.snapshot().kwh - parent.cluster_start_kwh
    summed = {k: sum(c.get(k, 0.0) for c in cluster) for k in {k for c in cluster for k in c}}
    energy = summed.get("green/energy_kwh", 0.0)
    share = min(1.0, max(0.0, union / energy)) if energy > 0 else 0.0
    parent.measurement.subtract({k: v * share for k, v in summed.items()})


def _previous_totals(previous: Any) -> dict[str, float]:
    """The green totals an earlier segment of a resumed run logged (added to the new ones)."""
    metrics = getattr(getattr(previous, "data", None), "metrics", None) or {}
    return {k: float(v) for k, v in metrics.items() if is_additive(k)}


def _finish(run: _Run, *, status: str | None, terminating: bool = False) -> bool:
    """Send the final values synchronously; the run then lingers. Never raises. True: the server
    was unreachable and the termination spooled (the caller skips MLflow's ``set_terminated``)."""
    try:
        with _state.lock:
            if _state.runs.get(run.run_id) is run:
                del _state.runs[run.run_id]
            elif _state.lingering.get(run.run_id) is run:
                del _state.lingering[run.run_id]  # terminated again: the time since is its
            else:
                return False
        result = run.measurement.checkpoint()
        _child_done(run, result)
        if run.gather is not None:
            run.gather.close()  # bounded wait for the nodes' final totals
        extra = {"green.run_status": status} if status else {}
        outcome = _send(run, result, final=True, extra_tags=extra)
        spooled = False
        if outcome == "down" and terminating and status:
            spooled = run.writer.terminate(status)
        if run.writer.dead is None:
            with _state.lock:
                _state.lingering[run.run_id] = run
        else:
            run.measurement.close()
            session.release(run.run_id)
        return spooled
    except Exception:
        log.exception("green-mlops: could not finish MLflow run %s", run.run_id)
        with contextlib.suppress(Exception):  # never leave a tracker sampling for nobody
            run.measurement.close()
        session.release(run.run_id)
        return False


def _revive(run: _Run) -> None:
    """A lingering run is resumed (``start_run(run_id=...)``): measure it live again."""
    try:
        with _state.lock:
            if _state.lingering.get(run.run_id) is not run:
                return
            del _state.lingering[run.run_id]
        _discard_lingering(keep=run.run_id)
        run.measurement.extra_tags["green.run_status"] = "RUNNING"  # not the last end's
        with _state.lock:
            _state.runs[run.run_id] = run
            _activate(run)
            _start_sink(run.measurement.settings.log_interval_s)
    except Exception:
        log.exception("green-mlops: could not resume measuring MLflow run %s", run.run_id)


def _kill_runs() -> None:
    """SIGTERM (:func:`.writer.on_sigterm`): end the measured runs KILLED, children first."""
    from mlflow.tracking.client import MlflowClient

    with _state.lock:
        runs = list(_state.runs.values())[::-1]
    for run in runs:  # newest first: children before their parents, as MLflow ends them
        with contextlib.suppress(Exception):
            MlflowClient(run.writer.tracking_uri).set_terminated(run.run_id, "KILLED")


def _discard_lingering(*, keep: str | None) -> None:
    """Another run starts: the terminated runs stop being measured (nothing more is sent)."""
    with _state.lock:
        gone = [r for k, r in _state.lingering.items() if k != keep]
        for run in gone:
            del _state.lingering[run.run_id]
    for run in gone:
        run.measurement.close()
        session.release(run.run_id)


def _at_exit() -> None:
    """Interpreter exit: end MLflow's active run as its own atexit handler would (run after
    this one), finish revived runs, stop the lingering ones; then the writer's handler runs."""
    try:
        if _state.originals:
            import mlflow

            with contextlib.suppress(Exception):
                if mlflow.active_run() is not None:
                    mlflow.end_run()
        with _state.lock:
            runs = list(_state.runs.values())
        for run in runs:
            _finish(run, status=None)
        _discard_lingering(keep=None)
    except Exception:
        log.exception("green-mlops: finishing at interpreter exit failed")


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


def totals_due(last: float | None, age: float, interval: float) -> bool:
    """Whether the totals are sent at ``age`` s (last sent at ``last``): every logging
    interval while the run is young, then every :data:`TOTALS_AGE_FRACTION` of its age."""
    if last is None:
        return True
    return age - last >= max(interval, TOTALS_AGE_FRACTION * age) - interval / 2


def _send(
    run: _Run, result: Result, *, final: bool, extra_tags: dict[str, str] | None = None
) -> str:
    """Queue what is due of ``result`` and flush it (see :meth:`.RunWriter.flush`); "idle"
    for a periodic send of a run finished meanwhile (its final values are sent)."""
    with run.writer.lock:
        if not final and _state.runs.get(run.run_id) is not run:
            return "idle"
        _queue(run, result, final=final, extra_tags=extra_tags or {})
        return run.writer.flush(report_later=True)


def _queue(run: _Run, result: Result, *, final: bool, extra_tags: Mapping[str, str]) -> None:
    """The totals when due (always when final), new power points, changed tags, the report."""
    writer, gather = run.writer, run.gather
    gathered_by = run.measurement.extra_tags.get("green.job.gathered_by")
    if gather is not None and gathered_by is None:  # every node's totals: the job's
        result = nodes.merge(
            result,
            gather.blobs if gather.closed else gather.live(),
            gather.job,
            error=gather.error,
            final=final,
            functional_units=run.measurement.functional_units,
            location=run.measurement.settings.location,
        )
    # the run's age: its seconds since it began (a resumed run continues its earlier segments)
    age = result.metrics.get("green/duration_s", result.snapshot.duration_s)
    if final or totals_due(writer.totals_sent_at, age, run.measurement.settings.log_interval_s):
        writer.totals(result.metrics, age)
    writer.power(
        result.power, started_at=result.snapshot.started_at - (age - result.snapshot.duration_s)
    )
    delivery = {"green.delivery": writer.delivery} if writer.delivery else {}
    writer.tags({**result.tags, **run.measurement.extra_tags, **extra_tags, **delivery})
    if final:
        writer.report(result.report())


_state = _State()
