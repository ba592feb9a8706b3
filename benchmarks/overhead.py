"""Overhead of green-mlops on a small CPU training loop, side by side with CodeCarbon.

    python benchmarks/overhead.py              # 5 rounds x 4 runs x 3000 steps: ~6 min, 2 cores
    python benchmarks/overhead.py --quick      # ~40 s smoke run (numbers are indicative only)
    python benchmarks/overhead.py --repeats 7 --steps 4000 --no-control

Workload: a 3-layer MLP (512-512-512-10, batch 128, SGD) on synthetic data with
``torch.set_num_threads(1)``, ~5 ms per training step. Every epoch is 50 training steps plus
10 forward-only validation batches. These conditions run the *same* loop, same seed, same
number of steps:

* ``untracked``: no tracking at all;
* ``green-mlops``: ``Tracker().start()`` ... ``.stop()`` with the meters this machine offers, a
  ``train`` and a ``validation`` phase per epoch (``precise=True``, they wake the sampler) and a
  ``data-wait`` phase around every batch fetch (``precise=False``), like a real training loop;
* ``codecarbon``: ``OfflineEmissionsTracker(country_iso_code="DEU", log_level="error",
  save_to_file=False)`` with its default ``measure_power_secs`` (15 s, plus its 1 s power monitor);
  the default run length (~16 s) lets one of those 15 s measurements fall inside each loop;
* ``untracked-A/A`` (unless ``--no-control``): the untracked loop again, a control whose ratio to
  ``untracked`` is the noise floor of this run: tracked ratios inside its band are not a result.

Method (these machines are noisy, other jobs share the cores; absolute times are not comparable
between runs, so only ratios measured side by side in one run are reported):

1. One untimed warm-up loop. Then ``--repeats`` rounds; each round runs every condition once,
   in an order rotated from round to round (ABCD, BCDA, CDAB, ...) so that no condition always
   follows the same one. Tracker start/stop are outside the timed loop and timed separately.
2. Per run: the median training-step time (per-step costs: the phase marks; robust to
   outliers), the wall time of the whole loop (steps, validation, phase boundaries: includes
   the periodic background sampling that a median hides) and the process CPU time over the
   loop (all threads: the trackers' own work, independent of idle cores).
3. Per round: each tracked value divided by the untracked value *of the same round*. Reported:
   the median of these per-round ratios over the rounds, with their min..max as the noise band.
   The overhead verdict uses the loop wall-time ratio (what a user pays, all costs included),
   not the median step ratio alone.
4. Start time: ``import`` + construct + ``start()`` in a fresh Python process that has already
   imported torch (like a training script) and settled the full garbage collection that
   importing torch leaves pending (it would fire inside whichever start comes first), median
   over ``--repeats`` processes per tool, run alternately; the start verdict uses this number,
   which is what a training script pays. The in-process start (first, and median of the later,
   warm ones) is printed as well.
5. Micro-benchmarks: one ``enter``/``exit`` call on a running tracker with CPU-only meters (the
   ``nvml`` plugin disabled), timed individually (``precise=True`` calls spaced 2 ms apart so
   the sampler they wake is idle again, as at real phase boundaries; ``precise=False`` calls
   back to back); one ``sample_now`` with the training loop's meters (one read of every meter
   plus attribution, which the sampler thread pays every ``interval_s`` and after each precise
   boundary). Medians, timer overhead included. From these, a direct cost accounting of one
   run (calls x medians): noise-free, but blind to indirect costs (caches, GIL hand-offs).

Exit status: 0 when every target passes, 1 otherwise. No network.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BATCH, IN_FEATURES, HIDDEN, CLASSES = 128, 512, 512, 10
EPOCH_STEPS, VAL_STEPS, DISTINCT_BATCHES = 50, 10, 50
SEED = 1234
CC_KWARGS: dict[str, Any] = {
    "country_iso_code": "DEU",
    "log_level": "error",
    "save_to_file": False,
}
CC_MEASURE_POWER_SECS = 15.0  # CodeCarbon's default, for the printed note only

UNTRACKED, GREEN, CODECARBON, CONTROL = "untracked", "green-mlops", "codecarbon", "untracked-A/A"

TARGET_OVERHEAD = 0.01  # <= 1 % slower
TARGET_START_S = 0.100
TARGET_BOUNDARY_S = 100e-6

# Fresh-process start. Torch is imported first (untimed): a training script has it loaded.
# ``gc.collect()`` after ``import torch``: importing torch leaves a full (generation-2) garbage
# collection pending, ~70 ms on this machine, that fires at the next allocation-heavy moment,
# whoever's it is. Settling it first charges each tool with its own start only.
COLD_GREEN = """
import gc, time, torch
gc.collect()
t0 = time.perf_counter()
from green_mlops import Tracker
tracker = Tracker().start()
t1 = time.perf_counter()
tracker.stop()
print(t1 - t0)
"""
COLD_CODECARBON = """
import gc, logging, time, torch
logging.getLogger("codecarbon").setLevel(logging.ERROR)
gc.collect()
t0 = time.perf_counter()
from codecarbon import OfflineEmissionsTracker
tracker = OfflineEmissionsTracker(**CC_KWARGS)
tracker.start()
t1 = time.perf_counter()
tracker.stop()
print(t1 - t0)
""".replace("CC_KWARGS", repr(CC_KWARGS))


@dataclass
class Run:
    condition: str
    step_median_s: float
    loop_s: float
    cpu_s: float
    start_s: float = 0.0
    stop_s: float = 0.0
    check: str = ""


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    cold_start_s: dict[str, list[float]] = field(default_factory=dict)
    boundary_s: dict[str, list[float]] = field(default_factory=dict)
    sample_now_s: list[float] = field(default_factory=list)
    timer_s: float = 0.0
    interval_s: float = 0.0
    loop_devices: list[str] = field(default_factory=list)
    micro_devices: list[str] = field(default_factory=list)


# -- workload ---------------------------------------------------------------------------------


class Workload:
    """Model, optimiser and synthetic data, identical for every run (same seed)."""

    def __init__(self, seed: int = SEED) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(IN_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, CLASSES),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss = torch.nn.CrossEntropyLoss()
        self.x = torch.randn(DISTINCT_BATCHES, BATCH, IN_FEATURES, generator=gen)
        self.y = torch.randint(0, CLASSES, (DISTINCT_BATCHES, BATCH), generator=gen)
        self.vx = torch.randn(VAL_STEPS, BATCH, IN_FEATURES, generator=gen)

    def loop(self, steps: int, tracker: Any = None) -> tuple[list[float], float, float]:
        """Train ``steps`` steps in epochs of ``EPOCH_STEPS`` with validation after each.

        Returns (per-step seconds, loop wall seconds, loop process-CPU seconds). With a
        ``tracker``, marks phases the way a training loop instrumented with green-mlops would.
        """
        model, optimizer, loss_fn, x_all, y_all = (
            self.model,
            self.optimizer,
            self.loss,
            self.x,
            self.y,
        )
        times: list[float] = []
        clock = time.perf_counter
        gc.collect()
        wall0, cpu0 = clock(), time.process_time()
        step = 0
        while step < steps:
            if tracker is not None:
                tracker.enter("train")
            model.train()
            for _ in range(min(EPOCH_STEPS, steps - step)):
                t0 = clock()
                if tracker is not None:
                    tracker.enter("data-wait", precise=False)
                i = step % DISTINCT_BATCHES
                x, y = x_all[i], y_all[i]
                if tracker is not None:
                    tracker.exit("data-wait", precise=False)
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                optimizer.step()
                times.append(clock() - t0)
                step += 1
            if tracker is not None:
                tracker.exit("train")
                tracker.enter("validation")
            model.eval()
            with torch.no_grad():
                for j in range(VAL_STEPS):
                    model(self.vx[j]).argmax(dim=1)
            if tracker is not None:
                tracker.exit("validation")
        return times, clock() - wall0, time.process_time() - cpu0


def run_condition(condition: str, steps: int) -> Run:
    work = Workload()
    clock = time.perf_counter
    if condition in (UNTRACKED, CONTROL):
        times, loop_s, cpu_s = work.loop(steps)
        return Run(condition, statistics.median(times), loop_s, cpu_s)
    if condition == GREEN:
        from green_mlops.tracker import Tracker

        t0 = clock()
        tracker = Tracker().start()
        start_s = clock() - t0
        times, loop_s, cpu_s = work.loop(steps, tracker)
        t0 = clock()
        snap = tracker.stop()
        stop_s = clock() - t0
        epochs = -(-steps // EPOCH_STEPS)
        entries = {name: p.entries for name, p in snap.phases.items()}
        ok = entries.get("data-wait") == steps and entries.get("train") == epochs
        check = (
            f"{snap.joules:.1f} J over {len(snap.devices)} device(s), phase entries "
            f"{'as expected' if ok else 'WRONG: ' + str(entries)}"
        )
        if snap.problems:
            check += f"; problems: {'; '.join(snap.problems)}"
        return Run(condition, statistics.median(times), loop_s, cpu_s, start_s, stop_s, check)
    from codecarbon import OfflineEmissionsTracker

    t0 = clock()
    cc = OfflineEmissionsTracker(**CC_KWARGS)
    cc.start()
    start_s = clock() - t0
    times, loop_s, cpu_s = work.loop(steps)
    t0 = clock()
    cc.stop()
    stop_s = clock() - t0
    data = getattr(cc, "final_emissions_data", None)
    energy = getattr(data, "energy_consumed", None)
    check = f"{energy * 3.6e6:.1f} J" if isinstance(energy, float) else "no energy reported"
    return Run(condition, statistics.median(times), loop_s, cpu_s, start_s, stop_s, check)


# -- start time and micro-benchmarks ------------------------------------------------------------


def cold_start(code: str) -> float | None:
    # Bytecode caching allowed (some shells set PYTHONDONTWRITEBYTECODE): an installed package
    # has its .pyc files; compiling every module at each start would measure the compiler.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"  fresh-process start failed (rc {proc.returncode}): {proc.stderr[-500:]}")
        return None


def device_list(tracker: Any) -> list[str]:
    return [f"{d.device} ({d.meter}, {d.method})" for d in tracker.snapshot().devices]


def micro(res: Results, n_precise: int, n_fast: int, n_sample: int) -> None:
    from green_mlops.tracker import Tracker

    clock = time.perf_counter_ns
    timer = []
    for _ in range(1000):
        t0 = clock()
        timer.append(clock() - t0)
    res.timer_s = statistics.median(timer) * 1e-9

    tracker = Tracker(disable_plugins="nvml").start()
    try:
        res.micro_devices = device_list(tracker)
        for precise, n, gap in (("precise", n_precise, 0.002), ("fast", n_fast, 0.0)):
            flag = precise == "precise"
            calls: list[int] = []
            for _ in range(n):
                t0 = clock()
                tracker.enter("bench", precise=flag)
                t1 = clock()
                if gap:
                    time.sleep(gap)
                t2 = clock()
                tracker.exit("bench", precise=flag)
                t3 = clock()
                calls += (t1 - t0, t3 - t2)
                if gap:
                    time.sleep(gap)
            res.boundary_s[precise] = [c * 1e-9 for c in calls]
    finally:
        tracker.stop()

    tracker = Tracker().start()  # the meters of the training loop, GPU ones included
    try:
        res.interval_s = tracker.interval_s
        res.loop_devices = device_list(tracker)
        samples: list[int] = []
        for _ in range(n_sample):
            t0 = clock()
            tracker.sample_now(time.monotonic())
            samples.append(clock() - t0)
        res.sample_now_s = [s * 1e-9 for s in samples]
    finally:
        tracker.stop()


# -- report -----------------------------------------------------------------------------------


def ratios(res: Results, condition: str, attr: str) -> list[float]:
    base = res.runs[UNTRACKED]
    return [
        getattr(r, attr) / getattr(b, attr) for r, b in zip(res.runs[condition], base, strict=True)
    ]


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.2f}%"


def band(values: Sequence[float]) -> str:
    return f"{pct(statistics.median(values))} [{pct(min(values))}..{pct(max(values))}]"


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(res: Results, conditions: Sequence[str], steps: int) -> bool:
    us, ms = 1e6, 1e3
    print("\n== Results (median over rounds of per-round ratios to untracked; [min..max]) ==")
    base = res.runs[UNTRACKED]
    print(
        f"untracked: step {statistics.median(r.step_median_s for r in base) * ms:.2f} ms "
        f"(per-round {min(r.step_median_s for r in base) * ms:.2f}.."
        f"{max(r.step_median_s for r in base) * ms:.2f}), loop "
        f"{statistics.median(r.loop_s for r in base):.1f} s for {steps} steps"
    )
    header = f"{'condition':<14} {'median step':>26} {'loop wall time':>26} {'loop CPU time':>26}"
    print(header)
    print("-" * len(header))
    for cond in conditions[1:]:
        print(
            f"{cond:<14} {band(ratios(res, cond, 'step_median_s')):>26} "
            f"{band(ratios(res, cond, 'loop_s')):>26} {band(ratios(res, cond, 'cpu_s')):>26}"
        )

    trackers = [c for c in conditions if c in (GREEN, CODECARBON)]
    green_start = [r.start_s for r in res.runs[GREEN][1:]] or [res.runs[GREEN][0].start_s]
    print("\nstart (import + construct + start() in a fresh process with torch loaded):")
    for cond in trackers:
        cold = res.cold_start_s.get(cond, [])
        warm = [r.start_s for r in res.runs[cond][1:]] or [res.runs[cond][0].start_s]
        stop = [r.stop_s for r in res.runs[cond]]
        cold_text = (
            f"{statistics.median(cold) * ms:8.1f} ms (n={len(cold)}, "
            f"{min(cold) * ms:.0f}..{max(cold) * ms:.0f})"
            if cold
            else "     n/a"
        )
        print(
            f"  {cond:<14} {cold_text}; in-process: first {res.runs[cond][0].start_s * ms:.1f} ms,"
            f" later median {statistics.median(warm) * ms:.1f} ms; stop median "
            f"{statistics.median(stop) * ms:.1f} ms"
        )

    print(f"\nboundary calls, CPU-only meters: {', '.join(res.micro_devices) or 'NONE'}")
    for name, label in (("precise", "precise=True "), ("fast", "precise=False")):
        calls = res.boundary_s[name]
        print(
            f"  enter/exit {label}: median {statistics.median(calls) * us:6.2f} us, "
            f"p99 {quantile(calls, 0.99) * us:7.2f} us (n={len(calls)})"
        )
    sample = statistics.median(res.sample_now_s)
    print(f"sample_now, the training loop's meters: {', '.join(res.loop_devices) or 'NONE'}")
    print(
        f"  sample_now:           median {sample * us:6.2f} us, p99 "
        f"{quantile(res.sample_now_s, 0.99) * us:7.2f} us (n={len(res.sample_now_s)}); at "
        f"interval_s={res.interval_s:g} the sampler thread is busy {sample / res.interval_s:.4%}"
    )
    print(f"  (timer overhead included in each call: {res.timer_s * us:.2f} us)")
    epochs = -(-steps // EPOCH_STEPS)
    loop_s = statistics.median(r.loop_s for r in res.runs[GREEN])
    samples = loop_s / res.interval_s + 4 * epochs
    direct_s = (
        2 * steps * statistics.median(res.boundary_s["fast"])
        + 4 * epochs * statistics.median(res.boundary_s["precise"])
        + samples * sample
    )
    print(
        f"direct cost accounting per run: {2 * steps} marks + {4 * epochs} precise boundaries + "
        f"<= {samples:.0f} samples = {direct_s * ms:.1f} ms = "
        f"{direct_s / statistics.median(r.loop_s for r in base):.3%} of the untracked loop\n"
        "  (direct costs only, medians x counts; indirect ones, caches and GIL hand-offs, not in)"
    )

    print("\n== Verdicts ==")
    verdicts: list[bool] = []

    def verdict(ok: bool, text: str) -> None:
        verdicts.append(ok)
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")

    noise = ""
    if CONTROL in conditions:
        control = ratios(res, CONTROL, "loop_s")
        floor = max(abs(r - 1) for r in control)
        noise = f"; A/A control {band(control)}"
        if floor > TARGET_OVERHEAD:
            noise += ": noise exceeds 1%, this run cannot resolve the target"
    green_loop = statistics.median(ratios(res, GREEN, "loop_s"))
    green_step = statistics.median(ratios(res, GREEN, "step_median_s"))
    green_cpu = statistics.median(ratios(res, GREEN, "cpu_s"))
    verdict(
        green_loop - 1 <= TARGET_OVERHEAD,
        f"green-mlops overhead <= 1%: {pct(green_loop)} loop wall time "
        f"(median step {pct(green_step)}, CPU {pct(green_cpu)}){noise}",
    )
    if CODECARBON in conditions:
        cc_loop = statistics.median(ratios(res, CODECARBON, "loop_s"))
        diffs = [
            (g - c) * 100
            for g, c in zip(
                ratios(res, GREEN, "loop_s"), ratios(res, CODECARBON, "loop_s"), strict=True
            )
        ]
        resolved = "resolved" if min(diffs) > 0 or max(diffs) < 0 else "within noise"
        verdict(
            green_loop < cc_loop,
            f"green-mlops overhead below CodeCarbon's: {pct(green_loop)} vs {pct(cc_loop)} "
            f"loop wall time (per-round difference {min(diffs):+.2f}..{max(diffs):+.2f} pp: "
            f"{resolved})",
        )
    cold = res.cold_start_s.get(GREEN, [])
    start_s = statistics.median(cold) if cold else statistics.median(green_start)
    cc_cold = res.cold_start_s.get(CODECARBON, [])
    cc_text = f", CodeCarbon {statistics.median(cc_cold) * ms:.0f} ms" if cc_cold else ""
    verdict(
        start_s <= TARGET_START_S,
        f"green-mlops start <= 100 ms: {start_s * ms:.1f} ms in a fresh process{cc_text}"
        f" (in-process later starts {statistics.median(green_start) * ms:.1f} ms)",
    )
    worst = max(statistics.median(res.boundary_s[k]) for k in ("precise", "fast"))
    verdict(
        worst <= TARGET_BOUNDARY_S,
        f"phase boundary call <= 100 us: {statistics.median(res.boundary_s['precise']) * us:.2f}"
        f" us precise, {statistics.median(res.boundary_s['fast']) * us:.2f} us not precise",
    )
    if len(res.runs[UNTRACKED]) < 3:
        print("note: fewer than 3 rounds: the ratios are indicative only")
    return all(verdicts)


# -- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every condition")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument(
        "--quick", action="store_true", help="~40 s smoke run: 2 rounds x 400 steps"
    )
    parser.add_argument(
        "--no-control", action="store_true", help="skip the untracked A/A control run (noise floor)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 400
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")

    torch.set_num_threads(1)
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    conditions = [UNTRACKED, GREEN, CODECARBON, CONTROL]
    if args.no_control:
        conditions.remove(CONTROL)
    try:
        import codecarbon  # noqa: F401

        cc_version = importlib.metadata.version("codecarbon")
    except ImportError:
        conditions.remove(CODECARBON)
        cc_version = "not installed (pip install 'green-mlops[bench]'): skipped"
    from green_mlops import __version__

    load0 = os.getloadavg()
    print(
        f"green-mlops {__version__}, codecarbon {cc_version}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load0[0]:.2f}"
    )
    print(f"{args.repeats} rounds x {len(conditions)} conditions x {args.steps} steps")

    res = Results(runs={c: [] for c in conditions})
    wall0 = time.perf_counter()
    Workload().loop(min(args.steps, 300))  # warm-up, untimed
    for rnd in range(args.repeats):
        k = rnd % len(conditions)
        order = conditions[k:] + conditions[:k]
        for cond in order:
            run = run_condition(cond, args.steps)
            res.runs[cond].append(run)
            print(
                f"  round {rnd + 1} {cond:<14} step {run.step_median_s * 1e3:6.3f} ms  "
                f"loop {run.loop_s:6.2f} s  cpu {run.cpu_s:6.2f} s  "
                f"start {run.start_s * 1e3:7.1f} ms  {run.check}",
                flush=True,
            )
    if CODECARBON in conditions:
        loop = statistics.median(r.loop_s for r in res.runs[CODECARBON])
        print(
            f"note: a CodeCarbon run lasted {loop:.1f} s: {int(loop // CC_MEASURE_POWER_SECS)} "
            f"of its {CC_MEASURE_POWER_SECS:g} s measurements (and its 1 s power monitor) fell "
            "inside the timed loop"
        )

    n_cold = 2 if args.quick else args.repeats
    print(f"fresh-process starts ({n_cold} per tool, alternating) ...", flush=True)
    codes = {GREEN: COLD_GREEN, CODECARBON: COLD_CODECARBON}
    for cond in (c for c in conditions if c in codes):
        cold_start(codes[cond])  # untimed: writes the bytecode caches a normal install has
    for _ in range(n_cold):
        for cond in (c for c in conditions if c in codes):
            value = cold_start(codes[cond])
            if value is not None:
                res.cold_start_s.setdefault(cond, []).append(value)

    print("micro-benchmarks ...", flush=True)
    if args.quick:
        micro(res, n_precise=100, n_fast=2000, n_sample=200)
    else:
        micro(res, n_precise=500, n_fast=20000, n_sample=2000)

    ok = report(res, conditions, args.steps)
    load1 = os.getloadavg()
    print(
        f"total {time.perf_counter() - wall0:.0f} s; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end (other jobs on the machine add noise)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
