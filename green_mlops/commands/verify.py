"""``green-mlops verify REPORT.json``: recompute a report's figures from what it carries
(green_mlops.verify computes; this module reads the files and presents).

Exit codes: 0 every figure matches, 1 a figure does not (each named, recomputed vs reported),
2 the report lacks what is needed (a v1 report, a missing field, an unreadable file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from green_mlops.runs import REPORT_FILE_NAMES
from green_mlops.verify import ABS_TOL, REL_TOL, Verification, verify_report

__all__ = ["register", "run", "verify_file"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="recompute a JSON report's carbon, energy, cost and SCI; non-zero on a mismatch",
        description=(
            "Recompute operational carbon (timeline energy x each interval's intensity x PUE), "
            "market-based carbon, facility energy, cost, embodied carbon and SCI from what the "
            "report carries, and check its SHA-256 digests. Exit 0: all match (within a "
            f"relative {REL_TOL:g} or {ABS_TOL:g} in the figure's unit); 1: a figure does not; "
            "2: the report lacks what is needed (v1, a missing field, unreadable)."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="REPORT",
        help="report.json / green_report.json files, or directories holding them",
    )
    parser.add_argument("--quiet", action="store_true", help="print only what does not match")
    parser.set_defaults(run=run)


def run(args: Any) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    worst = 0
    for path in _paths(args.paths):
        code = verify_file(path, console, quiet=args.quiet)
        worst = code if worst == 0 or code == 1 else worst
    return worst


def verify_file(path: Path, console: Any, *, quiet: bool = False) -> int:
    """Verify one file and print the outcome; returns its exit code."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        console.print(f"[red]{path}: cannot verify[/]: not a readable JSON report ({exc})")
        return 2
    outcome = verify_report(report if isinstance(report, dict) else {})
    _print(path, outcome, console, quiet=quiet)
    return outcome.exit_code


def _print(path: Path, outcome: Verification, console: Any, *, quiet: bool) -> None:
    from rich.table import Table

    if not quiet and outcome.checks:
        table = Table(title=str(path))
        for column in ("figure", "reported", "recomputed", ""):
            table.add_column(column)
        for check in outcome.checks:
            mark = "[green]ok[/]" if check.ok else "[red]MISMATCH[/]"
            table.add_row(check.name, _shown(check.reported), _shown(check.recomputed), mark)
        console.print(table)
    for check in outcome.mismatches:
        console.print(
            f"[red]MISMATCH[/] {check.name}: reported {_shown(check.reported)}, "
            f"recomputed {_shown(check.recomputed)}"
        )
    for reason in outcome.unverifiable:
        console.print(f"[yellow]cannot verify[/] {reason}")
    if outcome.exit_code == 0:
        console.print(
            f"{path}: verified, {len(outcome.checks)} checks match (relative {REL_TOL:g}, "
            f"absolute {ABS_TOL:g})"
        )


def _shown(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def _paths(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            inside = sorted(p for name in REPORT_FILE_NAMES for p in path.rglob(name))
            found += inside or [path / REPORT_FILE_NAMES[0]]  # not there: reported as unreadable
        else:
            found.append(path)
    return found
