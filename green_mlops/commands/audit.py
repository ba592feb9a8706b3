"""``green-mlops audit``: budgets and provenance rules as a CI gate.

Exit 0: every budget within (also "at risk", which is said); 1: a budget exceeded; 2: a
provenance rule failed; 3: a bad config file (or ``--now``); 4: the runs could not be read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from green_mlops.audit import (
    BAD_CONFIG,
    RUNS_UNAVAILABLE,
    AuditResult,
    BudgetResult,
    LimitCheck,
    RuleResult,
    audit,
    earliest_start,
)
from green_mlops.budget import AuditConfig, load_config
from green_mlops.config import ConfigError
from green_mlops.runs import RunRecord, RunsUnavailable

__all__ = ["junit_xml", "markdown", "register", "run"]

_RULE_TEXT = {
    "require_location": "every run priced with a known location (green.location)",
    "require_measured": "every run measured, no estimated meter (green.measured = true)",
}
_SHOWN_FAILURES = 10


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="budgets and provenance rules as a CI gate (exit 0 within, 1 exceeded, 2 a rule "
        "failed, 3 bad config)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="green-mlops.toml or pyproject.toml (default: the nearest green-mlops.toml, or "
        "pyproject.toml with [tool.green-mlops], from the working directory upward)",
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML: one test per budget/rule")
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown job summary")
    parser.add_argument(
        "--now",
        metavar="ISO",
        help="audit as of this time (ISO 8601; UTC unless it has an offset), default: now",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        now = _parse_now(args.now)
    except ConfigError as exc:
        print(f"green-mlops audit: {exc}", file=sys.stderr)
        return BAD_CONFIG
    try:
        records, unmatched = _read_mlflow(config, args.tracking_uri, now)
    except RunsUnavailable as exc:
        print(f"green-mlops audit: runs unavailable: {exc}", file=sys.stderr)
        return RUNS_UNAVAILABLE
    result = audit(config, records, now=now)
    _print(result, config, unmatched)
    for path, render in ((args.junit, junit_xml), (args.markdown, markdown)):
        if path:
            try:
                Path(path).write_text(render(result), encoding="utf-8")
            except OSError as exc:
                print(f"green-mlops audit: cannot write {path}: {exc.strerror}", file=sys.stderr)
                return RUNS_UNAVAILABLE
    return result.exit_code


def _parse_now(raw: str | None) -> float:
    if raw is None:
        return time.time()
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))  # Python 3.10 has no "Z"
    except ValueError:
        raise ConfigError(
            f"--now={raw!r} is not valid: expected an ISO 8601 time, e.g. 2026-12-01T12:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _read_mlflow(
    config: AuditConfig, tracking_uri: str | None, now: float
) -> tuple[list[RunRecord], list[str]]:
    """The runs of every experiment since the budgets' earliest period start (the audit
    selects among them), and the experiment globs that match none of their experiments."""
    from green_mlops.extras import install_command, missing_modules

    if missing_modules("mlflow"):
        raise RunsUnavailable(f"MLflow is not installed: {install_command('mlflow')}")
    from green_mlops.integrations.mlflow.reader import read_runs

    start = earliest_start(config, now)
    since = f"attributes.start_time >= {int(start * 1000)}" if start is not None else ""
    records = read_runs(tracking_uri, filter_string=since)
    names = {r.experiment for r in records}
    globs = dict.fromkeys(g for b in config.budgets for g in b.experiments)
    unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    return records, unmatched


# --- presentation ------------------------------------------------------------------------------

_UNITS = {"energy_kwh": "kWh", "co2e_kg": "kg CO2e"}


def _unit(check: LimitCheck, result: BudgetResult) -> str:
    if check.limit == "cost":
        return result.currency
    if check.limit == "kwh_per_unit":
        return f"kWh/{result.budget.units or 'run'}"
    return _UNITS.get(check.limit, "")


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _period(result: BudgetResult) -> str:
    if result.window is None:
        return result.budget.period
    start, end = (dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in result.window)
    last = end - dt.timedelta(seconds=1)
    return f"{result.budget.period} {start:%Y-%m-%d}..{last:%Y-%m-%d} UTC"


def _status(check: LimitCheck, unit: str) -> str:
    text = check.status
    if check.status == "at risk" and check.projected is not None:
        text += f": projected {check.projected:.4g} {unit} by the period's end"
    return text


def _rows(result: AuditResult) -> list[tuple[BudgetResult, LimitCheck]]:
    return [(b, c) for b in result.budgets for c in b.checks]


def _summary(result: AuditResult) -> str:
    exceeded = [b.budget.name for b in result.budgets if b.status == "exceeded"]
    at_risk = [b.budget.name for b in result.budgets if b.status == "at risk"]
    failed = [r.rule for r in result.rules if r.failures]
    parts = []
    if failed:
        parts.append(f"provenance rule(s) failed: {', '.join(failed)}")
    if exceeded:
        parts.append(f"exceeded: {', '.join(exceeded)}")
    if at_risk:
        parts.append(f"at risk: {', '.join(at_risk)}")
    return "; ".join(parts) or f"all {len(result.budgets)} budget(s) within"


def _print(result: AuditResult, config: AuditConfig, unmatched: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    when = dt.datetime.fromtimestamp(result.now, dt.timezone.utc)
    table = Table(title=f"Budgets of {config.path} as of {when:%Y-%m-%d %H:%M} UTC")
    for column in ("budget", "period", "runs", "limit", "used", "budget ", "%", "status"):
        table.add_column(
            column, justify="right" if column in ("runs", "used", "budget ", "%") else "left"
        )
    colours = {"within": "green", "at risk": "yellow", "exceeded": "red", "n/a": "yellow"}
    for budget, check in _rows(result):
        unit = _unit(check, budget)
        percent = check.percent
        status = f"[{colours[check.status]}]{escape(_status(check, unit))}[/]"
        if check.note:
            status += f"\n{escape(check.note)}"
        table.add_row(
            budget.budget.name,
            _period(budget),
            str(len(budget.runs)),
            check.limit,
            f"{_num(check.used)} {unit}".strip(),
            f"{_num(check.budget)} {unit}".strip(),
            "–" if percent is None else f"{percent:.0f}%",
            status,
        )
    console.print(table)
    for glob in unmatched:
        console.print(f"[yellow]note:[/] no run in an experiment matching {escape(repr(glob))}")
    for rule in result.rules:
        if not rule.enabled:
            continue
        if not rule.failures:
            console.print(f"[green]rule {rule.rule}: passed[/] ({rule.checked} runs)")
            continue
        console.print(f"[red]rule {rule.rule}: {len(rule.failures)} of {rule.checked} runs fail[/]")
        for line in rule.failures[:_SHOWN_FAILURES]:
            console.print(f"  {escape(line)}", soft_wrap=True)
        if len(rule.failures) > _SHOWN_FAILURES:
            console.print(f"  ... and {len(rule.failures) - _SHOWN_FAILURES} more")
    console.print(f"[bold]{escape(_summary(result))}[/] (exit {result.exit_code})")


def _check_text(budget: BudgetResult, check: LimitCheck) -> str:
    unit = _unit(check, budget)
    percent = "" if check.percent is None else f" ({check.percent:.0f}%)"
    text = f"{check.limit}: {_num(check.used)} of {_num(check.budget)} {unit}{percent}, "
    return text + _status(check, unit) + (f" ({check.note})" if check.note else "")


def junit_xml(result: AuditResult) -> str:
    """JUnit XML: one test case per budget (failed when exceeded) and per rule (failed when
    a run breaks it, skipped when the rule is off)."""
    cases: list[ET.Element] = []
    for budget in result.budgets:
        case = ET.Element(
            "testcase", classname="green-mlops.budget", name=budget.budget.name, time="0"
        )
        lines = [_check_text(budget, c) for c in budget.checks]
        over = [c for c in budget.checks if c.status == "exceeded"]
        if over:
            failure = ET.SubElement(
                case,
                "failure",
                type="BudgetExceeded",
                message="; ".join(_check_text(budget, c) for c in over),
            )
            failure.text = "\n".join(lines)
        unknown = [c for c in budget.checks if c.status == "n/a"]
        if unknown and not over:
            failure = ET.SubElement(
                case,
                "failure",
                type="BudgetUnknown",
                message="; ".join(_check_text(budget, c) for c in unknown),
            )
            failure.text = "\n".join(lines)
        ET.SubElement(case, "system-out").text = (
            f"{_period(budget)}, {len(budget.runs)} runs\n" + "\n".join(lines)
        )
        cases.append(case)
    for rule in result.rules:
        case = ET.Element("testcase", classname="green-mlops.rule", name=rule.rule, time="0")
        if not rule.enabled:
            ET.SubElement(case, "skipped", message="off in [audit]")
        elif rule.failures:
            failure = ET.SubElement(
                case,
                "failure",
                type="ProvenanceRule",
                message=f"{len(rule.failures)} of {rule.checked} runs: {_RULE_TEXT[rule.rule]}",
            )
            failure.text = "\n".join(rule.failures)
        cases.append(case)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0"}
    when = dt.datetime.fromtimestamp(result.now, dt.timezone.utc).isoformat()
    root = ET.Element("testsuites", {"name": "green-mlops audit", **counts})
    suite = ET.SubElement(
        root,
        "testsuite",
        {"name": "green-mlops audit", **counts, "skipped": str(skipped), "timestamp": when},
    )
    suite.extend(cases)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(result: AuditResult) -> str:
    """A Markdown job summary (e.g. for ``$GITHUB_STEP_SUMMARY``)."""
    icon = {0: "✅", 1: "❌", 2: "❌"}.get(result.exit_code, "❌")
    when = dt.datetime.fromtimestamp(result.now, dt.timezone.utc)
    lines = [
        f"## {icon} green-mlops audit: {_summary(result)}",
        "",
        f"As of {when:%Y-%m-%d %H:%M} UTC (calendar periods in UTC).",
        "",
        "| budget | period | runs | limit | used | budget | % | status |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for budget, check in _rows(result):
        unit = _unit(check, budget)
        percent = "–" if check.percent is None else f"{check.percent:.0f}%"
        status = _status(check, unit) + (f" ({check.note})" if check.note else "")
        lines.append(
            f"| {_md(budget.budget.name)} | {_period(budget)} | {len(budget.runs)} | "
            f"{check.limit} | {_num(check.used)} {unit} | {_num(check.budget)} {unit} | "
            f"{percent} | {_md(status)} |"
        )
    lines.append("")
    for rule in result.rules:
        state = rule_state(rule)
        lines.append(f"- **{rule.rule}** ({_RULE_TEXT[rule.rule]}): {state}")
        lines += [f"  - {_md(f)}" for f in rule.failures[:_SHOWN_FAILURES]]
        if len(rule.failures) > _SHOWN_FAILURES:
            lines.append(f"  - ... and {len(rule.failures) - _SHOWN_FAILURES} more")
    return "\n".join(lines) + "\n"


def rule_state(rule: RuleResult) -> str:
    if not rule.enabled:
        return "off"
    if rule.failures:
        return f"failed: {len(rule.failures)} of {rule.checked} runs"
    return f"passed ({rule.checked} runs)"
