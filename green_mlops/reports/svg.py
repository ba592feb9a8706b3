"""Inline SVG charts for the HTML report, drawn here (no library, no script, no external
resource): power over time coloured by phase, energy by phase and component, grid intensity.

Every mark carries a ``<title>`` with its exact value (the browser shows it on hover).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from green_mlops.reports.view import IntensityInterval, PowerPoint, significant

__all__ = ["Point", "color", "energy_bars", "intensity_chart", "power_chart", "scatter"]

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 36, 12, 36
#: Colour-blind-safe (Okabe-Ito) colours; phases and components have fixed ones.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
FIXED = {
    "train": "#0072B2",
    "validation": "#E69F00",
    "test": "#009E73",
    "sanity_check": "#CC79A7",
    "predict": "#56B4E9",
    "data_wait": "#D55E00",
    "other": "#999999",
    "cpu": "#0072B2",
    "gpu": "#009E73",
    "ram": "#E69F00",
    "total": "#999999",
}


def color(name: str, index: int = 0) -> str:
    return FIXED.get(name, PALETTE[index % len(PALETTE)])


def _nice_ticks(top: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least ``top``."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step + 1e-9) + 1)]


def _frame(x_max: float, y_ticks: Sequence[float], y_label: str, x_label: str) -> list[str]:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#333"/>',
    ]
    for tick in y_ticks:
        y = TOP + plot_h - plot_h * tick / y_ticks[-1]
        parts.append(
            f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{significant(tick, 3)}</text>'
        )
    for tick in _nice_ticks(x_max, 6):
        if tick > x_max * 1.0001:
            break
        x = LEFT + plot_w * tick / x_max if x_max > 0 else LEFT
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP + plot_h}" x2="{x:.1f}" y2="{TOP + plot_h + 4}" '
            'stroke="#333"/>'
            f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
            f"{significant(tick, 3)}</text>"
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text x="12" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {TOP + plot_h / 2})">{escape(y_label)}</text>'
    )
    return parts


def _svg(parts: Sequence[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(label)}" '
        'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>"
    )


@dataclass(frozen=True)
class Point:
    """One run in :func:`scatter`: energy (x), quality (y), on the Pareto front or not."""

    label: str
    x: float
    y: float
    on_front: bool
    href: str = ""


def scatter(points: Sequence[Point], x_label: str, y_label: str) -> str:
    """Quality against energy, one dot per run (a link when ``href``), the Pareto front
    joined by a line and drawn filled; the others hollow."""
    ticks = _nice_ticks(max((p.y for p in points), default=0.0))
    x_max = _nice_ticks(max((p.x for p in points), default=0.0), 6)[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(x_max, ticks, y_label, x_label)

    def xy(p: Point) -> tuple[float, float]:
        return LEFT + plot_w * p.x / x_max, TOP + plot_h - plot_h * max(p.y, 0.0) / ticks[-1]

    front = sorted((p for p in points if p.on_front), key=lambda p: p.x)
    if len(front) > 1:
        line = " ".join(f"{x:.2f},{y:.2f}" for x, y in map(xy, front))
        parts.append(
            f'<polyline class="front" points="{line}" fill="none" stroke="#009E73" '
            'stroke-width="1.5"/>'
        )
    for p in points:
        x, y = xy(p)
        fill = "#009E73" if p.on_front else "#fff"
        dot = (
            f'<circle class="run{" on-front" if p.on_front else ""}" cx="{x:.2f}" cy="{y:.2f}" '
            f'r="5" fill="{fill}" stroke="#0072B2" stroke-width="1.5" data-x="{p.x!r}" '
            f'data-y="{p.y!r}"><title>{escape(p.label)}: {significant(p.y)} at '
            f"{significant(p.x)} {escape(x_label)}{' (Pareto front)' if p.on_front else ''}"
            "</title></circle>"
        )
        parts.append(f'<a href="{escape(p.href)}">{dot}</a>' if p.href else dot)
    return _svg(parts, f"{y_label} against {x_label}")


def legend(names: Sequence[str]) -> str:
    """An HTML legend (colour swatch and name) for ``names`` in :func:`color`'s colours."""
    return (
        '<p class="legend">'
        + " ".join(
            f'<span><i style="background:{color(n, i)}"></i>{escape(n)}</span>'
            for i, n in enumerate(names)
        )
        + "</p>"
    )


def power_chart(points: Sequence[PowerPoint]) -> tuple[str, list[str]]:
    """Mean power of each timeline interval as a bar from its start to its end, coloured by
    its phase; returns the SVG and the phases in colour order."""
    x_max = max((p.end_s for p in points), default=0.0)
    ticks = _nice_ticks(max((p.watts for p in points), default=0.0))
    phases: list[str] = []
    for p in points:
        name = p.phase or "run"
        if name not in phases:
            phases.append(name)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(x_max, ticks, "power (W)", "seconds since the measurement began")
    for p in points:
        name = p.phase or "run"
        x0 = LEFT + plot_w * p.start_s / x_max
        x1 = LEFT + plot_w * p.end_s / x_max
        h = plot_h * max(p.watts, 0.0) / ticks[-1]
        parts.append(
            f'<rect class="power" x="{x0:.2f}" y="{TOP + plot_h - h:.2f}" '
            f'width="{max(x1 - x0, 0.5):.2f}" height="{h:.2f}" '
            f'fill="{color(name, phases.index(name))}" data-watts="{p.watts!r}" '
            f'data-start-s="{p.start_s!r}" data-end-s="{p.end_s!r}">'
            f"<title>{significant(p.start_s)}–{significant(p.end_s)} s: "
            f"{significant(p.watts)} W ({escape(name)})</title></rect>"
        )
    return _svg(parts, "power over time"), phases


def energy_bars(
    phases: Mapping[str, Mapping[str, float]], unit_scale: float = 1.0, unit: str = "kWh"
) -> tuple[str, list[str]]:
    """One horizontal bar per phase, stacked by component; returns the SVG and the
    components in colour order."""
    components: list[str] = []
    for split in phases.values():
        for c in split:
            if c not in components:
                components.append(c)
    rows = list(phases.items())
    bar_h, gap, left = 22, 10, 110
    height = TOP + len(rows) * (bar_h + gap) + BOTTOM
    top = max((sum(s.values()) * unit_scale for _, s in rows), default=0.0)
    ticks = _nice_ticks(top)
    plot_w = WIDTH - left - RIGHT
    parts = []
    for i, (phase, split) in enumerate(rows):
        y = TOP + i * (bar_h + gap)
        parts.append(
            f'<text x="{left - 6}" y="{y + bar_h / 2 + 4}" text-anchor="end">{escape(phase)}</text>'
        )
        x = float(left)
        for component in components:
            value = split.get(component)
            if value is None:
                continue
            w = plot_w * value * unit_scale / ticks[-1]
            parts.append(
                f'<rect x="{x:.2f}" y="{y}" width="{max(w, 0.0):.2f}" height="{bar_h}" '
                f'fill="{color(component, components.index(component))}">'
                f"<title>{escape(phase)} / {escape(component)}: "
                f"{significant(value * unit_scale)} {escape(unit)}</title></rect>"
            )
            x += w
    base = TOP + len(rows) * (bar_h + gap)
    for tick in ticks:
        x = left + plot_w * tick / ticks[-1]
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{base}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle">{significant(tick, 3)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">'
        f"energy ({escape(unit)})</text>"
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" aria-label="energy by phase" '
        'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>"
    )
    return svg, components


def intensity_chart(
    intervals: Sequence[IntensityInterval], duration_s: float, mean: float | None
) -> str:
    """The grid intensity of each interval as a step line over the run; without intervals
    (a v1 report) the run's mean as a dashed line."""
    x_max = max([duration_s, *(i.end_s for i in intervals)]) if intervals else duration_s
    x_min = min([0.0, *(i.start_s for i in intervals)])
    span = max(x_max - x_min, 1e-9)
    values = [i.g_per_kwh for i in intervals] or ([mean] if mean is not None else [])
    ticks = _nice_ticks(max(values, default=0.0) * 1.1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(span, ticks, "gCO2e/kWh", "seconds since the measurement began")

    def xy(t: float, g: float) -> tuple[float, float]:
        return LEFT + plot_w * (t - x_min) / span, TOP + plot_h - plot_h * g / ticks[-1]

    for i in intervals:
        (x0, y), (x1, _) = xy(i.start_s, i.g_per_kwh), xy(i.end_s, i.g_per_kwh)
        parts.append(
            f'<line class="intensity" x1="{x0:.2f}" y1="{y:.2f}" x2="{x1:.2f}" y2="{y:.2f}" '
            f'stroke="#D55E00" stroke-width="3" data-g-per-kwh="{i.g_per_kwh!r}">'
            f"<title>{significant(i.start_s)}–{significant(i.end_s)} s: "
            f"{significant(i.g_per_kwh)} gCO2e/kWh ({escape(i.source)})</title></line>"
        )
    if not intervals and mean is not None:
        (x0, y), (x1, _) = xy(x_min, mean), xy(x_min + span, mean)
        parts.append(
            f'<line x1="{x0:.2f}" y1="{y:.2f}" x2="{x1:.2f}" y2="{y:.2f}" stroke="#D55E00" '
            f'stroke-width="2" stroke-dasharray="6 4"><title>mean {significant(mean)} '
            "gCO2e/kWh</title></line>"
        )
    return _svg(parts, "grid intensity over the run")
