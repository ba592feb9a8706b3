"""Every node's totals in the run that rank 0 logs, through the job's own rendezvous store.

In a multi-node job where only rank 0 creates the run (the usual pattern, and Hugging Face
``Trainer``'s), the other nodes' energy would be missing. Each node's measuring process
(:attr:`~green_mlops.job.Job.measures_node`) runs a :class:`NodeAgent`: a background thread
with its own measurement of the node, connected to torch.distributed's ``TCPStore`` at
``MASTER_ADDR:MASTER_PORT`` (torchrun's agent store, or the store of rank 0's default process
group). Rank 0's :class:`RunGather` announces a run's start and end as events in the store;
agents answer with their totals over that window, live once per logging interval and final at
the end (or at their process's exit). A collective is not used here: the other ranks' training
threads cannot be made to join one at the moment rank 0's run ends. Nothing in a training
thread waits more than :data:`NODE_WAIT_S`; a node that stops answering is named in
``green.problems`` and the totals are said to be partial. See docs/multi-node.md.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from green_mlops import references
from green_mlops.job import Job
from green_mlops.metrics import is_additive

log = logging.getLogger(__name__)

__all__ = [
    "CLAIM_DELAY_S",
    "MAX_NODE_BREAKDOWN",
    "NODE_WAIT_S",
    "NodeAgent",
    "RunGather",
    "connect",
    "merge",
]

#: Key prefix in the job's store.
PREFIX = "green_mlops"
#: Longest wait, at a run's end, for the nodes' final totals (in the thread that ends the run).
NODE_WAIT_S = 3.0
#: Timeout of one store operation (connecting included).
STORE_TIMEOUT_S = 5.0
#: Nodes with a ``green/node/<n>/...`` breakdown; the others are summed in ``green/node/rest/``.
MAX_NODE_BREAKDOWN = 16
#: Local rank r of a node claims to measure it after r x this: the lowest alive wins.
CLAIM_DELAY_S = 0.5
#: Key rank 0 adds to a node's report: when it first read it (its own monotonic clock).
SEEN_KEY = "seen_by_rank0"
#: Beyond a bounded wait: how long the store's helper thread may take to notice its end.
_GRACE_S = 0.5
#: Poll period of rank 0's bounded wait for final totals.
_POLL_S = 0.01
#: An agent's wait for rank 0's next event: no timeout to wake up (and log) for.
_FOREVER = timedelta(days=365)
#: Set at interpreter exit: the live publishers stop.
_EXITING = threading.Event()


def connect(env: Mapping[str, str] | None = None) -> Any:
    """A client of the job's store at ``MASTER_ADDR:MASTER_PORT``; raises with the reason."""
    env = os.environ if env is None else env
    host, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    if not host or not port.isdigit():
        raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: no rendezvous store to use")
    import importlib

    dist: Any = importlib.import_module("torch.distributed")  # torch's stubs do not export it
    return dist.TCPStore(
        host,
        int(port),
        is_master=False,
        timeout=timedelta(seconds=STORE_TIMEOUT_S),
        wait_for_workers=False,
    )


def _key(*parts: object) -> str:
    return "/".join([PREFIX, *(str(p) for p in parts)])


def _event(store: Any, **event: Any) -> None:
    number = store.add(_key("events"), 1)
    store.set(_key("event", number), json.dumps(event))


# --- a node leader's side -----------------------------------------------------------------------


class NodeAgent(threading.Thread):
    """Measures this node and answers rank 0's runs with its totals over each run's window.

    ``measurement`` is started in the thread (a :class:`~green_mlops.session.Measurement`);
    ``store_factory`` connects to the job's store. The thread waits for rank 0's events with
    a blocking wait on the store's side (no polling traffic, no timeouts to log); a second
    thread publishes the live totals once per ``interval_s``. Never raises; gives up (said in
    the log) when the store cannot be reached.
    """

    def __init__(
        self,
        job: Job,
        measurement: Callable[[], Any],
        *,
        interval_s: float,
        location: str | None,
        store_factory: Callable[[], Any] = connect,
        claim_delay_s: float = 0.0,
    ) -> None:
        super().__init__(name="green-mlops-node", daemon=True)
        self.job = job
        self.claim_delay_s = claim_delay_s
        self._factory = measurement
        self._store_factory = store_factory
        self.interval_s = interval_s
        self.location = location
        self.measurement: Any = None
        self.store: Any = None
        self.next_event = 1
        self._lock = threading.Lock()
        self._open: dict[int, tuple[float, dict[str, float], float]] = {}  # seq: start, base, t
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            self.store = self._store_factory()
            if not self._claim():
                return  # a lower local rank measures this node
            self.measurement = self._factory()
            self.store.set(_key("node", self.job.node), socket.gethostname())
            self._catch_up()
            live = threading.Thread(
                target=self._live, args=(self.store.clone(),), name="green-mlops-node-live"
            )
            live.daemon = True
            live.start()
            atexit.register(self._at_exit)
        except Exception as exc:
            log.warning("green-mlops: node %s cannot report to rank 0: %s", self.job.node, exc)
            return
        finally:
            self.ready.set()
        try:
            while True:
                key = _key("event", self.next_event)
                self.store.wait([key], _FOREVER)
                event = json.loads(self.store.get(key))
                self.next_event += 1
                if event["kind"] == "start":
                    self._start(int(event["seq"]), float(event["time"]))
                elif event["kind"] == "end":
                    self._publish(int(event["seq"]), final=True)
        except Exception as exc:  # the store went away (rank 0's node ended): nothing to answer
            log.debug("green-mlops: node agent stops: %s", exc)

    def _claim(self) -> bool:
        """Become the node's one measuring process: the first local rank to claim it. Local
        rank r claims after ``claim_delay_s`` (r x :data:`CLAIM_DELAY_S` from the plugin), so
        the lowest local rank alive wins. Per restart of the workers (claimed anew)."""
        if self.claim_delay_s > 0:
            _EXITING.wait(self.claim_delay_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        # unique per agent: a process that inherited a rank's environment (its local rank)
        # must not win the claim as well
        me = f"{self.job.local_rank or 0}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        held = self.store.compare_set(_key("leader", self.job.node, restart), "", me)
        return bool(held == me.encode())

    def _catch_up(self) -> None:
        """A run rank 0 opened before this agent started: measured from now (said)."""
        self.next_event = int(self.store.add(_key("events"), 0)) + 1
        if self.store.check([_key("current")]):
            current = json.loads(self.store.get(_key("current")) or "null")
            if current:
                self._start(int(current["seq"]), float(current["start"]))

    def _live(self, store: Any) -> None:
        """The open runs' totals so far, once per interval (rank 0's periodic values)."""
        with contextlib.suppress(Exception):
            while not _EXITING.wait(self.interval_s):
                with self._lock:
                    seqs = list(self._open)
                for seq in seqs:
                    self._publish(seq, final=False, store=store)

    def _values(self) -> tuple[dict[str, float], Any]:
        result = self.measurement.result()
        return {k: v for k, v in result.metrics.items() if is_additive(k)}, result

    def _start(self, seq: int, start: float) -> None:
        base, _ = self._values()
        with self._lock:
            self._open[seq] = (start, base, time.time())

    def _publish(self, seq: int, *, final: bool, store: Any = None, reason: str = "") -> None:
        with self._lock:
            opened = self._open.pop(seq, None) if final else self._open.get(seq)
        if opened is None:
            return
        start, base, began = opened
        values, result = self._values()
        blob = {
            "node": self.job.node,
            "host": socket.gethostname(),
            "location": self.location,
            "final": final,
            "reason": reason,
            "at": time.time(),
            "late_s": max(0.0, began - start),
            "metrics": {k: v - base.get(k, 0.0) for k, v in values.items()},
            "power": [[t, w] for t, w in result.power if t > began],
            "problems": result.tags.get("green.problems", ""),
        }
        store = store or self.store
        store.set(_key("run", seq, "node", self.job.node), json.dumps(blob))
        if final:
            store.add(_key("run", seq, "finals"), 1)  # rank 0 polls this one counter

    def _at_exit(self) -> None:
        """This process ends: its final totals for the runs still open (a fresh connection:
        the agent's own is blocked in a wait)."""
        _EXITING.set()
        with self._lock:
            seqs = list(self._open)
        if not seqs:
            return

        def publish() -> None:
            with contextlib.suppress(Exception):
                store = self.store.clone()
                for seq in seqs:
                    self._publish(seq, final=True, store=store, reason="its process ended")

        _bounded(publish, NODE_WAIT_S)  # a hung store does not hold the process's exit


# --- rank 0's side ------------------------------------------------------------------------------


class RunGather:
    """One run of rank 0: announces its window and collects the nodes' totals for it.

    :meth:`open` returns at once (the store is reached from a background thread);
    :meth:`live` never waits; :meth:`close` waits at most ``wait_s`` for the nodes that are
    still answering.
    """

    def __init__(
        self,
        job: Job,
        *,
        interval_s: float,
        store_factory: Callable[[], Any] = connect,
        wait_s: float = NODE_WAIT_S,
    ) -> None:
        self.job = job
        self.interval_s = interval_s
        self.wait_s = wait_s
        self.start = time.time()
        self.seq: int | None = None
        self.error = ""
        self.store: Any = None
        self._factory = store_factory
        self._opened = threading.Event()
        self.nodes = [n for n in range(job.nodes or 0) if n != job.node]
        self.blobs: dict[int, dict[str, Any]] = {}
        #: Per node: its report's own timestamp, and when rank 0 first read that report (rank
        #: 0's monotonic clock: the nodes' wall clocks may differ from rank 0's).
        self._seen: dict[int, tuple[float, float]] = {}
        self._began = time.monotonic()
        self.closed = False
        self._lock = threading.Lock()  # one store operation at a time (sink and run's end)

    def open(self) -> RunGather:
        threading.Thread(target=self._open, name="green-mlops-gather", daemon=True).start()
        return self

    def _open(self) -> None:
        try:
            self.store = self._factory()
            self.seq = int(self.store.add(_key("seq"), 1))
            _event(self.store, kind="start", seq=self.seq, time=self.start)
            self.store.set(_key("current"), json.dumps({"seq": self.seq, "start": self.start}))
        except Exception as exc:
            self.error = f"node totals not gathered: {exc}"
        finally:
            self._opened.set()

    def live(self) -> dict[int, dict[str, Any]]:
        """The nodes' latest totals (non-blocking; an empty dict before the store answers)."""
        if self._opened.is_set() and self.seq is not None:
            with contextlib.suppress(Exception):
                self._read(self.nodes)
        return dict(self.blobs)

    def _read(self, nodes: Sequence[int], into: dict[int, dict[str, Any]] | None = None) -> None:
        keys = {n: _key("run", self.seq, "node", n) for n in nodes}
        with self._lock:
            present = [n for n in nodes if self.store.check([keys[n]])]
            raws = self.store.multi_get([keys[n] for n in present]) if present else []
        now = time.monotonic()
        for n, raw in zip(present, raws, strict=True):
            blob = json.loads(raw)
            at = float(blob["at"])
            if n not in self._seen or self._seen[n][0] != at:
                self._seen[n] = (at, now)
            blob[SEEN_KEY] = self._seen[n][1]
            (self.blobs if into is None else into)[n] = blob

    def close(self) -> dict[int, dict[str, Any]]:
        """Announce the end and collect the final totals (bounded wait); never raises.
        Only the first call does: a run terminated again keeps the first end's totals.
        The store's calls run in a helper thread: a store whose host hangs (its connection
        open, no replies: ``TCPStore.set``/``add`` then block without a timeout) is left
        behind after the wait."""
        if self.closed:
            return dict(self.blobs)
        self.closed = True
        deadline = time.monotonic() + self.wait_s
        found = dict(self.blobs)
        if not _bounded(lambda: self._close(deadline, found), self.wait_s + _GRACE_S):
            self.error = self.error or (
                f"node totals incomplete: the job's store did not answer within {self.wait_s:g} s"
            )
            return dict(self.blobs)
        self.blobs = found
        return dict(found)

    def _close(self, deadline: float, found: dict[int, dict[str, Any]]) -> None:
        self._opened.wait(max(0.0, deadline - time.monotonic()))
        if self.seq is None:
            self.error = self.error or "node totals not gathered: the store did not answer"
            return
        try:
            with self._lock:
                _event(self.store, kind="end", seq=self.seq, time=time.time())
                self.store.set(_key("current"), "")
            waiting, finals, read_at = list(self.nodes), -1, 0.0
            while waiting and time.monotonic() < deadline:
                with self._lock:
                    count = int(self.store.add(_key("run", self.seq, "finals"), 0))
                if count != finals or time.monotonic() - read_at > 0.5:  # one read per change
                    finals, read_at = count, time.monotonic()
                    self._read(waiting, found)
                    waiting = [n for n in waiting if self._expected(found.get(n))]
                if waiting:
                    time.sleep(_POLL_S)
        except Exception as exc:
            self.error = f"node totals incomplete: {exc}"

    def _expected(self, blob: Mapping[str, Any] | None) -> bool:
        """Whether to go on waiting for a node's final totals (``blob``: its latest): it
        answered recently (or the run is too young for it to have answered), both in rank
        0's own clock."""
        fresh = 2 * self.interval_s + 1.0
        if blob is None:
            return time.monotonic() - self._began < fresh
        return not blob["final"] and time.monotonic() - float(blob[SEEN_KEY]) < fresh


def _bounded(work: Callable[[], None], timeout_s: float) -> bool:
    """Run ``work`` in a daemon thread; whether it ended within ``timeout_s``."""
    thread = threading.Thread(target=work, name="green-mlops-store", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


# --- the merged run -----------------------------------------------------------------------------


def _counted(key: str) -> bool:
    """Node totals added to the run's: amounts, not durations (every node lives through the
    same time) nor a nested run's inclusive figures."""
    return is_additive(key) and not key.endswith("_s") and not key.startswith("green/inclusive/")


def _node_keys(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    parts = [k for k in metrics if k.startswith("green/energy/") and k.endswith("_kwh")]
    keys = ("green/energy_kwh", "green/co2e_g", *parts)
    return {
        f"{prefix}/{k.removeprefix('green/')}": metrics[k]
        for k in dict.fromkeys(keys)
        if k in metrics
    }


def _power_at(points: Sequence[Sequence[float]], t: float) -> float:
    """A node's average power over the interval that holds ``t`` (its last one after it)."""
    for pt, watts in points:
        if pt >= t:
            return float(watts)
    return float(points[-1][1]) if points else 0.0


def merge(
    result: Any,
    blobs: Mapping[int, Mapping[str, Any]],
    job: Job,
    *,
    error: str = "",
    final: bool,
    functional_units: float | None = None,
    location: str | None = None,
) -> Any:
    """``result`` (rank 0's :class:`~green_mlops.session.Result`) with the nodes' totals
    added: the job's totals, ``green/node/<n>/...``, the summed power series, and tags that
    say which nodes reported (``green.job.nodes_reported``) and which did not."""
    metrics = dict(result.metrics)
    tags = dict(result.tags)
    own = {k: v for k, v in result.metrics.items() if _counted(k)}
    nodes = sorted({job.node, *blobs, *range(job.nodes or 0)})
    breakdown: dict[str, float] = {}
    rest: dict[str, float] = {}
    for index, node in enumerate(nodes):
        values = own if node == job.node else blobs.get(node, {}).get("metrics")
        if values is None:
            continue
        if node != job.node:
            for key, value in values.items():
                if _counted(key):
                    metrics[key] = metrics.get(key, 0.0) + float(value)
        if index < MAX_NODE_BREAKDOWN:
            breakdown.update(_node_keys(f"green/node/{node}", values))
        else:
            for key, value in _node_keys("green/node/rest", values).items():
                rest[key] = rest.get(key, 0.0) + value
    metrics.update(breakdown)
    metrics.update(rest)
    kwh, co2e = metrics.get("green/energy_kwh", 0.0), metrics.get("green/co2e_g")
    if co2e is not None and kwh > 0:
        metrics["green/intensity_g_per_kwh"] = co2e / kwh
    if functional_units:
        added = sum(
            float(b["metrics"].get(k, 0.0))
            for b in blobs.values()
            for k in ("green/co2e_g", "green/embodied_g")
        )
        for key in [k for k in metrics if k.startswith("green/sci_g_per_")]:
            metrics[key] += added / functional_units
    power = [
        (t, w + sum(_power_at(b.get("power", []), t) for b in blobs.values()))
        for t, w in result.power
    ]
    said = _job_tags(blobs, job, nodes, error=error, final=final, location=location)
    if tags.get("green.problems") and said.get("green.problems"):
        said["green.problems"] = f"{tags['green.problems']}; {said['green.problems']}"
    tags.update(said)
    if rest:
        tags["green.job.nodes_summarised"] = f"nodes past the first {MAX_NODE_BREAKDOWN}"
    for key in [k for k in metrics if k.startswith(references.PREFIX)]:
        if key.endswith("/measured_fraction"):
            del metrics[key]  # of rank 0's node: compared again with the job's total
    earlier = ((result.accounting or {}).get("adjustments") or {}).get("earlier_segments")
    metrics.update(references.compare(metrics, tags, earlier))
    fp, sentence = result.footprint, result.sentence
    if fp is not None:  # the report's footprint and sentence: the job's, not rank 0's node's
        from green_mlops.footprint import reporting_sentence, with_totals

        count = len([n for n in nodes if n == job.node or n in blobs])
        fp = with_totals(fp, metrics, hardware=f"{count} nodes (node {job.node}: {fp.hardware})")
        sentence = reporting_sentence(fp)
    parts = {
        "rank0_metrics": dict(result.metrics),
        "nodes": {str(n): dict(b.get("metrics", {})) for n, b in sorted(blobs.items())},
    }
    return dataclasses.replace(
        result,
        metrics=metrics,
        tags=tags,
        power=power,
        parts=parts,
        footprint=fp,
        sentence=sentence,
    )


def _job_tags(
    blobs: Mapping[int, Mapping[str, Any]],
    job: Job,
    nodes: Sequence[int],
    *,
    error: str,
    final: bool,
    location: str | None,
) -> dict[str, str]:
    problems, notes = [], []
    reported = [job.node] + [n for n in nodes if n in blobs and blobs[n]["final"]]
    for node in nodes:
        blob = blobs.get(node)
        if node == job.node:
            continue
        if blob is None:
            if final:
                problems.append(f"node {node} never reported: its energy is not included")
            continue
        if final and not blob["final"]:
            seen = blob.get(SEEN_KEY)  # rank 0's clock, else the node's (skew included)
            age = max(
                0.0,
                time.time() - float(blob["at"]) if seen is None else time.monotonic() - float(seen),
            )
            problems.append(
                f"node {node} ({blob.get('host', '?')}) stopped reporting {age:.1f} s before "
                "the run ended: its energy after that is not included"
            )
        if blob.get("reason"):
            notes.append(f"node {node} reported when {blob['reason']}")
        if float(blob.get("late_s", 0.0)) > 1.0:
            notes.append(f"node {node} measured from {blob['late_s']:.1f} s after the run began")
        if blob.get("problems"):
            problems.append(f"node {node}: {blob['problems']}")
    if error:
        problems.append(error)
    out: dict[str, str] = {"green.job.nodes_reported": str(len(reported))}
    total = job.nodes or len(nodes)
    partial = bool(problems) and final
    out["green.job.partial"] = "true" if partial else "false"
    out["green.job.scope"] = (
        f"partial: {len(reported)} of {total} nodes reported"
        if partial
        else f"all {total} nodes of the job (each node measured once, gathered by rank 0)"
    )
    locations = {job.node: location, **{n: b.get("location") for n, b in blobs.items()}}
    if len(set(locations.values())) > 1:
        out["green.job.locations"] = ", ".join(f"{n}: {v}" for n, v in sorted(locations.items()))
    if problems:
        out["green.problems"] = "; ".join(problems)
    if notes:
        out["green.job.notes"] = "; ".join(notes)
    return out
