"""One self-contained HTML file: no script, font, image or stylesheet from anywhere else (a
Content-Security-Policy says so to the browser), so it opens offline and in MLflow's artifact
viewer. Charts are inline SVG drawn by :mod:`green_mlops.reports.svg`.

Per run: the reporting sentence, the totals, power over time coloured by phase, energy by phase
and component, the grid intensity over the run and the provenance table. For several runs
(an experiment) the comparison of :func:`green_mlops.compare.compare` comes first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape
from typing import Any

from green_mlops import __version__
from green_mlops.reports.options import ReportOptions
from green_mlops.reports.svg import energy_bars, intensity_chart, legend, power_chart
from green_mlops.reports.tables import comparison_table, totals
from green_mlops.reports.view import RunView, iso_utc, significant
from green_mlops.runs import RunRecord

__all__ = ["CSP", "MAX_RUN_SECTIONS", "STYLE", "comparison_totals", "render", "run_section"]

#: Nothing may be loaded: inline styles and data: images only, no script at all.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
#: Runs shown in full after the comparison; the others are in the comparison table only.
MAX_RUN_SECTIONS = 20

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.sentence{background:#f3f7f3;border-left:4px solid #009E73;padding:.6em 1em}
.legend span{margin-right:1.2em}.legend i{display:inline-block;width:.9em;height:.9em;
margin-right:.3em;vertical-align:middle}.note{color:#555;font-size:.9em}
.meta{color:#555}svg{max-width:100%;height:auto}.wide{overflow-x:auto}
"""


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    views = [RunView.of(r) for r in records]
    title = options.title or (
        f"Energy and carbon: run {views[0].record.name}"
        if len(views) == 1
        else f"Energy and carbon: {len(views)} runs of {_experiments(views)}"
    )
    body = [f"<h1>{escape(title)}</h1>"]
    body.append(
        f'<p class="meta">green-mlops {escape(__version__)}, generated '
        f"{iso_utc(time.time())}. Numbers show 4 significant digits; hover a chart for exact "
        "values.</p>"
    )
    comparison = options.comparison
    if comparison is None and len(views) > 1:
        from green_mlops.compare import compare

        comparison = compare(records)
    if comparison is not None:
        body.append(_comparison(comparison))
    for view in views[:MAX_RUN_SECTIONS]:
        body.append(_run(view))
    if len(views) > MAX_RUN_SECTIONS:
        body.append(
            f'<p class="note">{len(views) - MAX_RUN_SECTIONS} more runs are in the comparison '
            "table only; report them one by one for their charts.</p>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def run_section(record: RunRecord) -> str:
    """One run's section of the report (totals, charts, provenance), for a page of one's own
    (the dashboard's run page) styled by :data:`STYLE`."""
    return _run(RunView.of(record))


def _experiments(views: Sequence[RunView]) -> str:
    names = sorted({v.record.experiment for v in views})
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _comparison(comparison: Any) -> str:
    headers, rows = comparison_table(comparison)
    parts = ['<section id="comparison"><h2>Comparison</h2>']
    parts.append(f'<div class="wide">{_table(headers, rows, "comparison")}</div>')
    parts.append(comparison_totals(comparison))
    parts.append("</section>")
    return "".join(parts)


def comparison_totals(comparison: Any) -> str:
    """The comparison's totals sentence and its notes, as HTML (the report and the dashboard)."""
    total = comparison.total
    sums = [
        f"{label} {significant(value)}"
        for label, value in (
            ("energy (kWh)", total.energy_kwh),
            ("CO2e (g)", total.co2e_g),
            (f"cost ({total.currency or ''})", total.cost),
        )
        if value is not None
    ]
    parts = [f"<p>Total over {total.runs} runs: {escape('; '.join(sums))}.</p>"] if sums else []
    parts += [f'<p class="note">{escape(n)}</p>' for n in comparison.notes]
    return "".join(parts)


def _run(view: RunView) -> str:
    record = view.record
    parts = [f'<section class="run" data-run-id="{escape(record.run_id)}">']
    parts.append(f"<h2>{escape(record.name)}</h2>")
    when = " – ".join(t for t in (iso_utc(record.start_time), iso_utc(record.end_time)) if t)
    parts.append(
        f'<p class="meta">run {escape(record.run_id)} of {escape(record.experiment)}, '
        f"{escape(record.status)}{', ' + when if when else ''}; read from "
        f"{escape(record.source)}; report {escape(str(view.report.get('schema', 'none')))}</p>"
    )
    if view.sentence:
        parts.append(f'<p class="sentence">{escape(view.sentence)}</p>')
    rows = totals(view)
    parts.append(
        '<table class="totals"><thead><tr><th>figure</th><th>value</th><th>unit</th>'
        "<th>metric</th></tr></thead><tbody>"
        + "".join(
            f"<tr><td>{escape(t.label)}</td>"
            f'<td class="num" data-key="{escape(t.key)}" data-value="{t.value!r}">'
            f"{escape(t.shown)}</td><td>{escape(t.unit)}</td><td><code>{escape(t.key)}</code>"
            "</td></tr>"
            for t in rows
        )
        + "</tbody></table>"
    )
    parts.append(_power(view))
    parts.append(_energy(view))
    parts.append(_intensity(view))
    parts.append("<h3>Provenance</h3>")
    parts.append(_table(["what", "how it was obtained"], view.provenance(), "provenance"))
    parts.append("</section>")
    return "".join(parts)


def _power(view: RunView) -> str:
    points = view.power()
    if not points:
        return (
            '<h3>Power over time</h3><p class="note">No energy timeline in this run\'s '
            "report (the run has no green-mlops JSON report).</p>"
        )
    svg, phases = power_chart(points)
    note = ""
    if phases == ["run"]:
        note = (
            '<p class="note">This report\'s timeline does not say which phase each interval '
            "was spent in; energy by phase is below.</p>"
        )
    return f"<h3>Power over time</h3>{svg}{legend(phases)}{note}"


def _energy(view: RunView) -> str:
    phases = view.phases()
    components = view.components()
    if not phases and not components:
        return ""
    chart = {**phases} if phases else {"run": components}
    svg, names = energy_bars(chart)
    headers = ["phase", *names, "total (kWh)"]
    rows = [
        [
            phase,
            *(significant(split[c]) if c in split else "" for c in names),
            significant(sum(split.values())),
        ]
        for phase, split in chart.items()
    ]
    if phases and components:
        rows.append(
            [
                "all phases",
                *(significant(components[c]) if c in components else "" for c in names),
                significant(sum(components.values())),
            ]
        )
    return f"<h3>Energy by phase and component</h3>{svg}{legend(names)}" + _table(
        headers, rows, "energy"
    )


def _intensity(view: RunView) -> str:
    intervals = view.intensity()
    mean = view.metric("green/intensity_g_per_kwh")
    duration = view.duration_s or max((i.end_s for i in intervals), default=0.0)
    if not intervals and mean is None:
        why = view.tag("green.not_reported") or "no intensity in this run"
        return f'<h3>Grid intensity</h3><p class="note">Not reported: {escape(why)}</p>'
    parts = ["<h3>Grid intensity over the run</h3>", intensity_chart(intervals, duration, mean)]
    if intervals:
        sources = sorted({i.source for i in intervals})
        parts.append(
            f'<p class="note">{len(intervals)} interval(s) priced the energy: '
            f"{escape('; '.join(sources))}.</p>"
        )
    else:
        parts.append(
            '<p class="note">The mean intensity over the priced energy (dashed); this report '
            "does not carry the intervals (schema v1).</p>"
        )
    market = view.intensity("market_intervals")
    if market:
        parts.append(
            f'<p class="note">Market-based: {len(market)} interval(s), '
            f"{escape('; '.join(sorted({i.source for i in market})))} (not in SCI).</p>"
        )
    return "".join(parts)
