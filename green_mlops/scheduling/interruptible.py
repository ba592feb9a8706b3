"""The cheapest slots for an interruptible job: a dynamic programme over time steps,
vectorised over the work done (and over independent rows, for the benchmark).

On a grid of ``dt`` seconds from the earliest start, the job needs ``W`` work steps (its
duration rounded up to whole steps); each resume after a pause first runs
``resume_overhead_s`` of checkpoint restore, at the power of the step it resumes, which also
occupies whole steps. Two states per (step boundary, work done): running (the next step may
continue the work at no extra cost) or paused (continuing costs a resume). One pass over the
``T`` steps, each a few numpy operations over ``W + 1`` values: O(T x W) work, no Python loop
over the work. Ties go to the placement that finishes earliest, then to fewer resumes.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from green_mlops.scheduling.model import FloatArray, Forecast, Job, Placement, PlanError

__all__ = ["cheapest_slots", "solve"]

BoolArray = npt.NDArray[np.bool_]


def solve(
    cost: FloatArray,
    frac: FloatArray,
    oh_frac: FloatArray,
    oh_cost: FloatArray,
    oh_steps: int,
    *,
    true_cost: FloatArray | None = None,
    true_oh_cost: FloatArray | None = None,
    record: bool = False,
) -> tuple[FloatArray, FloatArray, list[tuple[BoolArray, BoolArray]]]:
    """Minimum of sum(intensity x energy fraction) over schedules doing all ``W`` work steps
    within the ``T`` steps, for each row.

    ``cost`` (rows, T): intensity of each step (inf: unusable); ``frac`` (W,): energy fraction
    of each work step; ``oh_frac`` (W,): energy fraction of a resume before work step w;
    ``oh_cost`` (rows, T + 1): intensity of the overhead ending at boundary u. ``true_*``: the
    real intensities, priced along the chosen schedules (planning on a noisy forecast).
    Returns (planned minimum, its true cost, per-step choices when ``record``)."""
    rows, steps = cost.shape
    work = frac.shape[0]
    inf = np.inf
    track = true_cost is not None or true_oh_cost is not None
    tc = cost if true_cost is None else true_cost
    toc = oh_cost if true_oh_cost is None else true_oh_cost
    run = np.full((rows, work + 1), inf)  # running at the boundary
    idle = np.full((rows, work + 1), inf)  # paused (or finished) at the boundary
    run_t = np.zeros((rows, work + 1))
    idle_t = np.zeros((rows, work + 1))
    pending: dict[int, tuple[FloatArray, FloatArray]] = {}
    choices: list[tuple[BoolArray, BoolArray]] = []
    never = np.zeros((rows, work + 1), dtype=bool)
    for t in range(steps):
        run[:, 0] = 0.0  # a fresh start costs nothing
        run_t[:, 0] = 0.0
        arrived = never
        if oh_steps == 0:  # resuming is free: a paused state may run on at once
            arrived = idle < run
            np.copyto(run, idle, where=arrived)
            if track:
                np.copyto(run_t, idle_t, where=arrived)
        elif t in pending:  # resumes begun oh_steps ago are restored now
            p, p_t = pending.pop(t)
            arrived = p < run
            np.copyto(run, p, where=arrived)
            if track:
                np.copyto(run_t, p_t, where=arrived)
        if oh_steps and t + oh_steps <= steps:
            u = t + oh_steps  # resume now, restored at boundary u
            p = idle.copy()
            p[:, 1:work] += oh_cost[:, u, None] * oh_frac[None, 1:]
            p[:, 0] = p[:, work] = inf
            p_t = idle_t
            if track:
                p_t = idle_t.copy()
                p_t[:, 1:work] += toc[:, u, None] * oh_frac[None, 1:]
            pending[u] = (p, p_t)
        stop = run < idle  # ties keep the earlier-finished (paused) state
        np.copyto(idle, run, where=stop)
        if track:
            np.copyto(idle_t, run_t, where=stop)
            run_t[:, 1:] = run_t[:, :-1] + tc[:, t, None] * frac[None, :]
        run[:, 1:] = run[:, :-1] + cost[:, t, None] * frac[None, :]
        run[:, 0] = inf
        if record:
            choices.append((arrived, stop))
    if not track:
        run_t, idle_t = run, idle
    take_run = run[:, work] < idle[:, work]
    best = np.where(take_run, run[:, work], idle[:, work])
    best_t = np.where(take_run, run_t[:, work], idle_t[:, work])
    if record:
        choices.append((never, take_run[:, None]))
    return best, best_t, choices


def cheapest_slots(
    forecast: Forecast, job: Job, *, earliest: float, end: float, resolution_s: float
) -> Placement | None:
    """The cheapest slots for ``job`` in ``[earliest, end)``; None when none fits."""
    dt = float(resolution_s)
    if not (math.isfinite(dt) and dt > 0):
        raise PlanError(f"resolution must be a positive number of seconds, not {resolution_s!r}")
    origin = math.ceil(earliest / dt - 1e-9) * dt  # steps on the clock, like forecast edges
    steps = math.floor((end - origin) / dt + 1e-9)
    work = max(1, math.ceil(job.duration_s / dt - 1e-9))
    if steps < work:
        return None
    oh = float(job.resume_overhead_s)
    if not (math.isfinite(oh) and oh >= 0):
        raise PlanError(f"resume overhead must be >= 0 seconds, not {job.resume_overhead_s!r}")
    oh_steps = math.ceil(oh / dt - 1e-9) if oh > 0 else 0
    grid = origin + dt * np.arange(steps + 1)
    integral, covered = forecast.integrals(grid[:-1], grid[1:])
    cost = np.where(covered >= dt - 1e-6, integral / dt, np.inf)[None, :]
    oh_cost = np.full((1, steps + 1), np.inf)
    if oh_steps:
        ia, ca = forecast.integrals(grid - oh, grid)
        ok = (ca >= oh - 1e-6) & (np.arange(steps + 1) >= oh_steps)
        oh_cost[0] = np.where(ok, ia / oh, np.inf)
    frac = _work_fractions(job, work)
    oh_frac = frac * (oh / (job.duration_s / work))
    best, _, choices = solve(cost, frac, oh_frac, oh_cost, oh_steps, record=True)
    if not math.isfinite(float(best[0])):
        return None
    runs, resumes = _backtrack(choices, steps, work, oh_steps)
    energy_factor = 1.0 + float(sum(oh_frac[w] for w in resumes))
    slots: list[tuple[float, float]] = []
    for a, b in runs:
        lead = oh if slots else 0.0
        slots.append((float(grid[a]) - lead, float(grid[b])))
    mean = float(best[0]) / energy_factor
    energy = None if job.energy_kwh is None else job.energy_kwh * energy_factor
    return Placement(tuple(slots), mean, energy, len(resumes), energy_factor)


def _work_fractions(job: Job, work: int) -> FloatArray:
    """Energy fraction of each of the ``work`` steps (the job's time mapped onto them)."""
    bounds, frac = job.segments()
    edges = np.linspace(0.0, job.duration_s, work + 1)
    cum = np.concatenate(([0.0], np.cumsum(frac)))
    at = np.interp(edges, bounds, cum)  # energy is linear within a segment
    out: FloatArray = np.diff(at)
    return out


def _backtrack(
    choices: list[tuple[BoolArray, BoolArray]], steps: int, work: int, oh_steps: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Runs of work steps ``[a, b)`` and the work index at each resume, from the choices."""
    ran: list[int] = []
    resumes: list[int] = []
    t, w = steps, work
    kind = "run" if bool(choices[steps][1][0, 0]) else "idle"
    while True:
        if kind == "idle":  # paused at boundary t: step t-1 was idle
            if t == 0:
                break
            stop = bool(choices[t - 1][1][0, w])
            t -= 1
            kind = "after" if stop else "idle"
        elif kind == "run":  # running at boundary t: step t-1 did work step w-1
            ran.append(t - 1)
            t, w, kind = t - 1, w - 1, "after"
        else:  # running at boundary t after a fresh start or an arrival
            if w == 0:
                break
            if bool(choices[t][0][0, w]):
                resumes.append(w)
                t -= oh_steps
                kind = "idle"
            else:
                kind = "run"
    ran.reverse()
    runs: list[tuple[int, int]] = []
    for s in ran:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs, resumes
