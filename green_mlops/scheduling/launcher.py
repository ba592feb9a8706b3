"""Waiting for the planned start and running the command (``green-mlops run``), with the clock
and the sleep injectable so that tests control time.

The wait re-plans every ``replan_every_s`` (a fresher forecast may move the start; a failed
re-plan keeps the current plan). The command runs with the plan in its environment
(:data:`green_mlops.scheduling.handoff.ENV`); SIGINT, SIGTERM and SIGHUP received meanwhile are
forwarded to it, and its exit status is returned (negative: killed by that signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from green_mlops.scheduling.planner import Plan, PlanError

__all__ = ["FORWARDED", "Waited", "run_command", "wait_for_start"]

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Waited:
    plan: Plan
    replans: int
    #: Re-plans that failed (the reason each time); the plan in force was kept.
    failures: tuple[str, ...] = ()
    #: The user chose to start at once (Ctrl-C during the wait).
    by_user: bool = False


def wait_for_start(
    planner: Callable[[float], Plan],
    first: Plan,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    replan_every_s: float = 900.0,
    tick: Callable[[float, Plan], None] | None = None,
) -> Waited:
    """Sleep until ``first``'s start, re-planning with ``planner(now)`` every
    ``replan_every_s``; returns the plan in force when its start is reached. A
    KeyboardInterrupt propagates (the caller asks: start now or abort)."""
    current, replans = first, 0
    failures: list[str] = []
    last = clock()
    while True:
        now = clock()
        start = current.chosen.start
        if now >= start:
            return Waited(current, replans, tuple(failures))
        if now - last >= replan_every_s:
            last = now
            try:
                fresh = planner(now)
            except (PlanError, ValueError) as exc:
                failures.append(str(exc))
            else:
                if fresh.chosen.slots != current.chosen.slots:
                    replans += 1
                current = fresh
                continue
        if tick is not None:
            tick(now, current)
        sleep(max(0.0, min(1.0, start - now, last + replan_every_s - now)))


@contextlib.contextmanager
def _forwarding(child: subprocess.Popen[bytes]) -> Iterator[None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {}
    for sig in FORWARDED:
        with contextlib.suppress(ValueError, OSError):  # not the main thread: no handlers
            previous[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_command(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` with ``env`` added to ours; its exit status (negative: its signal)."""
    child = subprocess.Popen(list(command), env={**os.environ, **(env or {})})
    with _forwarding(child):
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # forwarded already (SIGINT to the group or by us)
                continue
