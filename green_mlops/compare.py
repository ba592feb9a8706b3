"""Compare finished runs: quality per kWh, the Pareto front of quality vs energy, savings
against a baseline, and totals by a tag or param. Framework-free: it takes
:class:`~green_mlops.runs.RunRecord` objects, whichever store they were read from.

Energy figures follow the run metrics (docs/mlflow-plugin.md, "Nested runs"): a run's
``green/energy_kwh`` (and carbon, cost) is exclusive of its nested runs, so the totals sum
exclusive figures. Runs measured at the same time in one process (``green.concurrent_runs``)
each measured the whole machine: a family whose members' sum exceeds its top run's inclusive
figure is counted by that figure, a run inside another's measured time is counted in that one,
and where the overlap cannot be known the total is an upper bound (:attr:`Group.upper_bound`).
A run's result is compared by the energy it took *including* its nested runs
(``green/inclusive/...`` where it has them), over the whole run (every stage): quality per
kWh, the front and the baseline savings use :attr:`Row.inclusive_kwh` and
:attr:`Row.inclusive_co2e_g`.

A quantity that cannot be computed is ``None``, never 0, with the reason in :attr:`Row.absent`
(or :attr:`Group.absent`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from green_mlops.carbon import SKIPPED_DEFAULT
from green_mlops.overlap import concurrent_runs, counted_once, family_sum, names, outside_children
from green_mlops.runs import RunRecord

__all__ = [
    "EXCLUSIVE_NOTE",
    "Comparison",
    "Delta",
    "Group",
    "Period",
    "Row",
    "UnknownBaseline",
    "by_month",
    "compare",
]

#: Said with every total.
EXCLUSIVE_NOTE = (
    "totals are sums of exclusive figures: a parent run's green/* totals exclude its nested "
    "runs, so every joule is counted once"
)
#: Group totals: metric key -> Row/Group attribute.
_SUMMED = {"energy_kwh": "green/energy_kwh", "co2e_g": "green/co2e_g", "cost": "green/cost"}
#: ``green.not_reported`` items name these quantities.
_NOT_REPORTED = {"co2e": ("co2e_g",), "cost": ("cost",)}


class UnknownBaseline(ValueError):
    """The baseline run is not among the runs compared."""


@dataclass(frozen=True)
class Delta:
    """A run against the baseline; savings are positive when the run used less."""

    saving_kwh: float | None
    saving_kwh_pct: float | None
    saving_co2e_g: float | None
    saving_co2e_pct: float | None
    #: The run's metric minus the baseline's (in the metric's unit).
    metric_change: float | None
    absent: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One run. ``None`` means not computable; :attr:`absent` says why."""

    run_id: str
    name: str
    experiment: str
    status: str
    parent_id: str | None
    duration_s: float | None
    #: The run's own energy, exclusive of nested runs (``green/energy_kwh``): what sums.
    energy_kwh: float | None
    energy_uncertainty_kwh: float | None
    co2e_g: float | None
    cost: float | None
    currency: str | None
    flops: float | None
    #: Energy and carbon including nested runs: what the run's result cost.
    inclusive_kwh: float | None
    inclusive_co2e_g: float | None
    #: The chosen metric's latest value, and quality (metric, or 1/metric in mode min).
    metric: float | None
    quality: float | None
    quality_per_kwh: float | None
    #: Every meter measured (``green.measured``); None when the run does not say.
    measured: bool | None
    #: Components whose energy is an estimate (``green.method.<component> = estimate``).
    estimated: tuple[str, ...]
    #: Priced with a fallback intensity (a provider before it was skipped), and why.
    intensity_fallback: str | None
    intensity_estimated: bool
    #: Carbon covers part of the energy only (a lower bound).
    co2e_partial: bool
    on_front: bool
    vs_baseline: Delta | None
    #: The value of the ``by`` key (None: the run does not have it).
    group: str | None
    #: attribute -> why it is None.
    absent: Mapping[str, str] = field(default_factory=dict)
    inclusive_cost: float | None = None
    #: Unix seconds (the store's); ``green.concurrent_runs`` (runs alive at once, this one
    #: included, each measuring the whole machine), None when not concurrent.
    start_time: float | None = None
    end_time: float | None = None
    concurrent: int | None = None
    #: Created after the work it records (mlflow.sklearn's search candidates): not measured,
    #: its energy is its parent's (``green.measured_span`` "none: ...").
    in_parent: bool = False

    @property
    def marks(self) -> tuple[str, ...]:
        """Short words for what makes the numbers less than measured and fully priced."""
        marks = [f"concurrent ({self.concurrent} at once)"] if self.concurrent else []
        if self.estimated:
            marks.append(f"estimated ({'+'.join(self.estimated)})")
        elif self.measured is None and self.energy_kwh is not None:
            marks.append("measured? (no green.measured tag)")
        if self.intensity_fallback:
            marks.append("fallback intensity")
        if self.intensity_estimated:
            marks.append("estimated intensity")
        if self.co2e_partial:
            marks.append("CO2e partial")
        return tuple(marks)


@dataclass(frozen=True)
class Group:
    """Runs sharing the value of the ``by`` key (or every run: :attr:`Comparison.total`)."""

    key: str | None
    value: str | None
    runs: int
    energy_kwh: float | None
    co2e_g: float | None
    cost: float | None
    currency: str | None
    #: The best metric in the group (by ``mode``) and the best quality per kWh.
    best_metric: float | None
    best_quality_per_kwh: float | None
    absent: Mapping[str, str] = field(default_factory=dict)
    #: Why the energy, CO2e and cost are upper bounds (None: each joule counted once).
    upper_bound: str | None = None
    #: What was counted once although several runs measured it.
    counted_once: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """The rows (best quality per kWh first; without a metric, least energy first), the
    groups, the total over every run, and what the reader should know (:attr:`notes`)."""

    rows: tuple[Row, ...]
    metric: str | None
    mode: Literal["max", "min"]
    by: str | None
    baseline: Row | None
    groups: tuple[Group, ...]
    total: Group
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (``json.dumps``-able); absent quantities are ``null``."""
        out = asdict(self)
        out["baseline"] = self.baseline.run_id if self.baseline else None
        for row, plain in zip(self.rows, out["rows"], strict=True):
            plain["marks"] = list(row.marks)
        result: dict[str, Any] = _finite(out)
        return result


@dataclass(frozen=True)
class Period:
    """The runs of one experiment that started in one calendar month (UTC): their totals,
    and how much of their energy was measured (every meter measured: ``green.measured``),
    estimated, or from runs that do not say."""

    experiment: str
    #: ``YYYY-MM``; "unknown" for runs without a start time.
    month: str
    total: Group
    measured_kwh: float | None
    estimated_kwh: float | None
    unknown_kwh: float | None

    @property
    def measured_share(self) -> float | None:
        """Measured energy / energy (0..1); None when the energy is absent or 0."""
        energy = self.total.energy_kwh
        if energy is None or energy <= 0 or self.measured_kwh is None:
            return None
        return self.measured_kwh / energy


def by_month(records: Sequence[RunRecord]) -> tuple[Period, ...]:
    """The runs' totals per experiment and month of their start (UTC), by experiment name
    then month. Totals sum exclusive figures (:data:`EXCLUSIVE_NOTE`)."""
    import datetime as dt

    cells: dict[tuple[str, str], list[Row]] = {}
    for record in records:
        month = "unknown"
        if record.start_time is not None:
            when = dt.datetime.fromtimestamp(record.start_time, tz=dt.timezone.utc)
            month = when.strftime("%Y-%m")
        row = _row(record, None, "max", None)
        cells.setdefault((record.experiment, month), []).append(row)
    periods = []
    for (experiment, month), rows in sorted(cells.items()):
        total = _group("month", month, rows, "max")
        ids = {r.run_id for r in rows}
        own = [r for r in rows if not (r.in_parent and r.parent_id in ids)]  # (parent's energy)
        shares = [
            None
            if total.energy_kwh is None
            else _group("", "", [r for r in own if r.measured is measured], "max").energy_kwh
            for measured in (True, False, None)
        ]
        periods.append(Period(experiment, month, total, *shares))
    return tuple(periods)


def compare(
    records: Sequence[RunRecord],
    *,
    metric: str | None = None,
    mode: Literal["max", "min"] = "max",
    baseline: str | None = None,
    by: str | None = None,
) -> Comparison:
    """Compare ``records``. ``metric`` is a user metric of the runs (``val_acc``); ``mode``
    says whether higher (``max``) or lower (``min``) is better; ``baseline`` is a run id (or a
    run name that only one run has) among ``records``; ``by`` a metric, tag or param to total
    by. Raises :class:`UnknownBaseline` or ``ValueError`` (bad ``mode``)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: use 'max' (higher is better) or 'min' (lower is better)")
    rows = [_row(r, metric, mode, by) for r in records]
    base = _find_baseline(rows, baseline) if baseline is not None else None
    front = _front(rows)
    rows = [
        _with(
            row,
            on_front=row.run_id in front,
            vs_baseline=_delta(row, base) if base is not None else None,
        )
        for row in rows
    ]
    rows.sort(key=lambda r: _order(r, metric))
    if base is not None:
        base = next(r for r in rows if r.run_id == base.run_id)
    groups = _groups(rows, by, mode) if by is not None else ()
    total = _group(None, None, rows, mode)
    notes = [total.upper_bound or EXCLUSIVE_NOTE, *total.counted_once]
    notes += outside_children(records)
    if metric is None:
        notes.append("no metric chosen: quality per kWh and the front need --metric NAME")
    else:
        notes += _per_kwh_notes(records, rows, metric)
    return Comparison(
        rows=tuple(rows),
        metric=metric,
        mode=mode,
        by=by,
        baseline=base,
        groups=groups,
        total=total,
        notes=tuple(notes),
    )


def _per_kwh_notes(records: Sequence[RunRecord], rows: Sequence[Row], metric: str) -> list[str]:
    """Which energy quality per kWh divides by; the runs whose own figure (EnergyMonitor's,
    at its last validation) differs, with both values."""
    notes = [
        f"quality/kWh divides {metric} (its latest value) by the run's whole energy, nested runs "
        "and every stage (fit, test) included: green/inclusive/energy_kwh, else green/energy_kwh"
    ]
    own = {r.run_id: r.metrics.get(f"green/quality/{metric}_per_kwh") for r in records}
    differ = [
        f"{r.name} {own[r.run_id]:.4g} (compare: {r.quality_per_kwh:.4g})"
        for r in rows
        if r.quality_per_kwh is not None
        and own.get(r.run_id) is not None
        and not math.isclose(own[r.run_id] or 0.0, r.quality_per_kwh, rel_tol=1e-6)
    ]
    if differ:
        notes.append(
            f"green/quality/{metric}_per_kwh differs: EnergyMonitor divides by the energy at its "
            f"last validation, without the stages after it (test): {', '.join(differ)}"
        )
    return notes


# --- one run -----------------------------------------------------------------------------------


def _row(record: RunRecord, metric: str | None, mode: str, by: str | None) -> Row:
    m, tags = record.metrics, record.tags
    absent: dict[str, str] = {}
    not_reported = _not_reported(tags.get("green.not_reported", ""))
    untracked = "green/energy_kwh" not in m

    def get(key: str, attr: str, why: str) -> float | None:
        value = m.get(key)
        if value is None or not math.isfinite(value):
            absent[attr] = (
                "not measured by green-mlops (no green/* metrics)"
                if untracked
                else not_reported.get(attr, why)
            )
            return None
        return float(value)

    energy = get("green/energy_kwh", "energy_kwh", "no green/energy_kwh")
    band = get("green/energy_uncertainty_kwh", "energy_uncertainty_kwh", "no uncertainty band")
    co2e = get("green/co2e_g", "co2e_g", "no green/co2e_g")
    cost = get("green/cost", "cost", "not priced: set GREEN_MLOPS_PRICE_PER_KWH")
    flops = get("green/flops", "flops", "FLOPs not counted (EnergyMonitor counts them)")
    duration = m.get("green/duration_s")
    if duration is None and record.start_time is not None and record.end_time is not None:
        duration = record.end_time - record.start_time
    if duration is None:
        absent["duration_s"] = "no green/duration_s and no end time (still running?)"
    inclusive_kwh = m.get("green/inclusive/energy_kwh", energy)
    inclusive_cost = m.get("green/inclusive/cost", cost)
    inclusive_co2e = m.get("green/inclusive/co2e_g", co2e)
    if inclusive_kwh is None:
        absent["inclusive_kwh"] = absent["energy_kwh"]
    if inclusive_co2e is None:
        absent["inclusive_co2e_g"] = absent["co2e_g"]

    value: float | None = None
    quality: float | None = None
    per_kwh: float | None = None
    if metric is None:
        for attr in ("metric", "quality", "quality_per_kwh"):
            absent[attr] = "no metric chosen (--metric NAME)"
    else:
        raw = record.value(metric)
        if isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raw = None
        if raw is None or not math.isfinite(raw):
            for attr in ("metric", "quality", "quality_per_kwh"):
                absent[attr] = f"the run has no {metric!r}"
        else:
            value = float(raw)
            if mode == "max":
                quality = value
            elif value > 0:
                quality = 1.0 / value
            else:
                for attr in ("quality", "quality_per_kwh"):
                    absent[attr] = f"{metric}={value:g} <= 0: quality 1/{metric} undefined"
            if quality is not None:
                if inclusive_kwh is not None and inclusive_kwh > 0:
                    per_kwh = quality / inclusive_kwh
                else:
                    absent["quality_per_kwh"] = absent.get("inclusive_kwh", "energy is 0 kWh")

    measured_tag = tags.get("green.measured")
    fallbacks = "; ".join(  # a provider of the default list nobody configured is no fallback
        part
        for part in tags.get("green.intensity.fallbacks", "none").split("; ")
        if part not in ("", "none") and SKIPPED_DEFAULT not in part
    )
    group = record.value(by) if by is not None else None
    return Row(
        run_id=record.run_id,
        name=record.name,
        experiment=record.experiment,
        status=record.status,
        parent_id=record.parent_id,
        duration_s=duration,
        energy_kwh=energy,
        energy_uncertainty_kwh=band,
        co2e_g=co2e,
        cost=cost,
        currency=tags.get("green.currency") if cost is not None else None,
        flops=flops,
        inclusive_kwh=inclusive_kwh,
        inclusive_co2e_g=inclusive_co2e,
        metric=value,
        quality=quality,
        quality_per_kwh=per_kwh,
        measured=None if measured_tag is None else measured_tag == "true",
        estimated=tuple(
            sorted(
                k.removeprefix("green.method.")
                for k, v in tags.items()
                if k.startswith("green.method.") and v == "estimate"
            )
        ),
        intensity_fallback=fallbacks or None,
        intensity_estimated=tags.get("green.intensity.estimated") == "true",
        co2e_partial=co2e is not None and "lower bound" in tags.get("green.not_reported", ""),
        on_front=False,
        vs_baseline=None,
        group=None if group is None else _text(group),
        absent=absent,
        inclusive_cost=inclusive_cost,
        start_time=record.start_time,
        end_time=record.end_time,
        concurrent=concurrent_runs(tags),
        in_parent=record.parent_id is not None
        and tags.get("green.measured_span", "").startswith("none:"),
    )


def _not_reported(text: str) -> dict[str, str]:
    """``green.not_reported`` (``what: why; what: why``) as Row attribute -> reason."""
    reasons: dict[str, str] = {}
    what = None
    for item in text.split("; "):
        head = item.split(":", 1)[0].strip()
        if head in _NOT_REPORTED or head in ("embodied", "sci"):
            what = head
            reasons[what] = item
        elif what is not None:
            reasons[what] += "; " + item
    return {attr: reasons[w] for w in reasons if w in _NOT_REPORTED for attr in _NOT_REPORTED[w]}


def _text(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _with(row: Row, **changes: Any) -> Row:
    from dataclasses import replace

    return replace(row, **changes)


def _order(row: Row, metric: str | None) -> tuple[int, float, str]:
    if metric is not None:
        if row.quality_per_kwh is not None:
            return (0, -row.quality_per_kwh, row.name)
        return (1, 0.0, row.name)
    if row.inclusive_kwh is not None:
        return (0, row.inclusive_kwh, row.name)
    return (1, 0.0, row.name)


# --- the front, the baseline -------------------------------------------------------------------


def _front(rows: Sequence[Row]) -> set[str]:
    """Run ids on the Pareto front: no other run has at least the quality for at most the
    energy (inclusive), better in one of the two. One sweep by energy: O(n log n)."""
    points = sorted(
        (r.inclusive_kwh, -r.quality, r.run_id)
        for r in rows
        if r.inclusive_kwh is not None and r.quality is not None
    )
    front: set[str] = set()
    best_below = -math.inf  # the best quality of the runs with less energy
    i = 0
    while i < len(points):
        j = i
        while j < len(points) and points[j][0] == points[i][0]:
            j += 1
        top = -points[i][1]  # the best quality at this energy (sorted first)
        if top > best_below:  # ties at (energy, quality) are all on the front
            front.update(run_id for _, negative, run_id in points[i:j] if -negative == top)
        best_below = max(best_below, top)
        i = j
    return front


def _find_baseline(rows: Sequence[Row], wanted: str) -> Row:
    by_id = [r for r in rows if r.run_id == wanted]
    if by_id:
        return by_id[0]
    by_name = [r for r in rows if r.name == wanted]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        ids = ", ".join(r.run_id for r in by_name)
        raise UnknownBaseline(f"baseline {wanted!r}: {len(by_name)} runs have this name ({ids})")
    raise UnknownBaseline(
        f"baseline {wanted!r} is not among the {len(rows)} runs compared (give a run id, or "
        "the name of one run)"
    )


def _delta(row: Row, base: Row) -> Delta:
    absent: dict[str, str] = {}

    def saving(attr: str, field: str) -> tuple[float | None, float | None]:
        mine, theirs = getattr(row, attr), getattr(base, attr)
        if mine is None or theirs is None:
            side = row if mine is None else base
            absent[field] = absent[f"{field}_pct"] = (
                f"{side.name}: {side.absent.get(attr, 'absent')}"
            )
            return None, None
        saved = theirs - mine
        if theirs == 0:
            absent[f"{field}_pct"] = f"the baseline's {attr} is 0"
            return saved, None
        return saved, 100.0 * saved / theirs

    kwh, kwh_pct = saving("inclusive_kwh", "saving_kwh")
    co2e, co2e_pct = saving("inclusive_co2e_g", "saving_co2e_g")
    change = None
    if row.metric is not None and base.metric is not None:
        change = row.metric - base.metric
    else:
        side = row if row.metric is None else base
        absent["metric_change"] = f"{side.name}: {side.absent.get('metric', 'absent')}"
    return Delta(kwh, kwh_pct, co2e, co2e_pct, change, absent)


# --- totals ------------------------------------------------------------------------------------


def _groups(rows: Sequence[Row], by: str, mode: str) -> tuple[Group, ...]:
    values: dict[str | None, list[Row]] = {}
    for row in rows:
        values.setdefault(row.group, []).append(row)
    ordered = sorted(values, key=lambda v: (v is None, v or ""))
    return tuple(_group(by, v, values[v], mode) for v in ordered)


def _group(key: str | None, value: str | None, rows: Sequence[Row], mode: str) -> Group:
    absent: dict[str, str] = {}
    sums: dict[str, float | None] = {}
    units, once, unknown = counted_once(rows)
    ids = {r.run_id for r in rows}  # a run whose energy is its parent's adds 0 beside it
    for attr, metric_key in _SUMMED.items():
        lacking = [
            r.name
            for r in rows
            if getattr(r, attr) is None and not (r.in_parent and r.parent_id in ids)
        ]
        if lacking:
            sums[attr] = None
            shown = ", ".join(lacking[:3]) + (" ..." if len(lacking) > 3 else "")
            absent[attr] = f"{len(lacking)} of {len(rows)} runs without {metric_key} ({shown})"
        else:
            sums[attr] = math.fsum(family_sum(top, members, attr) for top, members in units)
    currencies = {r.currency for r in rows if r.cost is not None}
    currency = next(iter(currencies)) if len(currencies) == 1 else None
    if len(currencies) > 1:
        sums["cost"] = None
        absent["cost"] = f"mixed currencies ({', '.join(sorted(str(c) for c in currencies))})"
    metrics = [r.metric for r in rows if r.metric is not None]
    best = (max if mode == "max" else min)(metrics) if metrics else None
    qualities = [r.quality_per_kwh for r in rows if r.quality_per_kwh is not None]
    return Group(
        key=key,
        value=value,
        runs=len(rows),
        energy_kwh=sums["energy_kwh"],
        co2e_g=sums["co2e_g"],
        cost=sums["cost"],
        currency=currency,
        best_metric=best,
        best_quality_per_kwh=max(qualities) if qualities else None,
        absent=absent,
        upper_bound=None
        if not unknown
        else f"totals are upper bounds: {names(unknown)} ran at the same time "
        "(green.concurrent_runs), each measuring the whole machine, and how much they overlap "
        "cannot be known from their totals, so the overlap is counted more than once",
        counted_once=tuple(once),
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
