"""What a very long MLflow run costs in metric points, requests and spool space (issue 10.18).

    python benchmarks/mlflow_long_run.py                 # 30 days at the default 10 s interval
    python benchmarks/mlflow_long_run.py --days 7 --interval 30

Simulated time, real code: every logging interval of the run, the plugin's own batch builder
(``integrations.mlflow.plugin._queue`` into a ``RunWriter``, with its rate for the totals) is
given a result with the 19 totals of a GPU+CPU+RAM run and the power points its tracker's
timeline would have by then (one per interval, halving in resolution past 4096 points, as
``Tracker`` does). Two cases:

* server up throughout: the points and ``log_batch`` requests that would be sent;
* server down throughout: every batch goes through the real spool (``mlflow.spool.append``,
  with its lock, fsync and compaction) in a temp dir; reported: the spool's size at the end
  and the requests a replay takes (merged batches, 1000 metrics per request).

The "before" figures are the previous policy (every total at every interval), computed from
the same batches without spooling them (370 MB would not fit a quick benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from green_mlops.config import Settings
from green_mlops.integrations.mlflow import plugin, spool
from green_mlops.integrations.mlflow.writer import RunWriter
from green_mlops.session import Measurement, Result
from green_mlops.units import DAY, J_PER_KWH

MAX_TIMELINE = 4096
TOTAL_KEYS = [
    "green/energy_kwh",
    "green/energy_uncertainty_kwh",
    "green/duration_s",
    "green/energy/gpu_kwh",
    "green/energy/cpu_kwh",
    "green/energy/ram_kwh",
    "green/energy_facility_kwh",
    "green/co2e_g",
    "green/co2e_uncertainty_g",
    "green/intensity_g_per_kwh",
    "green/cost",
    "green/embodied_g",
    "green/phase/other_kwh",
    "green/phase/other_s",
    "green/phase/other/gpu_kwh",
    "green/phase/other/cpu_kwh",
    "green/phase/other/ram_kwh",
    "green/phase/other_co2e_g",
    "green/power_mean_w",
]


def simulate(days: float, interval: float, spool_dir: Path | None) -> dict[str, Any]:
    settings = Settings.load(log_interval_s=interval, cache_dir=spool_dir or Path("/nonexistent"))
    run_id = "r" * 32
    writer = RunWriter("http://127.0.0.1:5000", run_id, settings)
    run = plugin._Run(run_id, writer, Measurement(settings))
    path = writer.spool_path
    t0 = 1_700_000_000.0
    watts = 450.0
    step, last_point, timeline = interval, 0.0, 1
    points = before_points = requests = 0
    before_bytes = 0
    recent: list[tuple[float, float]] = []
    ticks = int(days * DAY / interval)
    started = time.perf_counter()
    for i in range(1, ticks + 1):
        age = i * interval
        if age - last_point >= step:  # the tracker's timeline
            last_point = age
            timeline += 1
            recent = [*recent[-3:], (t0 + age, watts)]
            if timeline > MAX_TIMELINE:
                timeline = timeline // 2 + 1
                step *= 2
        kwh = watts * age / J_PER_KWH
        metrics = {key: kwh for key in TOTAL_KEYS}
        metrics["green/duration_s"] = age
        snapshot = SimpleNamespace(duration_s=age, started_at=t0, running=True)
        result = Result(snapshot, metrics, {}, power=recent)  # type: ignore[arg-type]
        # before: every total at every interval, plus the new power points
        new_power = sum(1 for t, _ in recent if t > writer.power_until)
        before_points += len(TOTAL_KEYS) + new_power
        if i == 1 or i % 10000 == 0:
            sample = [(k, v, 0, int(age)) for k, v in metrics.items()]
            sample += [("system/green/power_w", watts, 0, int(age))] * new_power
            size = len(
                json.dumps(
                    {
                        "run_id": run.run_id,
                        "tracking_uri": writer.tracking_uri,
                        "metrics": sample,
                        "tags": {},
                        "report": None,
                        "power_until": 0,
                    }
                )
            )
            before_bytes += size * (1 if i == 1 else 10000)
        plugin._queue(run, result, final=False, extra_tags={})
        batch = writer.take()
        if batch is None:
            continue
        requests += 1
        points += len(batch["metrics"])
        if spool_dir is not None:
            spool.append(path, batch)
    out: dict[str, Any] = {
        "ticks": ticks,
        "points": points,
        "requests": requests,
        "before_points": before_points,
        "before_bytes": before_bytes,
        "seconds": time.perf_counter() - started,
    }
    if spool_dir is not None:
        out["spool_bytes"] = path.stat().st_size
        merged = spool.merge(spool._read(path))
        out["replay_requests"] = sum(max(1, math.ceil(len(b["metrics"]) / 1000)) for b in merged)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args()
    up = simulate(args.days, args.interval, None)
    with tempfile.TemporaryDirectory() as tmp:
        down = simulate(args.days, args.interval, Path(tmp))
    print(
        f"mlflow long run: {args.days:g} days at GREEN_MLOPS_LOG_INTERVAL_S={args.interval:g} "
        f"({up['ticks']:,} intervals, {len(TOTAL_KEYS)} totals), simulated time"
    )
    print(
        f"  server up:   {up['points']:,} metric points in {up['requests']:,} requests "
        f"(before: {up['before_points']:,} points, {up['ticks']:,} requests)"
    )
    print(
        f"  server down: spool {down['spool_bytes'] / 1e6:.2f} MB, replayed in "
        f"{down['replay_requests']:,} requests (before: ~{down['before_bytes'] / 1e6:.0f} MB, "
        f"{up['ticks']:,} requests); simulation took {down['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
