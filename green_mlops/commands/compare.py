"""``green-mlops compare``: runs side by side, best quality per kWh first (green_mlops.compare
computes; this module reads the runs and presents: table, markdown, csv, json, a plot)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from green_mlops.compare import Comparison, Group, Row, UnknownBaseline, compare
from green_mlops.runs import RunRecord, RunsUnavailable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CSV_COLUMNS", "plot", "register", "render", "run"]

FORMATS = ("table", "markdown", "csv", "json")
#: CSV columns: Row attributes, then the baseline deltas, the marks and the reasons.
CSV_COLUMNS = (
    "run_id",
    "name",
    "experiment",
    "status",
    "parent_id",
    "group",
    "duration_s",
    "energy_kwh",
    "energy_uncertainty_kwh",
    "inclusive_kwh",
    "co2e_g",
    "inclusive_co2e_g",
    "cost",
    "currency",
    "flops",
    "metric",
    "quality",
    "quality_per_kwh",
    "on_front",
    "baseline",
    "saving_kwh",
    "saving_kwh_pct",
    "saving_co2e_g",
    "saving_co2e_pct",
    "metric_change",
    "measured",
    "marks",
    "absent",
)
_DELTAS = ("saving_kwh", "saving_kwh_pct", "saving_co2e_g", "saving_co2e_pct", "metric_change")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare runs: quality per kWh, the Pareto front, savings against a baseline",
        description=(
            "One row per run, best quality per kWh first; runs on the Pareto front of quality "
            "vs energy marked. Runs from MLflow (--experiment) and/or report files (PATH)."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="report.json / green_report.json files, or directories holding them",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="MLflow experiment name or glob ('resnet-*'); repeatable",
    )
    parser.add_argument(
        "--filter",
        default="",
        metavar="FILTER",
        help="MLflow filter_string, e.g. \"params.lr = '0.1'\"",
    )
    parser.add_argument(
        "--tracking-uri", default=None, metavar="URI", help="default: MLFLOW_TRACKING_URI"
    )
    parser.add_argument(
        "--metric", default=None, metavar="NAME", help="the quality metric (val_acc)"
    )
    parser.add_argument(
        "--mode",
        choices=("max", "min"),
        default="max",
        help="max: higher metric is better (accuracy); min: lower is (loss); quality = 1/metric",
    )
    parser.add_argument(
        "--baseline", default=None, metavar="RUN_ID", help="savings against this run"
    )
    parser.add_argument(
        "--by", default=None, metavar="KEY", help="totals by this tag, param or metric"
    )
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument(
        "--plot", default=None, metavar="FILE.png", help="quality vs energy, front drawn"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The command: exit 0, or 1 with one line on stderr (no traceback)."""
    try:
        records = _records(args)
        comparison = compare(
            records, metric=args.metric, mode=args.mode, baseline=args.baseline, by=args.by
        )
    except (RunsUnavailable, UnknownBaseline, ValueError) as exc:
        print(f"green-mlops compare: {exc}", file=sys.stderr)
        return 1
    if args.plot:
        try:
            plot(comparison).savefig(args.plot, dpi=120)
        except ImportError:
            from green_mlops.extras import install_command

            print(
                f"green-mlops compare: --plot needs matplotlib: {install_command('plot')}",
                file=sys.stderr,
            )
            return 1
        except OSError as exc:
            print(f"green-mlops compare: --plot {args.plot}: {exc.strerror}", file=sys.stderr)
            return 1
        except ValueError as exc:  # an image format matplotlib does not write
            print(f"green-mlops compare: --plot {args.plot}: {exc}", file=sys.stderr)
            return 1
    if args.format == "table":
        _print_table(comparison)
    else:
        sys.stdout.write(render(comparison, args.format))
    return 0


def _records(args: argparse.Namespace) -> list[RunRecord]:
    from green_mlops.runs import read_report_files

    if not args.paths and not args.experiment:
        raise RunsUnavailable(
            "nothing to compare: give --experiment NAME (MLflow) and/or report file PATHs"
        )
    records = read_report_files(args.paths) if args.paths else []
    if args.experiment:
        from green_mlops.extras import install_command, missing_modules

        if missing_modules("mlflow"):
            raise RunsUnavailable(f"reading MLflow runs needs MLflow: {install_command('mlflow')}")
        from green_mlops.integrations.mlflow.reader import read_runs

        records += read_runs(args.tracking_uri, args.experiment, filter_string=args.filter)
        wanted = args.baseline
        if wanted and not any(wanted in (r.run_id, r.name) for r in records):
            try:
                records += read_runs(args.tracking_uri, run_ids=[wanted])
            except RunsUnavailable as exc:
                raise UnknownBaseline(
                    f"baseline {wanted!r} is not among the runs compared and MLflow has no run "
                    f"with this id ({exc})"
                ) from None
    return records


# --- formats -----------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def _signed(value: float | None, spec: str = "+.3g") -> str:
    return "" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "" if value is None else f" ({value:+.1f} %)"


def _cells(row: Row, c: Comparison, absent: str) -> list[str]:
    """One row as the table and the markdown show it (``absent`` for a missing value)."""

    def show(text: str) -> str:
        return text or absent

    band = f" ±{row.energy_uncertainty_kwh:.2g}" if row.energy_uncertainty_kwh is not None else ""
    energy = show(_num(row.energy_kwh)) + band
    if row.inclusive_kwh is not None and row.inclusive_kwh != row.energy_kwh:
        energy += f" (incl. nested {row.inclusive_kwh:.3g})"
    cost = show(_num(row.cost)) + (f" {row.currency}" if row.currency else "")
    cells = [
        ("front" if row.on_front else "") + (" baseline" if row is c.baseline else ""),
        row.name,
        row.status,
        show(_num(row.duration_s, ".1f")),
        energy,
        show(_num(row.co2e_g)),
        cost,
        show(_num(row.flops)),
    ]
    if c.metric is not None:
        cells += [show(_num(row.metric, ".4g")), show(_num(row.quality_per_kwh))]
    if c.baseline is not None:
        d = row.vs_baseline
        assert d is not None
        cells += [
            show(_signed(d.saving_kwh)) + _pct(d.saving_kwh_pct),
            show(_signed(d.saving_co2e_g)) + _pct(d.saving_co2e_pct),
        ]
        if c.metric is not None:
            cells.append(show(_signed(d.metric_change, "+.4g")))
    cells.append(", ".join(row.marks))
    return [cell.strip() for cell in cells]


def _headers(c: Comparison) -> list[str]:
    headers = ["", "run", "status", "duration s", "energy kWh", "CO2e g", "cost", "FLOPs"]
    if c.metric is not None:
        headers += [c.metric, f"quality/kWh ({'1/' if c.mode == 'min' else ''}{c.metric})"]
    if c.baseline is not None:
        headers += ["kWh saved", "CO2e g saved"]
        if c.metric is not None:
            headers.append(f"Δ {c.metric}")
    return [*headers, "marks"]


def _grid(c: Comparison, absent: str) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the run table; cost and FLOPs only when a run has them (the
    reason is listed below the table), the status only when a run did not finish."""
    headers = _headers(c)
    rows = [_cells(row, c, absent) for row in c.rows]
    keep = [
        i
        for i, header in enumerate(headers)
        if (header == "status" and any(r[i] != "FINISHED" for r in rows))
        or (header in ("cost", "FLOPs") and any(r[i] != absent for r in rows))
        or header not in ("status", "cost", "FLOPs")
    ]
    return [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]


def _group_cells(g: Group, c: Comparison, absent: str) -> list[str]:
    """A total's cells; ``≤`` before a sum that counts an overlap more than once (an upper
    bound: :attr:`Group.upper_bound`)."""
    at_most = "≤ " if g.upper_bound else ""

    def show(value: float | None) -> str:
        return at_most + _num(value) if value is not None else absent

    cost = show(g.cost) + (f" {g.currency}" if g.currency else "")
    cells = [
        "(not set)" if g.value is None and g.key is not None else g.value or "all runs",
        str(g.runs),
        show(g.energy_kwh),
        show(g.co2e_g),
        cost.strip(),
    ]
    if c.metric is not None:
        cells += [_num(g.best_metric) or absent, _num(g.best_quality_per_kwh) or absent]
    return cells


def _group_headers(c: Comparison) -> list[str]:
    headers = [c.by or "", "runs", "energy kWh", "CO2e g", "cost"]
    if c.metric is not None:
        headers += [f"best {c.metric}", "best quality/kWh"]
    return headers


def _absent_lines(c: Comparison) -> list[str]:
    """Why each empty cell is empty, one line per reason (with the runs it applies to)."""
    reasons: dict[tuple[str, str], list[str]] = {}
    shown = {"duration_s", "energy_kwh", "co2e_g", "cost", "flops"}
    if c.metric is not None:
        shown |= {"metric", "quality_per_kwh"}
    for row in c.rows:
        for attr, why in row.absent.items():
            if attr in shown:
                reasons.setdefault((attr, why), []).append(row.name)
        if row.vs_baseline is not None:
            for attr, why in row.vs_baseline.absent.items():
                if not attr.endswith("_pct"):
                    reasons.setdefault((attr, why), []).append(row.name)
    for group in (*c.groups, c.total):
        for attr, why in group.absent.items():
            reasons.setdefault((attr, why), []).append(f"total {group.value or 'all runs'}")
        if group.upper_bound and group is not c.total:  # the total's is among the notes
            reasons.setdefault(("≤", group.upper_bound), []).append(f"total {group.value}")
    lines = []
    for (attr, why), names in reasons.items():
        who = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        lines.append(f"≤ in {who}: {why}" if attr == "≤" else f"{attr} absent for {who}: {why}")
    return lines


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)]) + "\n"


def _markdown(c: Comparison) -> str:
    out = [_title(c) + "\n", _markdown_table(*_grid(c, "—"))]
    groups = [*c.groups, c.total]
    out += ["", _markdown_table(_group_headers(c), [_group_cells(g, c, "—") for g in groups])]
    out += [""] + [f"- {line}" for line in (*c.notes, *_absent_lines(c))]
    return "\n".join(out) + "\n"


def _csv(c: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in c.rows:
        plain: dict[str, Any] = {k: getattr(row, k) for k in CSV_COLUMNS if hasattr(row, k)}
        plain["baseline"] = row is c.baseline
        for key in _DELTAS:
            plain[key] = getattr(row.vs_baseline, key) if row.vs_baseline else None
        plain["marks"] = "; ".join(row.marks)
        reasons = {**row.absent, **(row.vs_baseline.absent if row.vs_baseline else {})}
        plain["absent"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        writer.writerow({k: "" if v is None else _csv_value(v) for k, v in plain.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def render(c: Comparison, fmt: str) -> str:
    """The comparison as ``markdown``, ``csv`` or ``json`` text."""
    renderers: dict[str, Callable[[Comparison], str]] = {
        "markdown": _markdown,
        "csv": _csv,
        "json": lambda comparison: json.dumps(comparison.as_dict(), indent=2) + "\n",
    }
    if fmt not in renderers:
        raise ValueError(f"format {fmt!r}: one of {', '.join(renderers)}")
    return renderers[fmt](c)


def _title(c: Comparison) -> str:
    experiments = sorted({r.experiment for r in c.rows})
    what = ", ".join(experiments[:3]) + (" ..." if len(experiments) > 3 else "")
    order = "best quality per kWh first" if c.metric else "least energy first"
    finished = " all FINISHED," if all(r.status == "FINISHED" for r in c.rows) else ""
    return f"{len(c.rows)} runs of {what or 'nothing'} ({finished} {order})".replace("( ", "(")


def _print_table(c: Comparison) -> None:
    """The rich tables; where a table's cells cannot all be shown whole at the console's
    width (80 columns without a terminal, CI), one block per run (and per total) instead."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    headers, cells = _grid(c, "—")
    _print_grid(console, _title(c), headers, cells, lead=2, numbers=range(2, len(headers) - 1))
    totals = [_group_cells(group, c, "—") for group in (*c.groups, c.total)]
    title = "Totals" + (f" by {c.by}" if c.by else "")
    _print_grid(console, title, _group_headers(c), totals, lead=1, numbers=())
    for line in (*c.notes, *_absent_lines(c)):
        console.print(f"- {escape(line)}", soft_wrap=True)


def _print_grid(
    console: Any,
    title: str,
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    *,
    lead: int,
    numbers: Sequence[int],
) -> None:
    """One rich table, or, where it would cut a cell at the console's width, per row a line
    of its first ``lead`` cells (the run, its front/baseline label) and a ``label  value``
    line for each other cell that is not empty."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for i, header in enumerate(headers):
        right = i in numbers
        table.add_column(escape(header), justify="right" if right else "left", no_wrap=i < lead)
    for row_cells in cells:
        table.add_row(*(escape(cell) for cell in row_cells))
    with console.capture() as captured:
        console.print(table)
    text = captured.get()
    if "…" not in text or any("…" in cell for row_cells in cells for cell in row_cells):
        console.file.write(text)  # no cell cut (rich cuts a cell it cannot wrap with "…")
        return
    console.print(escape(title), soft_wrap=True)
    width = max(len(label) for label in headers[lead:])
    for row_cells in cells:
        head = [cell for cell in reversed(row_cells[:lead]) if cell]
        console.print(escape(head[0] + "".join(f"  [{cell}]" for cell in head[1:])), soft_wrap=True)
        for label, cell in zip(headers[lead:], row_cells[lead:], strict=True):
            if cell:
                console.print(f"  {escape(label.ljust(width))}  {escape(cell)}", soft_wrap=True)


# --- the plot ----------------------------------------------------------------------------------


def plot(c: Comparison) -> Figure:
    """Quality vs energy (including nested runs), the Pareto front as a step line; estimated
    runs hollow, the baseline ringed. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    points = [
        (r, r.inclusive_kwh, r.quality)
        for r in c.rows
        if r.inclusive_kwh is not None and r.quality is not None
    ]
    for r, kwh, quality in points:
        hollow = bool(r.estimated) or r.measured is not True
        colour = "tab:green" if r.on_front else "tab:gray"
        ax.scatter(
            [kwh], [quality], s=40, facecolors="none" if hollow else colour, edgecolors=colour
        )
        ax.annotate(r.name, (kwh, quality), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r is c.baseline:
            ax.scatter([kwh], [quality], s=160, facecolors="none", edgecolors="k")
    front = sorted((kwh, quality) for r, kwh, quality in points if r.on_front)
    if front:
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="post",
            color="tab:green",
            label="Pareto front",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("energy, kWh (including nested runs)")
    metric = c.metric or "quality"
    ax.set_ylabel(f"1/{metric}" if c.mode == "min" else metric)
    ax.set_title(
        f"{metric} vs energy ({len(points)} of {len(c.rows)} runs; hollow: estimated)", fontsize=9
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
