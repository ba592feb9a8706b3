"""The power chart of a run (``green/power.png``), drawn from its report's timeline."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from green_mlops.extras import install_command
from green_mlops.log import warn_once

__all__ = ["draw_power"]


def draw_power(report: dict[str, Any], path: Path) -> bool:
    """Draw power over time per component into ``path``; False when there is nothing to draw
    (fewer than two timeline points) or no matplotlib. Drawn on a bare
    ``matplotlib.figure.Figure``: pyplot and the user's backend are left alone."""
    timeline = report["energy"]["timeline"]
    if len(timeline) < 2:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warn_once(f"no power chart: matplotlib is missing: {install_command('plot')}", fix=True)
        return False
    except Exception:  # a broken matplotlib: the report goes without its chart
        return False
    t0 = timeline[0]["time"]
    components = sorted({c for p in timeline for c in p["joules_by_component"]})
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    for component in components:
        xs, ys = [], []
        for a, b in itertools.pairwise(timeline):
            dt = b["time"] - a["time"]
            if dt > 0:
                joules = b["joules_by_component"].get(component, 0.0) - a[
                    "joules_by_component"
                ].get(component, 0.0)
                xs.append(b["time"] - t0)
                ys.append(joules / dt)
        ax.step(xs, ys, where="pre", label=component)
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("power (W)")
    ax.set_title("green-mlops: power by component")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
