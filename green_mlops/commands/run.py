"""``green-mlops run [--finish-by T | --start-by T] [--max-wait 8h] -- COMMAND ...``: wait for
the planned low-carbon start, then run COMMAND (green_mlops.scheduling.launcher waits and runs;
this module parses and presents).

Exit status: COMMAND's (a COMMAND killed by a signal kills this process with the same signal);
2 no plan could be made, nothing was run; 130 aborted while waiting (Ctrl-C, then "a").
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any

from green_mlops.commands.plan import (
    Planned,
    PlanRequest,
    add_plan_arguments,
    make_plan,
    option,
    parse_duration,
    request_from,
)
from green_mlops.scheduling.planner import PlanError

__all__ = ["register", "run", "sbatch_begin"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="wait for the cleanest start before the deadline, then run a command",
        description=(
            "Plan COMMAND's start on the grid forecast (as `green-mlops plan`), wait for it with "
            "a countdown (Ctrl-C: start now or abort), re-plan as fresher forecasts arrive, then "
            "run COMMAND with its exit status passed through. With GREEN_MLOPS_ENABLE=1 its "
            "MLflow runs carry the plan (green.schedule.* tags, "
            "green/schedule/co2e_if_run_now_g)."
        ),
    )
    add_plan_arguments(parser, interruptible=False)
    parser.add_argument("--max-wait", help="never wait longer than this: 8h")
    parser.add_argument(
        "--replan-every", default="15m", help="re-plan on a fresh forecast this often (15m)"
    )
    parser.add_argument(
        "--print-sbatch-begin",
        action="store_true",
        help="print sbatch's --begin=... for the planned start (local time) instead of waiting",
    )
    parser.add_argument("command", nargs="+", metavar="-- COMMAND", help="what to run")
    parser.set_defaults(run=run)


def sbatch_begin(start: float) -> str:
    """SLURM's ``--begin`` for ``start``: local time, as sbatch reads it on this host."""
    return "--begin=" + datetime.fromtimestamp(start).strftime("%Y-%m-%dT%H:%M:%S")


#: The shortest re-planning period: each re-plan asks the providers for a forecast.
MIN_REPLAN_S = 60.0


def _replan_every(text: str) -> float:
    seconds = parse_duration(text)
    if seconds < MIN_REPLAN_S:
        raise ValueError("expected at least 1m (each re-plan fetches a forecast), e.g. 15m")
    return seconds


def _with_max_wait(request: PlanRequest, max_wait_s: float | None, now: float) -> PlanRequest:
    """A latest start no later than ``now + max_wait_s`` (and still meeting ``finish_by``)."""
    if max_wait_s is None:
        return request
    latest = now + max_wait_s
    if request.finish_by is not None:
        latest = min(latest, request.finish_by - request.duration_s)
    elif request.start_by is not None:
        latest = min(latest, request.start_by)
    return dataclasses.replace(request, finish_by=None, start_by=latest)


def run(args: Any) -> int:
    from rich.console import Console

    from green_mlops.config import ConfigError, Settings
    from green_mlops.scheduling.handoff import ENV, Schedule
    from green_mlops.scheduling.launcher import run_command, wait_for_start

    console = Console(stderr=True, highlight=False)
    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        console.print("green-mlops run: no command given (green-mlops run ... -- COMMAND)")
        return 2
    submitted = time.time()
    try:
        settings = Settings.load()
        request = request_from(args, submitted)
        max_wait = (
            None if args.max_wait is None else option("--max-wait", args.max_wait, parse_duration)
        )
        replan_every = option("--replan-every", args.replan_every, _replan_every)
        # the user's deadline (--max-wait turns it into a latest start for the planner)
        deadline = request.finish_by if request.finish_by is not None else request.start_by
        request = _with_max_wait(request, max_wait, submitted)
        planned = make_plan(request, settings, submitted)
    except ConfigError as exc:
        console.print(f"green-mlops: configuration error: {exc}", markup=False)
        return 2
    except (PlanError, ValueError) as exc:
        console.print(f"green-mlops run: no plan, nothing run: {exc}", markup=False)
        return 2
    if args.print_sbatch_begin:
        print(sbatch_begin(planned.plan.chosen.start))
        return 0
    latest = [planned]

    def planner(now: float) -> Any:
        latest[0] = make_plan(request, settings, now)
        return latest[0].plan

    console.print(f"plan: {planned.plan.decision}: {planned.plan.reason}", markup=False)
    try:
        waited = _countdown(console, planner, planned, replan_every, wait_for_start)
    except _Abort:
        console.print("aborted: nothing run")
        return 130
    chosen = waited.plan
    final = latest[0] if latest[0].plan is chosen else planned
    schedule = Schedule(
        submitted_at=submitted,
        planned_start=chosen.chosen.start,
        planned_end=chosen.chosen.end,
        started_at=time.time(),
        deadline=chosen.deadline if deadline is None else deadline,
        decision="run-now (user)" if waited.by_user else chosen.decision,
        reason=chosen.reason,
        zone=chosen.location,
        source=final.source,
        basis=final.basis,
        planned_mean_g_per_kwh=chosen.chosen.mean_g_per_kwh,
        run_now_mean_g_per_kwh=planned.plan.now.mean_g_per_kwh,
        planned_saving_fraction=1 - chosen.chosen.impact / planned.plan.now.impact
        if planned.plan.now.impact > 0
        else 0.0,
        min_saving=chosen.min_saving,
        replans=waited.replans,
    )
    code = run_command(command, {ENV: schedule.to_env()})
    if code < 0:  # killed by a signal: die of the same one, so our caller sees it
        sys.stdout.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


class _Abort(Exception):
    pass


def _countdown(console: Any, planner: Any, planned: Planned, replan_every: float, wait: Any) -> Any:
    """Wait with a live countdown; Ctrl-C asks whether to start now or abort."""
    from rich.live import Live

    from green_mlops.scheduling.casdk import iso
    from green_mlops.scheduling.launcher import Waited

    first = planned.plan
    if first.chosen.start <= time.time():
        return Waited(first, 0)

    def line(now: float, plan: Any) -> str:
        left = max(0, int(plan.chosen.start - now))
        h, rest = divmod(left, 3600)
        return (
            f"starting at {iso(plan.chosen.start)} in {h:d}:{rest // 60:02d}:{rest % 60:02d} "
            f"({plan.reason}); Ctrl-C: start now or abort"
        )

    try:
        with Live(line(time.time(), first), console=console, refresh_per_second=1) as live:
            return wait(
                planner,
                first,
                replan_every_s=replan_every,
                tick=lambda now, plan: live.update(line(now, plan)),
            )
    except KeyboardInterrupt:
        answer = _ask(console)
        if answer != "s":
            raise _Abort from None
        return Waited(first, 0, by_user=True)


def _ask(console: Any) -> str:
    if not sys.stdin.isatty():
        return "a"
    try:
        text = console.input("start now [s] or abort [a]? ")
    except (EOFError, KeyboardInterrupt):
        return "a"
    return str(text).strip().lower()[:1]
