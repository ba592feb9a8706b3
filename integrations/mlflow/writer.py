"""The one way out to MLflow, for the plugin and the Lightning ``EnergyMonitor``: metrics at the
agreed steps, tags, the report and chart, bounded requests, the spool when the server is down,
delivery at exit and on SIGTERM. See docs/mlflow-plugin.md (steps, spool, bounded sends)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from green_mlops.config import Settings
from green_mlops.integrations.mlflow import spool, views
from green_mlops.log import warn_once
from green_mlops.metrics import POWER_KEY
from green_mlops.reports.view import iso_utc

__all__ = [
    "CHART_ARTIFACT",
    "HTML_ARTIFACT",
    "REPORT_ARTIFACT",
    "RunGone",
    "RunWriter",
    "deliver",
    "on_sigterm",
    "replay_spool",
    "shown_uri",
    "wait_uploads",
]

log = logging.getLogger(__name__)

REPORT_ARTIFACT = "green/report.json"
CHART_ARTIFACT = views.CHART_ARTIFACT
HTML_ARTIFACT = views.HTML_ARTIFACT
#: MLflow's ``log_batch`` limits per request: tags, and metrics and tags together.
MAX_TAGS = 100
MAX_ENTITIES = 1000
#: green-mlops' own requests to a tracking server: retries, backoff factor, timeout per try.
SEND_RETRIES = 1
SEND_BACKOFF_S = 0.5
SEND_TIMEOUT_S = 5.0
#: Longest wait at interpreter exit (or in :func:`wait_uploads`) for reports being sent.
UPLOAD_WAIT_S = 10.0
#: Longest the last replay of spooled values may delay interpreter exit.
EXIT_REPLAY_S = 10.0
_LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
_UPDATE_RUN = "/api/2.0/mlflow/runs/update"

#: One batch in plain data (the spool's line format): ``run_id``, ``tracking_uri``, ``metrics``
#: as ``[key, value, timestamp_ms, step]``, ``tags``, ``report`` (or None), ``power_until``; or a
#: termination: ``run_id``, ``tracking_uri``, ``terminate: {status, end_time}``.
Batch = dict[str, Any]


class RunGone(Exception):
    """The run was deleted: nothing more can be written to it."""


class RunWriter:
    """Writes one MLflow run. Queue values, then :meth:`flush` sends them as one batch (split
    at MLflow's per-request limits) or, when the server does not take it, spools it. Steps (one
    convention for every writer): :meth:`totals` at whole seconds since the run's measurement
    began (resumed runs: earlier segments included), so the value MLflow shows (the highest
    step's) is the latest total; :meth:`series` at the caller's step; :meth:`power` at whole
    seconds since the run's start. Thread-safe: hold :attr:`lock` to queue and flush at once."""

    def __init__(self, tracking_uri: str, run_id: str, settings: Settings) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.settings = settings
        self.lock = threading.RLock()
        self.dead: str | None = None  # why the run can no longer be written (deleted)
        self.totals_sent_at: float | None = None  # ``seconds`` of the last totals queued
        self.power_until = 0.0  # Unix time of the latest power point queued
        self._tags_sent: dict[str, str] = {}
        self._metrics: list[tuple[str, float, int, int]] = []
        self._tags: dict[str, str] = {}
        self._report: dict[str, Any] | None = None
        self._down_since: float | None = None  # Unix time of this outage's first failed send
        self._outages: list[str] = []  # the ended ones, described
        self._kept = 0  # batches spooled in this outage

    @property
    def delivery(self) -> str | None:
        """Provenance (tag ``green.delivery``): when the tracking server did not take this
        run's values, and where they went; None while every send went through."""
        spans = list(self._outages)
        if self._down_since is not None:
            spans.append(
                f"from {iso_utc(self._down_since)} ({self._kept} batch(es) kept in the spool, sent "
                "when the server answers again or by `green-mlops sync`)"
            )
        said = "; ".join(spans[-5:])
        return f"the tracking server did not take green values {said}" if spans else None

    @property
    def spool_path(self) -> Path:
        return spool.path_for(self.settings.cache_dir, self.run_id)

    # -- queueing ------------------------------------------------------------------------------

    def totals(self, metrics: Mapping[str, float], seconds: float) -> None:
        """Cumulative run totals, at step = ``int(seconds)`` of the run's measurement."""
        with self.lock:
            self._add(metrics, int(seconds))
            self.totals_sent_at = seconds

    def series(self, metrics: Mapping[str, float], step: int) -> None:
        """Points of series (per epoch, per step) at the caller's ``step``."""
        with self.lock:
            self._add(metrics, int(step))

    def power(self, points: Iterable[tuple[float, float]], started_at: float) -> None:
        """``system/green/power_w`` points ``(unix time, watts)`` not queued before, at step =
        whole seconds since ``started_at`` (the Unix time of the run's second 0)."""
        with self.lock:
            latest = self.power_until
            for t, watts in points:
                latest = max(latest, t)
                if t > self.power_until and math.isfinite(watts):
                    point = (POWER_KEY, float(watts), int(t * 1000), int(t - started_at))
                    self._metrics.append(point)
            self.power_until = latest

    def tags(self, tags: Mapping[str, str]) -> None:
        """Tags whose value changed since they were last queued."""
        with self.lock:
            for key, value in tags.items():
                if self._tags_sent.get(key) != value:
                    self._tags[key] = self._tags_sent[key] = str(value)

    def report(self, report: dict[str, Any]) -> None:
        """The report (``green/report.json``, with the chart ``green/power.png``)."""
        with self.lock:
            self._report = report

    def take(self) -> Batch | None:
        """What is queued, as one plain-data batch (emptying the queue); None: nothing."""
        with self.lock:
            if not self._metrics and not self._tags and self._report is None:
                return None
            batch = {
                "run_id": self.run_id,
                "tracking_uri": self.tracking_uri,
                "metrics": self._metrics,
                "tags": self._tags,
                "report": self._report,
                "power_until": self.power_until,
            }
            self._metrics, self._tags, self._report = [], {}, None
            return batch

    def _add(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._metrics += [(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]

    # -- sending -------------------------------------------------------------------------------

    def flush(self, *, report_later: bool = False) -> str:
        """Send what is queued (this run's spool first, to keep the order). Returns "sent";
        "down" (no answer) or "unsent" (refused), spooled either way when the spool can be used;
        "gone" (the run was deleted); "idle" (nothing queued). ``report_later``: the report and
        chart go from a background thread (:func:`wait_uploads`). Never raises for a failure."""
        with self.lock:
            batch = self.take()
            if self.dead:
                return "gone"
            if batch is None:
                return "idle"
            path = self.spool_path
            try:
                try:
                    replay_spool(path)
                except (spool.SpoolBusy, spool.SpoolUnusable) as exc:
                    if isinstance(exc, spool.SpoolUnusable):
                        reason = getattr(exc.__cause__, "strerror", None) or str(exc)
                        warn_once(
                            f"the spool {path.parent} cannot be read ({reason}); sending anyway"
                        )
                deliver({**batch, "report": None} if report_later else batch)
            except RunGone as exc:
                self.dead = str(exc)
                log.warning(
                    "green-mlops: run %s can no longer be written (%s); green metrics for it "
                    "stop here",
                    self.run_id,
                    exc,
                )
                return "gone"
            except Exception as exc:
                first = self._down_since is None
                if _keep(
                    path,
                    batch,
                    "green-mlops: could not send green metrics of run %s to %s (%s); kept in %s "
                    "and sent when the server answers again (or run `green-mlops sync`); said "
                    "once until it does",
                    self.run_id,
                    shown_uri(self.tracking_uri),
                    type(exc).__name__,
                    path,
                    level=logging.WARNING if first else logging.DEBUG,
                ):
                    self._kept += 1
                if first:
                    self._down_since = time.time()
                return "down" if unreachable(exc, self.tracking_uri) else "unsent"
            if self._down_since is not None:  # the server answers again
                log.warning(
                    "green-mlops: the tracking server takes green metrics of run %s again; the "
                    "%d batch(es) kept meanwhile were sent",
                    self.run_id,
                    self._kept,
                )
                self._outages = [
                    *self._outages[-4:],  # the tag says the last five
                    f"from {iso_utc(self._down_since)} to {iso_utc(time.time())} ({self._kept} "
                    "batch(es) kept in the spool meanwhile, sent when it answered again)",
                ]
                self._down_since, self._kept = None, 0
            if report_later and batch["report"] is not None:
                _uploads.put({**batch, "metrics": [], "tags": {}}, path)
            return "sent"

    def terminate(self, status: str) -> bool:
        """The final values could not be sent: end the run with one bounded request (a slow
        server may answer now), else spool the termination for ``green-mlops sync``. Returns
        True when spooled (the caller then skips MLflow's own ``set_terminated``)."""
        record = {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "terminate": {"status": status, "end_time": int(time.time() * 1000)},
        }
        with contextlib.suppress(Exception):
            deliver(record)
            return False
        return _keep(
            self.spool_path,
            record,
            "green-mlops: %s is unreachable; run %s will be marked %s by `green-mlops sync` "
            "(kept in %s)",
            shown_uri(self.tracking_uri),
            self.run_id,
            status,
            self.spool_path,
        )


# --- delivery (also of spooled batches, from another process) -------------------------------


def deliver(batch: Batch) -> None:
    """Send one plain-data batch. Raises :class:`RunGone` for a deleted run, else any error."""
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.tracking.client import MlflowClient

    client = MlflowClient(tracking_uri=batch["tracking_uri"])
    store = _rest_store(client)
    run_id = batch["run_id"]
    try:
        if batch.get("terminate") is not None:
            status, end_time = batch["terminate"]["status"], batch["terminate"]["end_time"]
            if store is not None:
                body = {"run_id": run_id, "run_uuid": run_id, "status": status}
                _post(store, _UPDATE_RUN, {**body, "end_time": end_time})
            else:
                _unwrapped(MlflowClient.set_terminated)(client, run_id, status, end_time)
            return
        metrics = [(k, float(v), int(ts), int(step)) for k, v, ts, step in batch["metrics"]]
        tags = [(k, str(v)) for k, v in batch["tags"].items()]
        for some_metrics, some_tags in _requests(metrics, tags):
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
                client.log_batch(
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
            raise RunGone(f"{exc.error_code}: the run was deleted") from None
        raise


def _requests(
    metrics: list[tuple[str, float, int, int]], tags: list[tuple[str, str]]
) -> list[tuple[list[tuple[str, float, int, int]], list[tuple[str, str]]]]:
    """``metrics`` and ``tags`` split into ``log_batch`` requests MLflow accepts."""
    out = []
    m = t = 0
    while m < len(metrics) or t < len(tags):
        some_tags = tags[t : t + MAX_TAGS]
        some_metrics = metrics[m : m + MAX_ENTITIES - len(some_tags)]
        out.append((some_metrics, some_tags))
        m, t = m + len(some_metrics), t + len(some_tags)
    return out


def replay_spool(path: Path) -> int:
    """Send the batches kept in ``path`` (oldest first); delete it when all went through.

    Returns the number of batches sent. Raises on the first failure, keeping what is unsent
    (:class:`~.spool.SpoolBusy` when another process is sending it).
    """
    from mlflow.exceptions import RestException

    def send(batch: Batch) -> None:
        try:
            deliver(batch)
        except RunGone:  # the run was deleted: its values land nowhere
            pass
        except RestException as exc:  # refused for good (not busy): never block what follows
            code = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
            if 400 <= code < 500 and code not in (408, 429):
                raise spool.Refused(f"{exc.error_code} ({code})") from None
            raise

    return spool.replay(path, send)


def wait_uploads(timeout: float = UPLOAD_WAIT_S) -> bool:
    """Wait (at most ``timeout`` s) for the reports queued by ``flush(report_later=True)``.
    Returns whether all were sent."""
    return not _uploads.wait(timeout)


def shown_uri(tracking_uri: str) -> str:
    """The tracking URI as logged: without credentials embedded in it (``user:token@``, or a
    query value such as ``?token=...``, ``&password=...``, ``&sig=...``)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    if parts.query:
        query = [
            (k, "***" if _SECRET_QUERY.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts) if parts != urlsplit(tracking_uri) else tracking_uri


#: Query parameter names that carry a credential (matched anywhere, case-insensitively).
_SECRET_QUERY = re.compile(r"token|key|secret|pass|pwd|auth|sig|credential|cookie", re.I)


def unreachable(exc: Exception, tracking_uri: str) -> bool:
    """No answer from a tracking server (as opposed to an answer refusing the request)."""
    from mlflow.exceptions import RestException

    return tracking_uri.startswith(("http://", "https://")) and not isinstance(exc, RestException)


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """MLflow's own method under the plugin's wrappers (our own requests must not recurse)."""
    while getattr(method, "__green_mlops__", False):
        method = method.__wrapped__  # type: ignore[attr-defined]
    return method


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


def _deleted(client: Any, run_id: str) -> bool:
    try:
        return bool(client.get_run(run_id).info.lifecycle_stage == "deleted")
    except Exception:
        return False


def _log_report(client: Any, run_id: str, report: dict[str, Any]) -> None:
    """The report, its HTML view and the chart in one upload, from a directory of our own (the
    ``TemporaryDirectory`` of MLflow's ``log_dict``/``log_figure`` is deleted under an upload
    running at exit). A view that cannot be made is said in ``green.notes``; the JSON goes."""
    folder = Path(tempfile.mkdtemp(prefix="green-mlops-"))
    try:
        green = folder / Path(REPORT_ARTIFACT).parent
        green.mkdir()
        (folder / REPORT_ARTIFACT).write_text(json.dumps(report, indent=2, default=str))
        tags = views.write(client, run_id, report, folder)
        client.log_artifacts(run_id, str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if tags:
        _set_tags(client, run_id, tags)


def _set_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    """Tags in one bounded request (MLflow's own client without a REST store)."""
    from mlflow.entities import RunTag

    store = _rest_store(client)
    if store is not None:
        body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        _post(store, _LOG_BATCH, body)
    else:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)


# --- the spool and the background uploads ----------------------------------------------------

#: Spool files written by this process: one last replay of each at interpreter exit.
_spooled: set[Path] = set()


def _keep(path: Path, batch: Batch, message: str, *args: Any, level: int = logging.WARNING) -> bool:
    """Spool ``batch``; say so (``message % args`` at ``level``) when it was. Returns whether
    it was."""
    if not spool.append(path, batch):
        return False
    _spooled.add(path)
    log.log(level, message, *args)
    return True


class _Uploads:
    """One background thread sends the queued reports and charts, oldest first."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: list[tuple[Batch, Path]] = []
        self.thread: threading.Thread | None = None

    def put(self, artifacts: Batch, path: Path) -> None:
        with self.cond:
            self.pending.append((artifacts, path))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._work, name="green-mlops-report", daemon=True
                )
                self.thread.start()

    def wait(self, timeout: float) -> list[tuple[Batch, Path]]:
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
                deliver(artifacts)
            except RunGone:
                pass
            except Exception as exc:
                _keep(
                    path,
                    artifacts,
                    "green-mlops: could not send the report of run %s (%s); kept in %s",
                    artifacts["run_id"],
                    type(exc).__name__,
                    path,
                )
            with self.cond:
                self.pending.pop(0)
                self.cond.notify_all()


_uploads = _Uploads()


def _at_exit() -> None:
    """Interpreter exit (after the plugin has finished its runs): spool the reports not sent
    in time, then one last replay of this process's spools, bounded: an artifact store that
    hangs retries for minutes inside MLflow. What is not sent stays for ``green-mlops sync``."""
    try:
        for batch, path in _uploads.wait(UPLOAD_WAIT_S):
            if spool.append(path, batch):
                _spooled.add(path)
        if _spooled:
            last_try = threading.Thread(
                target=_replay_spooled, name="green-mlops-exit", daemon=True
            )
            last_try.start()
            last_try.join(EXIT_REPLAY_S)
            _say_pending(sorted(_spooled))
    except Exception:
        log.exception("green-mlops: finishing at interpreter exit failed")


def _say_pending(paths: Iterable[Path]) -> None:
    """Once, at exit: what this process's runs still have in the spool, where, and that
    ``green-mlops sync`` delivers it (tracking URIs without their credentials)."""
    pending = [(path, kept) for path in paths if (kept := spool.pending(path)) is not None]
    if not pending:
        return
    log.warning(
        "green-mlops: not delivered before exit (the tracking server %s did not take them in "
        "time): %s; kept in %s; run `green-mlops sync` when the server answers to deliver them",
        ", ".join(dict.fromkeys(shown_uri(u) for _, (_, uris) in pending for u in uris)) or "?",
        "; ".join(f"run {path.stem}: {what}" for path, (what, _) in pending),
        ", ".join(dict.fromkeys(str(path.parent) for path, _ in pending)),
    )


def _replay_spooled() -> None:
    """Replay each spool of this process until the server fails to answer."""
    for path in sorted(_spooled):
        try:
            replay_spool(path)
        except (spool.SpoolBusy, spool.SpoolUnusable):
            continue
        except Exception:
            break


#: Called on SIGTERM, in order, before the exit-time delivery (:func:`on_sigterm`).
_on_term: dict[Callable[[], None], None] = {}


def on_sigterm(finish: Callable[[], None]) -> None:
    """On SIGTERM (torchrun, Slurm): ``finish()``, the exit-time delivery (at most
    :data:`UPLOAD_WAIT_S` + :data:`EXIT_REPLAY_S` in all), then die of it as by default. Only
    for the default handler, from the main thread: never one the user or a framework installed."""
    _on_term[finish] = None
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum: int, frame: Any) -> None:
    if signal.getsignal(signum) is not _sigterm:
        return  # chained by a handler installed since (Lightning's), where SIG_DFL was not
    # from a thread: the main thread, interrupted here, may hold a lock the sends need
    ender = threading.Thread(target=_terminating, name="green-mlops-sigterm", daemon=True)
    ender.start()
    ender.join(UPLOAD_WAIT_S + EXIT_REPLAY_S)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # never swallowed


def _terminating() -> None:
    for finish in [*_on_term, _at_exit]:  # none raises
        finish()


# Registered at import, before the plugin's own handler: handlers run last-in first-out, so
# this one runs after the plugin has sent its runs' final values.
atexit.register(_at_exit)
