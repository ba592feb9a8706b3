"""The power chart of a run (``green/power.png``), drawn from its report's timeline.

The timeline is read as ``green-mlops verify`` reads it: its points, then the measurement's end
(``started_at + duration_s``) when later, so a stage with a single interval still draws its
level. A report of several stages (``energy.stages``, docs/report-format.md) draws each stage's
power and shades the time between stages, when nothing was measured.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from green_mlops.extras import install_command
from green_mlops.log import warn_once

__all__ = ["between_stages", "draw_power", "power_steps"]

#: One level of the chart: (start s, end s, watts), seconds since the report's first point.
Step = tuple[float, float, float]


def _points(energy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    points = list(energy.get("timeline") or [])
    try:
        end = float(energy["started_at"]) + float(energy["duration_s"])
        last = {"time": end, "joules_by_component": dict(energy["joules_by_component"])}
    except (KeyError, TypeError, ValueError):
        return points
    if not points or end > float(points[-1]["time"]):
        points.append(last)
    return points


def between_stages(report: Mapping[str, Any]) -> list[tuple[float, float]]:
    """The spans between two stages of the report (nothing measured), in seconds since its
    first timeline point."""
    energy = report["energy"]
    points = _points(energy)
    stages = energy.get("stages") or []
    if not points or len(stages) < 2:
        return []
    t0 = float(points[0]["time"])
    out = []
    for before, after in itertools.pairwise(stages):
        end = float(before["started_at"]) + float(before["duration_s"])
        start = float(after["started_at"])
        if start > end:
            out.append((end - t0, start - t0))
    return out


def power_steps(report: Mapping[str, Any]) -> dict[str, list[Step]]:
    """Mean power of each timeline interval per component, leaving out the time between
    stages; a component's list is empty when the measurement has no interval."""
    energy = report["energy"]
    points = _points(energy)
    named = [
        *(energy.get("joules_by_component") or {}),
        *(c for p in points for c in p["joules_by_component"]),
    ]
    components = sorted(set(named))
    gaps = between_stages(report)
    out: dict[str, list[Step]] = {c: [] for c in components}
    if not points:
        return out
    t0 = float(points[0]["time"])
    for a, b in itertools.pairwise(points):
        x0, x1 = float(a["time"]) - t0, float(b["time"]) - t0
        if x1 <= x0 or any(g0 - 1e-9 <= x0 and x1 <= g1 + 1e-9 for g0, g1 in gaps):
            continue
        for component in components:
            joules = float(b["joules_by_component"].get(component, 0.0)) - float(
                a["joules_by_component"].get(component, 0.0)
            )
            out[component].append((x0, x1, joules / (x1 - x0)))
    return out


def draw_power(report: dict[str, Any], path: Path) -> bool:
    """Draw power over time per component into ``path``; False when there is nothing to draw
    (no timeline point) or no matplotlib. A measurement too short for an interval is drawn as
    its energy at second 0 and said in the title. Drawn on a bare
    ``matplotlib.figure.Figure``: pyplot and the user's backend are left alone."""
    energy = report["energy"]
    if not _points(energy):
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warn_once(f"no power chart: matplotlib is missing: {install_command('plot')}", fix=True)
        return False
    except Exception:  # a broken matplotlib: the report goes without its chart
        return False
    steps = power_steps(report)
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    title = "green-mlops: power by component"
    for component, levels in steps.items():
        xs: list[float] = []
        ys: list[float] = []
        for x0, x1, watts in levels:  # one line per component, broken between stages
            if xs and xs[-1] != x0:
                xs.append(math.nan)
                ys.append(math.nan)
            xs += [x0, x1]
            ys += [watts, watts]
        if xs:
            ax.plot(xs, ys, label=component)
    if not any(steps.values()):
        joules = float(energy.get("joules") or 0.0)
        ax.plot([0.0], [0.0], marker="o", color="C0", label="too short for an interval")
        title += f" (one point: {joules:.3g} J)"
    for k, (g0, g1) in enumerate(between_stages(report)):
        ax.axvspan(g0, g1, color="0.9", label="between stages (not measured)" if k == 0 else None)
    names = [str(s.get("stage")) for s in energy.get("stages") or []]
    if len(names) > 1:
        title += f": stages {', '.join(names)}"
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("power (W)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
