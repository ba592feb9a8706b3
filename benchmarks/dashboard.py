"""The green dashboard on an experiment of 1,000 runs, and the cost of the report views at the
end of a run.

    python benchmarks/dashboard.py              # 1,000 runs; ~2 min on 2 busy cores
    python benchmarks/dashboard.py --runs 5000

1. Pages. The runs are SYNTHETIC (``benchmarks/compare.py``'s: the keys of a real plugin run,
   random values, every 20th nested), written into a sqlite store which a real
   ``mlflow server --app-name green-mlops`` (``tests/dashboard_server.py``) then serves on
   127.0.0.1. Timed apart (median of ``--repeat``), in this process on the same store: the
   query (``store_runs``: MLflow's ``search_runs``, pages of 1,000) and the rendering
   (``compare`` + the experiment page's HTML; ``by_month`` + the overview's HTML). Then the
   pages over HTTP from the server, query included. Target: a page renders in < 2 s, query
   time apart.
2. End of a run. A real plugin run (``tests/green_runs.py``); its ``green/report.json`` with the
   energy timeline stretched to ``--points`` points (an hour at 5 s). Timed: what the upload
   folder took before (JSON + ``green/power.png``) and now (+ ``green/report.html`` and the
   chart as an image: ``views.write``, one ``get_run`` request included).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from green_mlops.compare import by_month, compare  # noqa: E402
from green_mlops.integrations.mlflow import views  # noqa: E402
from green_mlops.integrations.mlflow.app import pages  # noqa: E402
from green_mlops.integrations.mlflow.chart import draw_power  # noqa: E402
from green_mlops.integrations.mlflow.reader import store_runs  # noqa: E402
from tests.dashboard_server import DashboardServer  # noqa: E402
from tests.green_runs import RunSpec, make_runs  # noqa: E402

TARGET_S = 2.0


def _synthetic() -> Any:
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks/compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
        return int(r.status)


def pages_part(folder: Path, runs: int, repeat: int) -> tuple[bool, dict[str, Any]]:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    exp_id = client.create_experiment(name)
    t0 = time.perf_counter()
    ids = _synthetic().make(client, exp_id, runs)
    made_s = time.perf_counter() - t0
    store = SqlAlchemyStore(uri, str(folder / "artifacts"))
    query_s, records = timed(lambda: store_runs(store, {exp_id: name}, "bench"), repeat)
    assert len(records) == runs, len(records)

    def experiment_page() -> str:
        c = compare(records, metric="val_acc", mode="max", baseline=ids[0])
        return pages.experiment_page(exp_id, name, c, ["val_acc"])

    def overview_page() -> str:
        return pages.overview_page({exp_id: name}, by_month(records), None, "")

    page_s, html = timed(experiment_page, repeat)
    overview_s, _ = timed(overview_page, repeat)
    server = DashboardServer(folder)
    server.start()
    try:
        base = f"{server.url}/green/experiment?experiment_id={exp_id}&metric=val_acc"
        http_page_s, _ = timed(lambda: get(f"{base}&baseline={ids[0]}"), repeat)
        http_overview_s, _ = timed(lambda: get(f"{server.url}/green/"), repeat)
    finally:
        server.stop()
    ok = page_s < TARGET_S and overview_s < TARGET_S
    print(f"pages: {runs} synthetic runs written in {made_s:.1f} s (sqlite store)")
    print(f"  query (store_runs, in process)          {query_s:7.3f} s")
    print(f"  experiment page: compare + HTML         {page_s:7.3f} s  ({len(html) / 1e6:.1f} MB)")
    print(f"  overview page: by_month + HTML          {overview_s:7.3f} s")
    print(
        f"  over HTTP, query included: experiment   {http_page_s:7.3f} s, overview "
        f"{http_overview_s:.3f} s"
    )
    print(
        f"  target: a page renders in < {TARGET_S:g} s (query apart): {'MET' if ok else 'NOT MET'}"
    )
    return ok, {"query_s": query_s, "page_s": page_s, "overview_s": overview_s}


def end_of_run_part(folder: Path, points: int, repeat: int) -> None:
    server = DashboardServer(folder / "run-server")
    server.root.mkdir()
    server.start()
    try:
        ids = make_runs(server, [RunSpec("bench-end", "r", busy_s=1.0)], folder / "run")
        client = MlflowClient(server.url)
        run_id = ids["r"]
        report = json.loads(
            Path(client.download_artifacts(run_id, "green/report.json")).read_text()
        )
        timeline = report["energy"]["timeline"]
        first, last = timeline[0], timeline[-1]
        long = copy.deepcopy(report)
        long["energy"]["timeline"] = [
            {
                **last,
                "time": first["time"] + 5.0 * i,
                "joules_by_component": {
                    k: v * i / points for k, v in last["joules_by_component"].items()
                },
            }
            for i in range(points)
        ]
        for label, doc in (("as logged", report), (f"{points} points", long)):

            def before(doc: dict[str, Any] = doc) -> None:
                with tempfile.TemporaryDirectory() as d:
                    (Path(d) / "report.json").write_text(json.dumps(doc, indent=2, default=str))
                    draw_power(doc, Path(d) / "power.png")

            def after(doc: dict[str, Any] = doc) -> None:
                with tempfile.TemporaryDirectory() as d:
                    (Path(d) / "green").mkdir()
                    (Path(d) / "green/report.json").write_text(
                        json.dumps(doc, indent=2, default=str)
                    )
                    views.write(client, run_id, doc, Path(d))

            before_s, _ = timed(before, repeat)
            after_s, _ = timed(after, repeat)
            n = len(doc["energy"]["timeline"])
            print(
                f"end of a run ({label}: {n} timeline points): upload folder before "
                f"{before_s:.3f} s (JSON + PNG), now {after_s:.3f} s (+ HTML + image), "
                f"+{after_s - before_s:.3f} s"
            )
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--points", type=int, default=720)
    parser.add_argument("--skip-end-of-run", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="green-dashboard-bench-") as folder:
        ok, _ = pages_part(Path(folder), args.runs, args.repeat)
        if not args.skip_end_of_run:
            end_of_run_part(Path(folder), args.points, args.repeat)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
