"""Time of carbon accounting for a long run: ``green_mlops.carbon.account`` on a 24 h run.

    python benchmarks/carbon_accounting.py               # 21 repeats
    python benchmarks/carbon_accounting.py --repeats 51 --profile

Input, like a day-long training run priced by a time-resolved API with a yearly table behind
it: an energy timeline with a point every 10 s (8,641 points, power varying between 200 and
700 W), priced by a chain of two series: 5-minute intensity points (as WattTime MOER), then a
yearly table covering all time. Two cases: the 5-minute points cover the whole day (288
points: the target case), and they cover the first 20 h only (a forecast shorter than the
run: the last 4 h fall back to the yearly table).

Prints, per case, the median and min..max wall time of one ``account()`` call over
``--repeats`` calls (after one untimed warm-up) and a PASS/FAIL line for the 24 h case against
the 10 ms target (median); ``--profile`` adds
the top functions of a cProfile run. Exit status 0 on PASS, 1 on FAIL. No network.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from green_mlops.carbon import account
from green_mlops.intensity import FOREVER, IntensityPoint, IntensitySeries

TARGET_MS = 10.0
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_input(api_hours: int) -> tuple[list[tuple[float, float]], list[IntensitySeries]]:
    """The 24 h timeline, and 5-minute points for the first ``api_hours`` then a yearly table."""
    timeline: list[tuple[float, float]] = []
    joules = 0.0
    for i in range(24 * 360 + 1):
        t = START + 10.0 * i
        if i:
            joules += 10.0 * (450.0 + 250.0 * math.sin(i / 50.0))
        timeline.append((t, joules))
    points = tuple(
        IntensityPoint(START + 300.0 * k, START + 300.0 * (k + 1), 300.0 + 100 * math.cos(k / 7))
        for k in range(api_hours * 12)
    )
    forecast = IntensitySeries(
        points, "watttime", "forecast", "CAISO_NORTH", "marginal", "direct", True, "now"
    )
    yearly = IntensitySeries(
        (IntensityPoint(FOREVER[0], FOREVER[1], 250.0),),
        "static",
        "ember-yearly",
        "US",
        "average",
        "lifecycle",
        False,
        "2024",
    )
    return timeline, [forecast, yearly]


def _time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of account()")
    args = parser.parse_args(argv)

    medians: dict[int, float] = {}
    for api_hours in (24, 20):
        timeline, chain = make_input(api_hours)
        current = account(timeline, chain)
        print(
            f"case: {len(timeline)} timeline points (10 s); {len(chain[0].points)} 5-min "
            f"intensity points ({api_hours} h) then a yearly table; {current.kwh:.3f} kWh, "
            f"{current.grams:.1f} g, {len(current.kwh_by_source)} source(s)"
        )
        times: dict[str, list[float]] = {"account": []}
        for _ in range(args.repeats):
            times["account"].append(_time_ms(partial(account, timeline, chain)))
        for name, values in times.items():
            print(
                f"  {name:>13}: median {statistics.median(values):7.2f} ms "
                f"(min {min(values):.2f} .. max {max(values):.2f}, {len(values)} calls)"
            )
        medians[api_hours] = statistics.median(times["account"])
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(account, timeline, chain)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(6)
            print(out.getvalue())

    median = medians[24]
    verdict = "PASS" if median < TARGET_MS else "FAIL"
    print(
        f"{verdict}: account() median {median:.2f} ms for the 24 h case, target < {TARGET_MS:g} ms"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
