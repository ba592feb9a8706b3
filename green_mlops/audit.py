"""The audit: each budget's runs in its current period against its limits, and the provenance
rules, from :class:`~green_mlops.runs.RunRecord` lists (whichever store they were read from).

- A budget counts the runs it selects (experiment globs and tags) that started in its period
  (the calendar period in UTC that contains ``now``; all time for ``total`` and ``run``), and
  their nested runs. Sums use each run's *exclusive* totals (a parent's ``green/energy_kwh``
  leaves out its nested runs, which report their own: :data:`~green_mlops.metrics.EXCLUSIVE_KEYS`),
  so no joule is counted twice.
- ``period = "run"`` checks every top-level run (with its nested runs) against the limit on
  its own; the table shows the worst.
- "at risk": within the budget so far, but the period's burn rate (used / elapsed fraction of
  the period) projects past it by the period's end.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from green_mlops.budget import AuditConfig, Budget, period_window
from green_mlops.runs import RunRecord

__all__ = [
    "BAD_CONFIG",
    "EXCEEDED",
    "PROVENANCE",
    "RUNS_UNAVAILABLE",
    "WITHIN",
    "AuditResult",
    "BudgetResult",
    "LimitCheck",
    "RuleResult",
    "audit",
    "earliest_start",
    "selects",
]

#: Exit codes of ``green-mlops audit``.
WITHIN, EXCEEDED, PROVENANCE, BAD_CONFIG, RUNS_UNAVAILABLE = 0, 1, 2, 3, 4

#: Summed limits: limit key -> (metric key, factor to the limit's unit).
SUMS = {
    "energy_kwh": ("green/energy_kwh", 1.0),
    "co2e_kg": ("green/co2e_g", 1e-3),
    "cost": ("green/cost", 1.0),
}
_ENERGY = "green/energy_kwh"


@dataclass(frozen=True)
class LimitCheck:
    """One limit of one budget. ``used`` is None when it cannot be computed (``note`` says
    why); ``status`` is ``within``, ``at risk``, ``exceeded`` or ``n/a``."""

    limit: str
    budget: float
    used: float | None
    status: str
    projected: float | None = None
    note: str = ""

    @property
    def percent(self) -> float | None:
        return None if self.used is None else 100.0 * self.used / self.budget


@dataclass(frozen=True)
class BudgetResult:
    budget: Budget
    #: (start, end) Unix seconds of the period; None for ``run`` and ``total``.
    window: tuple[float, float] | None
    #: The runs counted: those selected and their nested runs.
    runs: tuple[RunRecord, ...]
    checks: tuple[LimitCheck, ...]
    #: The currency of ``green/cost`` (from the runs' ``green.currency``), "" when none.
    currency: str = ""

    @property
    def status(self) -> str:
        statuses = {c.status for c in self.checks}
        for status in ("exceeded", "at risk", "n/a"):
            if status in statuses:
                return status
        return "within"


@dataclass(frozen=True)
class RuleResult:
    """A provenance rule over every run the budgets count; ``failures`` name each run it
    rejects, why, and the fix."""

    rule: str
    enabled: bool
    checked: int
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditResult:
    now: float
    budgets: tuple[BudgetResult, ...]
    rules: tuple[RuleResult, ...]

    @property
    def exit_code(self) -> int:
        """2 when a rule fails or a limit cannot be computed (``n/a``: the gate cannot decide,
        so it never passes), else 1 when a budget is exceeded, else 0 (also when at risk)."""
        if any(r.failures for r in self.rules) or any(
            c.status == "n/a" for b in self.budgets for c in b.checks
        ):
            return PROVENANCE
        if any(b.status == "exceeded" for b in self.budgets):
            return EXCEEDED
        return WITHIN


def selects(budget: Budget, record: RunRecord) -> bool:
    """The budget's experiment globs (any) and tags (all) match the run."""
    if budget.experiments and not any(
        fnmatch.fnmatchcase(record.experiment, glob) for glob in budget.experiments
    ):
        return False
    return all(record.tags.get(k) == v for k, v in budget.tags.items())


def earliest_start(config: AuditConfig, now: float) -> float | None:
    """The earliest period start of the budgets (what to read from); None when one of them
    needs every run (``run``, ``total``)."""
    windows = [period_window(b.period, now) for b in config.budgets]
    if any(w is None for w in windows):
        return None
    return min(w[0] for w in windows if w is not None)


def audit(
    config: AuditConfig, records: Sequence[RunRecord], *, now: float | None = None
) -> AuditResult:
    """Check every budget of ``config`` and its rules against ``records`` (all runs that
    may count: the audit selects them) as of ``now`` (Unix seconds; default: the clock)."""
    now = time.time() if now is None else now
    results = []
    for budget in config.budgets:
        window = period_window(budget.period, now)
        runs = _counted(budget, records, window, now)
        checks = [
            _check(budget, key, limit, runs, window, now) for key, limit in budget.limits.items()
        ]
        currencies = sorted(
            {r.tags.get("green.currency", "") for r in runs if "green/cost" in r.metrics} - {""}
        )
        results.append(
            BudgetResult(budget, window, tuple(runs), tuple(checks), ", ".join(currencies))
        )
    scope = list({r.run_id: r for b in results for r in b.runs}.values())
    rules = config.rules
    return AuditResult(
        now,
        tuple(results),
        (
            _rule("require_location", rules.require_location, scope, _location_problem),
            _rule("require_measured", rules.require_measured, scope, _measured_problem),
        ),
    )


def _counted(
    budget: Budget, records: Sequence[RunRecord], window: tuple[float, float] | None, now: float
) -> list[RunRecord]:
    """The runs of the period the budget selects, and their nested runs (which need not carry
    the budget's tags: MLflow does not copy a parent's tags)."""

    def in_period(r: RunRecord) -> bool:
        if r.start_time is None:
            return window is None
        if r.start_time > now:
            return False
        return window is None or window[0] <= r.start_time < window[1]

    eligible = [r for r in records if in_period(r)]
    chosen = {r.run_id for r in eligible if selects(budget, r)}
    children: dict[str, list[str]] = {}
    for r in eligible:
        if r.parent_id:
            children.setdefault(r.parent_id, []).append(r.run_id)
    stack = list(chosen)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in chosen:
                chosen.add(child)
                stack.append(child)
    return [r for r in eligible if r.run_id in chosen]


def _trees(runs: Sequence[RunRecord]) -> list[tuple[RunRecord, list[RunRecord]]]:
    """Each top-level run of ``runs`` with every run of its tree (itself included)."""
    by_id = {r.run_id: r for r in runs}

    def root(r: RunRecord) -> RunRecord:
        seen = {r.run_id}
        while r.parent_id in by_id and r.parent_id not in seen:
            r = by_id[r.parent_id]
            seen.add(r.run_id)
        return r

    trees: dict[str, tuple[RunRecord, list[RunRecord]]] = {}
    for r in runs:
        top = root(r)
        trees.setdefault(top.run_id, (top, []))[1].append(r)
    return list(trees.values())


def _check(
    budget: Budget,
    key: str,
    limit: float,
    runs: Sequence[RunRecord],
    window: tuple[float, float] | None,
    now: float,
) -> LimitCheck:
    if not runs:
        return LimitCheck(key, limit, 0.0 if key in SUMS else None, "within", note="no runs")
    if key == "cost":
        currencies = {r.tags.get("green.currency", "") for r in runs if "green/cost" in r.metrics}
        if len(currencies) > 1:
            shown = ", ".join(sorted(c or "?" for c in currencies))
            return LimitCheck(key, limit, None, "n/a", note=f"mixed currencies ({shown})")
    trees = _trees(runs)
    if budget.period == "run":
        figures = [(top, *_figure(budget, key, [(top, tree)])) for top, tree in trees]
        known = [(top, value) for top, value, _ in figures if value is not None]
        lacking = len(figures) - len(known)
        notes = [f"{lacking} of {len(figures)} runs lack {_what(budget, key)}"] if lacking else []
        if not known:
            return LimitCheck(key, limit, None, "n/a", note="; ".join(notes))
        worst, used = max(known, key=lambda item: item[1])
        over = sum(1 for _, value in known if value > limit)
        notes.insert(0, f"worst: run {worst.name!r} ({worst.run_id})")
        if over:
            notes.insert(1, f"{over} of {len(known)} runs over")
        return LimitCheck(key, limit, used, "exceeded" if over else "within", note="; ".join(notes))
    value, note = _figure(budget, key, trees)
    if value is None:
        return LimitCheck(key, limit, None, "n/a", note=note)
    if value > limit:
        return LimitCheck(key, limit, value, "exceeded", note=note)
    projected = _projection(value, window, now) if key in SUMS else None
    status = "at risk" if projected is not None and projected > limit else "within"
    return LimitCheck(key, limit, value, status, projected, note)


def _figure(
    budget: Budget, key: str, trees: Sequence[tuple[RunRecord, list[RunRecord]]]
) -> tuple[float | None, str]:
    """The figure a limit limits over ``trees`` (None when no run has it), and a note on the
    runs that lack it."""
    what = _what(budget, key)
    if key in SUMS:
        metric, factor = SUMS[key]
        runs = [r for _, tree in trees for r in tree]
        have = [r.metrics[metric] for r in runs if metric in r.metrics]
        if not have:
            return None, f"no run has {what}"
        lacking = len(runs) - len(have)
        return sum(have) * factor, (
            f"{lacking} of {len(runs)} runs lack {what}: a lower bound" if lacking else ""
        )
    # kwh_per_unit: the energy of each top-level run (with its nested runs) per unit
    kwh = units = 0.0
    lacking = 0
    for top, tree in trees:
        count = _units(budget, top)
        energy = [r.metrics[_ENERGY] for r in tree if _ENERGY in r.metrics]
        if count is None or not energy:
            lacking += 1
            continue
        kwh += sum(energy)
        units += count
    if units <= 0:
        return None, f"no run has {what}"
    return kwh / units, f"{lacking} of {len(trees)} runs lack {what}: left out" if lacking else ""


def _units(budget: Budget, run: RunRecord) -> float | None:
    """The run's number of functional units: 1 without ``units``, else its metric, param or
    tag of that name (None when missing or not a number > 0)."""
    if budget.units is None:
        return 1.0
    raw = run.value(budget.units)
    try:
        count = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return count if math.isfinite(count) and count > 0 else None


def _what(budget: Budget, key: str) -> str:
    if key in SUMS:
        return SUMS[key][0]
    return f"{_ENERGY} and {budget.units!r}" if budget.units else _ENERGY


def _projection(used: float, window: tuple[float, float] | None, now: float) -> float | None:
    """``used`` at the period's burn rate by its end; None without a calendar period."""
    if window is None:
        return None
    start, end = window
    elapsed = (now - start) / (end - start)
    if not 0 < elapsed < 1:
        return None
    return used / elapsed


def _label(r: RunRecord) -> str:
    return f"run {r.name!r} ({r.run_id}) of {r.experiment!r}"


def _location_problem(r: RunRecord) -> str | None:
    location = r.tags.get("green.location", "")
    if location.strip() and location.strip().lower() != "unknown":
        return None
    source = r.tags.get("green.intensity.source", "none")
    shown = repr(location) if location else "missing"
    return (
        f"{_label(r)}: green.location = {shown}, priced with {source}: set "
        "GREEN_MLOPS_LOCATION (a zone or country code such as DE or US-CAL-CISO) where it runs"
    )


def _measured_problem(r: RunRecord) -> str | None:
    measured = r.tags.get("green.measured")
    if measured == "true":
        return None
    meters = r.tags.get("green.meters", "no green-mlops meters")
    shown = repr(measured) if measured is not None else "missing"
    return (
        f"{_label(r)}: green.measured = {shown} ({meters}): `green-mlops doctor` on that "
        "machine names the meter to enable"
    )


def _rule(
    name: str,
    enabled: bool,
    runs: Sequence[RunRecord],
    problem: Callable[[RunRecord], str | None],
) -> RuleResult:
    if not enabled:
        return RuleResult(name, False, 0)
    found = [p for p in (problem(r) for r in runs) if p]
    return RuleResult(name, True, len(runs), tuple(found))
