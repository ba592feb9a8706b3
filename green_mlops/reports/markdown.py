"""A Markdown report (a pull request, a CI job summary, a wiki): per run the reporting
sentence, the totals, energy by phase and the provenance; the comparison for several runs."""

from __future__ import annotations

from collections.abc import Sequence

from green_mlops.reports.options import ReportOptions
from green_mlops.reports.tables import comparison_table, totals
from green_mlops.reports.view import RunView, significant
from green_mlops.runs import RunRecord

__all__ = ["render", "table"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join(" --- " for _ in headers) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    views = [RunView.of(r) for r in records]
    lines = [f"# {options.title or 'Energy and carbon'}", ""]
    comparison = options.comparison
    if comparison is None and len(views) > 1:
        from green_mlops.compare import compare

        comparison = compare(records)
    if comparison is not None:
        headers, rows = comparison_table(comparison)
        lines += ["## Comparison", "", *table(headers, rows), ""]
        lines += [f"- {n}" for n in comparison.notes] + [""]
    for view in views:
        lines += _run(view)
    return "\n".join(lines).rstrip() + "\n"


def _run(view: RunView) -> list[str]:
    r = view.record
    lines = [f"## {r.name}", "", f"Run `{r.run_id}` of `{r.experiment}` ({r.status}).", ""]
    if view.sentence:
        lines += [f"> {view.sentence}", ""]
    rows = [[t.label, t.shown, t.unit, f"`{t.key}`"] for t in totals(view)]
    lines += [*table(["figure", "value", "unit", "metric"], rows), ""]
    phases = view.phases()
    if phases:
        names = sorted({c for split in phases.values() for c in split})
        lines += ["### Energy by phase (kWh)", ""]
        lines += table(
            ["phase", *names, "total"],
            [
                [
                    p,
                    *(significant(s[c]) if c in s else "" for c in names),
                    significant(sum(s.values())),
                ]
                for p, s in phases.items()
            ],
        )
        lines.append("")
    lines += ["### Provenance", "", *table(["what", "how it was obtained"], view.provenance()), ""]
    return lines
