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
and the final values are sent synchronously *before* the run is marked terminated; the report
and the power chart follow from a background thread (joined, bounded, at interpreter exit, or
by :func:`flush`).

Rates: the power series ``system/green/power_w`` has one point per timeline interval (the
logging interval, halved in resolution as the tracker's timeline grows past 4096 points); the
cumulative totals are sent every logging interval while the run is young and then at most
every :data:`TOTALS_AGE_FRACTION` of its age (a 30-day run: ~1,700 sends, not 259,000).

Terminated, then terminated again: a terminated run's measurement goes on ("lingers") until
another run starts in this process, or the process exits; nothing is sent for it meanwhile. A
second ``set_terminated`` (Lightning's ``MLFlowLogger`` terminates the run after ``fit`` and
again after ``test``) sends its cumulative totals again: the time since the first termination
belongs to it. ``start_run(run_id=...)`` measures it live again (a resumed run). Plain writes
(``log_metric``, ``set_tag``) never revive a run: a post-hoc tag must not bill the machine's
energy to a finished run.

If the tracking server is unreachable or fails, training goes on: the batch is appended to a
spool file (``<cache_dir>/spool/<run_id>.jsonl``, see :mod:`.mlflow_spool`) and replayed at the
next interval, at the end, or by ``green-mlops sync``. green-mlops' own requests use bounded
retries (:data:`SEND_RETRIES`, :data:`SEND_TIMEOUT_S`), not MLflow's 7 (~4 minutes): when the
final values cannot be delivered, the termination is spooled with them and MLflow's own
``set_terminated`` request is not made, so ending a run with the server down returns within
about 10 s; ``green-mlops sync`` marks the run terminated (its real end time) later. Metric
writes are idempotent in MLflow (same key, value, timestamp and step): a replay never
duplicates a value.

Nested runs: a run's ``green/energy_kwh`` (and carbon, cost, embodied) is its *exclusive*
energy: the energy of its nested child runs in this process is subtracted and reported in
the children, so summing ``green/energy_kwh`` over all runs never double counts. Children
alive at the same time (threads; ``mlflow.sklearn`` autologging of a parameter search) each
measure the whole machine: the parent subtracts the energy of the union of their time
(measured by its own tracker), not their sum, and they carry ``green.concurrent_runs``, as do
concurrent top-level runs. A parent also logs ``green/inclusive/...`` totals. A resumed run
keeps its ``mlflow.parentRunId`` parent.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from green_mlops import session
from green_mlops.config import Settings
from green_mlops.integrations import mlflow_spool as spool
from green_mlops.log import warn_once
from green_mlops.metrics import POWER_KEY
from green_mlops.session import ADDITIVE_KEYS, Measurement, Result

log = logging.getLogger("green_mlops")

__all__ = ["OWNER", "autolog", "disable", "flush", "replay_spool", "tracked_runs"]

#: Owner name in the session registry: runs measured by this integration.
OWNER = "mlflow"
REPORT_ARTIFACT = "green/report.json"
TIMELINE_ARTIFACT = "green/power.png"
_MAX_METRICS = 1000  # MLflow's log_batch limits
_MAX_TAGS = 100
#: Longest the last replay of spooled values may delay interpreter exit.
EXIT_REPLAY_S = 10.0
#: green-mlops' own requests to a tracking server: retries, backoff factor, timeout per try.
SEND_RETRIES = 1
SEND_BACKOFF_S = 0.5
SEND_TIMEOUT_S = 5.0
#: Totals are sent at most every max(logging interval, this fraction of the run's age).
TOTALS_AGE_FRACTION = 0.005
#: Longest wait at interpreter exit (or in :func:`flush`) for reports and charts being sent.
UPLOAD_WAIT_S = 10.0
_LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
_UPDATE_RUN = "/api/2.0/mlflow/runs/update"


@dataclass
class _Run:
    """A measured run and what has been sent for it."""

    run_id: str
    tracking_uri: str
    measurement: Measurement
    parent: _Run | None = None
    sent_power_until: float = 0.0
    sent_tags: dict[str, str] = field(default_factory=dict)
    totals_sent_at: float | None = None  # the run's age at the last send of its totals
    dead: str | None = None  # the run was deleted or is unwritable: stop sending
    lock: threading.Lock = field(default_factory=threading.Lock)
    # nested-run accounting: what the parent already left out for this run
    subtracted: dict[str, float] = field(default_factory=dict)
    in_parent: bool = False  # counted in the parent's open children
    # as a parent: children alive now, the finished ones of the current overlap cluster,
    # and this run's own (inclusive) energy when the cluster began
    open_children: int = 0
    cluster: list[dict[str, float]] = field(default_factory=list)
    cluster_start_kwh: float = 0.0
    concurrent: int = 1


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings: Settings | None = None
        self.originals: dict[str, Any] = {}
        self.runs: dict[str, _Run] = {}
        self.lingering: dict[str, _Run] = {}  # terminated, still measured (may be revived)
        self.error: Exception | None = None  # a ConfigError to raise at run creation
        self.sink: _Sink | None = None
        self.uploads = _Uploads()
        self.spooled: set[Path] = set()
        self.exit_registered = False


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
    """Undo :func:`autolog`: restore MLflow's functions. Runs being measured are finished and
    their reports sent (waiting at most :data:`UPLOAD_WAIT_S`)."""
    with _state.lock:
        runs = list(_state.runs.values())
        _restore()
        _state.settings = None
        _state.error = None
    for run in runs:
        _finish(run, status="FINISHED")
    _discard_lingering(keep=None)
    flush()


def tracked_runs() -> list[str]:
    """Ids of the runs measured right now."""
    with _state.lock:
        return list(_state.runs)


def flush(timeout: float = UPLOAD_WAIT_S) -> bool:
    """Wait (at most ``timeout`` s) for the reports and charts of ended runs to be sent.
    Returns whether all were. Done for you at interpreter exit."""
    return not _state.uploads.wait(timeout)


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
    if not _state.exit_registered:
        _state.exit_registered = True
        atexit.register(_at_exit)


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


def _original(name: str) -> Any:
    """MLflow's own ``MlflowClient.<name>`` (green-mlops' own termination must not recurse)."""
    from mlflow.tracking.client import MlflowClient

    return _state.originals.get(name) or getattr(MlflowClient, name)


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
            run = _state.runs.get(run_id) or _state.lingering.get(run_id)
        if run is not None:
            status = kwargs.get("status") or (args[0] if args else None) or "FINISHED"
            # final values land before the status changes; with the server down the
            # termination is spooled with them instead of waiting for MLflow's retries
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
        _discard_lingering(keep=run_id)
        tracking_uri = str(client.tracking_uri)
        previous = None
        if resumed:
            with contextlib.suppress(Exception):
                previous = client.get_run(run_id)
            parent_id = parent_id or _parent_id(previous)
        measurement, created = session.claim(run_id, OWNER, lambda: Measurement(settings).start())
        if not created:
            return  # another integration (the Lightning callback) measures and logs it
        run = _Run(run_id, tracking_uri, measurement)
        if previous is not None:
            run.measurement.offsets = _previous_totals(previous)
            # the earlier segments are not in this process's parent: it leaves out ours only
            run.subtracted = {
                k: v for k, v in run.measurement.offsets.items() if k in ADDITIVE_KEYS
            }
        with _state.lock:
            run.parent = _state.runs.get(parent_id) if parent_id else None
            _state.runs[run_id] = run
            _activate(run)
            if _state.sink is None or not _state.sink.is_alive():
                _state.sink = _Sink(settings.log_interval_s)
                _state.sink.start()
    except Exception:
        log.exception("green-mlops: could not start measuring MLflow run %s", run_id)


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
        for k in ADDITIVE_KEYS
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
    try:
        metrics = previous.data.metrics
    except Exception:
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("green/") and k.endswith(("_kwh", "_g", "_s", "/cost", "/flops"))
    }


def _finish(run: _Run, *, status: str | None, terminating: bool = False) -> bool:
    """Send the final values synchronously; the run then lingers. Never raises.

    Returns True when the server could not be reached and the termination was spooled (the
    caller then skips MLflow's own ``set_terminated``)."""
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
        extra = {"green.run_status": status} if status else {}
        outcome = _send(run, result, final=True, extra_tags=extra)
        spooled = False
        if outcome == "down" and terminating and status:
            spooled = _terminate_or_spool(run, status)
        if run.dead is None:
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


def _terminate_or_spool(run: _Run, status: str) -> bool:
    """The final values could not be sent: end the run with our bounded request (a slow server
    may answer now; MLflow's own termination then goes ahead too), else spool the termination
    for ``green-mlops sync``. Returns True when spooled (MLflow's own call is then skipped)."""
    record = {
        "run_id": run.run_id,
        "tracking_uri": run.tracking_uri,
        "terminate": {"status": status, "end_time": int(time.time() * 1000)},
    }
    try:
        _deliver(record)
        return False
    except Exception:
        pass
    path = spool.path_for(run.measurement.settings.cache_dir, run.run_id)
    if not spool.append(path, record):
        return False
    _state.spooled.add(path)
    log.warning(
        "green-mlops: %s is unreachable; run %s will be marked %s by `green-mlops sync` "
        "(kept in %s)",
        _shown(run.tracking_uri),
        run.run_id,
        status,
        path,
    )
    return True


def _revive(run: _Run) -> None:
    """A lingering run is resumed (``start_run(run_id=...)``): measure it live again."""
    try:
        with _state.lock:
            if _state.lingering.get(run.run_id) is not run:
                return
            del _state.lingering[run.run_id]
        _discard_lingering(keep=run.run_id)
        with _state.lock:
            _state.runs[run.run_id] = run
            _activate(run)
            if _state.sink is None or not _state.sink.is_alive():
                _state.sink = _Sink(run.measurement.settings.log_interval_s)
                _state.sink.start()
    except Exception:
        log.exception("green-mlops: could not resume measuring MLflow run %s", run.run_id)


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
    """Interpreter exit: end MLflow's active run as its own atexit handler would (that one runs
    after this), finish revived runs, stop the lingering ones, send what is left (bounded)."""
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
        for batch, path in _state.uploads.wait(UPLOAD_WAIT_S):
            if spool.append(path, batch):
                _state.spooled.add(path)
        # One last try, until the server fails to answer, bounded: an artifact store that
        # hangs retries for minutes inside MLflow. What is not sent stays for `green-mlops sync`.
        last_try = threading.Thread(target=_replay_spooled, name="green-mlops-exit", daemon=True)
        last_try.start()
        last_try.join(EXIT_REPLAY_S)
    except Exception:
        log.exception("green-mlops: finishing at interpreter exit failed")


def _replay_spooled() -> None:
    for path in sorted(_state.spooled):
        try:
            replay_spool(path)
        except (spool.SpoolBusy, spool.SpoolUnusable):
            continue
        except Exception:
            break


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


def _batch(
    run: _Run, result: Result, *, final: bool, extra_tags: dict[str, str]
) -> dict[str, Any] | None:
    """One log_batch payload as plain data (so it can be spooled as JSON); None: nothing due."""
    now_ms = int(time.time() * 1000)
    # step = seconds since the run began (a resumed run continues from its earlier segments)
    age = result.metrics.get("green/duration_s", result.snapshot.duration_s)
    step = int(age)
    totals = final or totals_due(run.totals_sent_at, age, run.measurement.settings.log_interval_s)
    metrics = (
        [(k, v, now_ms, step) for k, v in result.metrics.items() if math.isfinite(v)]
        if totals
        else []
    )
    for t, watts in result.power:
        if t > run.sent_power_until and math.isfinite(watts):
            offset = step - int(result.snapshot.duration_s)
            metrics.append(
                (POWER_KEY, watts, int(t * 1000), offset + int(t - result.snapshot.started_at))
            )
    tags = {**result.tags, **run.measurement.extra_tags, **extra_tags}
    tags = {k: v for k, v in tags.items() if run.sent_tags.get(k) != v}
    if not metrics and not tags and not final:
        return None
    return {
        "run_id": run.run_id,
        "tracking_uri": run.tracking_uri,
        "metrics": metrics,
        "tags": tags,
        "report": result.report() if final else None,
        "power_until": max((t for t, _ in result.power), default=run.sent_power_until),
        "totals_at": age if totals else None,
    }


def _send(
    run: _Run, result: Result, *, final: bool, extra_tags: dict[str, str] | None = None
) -> str:
    """Deliver (or spool) one batch. Returns "sent"; "down" (no answer from the server) or
    "unsent" (refused), spooled either way when the spool can be used; "gone"; or "idle"."""
    with run.lock:
        if run.dead:
            return "gone"
        if not final and _state.runs.get(run.run_id) is not run:
            return "idle"  # finished meanwhile: its final values are sent
        batch = _batch(run, result, final=final, extra_tags=extra_tags or {})
        if batch is None:
            return "idle"
        path = spool.path_for(run.measurement.settings.cache_dir, run.run_id)
        outcome = "sent"
        try:
            try:
                replay_spool(path)
            except (spool.SpoolBusy, spool.SpoolUnusable) as exc:
                if isinstance(exc, spool.SpoolUnusable):
                    reason = getattr(exc.__cause__, "strerror", None) or str(exc)
                    warn_once(f"the spool {path.parent} cannot be read ({reason}); sending anyway")
            _deliver({**batch, "report": None})  # report and chart: from another thread
        except _RunGone as exc:
            run.dead = str(exc)
            log.warning(
                "green-mlops: run %s can no longer be written (%s); green metrics for it stop here",
                run.run_id,
                exc,
            )
            return "gone"
        except Exception as exc:
            outcome = "down" if _unreachable(exc, run.tracking_uri) else "unsent"
            if spool.append(path, batch):
                _state.spooled.add(path)
                log.warning(
                    "green-mlops: could not send green metrics of run %s to %s (%s); kept in %s "
                    "and sent when the server answers again (or run `green-mlops sync`)",
                    run.run_id,
                    _shown(run.tracking_uri),
                    type(exc).__name__,
                    path,
                )
        else:
            if batch["report"] is not None:
                _upload_later(run, batch, path)
        run.sent_power_until = batch["power_until"]
        run.sent_tags.update(batch["tags"])
        if batch["totals_at"] is not None:
            run.totals_sent_at = batch["totals_at"]
        return outcome


def _upload_later(run: _Run, batch: dict[str, Any], path: Path) -> None:
    """The report and the chart, sent from a background thread (spooled if that fails)."""
    artifacts = {
        "run_id": run.run_id,
        "tracking_uri": run.tracking_uri,
        "metrics": [],
        "tags": {},
        "report": batch["report"],
        "power_until": batch["power_until"],
    }
    _state.uploads.put(artifacts, path)


class _Uploads:
    """One background thread sends the queued reports and charts, oldest first."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: list[tuple[dict[str, Any], Path]] = []
        self.thread: threading.Thread | None = None

    def put(self, artifacts: dict[str, Any], path: Path) -> None:
        with self.cond:
            self.pending.append((artifacts, path))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._work, name="green-mlops-report", daemon=True
                )
                self.thread.start()

    def wait(self, timeout: float) -> list[tuple[dict[str, Any], Path]]:
        """Wait until all are sent or ``timeout`` passed; returns those not sent."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            return list(self.pending)

    def _work(self) -> None:
        while True:
            with self.cond:
                if not self.pending:
                    self.thread = None
                    self.cond.notify_all()
                    return
                artifacts, path = self.pending[0]
            try:
                _deliver(artifacts)
            except _RunGone:
                pass
            except Exception as exc:
                if spool.append(path, artifacts):
                    _state.spooled.add(path)
                    log.warning(
                        "green-mlops: could not send the report of run %s (%s); kept in %s",
                        artifacts["run_id"],
                        type(exc).__name__,
                        path,
                    )
            with self.cond:
                self.pending.pop(0)
                self.cond.notify_all()


class _RunGone(Exception):
    pass


def _shown(tracking_uri: str) -> str:
    """The tracking URI as logged: without credentials embedded in it (``user:token@``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    if "@" not in parts.netloc:
        return tracking_uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _unreachable(exc: Exception, tracking_uri: str) -> bool:
    """No answer from a tracking server (as opposed to an answer refusing the request)."""
    from mlflow.exceptions import RestException

    return tracking_uri.startswith(("http://", "https://")) and not isinstance(exc, RestException)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking.client import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _rest_store(client: Any) -> Any:
    """The client's REST store (for requests with bounded retries), or None."""
    try:
        from mlflow.store.tracking.rest_store import RestStore

        store = client._tracking_client.store
    except Exception:
        return None
    return store if isinstance(store, RestStore) else None


def _post(store: Any, endpoint: str, body: dict[str, Any]) -> None:
    """One REST call with green-mlops' bounded retries (MLflow's default would be ~4 min)."""
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = http_request(  # type: ignore[no-untyped-call]
        store.get_host_creds(),
        endpoint,
        "POST",
        json=body,
        max_retries=SEND_RETRIES,
        backoff_factor=SEND_BACKOFF_S,
        timeout=SEND_TIMEOUT_S,
    )
    verify_rest_response(response, endpoint)


def _deliver(batch: dict[str, Any]) -> None:
    """Send one spooled-format batch. Raises _RunGone for a deleted run, else any error."""
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException, RestException

    client = _client(batch["tracking_uri"])
    store = _rest_store(client)
    run_id = batch["run_id"]
    try:
        if batch.get("terminate") is not None:
            status, end_time = batch["terminate"]["status"], batch["terminate"]["end_time"]
            if store is not None:
                body = {"run_id": run_id, "run_uuid": run_id, "status": status}
                _post(store, _UPDATE_RUN, {**body, "end_time": end_time})
            else:
                _original("set_terminated")(client, run_id, status, end_time)
            return
        metrics = [(k, float(v), int(ts), int(step)) for k, v, ts, step in batch["metrics"]]
        tags = [(k, str(v)) for k, v in batch["tags"].items()]
        metric_chunks = [
            metrics[i : i + _MAX_METRICS] for i in range(0, len(metrics), _MAX_METRICS)
        ]
        tag_chunks = [tags[i : i + _MAX_TAGS] for i in range(0, len(tags), _MAX_TAGS)]
        for i in range(max(len(metric_chunks), len(tag_chunks))):
            some_metrics = metric_chunks[i] if i < len(metric_chunks) else []
            some_tags = tag_chunks[i] if i < len(tag_chunks) else []
            if store is not None:
                body = {
                    "run_id": run_id,
                    "metrics": [
                        {"key": k, "value": v, "timestamp": ts, "step": s}
                        for k, v, ts, s in some_metrics
                    ],
                    "tags": [{"key": k, "value": v} for k, v in some_tags],
                }
                _post(store, _LOG_BATCH, body)
            else:
                _original("log_batch")(
                    client,
                    run_id,
                    metrics=[Metric(*m) for m in some_metrics],
                    tags=[RunTag(*t) for t in some_tags],
                    synchronous=True,
                )
        if batch.get("report") is not None:
            _log_report(client, run_id, batch["report"])
    except MlflowException as exc:
        answered = store is None or isinstance(exc, RestException)
        if answered and (
            getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or _deleted(client, run_id)
        ):
            raise _RunGone(f"{exc.error_code}: the run was deleted") from None
        raise


def _deleted(client: Any, run_id: str) -> bool:
    try:
        return bool(client.get_run(run_id).info.lifecycle_stage == "deleted")
    except Exception:
        return False


def _log_report(client: Any, run_id: str, report: dict[str, Any]) -> None:
    """``green/report.json`` and ``green/power.png`` in one upload, from a directory of our own:
    MLflow's ``log_dict``/``log_figure`` use ``TemporaryDirectory``, whose exit-time finalizer
    deletes it under an upload still running at interpreter exit."""
    folder = Path(tempfile.mkdtemp(prefix="green-mlops-"))
    try:
        (folder / Path(REPORT_ARTIFACT).name).write_text(json.dumps(report, indent=2))
        _draw_power(report, folder / Path(TIMELINE_ARTIFACT).name)
        client.log_artifacts(run_id, str(folder), str(Path(REPORT_ARTIFACT).parent))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _draw_power(report: dict[str, Any], path: Path) -> None:
    """A power-over-time image per component, from the report's timeline. Drawn on a bare
    ``matplotlib.figure.Figure``: pyplot and the user's backend are left alone."""
    timeline = report["energy"]["timeline"]
    if len(timeline) < 2:
        return
    try:
        from matplotlib.figure import Figure
    except Exception:
        return
    t0 = timeline[0]["time"]
    components = sorted({c for p in timeline for c in p["joules_by_component"]})
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
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
    fig.savefig(path)


# --- spool ----------------------------------------------------------------------------------


def replay_spool(path: Path) -> int:
    """Send the batches kept in ``path`` (oldest first); delete it when all went through.

    Returns the number of batches sent. Raises on the first failure, keeping what is unsent
    (:class:`~.mlflow_spool.SpoolBusy` when another process is sending it).
    """

    from mlflow.exceptions import RestException

    def deliver(batch: dict[str, Any]) -> None:
        try:
            _deliver(batch)
        except _RunGone:  # the run was deleted: its values land nowhere
            pass
        except RestException as exc:  # refused for good (not busy): never block what follows
            code = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
            if 400 <= code < 500 and code not in (408, 429):
                raise spool.Refused(f"{exc.error_code} ({code})") from None
            raise

    return spool.replay(path, deliver)


_state = _State()
