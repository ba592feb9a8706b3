"""The dashboard's HTML: server-rendered pages presenting what :mod:`green_mlops.compare`,
:mod:`green_mlops.audit` and the run report computed (this module computes nothing). Every
number shown carries its exact value in ``data-value`` (what sorting and the tests read)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from green_mlops import __version__
from green_mlops.compare import EXCLUSIVE_NOTE, Comparison, Period, Row
from green_mlops.reports.html import STYLE, comparison_totals, run_section
from green_mlops.reports.svg import Point, scatter
from green_mlops.reports.view import significant
from green_mlops.runs import RunRecord

__all__ = ["error_page", "experiment_page", "overview_page", "run_page"]

#: Scripts and styles from this server only; SVG and data: images inline.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'"
)


def _page(title: str, body: str, crumbs: Sequence[tuple[str, str]] = ()) -> str:
    trail = " / ".join(
        [f'<a href="{escape(href)}">{escape(text)}</a>' for text, href in crumbs] + [escape(title)]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · green-mlops</title><style>{STYLE}</style>"
        '<link rel="stylesheet" href="/green/static/green.css">'
        '<script src="/green/static/green.js" defer></script></head><body>'
        f'<nav class="crumbs"><a href="/">MLflow</a> / <a href="/green/">green dashboard</a>'
        f"{' / ' + trail if crumbs or title else ''}</nav>"
        f"<h1>{escape(title)}</h1>{body}"
        f'<p class="meta">green-mlops {escape(__version__)}</p></body></html>\n'
    )


def _num(value: float | None, digits: int = 4, scale: float = 1.0) -> str:
    """A table cell with the exact value in ``data-value`` (empty when absent)."""
    if value is None:
        return '<td class="num absent" data-value="">–</td>'
    shown = value * scale
    return f'<td class="num" data-value="{shown!r}">{significant(shown, digits)}</td>'


def _text(value: str, sort: str | None = None) -> str:
    return f'<td data-value="{escape(sort if sort is not None else value)}">{escape(value)}</td>'


def _head(headers: Sequence[str]) -> str:
    cells = "".join(
        f'<th><button type="button" class="sort" data-column="{i}">{escape(h)}</button></th>'
        for i, h in enumerate(headers)
    )
    return f"<thead><tr>{cells}</tr></thead>"


def experiment_href(experiment_id: str, **query: str) -> str:
    return "/green/experiment?" + urlencode({"experiment_id": experiment_id, **query})


def mlflow_run_href(experiment_id: str, run_id: str, tail: str = "") -> str:
    return f"/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}{tail}"


# --- the overview ------------------------------------------------------------------------------


def overview_page(
    experiments: Mapping[str, str],
    periods: Sequence[Period],
    budgets: Any,
    budget_note: str,
) -> str:
    ids = {name: exp_id for exp_id, name in experiments.items()}
    headers = [
        "experiment",
        "month (UTC)",
        "runs",
        "energy (kWh)",
        "CO2e (kg)",
        "cost",
        "measured share (%)",
        "estimated (kWh)",
    ]
    rows = []
    for p in periods:
        exp_id = ids.get(p.experiment, "")
        total = p.total
        cost = _num(total.cost)
        if total.cost is not None and total.currency:
            cost = cost.replace("</td>", f" {escape(total.currency)}</td>")
        share = p.measured_share
        rows.append(
            f'<tr data-experiment-id="{escape(exp_id)}" data-month="{escape(p.month)}">'
            f'<td data-value="{escape(p.experiment)}"><a href="{escape(experiment_href(exp_id))}">'
            f"{escape(p.experiment)}</a></td>"
            + _text(p.month)
            + f'<td class="num" data-value="{total.runs}">{total.runs}</td>'
            + _num(total.energy_kwh)
            + _num(total.co2e_g, scale=1e-3)
            + cost
            + _num(None if share is None else share, 3, 100.0)
            + _num(p.estimated_kwh)
            + "</tr>"
        )
    absent = sorted(
        {f"{p.experiment} {p.month}: {why}" for p in periods for why in p.total.absent.values()}
    )
    body = [
        '<section id="overview"><h2>Energy, carbon and cost by experiment and month</h2>',
        f'<div class="wide"><table class="sortable overview">{_head(headers)}<tbody>'
        + "".join(rows)
        + "</tbody></table></div>",
    ]
    # where overlapping runs could not be counted once, the period's total is an upper bound
    bounds = sorted(
        {f"{p.experiment} {p.month}: {p.total.upper_bound}" for p in periods if p.total.upper_bound}
    )
    counted = "" if bounds else f"{EXCLUSIVE_NOTE}. "
    body.append(
        f'<p class="note">{escape(counted)}Measured share: the energy of runs whose every meter '
        "measured (green.measured = true); estimated: runs with an estimate.</p>"
    )
    body += [f'<p class="note upper-bound">{escape(b)}</p>' for b in bounds]
    body += [f'<p class="note absent">{escape(a)}</p>' for a in absent[:20]]
    if not periods:
        body.append('<p class="note">No runs in the experiments you may read.</p>')
    unmeasured = [
        name for name in experiments.values() if name not in {p.experiment for p in periods}
    ]
    if unmeasured:
        body.append(
            f'<p class="note">Experiments without runs: {escape(", ".join(unmeasured))}</p>'
        )
    body.append("</section>")
    body.append(_budgets(budgets, budget_note))
    return _page("Experiments", "".join(body))


def _budgets(result: Any, note: str) -> str:
    parts = ['<section id="budgets"><h2>Budgets</h2>']
    if result is not None and result.budgets:
        headers = ["budget", "period", "limit", "used", "of", "used (%)", "projected", "status"]
        rows = []
        for b in result.budgets:
            for c in b.checks:
                unit = b.currency if c.limit == "cost" else ""
                rows.append(
                    f'<tr class="status-{escape(c.status.replace(" ", "-"))}" '
                    f'data-budget="{escape(b.budget.name)}" data-limit="{escape(c.limit)}">'
                    + _text(b.budget.name)
                    + _text(b.budget.period)
                    + _text(c.limit + (f" ({unit})" if unit else ""))
                    + _num(c.used)
                    + _num(c.budget)
                    + _num(c.percent, 3)
                    + _num(c.projected)
                    + f'<td class="status" data-value="{escape(c.status)}">{escape(c.status)}'
                    + (f' <span class="note">{escape(c.note)}</span>' if c.note else "")
                    + "</td></tr>"
                )
        table = f'<table class="sortable budgets">{_head(headers)}<tbody>{"".join(rows)}'
        parts.append(table + "</tbody></table>")
    if note:
        parts.append(f'<p class="note">{escape(note)}</p>')
    parts.append("</section>")
    return "".join(parts)


# --- an experiment -----------------------------------------------------------------------------


def experiment_page(
    experiment_id: str,
    name: str,
    comparison: Comparison,
    metrics: Sequence[str],
) -> str:
    metric, base = comparison.metric, comparison.baseline
    query = {"metric": metric or "", "mode": comparison.mode}
    form = [
        f'<form method="get" action="/green/experiment" id="choose">'
        f'<input type="hidden" name="experiment_id" value="{escape(experiment_id)}">'
        '<label>quality metric <select name="metric" class="auto">'
        f'<option value=""{"" if metric else " selected"}>(none)</option>'
    ]
    for m in metrics:
        form.append(f"<option{' selected' if m == metric else ''}>{escape(m)}</option>")
    form.append('</select></label> <label>better <select name="mode" class="auto">')
    for mode, said in (("max", "higher"), ("min", "lower")):
        chosen = " selected" if mode == comparison.mode else ""
        form.append(f'<option value="{mode}"{chosen}>{said}</option>')
    form.append('</select></label> <label>baseline <select name="baseline" class="auto">')
    form.append(f'<option value=""{"" if base else " selected"}>(none)</option>')
    for row in sorted(comparison.rows, key=lambda r: r.name):
        chosen = " selected" if base is not None and row.run_id == base.run_id else ""
        form.append(
            f'<option value="{escape(row.run_id)}"{chosen}>{escape(row.name)} '
            f"({escape(row.run_id[:8])})</option>"
        )
    form.append("</select></label> <noscript><button>show</button></noscript></form>")

    headers = ["run", "status", "duration (s)", "energy (kWh)", "CO2e (g)", "cost", "FLOPs"]
    if metric:
        headers += [metric, f"{metric} per kWh", "Pareto front"]
    if base is not None:
        headers += ["saving vs baseline (kWh)", "saving (%)", f"change in {metric or 'metric'}"]
    headers += ["marks", "MLflow"]
    rows = [_row(experiment_id, r, comparison) for r in comparison.rows]
    body = ["".join(form)]
    if base is not None:
        body.append(
            f'<p id="baseline">Savings against the baseline run <b>{escape(base.name)}</b> '
            f"({escape(base.run_id)}): positive when a run used less energy.</p>"
        )
    body.append(
        '<div class="wide"><table class="sortable comparison" id="comparison">'
        f"{_head(headers)}<tbody>{''.join(rows)}</tbody></table></div>"
    )
    body.append(comparison_totals(comparison))
    body.append(_scatter(experiment_id, comparison, query))
    api = "/green/api/compare?" + urlencode(
        {"experiment_id": experiment_id, **query, "baseline": base.run_id if base else ""}
    )
    body.append(f'<p class="note">As JSON: <a href="{escape(api)}">{escape(api)}</a></p>')
    return _page(name, "".join(body), [("experiments", "/green/")])


def _row(experiment_id: str, row: Row, comparison: Comparison) -> str:
    base = comparison.baseline
    cost = _num(row.cost)
    if row.cost is not None and row.currency:
        cost = cost.replace("</td>", f" {escape(row.currency)}</td>")
    cells = [
        f'<td data-value="{escape(row.name)}"><a href="/green/run?run_id={quote(row.run_id)}">'
        f"{escape(row.name)}</a></td>",
        _text(row.status),
        _num(row.duration_s),
        _num(row.energy_kwh),
        _num(row.co2e_g),
        cost,
        _num(row.flops, 3),
    ]
    if comparison.metric:
        front = "yes" if row.on_front else ""
        cells += [
            _num(row.metric),
            _num(row.quality_per_kwh),
            f'<td class="front" data-value="{front}">{"★ front" if front else ""}</td>',
        ]
    if base is not None:
        if row.run_id == base.run_id:
            cells += ['<td data-value="">baseline</td>', '<td data-value=""></td>' * 2]
        else:
            d = row.vs_baseline
            cells += [
                _num(d.saving_kwh if d else None),
                _num(d.saving_kwh_pct if d else None, 3),
                _num(d.metric_change if d else None),
            ]
    cells.append(_text(", ".join(row.marks)))
    href = mlflow_run_href(experiment_id, row.run_id)
    cells.append(f'<td data-value=""><a href="{escape(href)}">run</a></td>')
    classes = "on-front" if row.on_front else ""
    if base is not None and row.run_id == base.run_id:
        classes += " baseline"
    return f'<tr data-run-id="{escape(row.run_id)}" class="{classes.strip()}">{"".join(cells)}</tr>'


def _scatter(experiment_id: str, comparison: Comparison, query: Mapping[str, str]) -> str:
    metric = comparison.metric
    if not metric:
        return '<p class="note">Choose a quality metric for the scatter and the Pareto front.</p>'
    points = [
        Point(
            r.name, r.inclusive_kwh, r.quality, r.on_front, f"/green/run?run_id={quote(r.run_id)}"
        )
        for r in comparison.rows
        if r.inclusive_kwh is not None and r.quality is not None
    ]
    if not points:
        return f'<p class="note">No run has both {escape(metric)} and energy.</p>'
    quality = metric if comparison.mode == "max" else f"1/{metric}"
    return (
        f'<section id="scatter"><h2>{escape(quality)} against energy</h2>'
        + scatter(points, "kWh", quality)
        + '<p class="note">Filled dots joined by the line: the Pareto front (no other run has '
        "at least the quality for at most the energy). Energy includes nested runs.</p></section>"
    )


# --- a run -------------------------------------------------------------------------------------


def run_page(record: RunRecord, experiment_id: str, has_report: bool) -> str:
    links = [
        f'<a href="{escape(mlflow_run_href(experiment_id, record.run_id))}">the run in MLflow</a>',
        f'<a href="{escape(mlflow_run_href(experiment_id, record.run_id, "/artifacts"))}">'
        "its artifacts (green/report.html)</a>",
        f'<a href="/green/api/run?run_id={quote(record.run_id)}">as JSON</a>',
    ]
    body = [f'<p class="links">{" · ".join(links)}</p>']
    if not has_report:
        body.append(
            '<p class="note">This run has no green/report.json artifact: the figures below are '
            "its metrics and tags only.</p>"
        )
    body.append(run_section(record))
    crumbs = [("experiments", "/green/"), (record.experiment, experiment_href(experiment_id))]
    return _page(f"run {record.name}", "".join(body), crumbs)


def error_page(status: int, message: str) -> str:
    return _page(f"{status}: {message.split(':')[0]}", f'<p class="error">{escape(message)}</p>')
