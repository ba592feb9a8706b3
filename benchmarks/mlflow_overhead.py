"""Cost of ``GREEN_MLOPS_ENABLE=1`` for an MLflow training script: step time and REST requests.

    python benchmarks/mlflow_overhead.py            # 4 pairs of ~25 s runs: ~5 min on 2 cores
    python benchmarks/mlflow_overhead.py --quick    # 2 pairs of ~5 s runs: ~1 min, indicative only
    python benchmarks/mlflow_overhead.py --pairs 6 --seconds 60 --log-interval 10

Setup: a real MLflow tracking server (uvicorn, sqlite store, proxied artifacts) in a temp dir,
behind a small counting HTTP proxy on 127.0.0.1 that forwards every request and records its
time, method and path. The user-style script (this file with ``--worker``) does
``import mlflow``, ``mlflow.start_run()`` and a fixed number of training-like steps of ~5 ms
(numpy matmuls with one BLAS thread, which release the GIL, plus ~1 ms of pure Python, which
holds it), calling ``mlflow.log_metric`` every ``--log-every`` steps. The step cost is calibrated
once, here, and the same work is given to every process.

Method: one untimed warm-up process, then fresh processes run one after the other,
A/B/A/B/.../A (``--pairs`` B runs, one more A): A untracked, B with ``GREEN_MLOPS_ENABLE=1``
(the same ``GREEN_MLOPS_LOG_INTERVAL_S``, ``GREEN_MLOPS_LOCATION`` and cache dir in both).

* Step time is measured inside each process (``perf_counter`` around each step, ``log_metric``
  included). Each B is compared with the geometric mean of the A before and the A after it
  (which cancels a load that drifts linearly); reported: the median of these ratios, their
  min..max, and, as the noise floor of this run, the ratio between consecutive A runs (A/A).
  The mean step time and the loop wall time (which include the rare steps that wait for
  green-mlops' background threads) are printed as well. The verdict is INCONCLUSIVE when the
  A/A band is wider than the target and the overhead is not clearly outside it.
* Requests: each worker prints the wall-clock times of its loop; the proxy's records are split
  into "during the loop" and "outside it" (process start, run creation, end of run). The
  untracked partner's count is subtracted from the tracked one: the rest is green-mlops'.
  During the loop that is the periodic sending, reported per logging interval (all pairs'
  extra requests / all pairs' loop seconds / interval) and per minute. The one-off requests
  at the end of a run (final totals, report and figure artifacts) are reported separately,
  with the end-of-run delay (how long ``with mlflow.start_run():`` takes to exit).
* CPU: each worker also reports the CPU time its other threads used during the loop
  (process CPU time minus the main thread's), i.e. green-mlops' sampler and sender threads.

Targets (issue 4): median step overhead <= 1 %; <= 1 request per logging interval during a
run; ending a tracked run adds <= 100 ms (issue 10.19; measured on ``--sweep`` short runs
after the loop, 5 steps each). Exit status 0 when all pass (INCONCLUSIVE is not a pass).
Numbers from a shared, busy machine are noisy: a ratio inside the A/A band is not a result.
No network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test server helper
from tests.mlflow_server import MlflowServer

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one BLAS thread, here and in the workers (inherited)

TARGET_OVERHEAD = 0.01
TARGET_REQUESTS_PER_INTERVAL = 1.0
TARGET_END_OF_RUN_S = 0.1  # leaving a tracked run, minus leaving an untracked one (issue 10.19)
MATRIX = 192
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts/"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "server",
    "date",
}


# --- the user-style script ----------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> None:
    """One training-like run; prints one JSON line with its step times and loop window."""
    import mlflow

    a, b = operands()
    mlflow.set_experiment(spec["experiment"])
    times: list[float] = []
    with mlflow.start_run() as run:
        loop_start = time.time()
        cpu0, main0 = time.process_time(), time.thread_time()
        x = a
        for step in range(spec["steps"]):
            t0 = time.perf_counter()
            x, loss = train_step(x, b, spec["matmuls"], spec["python_ops"])
            if step % spec["log_every"] == 0:
                mlflow.log_metric("loss", loss, step=step)
            times.append(time.perf_counter() - t0)
        loop_end = time.time()
        other_cpu_s = (time.process_time() - cpu0) - (time.thread_time() - main0)
    exited = time.time()
    # a sweep of short trials (Optuna-like): how long leaving each run takes
    sweep_start, sweep_ends = time.time(), []
    for _ in range(spec.get("sweep", 0)):
        with mlflow.start_run():
            for step in range(5):
                x, loss = train_step(x, b, spec["matmuls"], spec["python_ops"])
                mlflow.log_metric("loss", loss, step=step)
            left = time.perf_counter()
        sweep_ends.append(time.perf_counter() - left)
    print(
        json.dumps(
            {
                "sweep_start": sweep_start,
                "sweep_end_run_s": sweep_ends,
                "run_id": run.info.run_id,
                "loop_start": loop_start,
                "loop_end": loop_end,
                "end_run_s": exited - loop_end,
                "median_step_s": statistics.median(times),
                "mean_step_s": statistics.fmean(times),
                "loop_s": loop_end - loop_start,
                "other_threads_cpu_s": other_cpu_s,
            }
        ),
        flush=True,
    )


def operands() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((MATRIX, MATRIX)), rng.standard_normal((MATRIX, MATRIX)) / MATRIX


def train_step(x: Any, b: Any, matmuls: int, python_ops: int) -> tuple[Any, float]:
    """numpy work (releases the GIL) and pure Python work (holds it), like a training step."""
    import numpy as np

    for _ in range(matmuls):
        x = np.tanh(x @ b)
    loss = sum(i * i for i in range(python_ops)) * 0.0 + float(x[0, 0])
    return x, loss


def calibrate(step_s: float) -> tuple[int, int]:
    """(matmuls, python_ops) for a median step of ~step_s: 80 % numpy, 20 % pure Python."""
    a, b = operands()

    def median_step(matmuls: int, python_ops: int, n: int = 60) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            train_step(a, b, matmuls, python_ops)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    per_matmul = median_step(20, 0, 10) / 20
    per_op = median_step(0, 200_000, 10) / 200_000
    matmuls = max(1, round(0.8 * step_s / per_matmul))
    python_ops = max(1, round(0.2 * step_s / per_op))
    scale = step_s / median_step(matmuls, python_ops)
    return max(1, round(matmuls * scale)), max(1, round(python_ops * scale))


# --- MLflow server and counting proxy -----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    time: float
    method: str
    path: str

    @property
    def kind(self) -> str:
        if self.method == "POST" and self.path.startswith(LOG_BATCH):
            return "log-batch"
        if self.method == "PUT" and self.path.startswith(ARTIFACTS):
            return "artifact upload"
        return f"{self.method} {self.path.split('?')[0].removeprefix('/api/2.0/mlflow')}"


class CountingProxy(ThreadingHTTPServer):
    """Forwards every request to the MLflow server and records it."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def between(self, start: float, end: float) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if start <= r.time <= end]


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingProxy

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        body = self._body()
        with self.server.lock:
            self.server.requests.append(Request(time.time(), self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


# --- the benchmark -------------------------------------------------------------------------------


@dataclass
class Run:
    tracked: bool
    result: dict[str, Any]
    requests: list[Request] = field(default_factory=list)  # the whole process
    in_loop: list[Request] = field(default_factory=list)

    @property
    def outside(self) -> list[Request]:
        start, end = self.result["loop_start"], self.result["loop_end"]
        sweep = self.result.get("sweep_start", math.inf)
        return [r for r in self.requests if not start <= r.time <= end and r.time < sweep]


def run_worker(
    spec: dict[str, Any], tracked: bool, proxy: CountingProxy, cache: Path, interval: float
) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": proxy.url,
        "GREEN_MLOPS_CACHE_DIR": str(cache),
        "GREEN_MLOPS_LOCATION": "DE",
        "GREEN_MLOPS_LOG_INTERVAL_S": str(interval),
        "PYTHONUNBUFFERED": "1",
    }
    if tracked:
        env["GREEN_MLOPS_ENABLE"] = "1"
    started = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=spec["steps"] * 0.1 + 300,
    )
    ended = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1])
    requests = proxy.between(started, ended)
    in_loop = [r for r in requests if result["loop_start"] <= r.time <= result["loop_end"]]
    return Run(tracked, result, requests, in_loop)


def ratio_line(label: str, ratios: list[float]) -> str:
    med = statistics.median(ratios)
    return (
        f"  {label:<34} {100 * (med - 1):+6.2f} %   "
        f"(per pair {100 * (min(ratios) - 1):+.2f} .. {100 * (max(ratios) - 1):+.2f} %)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 pairs of ~5 s runs, interval 2 s")
    parser.add_argument("--pairs", type=int, help="A/B pairs (default 4; quick 2)")
    parser.add_argument("--seconds", type=float, help="loop length per run (default 25; quick 5)")
    parser.add_argument("--log-interval", type=float, help="GREEN_MLOPS_LOG_INTERVAL_S (10; 2)")
    parser.add_argument("--log-every", type=int, default=50, help="log_metric every N steps")
    parser.add_argument("--step-ms", type=float, default=5.0, help="target step time")
    parser.add_argument(
        "--sweep", type=int, default=20, help="short runs (5 steps) after the loop, each timed"
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    pairs = args.pairs or (2 if args.quick else 4)
    seconds = args.seconds or (5.0 if args.quick else 25.0)
    interval = args.log_interval or (2.0 if args.quick else 10.0)

    matmuls, python_ops = calibrate(args.step_ms / 1000)
    steps = round(seconds * 1000 / args.step_ms)
    print(
        f"mlflow overhead: {pairs} A/B pairs of {steps} steps (~{args.step_ms:g} ms: "
        f"{matmuls} x {MATRIX}^2 matmul + {python_ops} Python ops), log_metric every "
        f"{args.log_every} steps, GREEN_MLOPS_LOG_INTERVAL_S={interval:g}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="green-mlops-bench-") as tmp:
        root = Path(tmp)
        server = MlflowServer(root)
        server.start(timeout=90.0)
        proxy = CountingProxy(server.port)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            from mlflow.tracking.client import MlflowClient

            experiment = f"mlflow-overhead-{int(time.time())}"
            MlflowClient(proxy.url).create_experiment(experiment)
            spec = {
                "experiment": experiment,
                "steps": steps,
                "matmuls": matmuls,
                "python_ops": python_ops,
                "log_every": args.log_every,
                "sweep": args.sweep,
            }
            cache = root / "cache"
            run_worker({**spec, "steps": min(steps, 400)}, False, proxy, cache, interval)
            runs: list[Run] = []
            for i in range(2 * pairs + 1):  # A B A B ... A
                tracked = i % 2 == 1
                run = run_worker(spec, tracked, proxy, cache, interval)
                runs.append(run)
                r = run.result
                print(
                    f"  {i + 1:2d} {'B tracked  ' if tracked else 'A untracked'} "
                    f"median step {1000 * r['median_step_s']:.3f} ms, "
                    f"mean {1000 * r['mean_step_s']:.3f} ms, loop {r['loop_s']:.1f} s, "
                    f"other threads' CPU {1000 * r['other_threads_cpu_s']:.0f} ms, "
                    f"end of run {r['end_run_s']:.2f} s, requests {len(run.requests)} "
                    f"({len(run.in_loop)} during the loop)",
                    flush=True,
                )
        finally:
            proxy.shutdown()
            server.stop()
    return report(runs, interval)


def report(runs: list[Run], interval: float) -> int:
    untracked = [r for r in runs if not r.tracked]
    tracked = [r for r in runs if r.tracked]
    # B_i against the A before and the A after it
    neighbours = [(untracked[i], b, untracked[i + 1]) for i, b in enumerate(tracked)]

    def ratios(key: str) -> list[float]:
        return [b.result[key] / math.sqrt(a.result[key] * c.result[key]) for a, b, c in neighbours]

    aa = [
        c.result["median_step_s"] / a.result["median_step_s"]
        for a, c in itertools.pairwise(untracked)
    ]
    print("\nstep time, tracked / untracked (each B against the A before and after it):")
    overhead = statistics.median(ratios("median_step_s")) - 1
    print(ratio_line("median step time", ratios("median_step_s")))
    print(ratio_line("mean step time", ratios("mean_step_s")))
    print(ratio_line("loop wall time", ratios("loop_s")))
    print(ratio_line("noise floor: A/A median step", aa))
    cpu = [
        (b.result["other_threads_cpu_s"] - a.result["other_threads_cpu_s"]) / b.result["loop_s"]
        for a, b, _ in neighbours
    ]
    print(
        f"  green-mlops' threads' CPU time: {100 * statistics.median(cpu):.2f} % of the loop "
        f"time (per pair {', '.join(f'{100 * x:.2f}' for x in cpu)} %; load-independent)"
    )
    end_a = statistics.median(r.result["end_run_s"] for r in untracked)
    end_b = statistics.median(r.result["end_run_s"] for r in tracked)
    print(
        f"  end of run (leaving `with start_run()`): {end_a:.2f} s untracked, {end_b:.2f} s tracked"
    )
    sweep_a = [t for r in untracked for t in r.result["sweep_end_run_s"]]
    sweep_b = [t for r in tracked for t in r.result["sweep_end_run_s"]]
    end_extra = (
        statistics.median(sweep_b) - statistics.median(sweep_a)
        if sweep_a and sweep_b
        else end_b - end_a
    )
    if sweep_a and sweep_b:
        print(
            f"  end of a short run ({len(sweep_b)} tracked, {len(sweep_a)} untracked, "
            "5 steps each): "
            f"median {1000 * statistics.median(sweep_a):.0f} ms untracked, "
            f"{1000 * statistics.median(sweep_b):.0f} ms tracked, max "
            f"{1000 * max(sweep_b):.0f} ms tracked"
        )

    extra_in_loop, loop_intervals, per_pair, one_off = 0, 0.0, [], []
    kinds: dict[str, list[int]] = {}
    for a, b, _ in neighbours:
        extra = len(b.in_loop) - len(a.in_loop)
        extra_in_loop += extra
        loop_intervals += b.result["loop_s"] / interval
        per_pair.append(extra / (b.result["loop_s"] / interval))
        one_off.append(len(b.outside) - len(a.outside))
        for kind in {r.kind for r in a.requests + b.requests}:
            n = sum(r.kind == kind for r in b.requests) - sum(r.kind == kind for r in a.requests)
            kinds.setdefault(kind, []).append(n)
    requests = extra_in_loop / loop_intervals
    print("\nREST requests made by green-mlops (tracked minus the untracked run before it):")
    print(
        f"  during the run: {requests:.2f} per logging interval of {interval:g} s "
        f"({requests * 60 / interval:.1f} per minute; {extra_in_loop} requests in "
        f"{loop_intervals:.1f} intervals; per pair {', '.join(f'{x:.2f}' for x in per_pair)})"
    )
    print(f"  once per run, outside the loop: {', '.join(f'{x:+d}' for x in one_off)} per pair")
    for kind, counts in sorted(kinds.items()):
        if any(counts):
            print(f"    {kind:<40} {', '.join(f'{c:+d}' for c in counts)} per pair (whole process)")

    noise = max(abs(x - 1) for x in aa)
    if overhead <= TARGET_OVERHEAD and noise <= TARGET_OVERHEAD:
        verdict = "PASS"
    elif overhead > TARGET_OVERHEAD and overhead > noise:
        verdict = "FAIL"
    else:
        verdict = "INCONCLUSIVE"
    ok_requests = requests <= TARGET_REQUESTS_PER_INTERVAL
    print()
    print(
        f"{verdict}: median step overhead {100 * overhead:+.2f} % "
        f"(target <= {100 * TARGET_OVERHEAD:g} %; A/A noise band +-{100 * noise:.2f} %)"
    )
    print(
        f"{'PASS' if ok_requests else 'FAIL'}: {requests:.2f} requests per logging interval "
        f"during a run (target <= {TARGET_REQUESTS_PER_INTERVAL:g})"
    )
    ok_end = end_extra <= TARGET_END_OF_RUN_S
    print(
        f"{'PASS' if ok_end else 'FAIL'}: ending a tracked run adds {1000 * end_extra:.0f} ms "
        f"(median, target <= {1000 * TARGET_END_OF_RUN_S:g} ms)"
    )
    return 0 if verdict == "PASS" and ok_requests and ok_end else 1


if __name__ == "__main__":
    sys.exit(main())
