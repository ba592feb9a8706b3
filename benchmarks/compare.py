"""``green-mlops compare`` on 1,000 runs: the MLflow query and the comparison timed apart.

    python benchmarks/compare.py                # 1,000 runs
    python benchmarks/compare.py --runs 5000

The runs are SYNTHETIC: written with ``MlflowClient.log_batch`` straight into the sqlite store
of a real MLflow server (``tests/mlflow_server.py``), which then serves them on 127.0.0.1;
they carry the ``green/*`` metrics and ``green.*`` tags a real plugin run has (the same keys;
values drawn at random), a user metric ``val_acc``, two params and a ``team`` tag; every 20th
run is the nested child of the run before it. Nothing was measured: this times reading and
comparing, not energy.

Timed (median of ``--repeat`` rounds): ``read_runs`` (MLflow ``search_runs``, pages of 1,000),
``compare`` (quality per kWh, front, baseline deltas, totals by ``team``), and rendering the
result as CSV, JSON and Markdown.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from green_mlops.commands.compare import render  # noqa: E402
from green_mlops.compare import compare  # noqa: E402
from green_mlops.integrations.mlflow.reader import read_runs  # noqa: E402
from tests.mlflow_server import MlflowServer  # noqa: E402

TAGS = {
    "green.meters": "nvml:counter(gpu),rapl:counter(cpu),ram_estimate:estimate(ram)",
    "green.measured": "false",
    "green.devices": "gpu:0,cpu:package-0,ram:estimate",
    "green.method.gpu": "counter",
    "green.method.cpu": "counter",
    "green.method.ram": "estimate",
    "green.location": "DE, Germany",
    "green.intensity.source": "electricitymaps/DE (100%)",
    "green.intensity.basis": "average",
    "green.intensity.scope": "lifecycle",
    "green.intensity.estimated": "false",
    "green.intensity.vintage": "live",
    "green.intensity.fallbacks": "none",
    "green.pue": "1.2",
    "green.currency": "EUR",
    "green.functional_unit": "run",
    "green.not_reported": "none",
    "green.run_status": "FINISHED",
}


def _run(client: MlflowClient, experiment_id: str, i: int, parent: str | None) -> str:
    rng = random.Random(i)
    start = int(time.time() * 1000) - rng.randrange(10**9)
    seconds = rng.uniform(600, 36000)
    kwh = seconds / 3600 * rng.uniform(0.2, 2.5)
    parts = {"gpu": 0.7, "cpu": 0.25, "ram": 0.05}
    metrics = {
        "green/energy_kwh": kwh,
        "green/energy_uncertainty_kwh": kwh * 0.08,
        "green/duration_s": seconds,
        **{f"green/energy/{c}_kwh": kwh * share for c, share in parts.items()},
        **{f"green/phase/{p}_kwh": kwh * s for p, s in (("train", 0.8), ("validation", 0.2))},
        **{f"green/phase/{p}_s": seconds * s for p, s in (("train", 0.8), ("validation", 0.2))},
        "green/energy_facility_kwh": kwh * 1.2,
        "green/co2e_g": kwh * 1.2 * 380,
        "green/co2e_uncertainty_g": kwh * 1.2 * 380 * 0.08,
        "green/intensity_g_per_kwh": 380.0,
        "green/cost": kwh * 1.2 * 0.25,
        "green/embodied_g": seconds * 0.01,
        "val_acc": min(0.99, 0.6 + 0.1 * kwh**0.3 + rng.gauss(0, 0.03)),
    }
    tags = {**TAGS, "team": rng.choice(["vision", "nlp", "speech"]), "mlflow.runName": f"r{i:04d}"}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"r{i:04d}")
    step = int(seconds)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, start + step * 1000, step) for k, v in metrics.items()],
        params=[Param("lr", str(rng.choice([1e-3, 3e-4, 1e-4]))), Param("batch", "64")],
    )
    client.set_terminated(run.info.run_id, end_time=start + int(seconds * 1000))
    return str(run.info.run_id)


def make(client: MlflowClient, experiment_id: str, runs: int) -> list[str]:
    """Every 20th run nested in the one before it."""
    ids: list[str] = []
    for i in range(runs):
        ids.append(_run(client, experiment_id, i, ids[-1] if i % 20 == 19 else None))
    return ids


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="green-compare-bench-") as folder:
        # written into the store directly (quick), then read through the server (as users do)
        store = MlflowClient(f"sqlite:///{Path(folder) / 'mlflow.db'}")
        name = f"bench-{uuid.uuid4().hex[:6]}"
        experiment_id = store.create_experiment(name)
        t0 = time.perf_counter()
        ids = make(store, experiment_id, args.runs)
        made_s = time.perf_counter() - t0
        server = MlflowServer(Path(folder))
        server.start()
        try:
            query_s, records = timed(lambda: read_runs(server.url, [name]), args.repeat)
            assert len(records) == args.runs, len(records)
            compare_s, result = timed(
                lambda: compare(records, metric="val_acc", mode="max", baseline=ids[0], by="team"),
                args.repeat,
            )
            render_s = {
                fmt: timed(lambda fmt=fmt: render(result, fmt), args.repeat)[0]
                for fmt in ("csv", "json", "markdown")
            }
        finally:
            server.stop()
    front = sum(r.on_front for r in result.rows)
    print(f"SYNTHETIC runs (log_batch of realistic green/* keys, nothing measured): {args.runs}")
    print(f"  written in {made_s:.1f} s (into the sqlite store; not part of compare)")
    print(f"MLflow query (read_runs over HTTP, pages of 1000): {query_s:.2f} s", end="")
    print(f" (median of {args.repeat})")
    print(f"compare (quality per kWh, front, baseline, totals by team): {compare_s * 1000:.1f} ms")
    for fmt, seconds in render_s.items():
        print(f"render {fmt}: {seconds * 1000:.1f} ms")
    total = result.total.energy_kwh
    shown = "absent" if total is None else f"{total:.1f} kWh"
    print(f"front: {front} runs; groups: {len(result.groups)}; total energy {shown}")


if __name__ == "__main__":
    main()
