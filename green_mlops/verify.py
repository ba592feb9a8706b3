"""Recompute a report's figures from what it carries: the third-party check behind
``green-mlops verify`` (docs/report-format.md, "Verifying a report").

From the report alone: operational carbon (the timeline's energy in each intensity interval x
its g/kWh, x PUE), market-based carbon, facility energy, cost, embodied carbon and SCI; then
the logged totals (``metrics``: the figures less nested runs, plus earlier segments), the
``footprint`` block, and the SHA-256 digests of the timeline and the intervals. Framework-free,
no I/O: the command reads the file.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from green_mlops.units import J_PER_KWH, YEAR

__all__ = [
    "ABS_TOL",
    "REL_TOL",
    "REPORT_SCHEMA",
    "Check",
    "Verification",
    "canonical_json",
    "digest",
    "report_digests",
    "verify_report",
]

#: The schema of the reports this version writes (and the only one :func:`verify_report` reads).
REPORT_SCHEMA = "green-mlops/report/v2"
#: A recomputed figure matches when within REL_TOL of the reported one, or ABS_TOL of it in the
#: figure's unit (kWh, g, currency): the difference of two float sums in another order.
REL_TOL = 1e-9
ABS_TOL = 1e-9
#: What ``digests`` covers, each a key of ``accounting``.
DIGESTED = ("timeline", "intervals", "market_intervals")
#: ``accounting.figures`` name -> metric key (``{unit}``: the functional unit).
METRIC_KEYS = {
    "energy_kwh": "green/energy_kwh",
    "energy_facility_kwh": "green/energy_facility_kwh",
    "co2e_g": "green/co2e_g",
    "co2e_market_g": "green/co2e_market_g",
    "cost": "green/cost",
    "embodied_g": "green/embodied_g",
    "sci_g": "green/sci_g_per_{unit}",
}
#: The totals a multi-node job adds over its nodes (SCI is recomputed from the sums instead).
JOB_SUM_KEYS = tuple(k for k in METRIC_KEYS.values() if "{unit}" not in k)
#: ``footprint`` field -> ``accounting.figures`` name.
FOOTPRINT_FIELDS = {
    "it_kwh": "energy_kwh",
    "facility_kwh": "energy_facility_kwh",
    "operational_g": "co2e_g",
    "market_g": "co2e_market_g",
    "cost": "cost",
    "embodied_g": "embodied_g",
    "sci_g": "sci_g",
}


def canonical_json(value: Any) -> bytes:
    """The encoding the digests hash: ``json.dumps(value, sort_keys=True, separators=(",",
    ":"), ensure_ascii=True, allow_nan=False)`` as UTF-8 (floats in Python's shortest
    round-trip form)."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("utf-8")


def digest(value: Any) -> str:
    """``sha256:<hex>`` of :func:`canonical_json`."""
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def report_digests(accounting: Mapping[str, Any]) -> dict[str, str]:
    """The report's ``digests``: one per :data:`DIGESTED` key of ``accounting``."""
    return {key: digest(accounting.get(key)) for key in DIGESTED}


@dataclass(frozen=True)
class Check:
    """One comparison: ``name`` (a metric key, ``accounting.figures.<x>``, ``footprint.<x>``,
    ``digests.<x>``), the reported and the recomputed value (``None``: absent)."""

    name: str
    reported: Any
    recomputed: Any
    ok: bool


@dataclass
class Verification:
    """The outcome: every check, and what could not be checked (with why)."""

    checks: list[Check] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def exit_code(self) -> int:
        """0: everything matches; 1: a figure does not; 2: the report lacks what is needed."""
        if self.mismatches:
            return 1
        return 2 if self.unverifiable else 0


class _Malformed(Exception):
    """The report lacks a field verify needs (or it has the wrong type)."""


def verify_report(report: Mapping[str, Any]) -> Verification:
    """Recompute and compare everything :func:`verify_report`'s module docstring lists."""
    out = Verification()
    schema = report.get("schema") if isinstance(report, Mapping) else None
    if schema != REPORT_SCHEMA or not isinstance(report.get("accounting"), Mapping):
        out.unverifiable.append(
            f"schema {schema!r}: the report carries no intensity intervals or inputs to recompute "
            f"from (needs {REPORT_SCHEMA}: measure the run again with this version)"
        )
        return out
    try:
        _verify(report, out)
    except _Malformed as exc:
        out.unverifiable.append(str(exc))
    return out


def _verify(report: Mapping[str, Any], out: Verification) -> None:
    acc: Mapping[str, Any] = report["accounting"]
    digests = _get(report, "digests", Mapping)
    for key in DIGESTED:
        value = acc.get(key)
        out.checks.append(_same(f"digests.{key}", digests.get(key), digest(value), exact=True))
    timeline = _timeline(_get(acc, "timeline", list))
    intervals = _intervals(_get(acc, "intervals", list), "intervals")
    market_raw = acc.get("market_intervals")
    market = None if market_raw is None else _intervals(market_raw, "market_intervals")
    _check_energy_timeline(report, timeline, out)
    _check_energy_parts(report["energy"], out)

    pue = _number(acc, "pue")
    price = _number(acc, "price_per_kwh", optional=True)
    emb = _get(acc, "embodied", Mapping)
    units = _number(acc, "functional_units", optional=True)
    unit = _get(acc, "functional_unit", str)

    energy = (timeline[-1][1] - timeline[0][1]) / J_PER_KWH if timeline else 0.0
    grams, priced, unpriced = price_timeline(timeline, intervals)
    co2e = grams * pue if priced > 0 or unpriced == 0 else None  # no energy: 0 g, as footprint
    market_g = None
    if market is not None:
        m_grams, m_priced, _ = price_timeline(timeline, market)
        market_g = m_grams * pue if m_priced > 0 else None
    facility = energy * pue
    te = _number(emb, "total_kgco2e", optional=True)
    embodied = None
    if te is not None:
        lifetime = _number(emb, "hardware_lifetime_years")
        share = _number(emb, "resource_share")
        reserved = _number(emb, "reserved_s")
        embodied = te * 1000 * reserved / (lifetime * YEAR) * share
    sci = None
    if co2e is not None and embodied is not None and units and unpriced <= ABS_TOL:
        sci = (co2e + embodied) / units
    recomputed = {
        "energy_kwh": energy,
        "energy_facility_kwh": facility,
        "co2e_g": co2e,
        "co2e_market_g": market_g,
        "cost": None if price is None else facility * price,
        "embodied_g": embodied,
        "sci_g": sci,
    }
    figures = _get(acc, "figures", Mapping)
    for name, value in recomputed.items():
        out.checks.append(_same(f"accounting.figures.{name}", figures.get(name), value))
    expected = _check_metrics(report, acc, recomputed, unit, out)
    _check_breakdown(report, acc, grams / priced if priced > 0 else None, out)
    fp = report.get("footprint")
    if isinstance(fp, Mapping):
        for name, figure in FOOTPRINT_FIELDS.items():
            check = _same(f"footprint.{name}", fp.get(name), recomputed[figure])
            if not check.ok and expected.get(figure) is not None:  # the run's totals
                check = _same(f"footprint.{name}", fp.get(name), expected[figure])
            if not check.ok and isinstance(report.get("nodes"), Mapping):  # the job's totals
                job = report["metrics"].get(METRIC_KEYS[figure].format(unit=unit))
                check = _same(f"footprint.{name}", fp.get(name), job)
            out.checks.append(check)


def _check_metrics(
    report: Mapping[str, Any],
    acc: Mapping[str, Any],
    recomputed: Mapping[str, float | None],
    unit: str,
    out: Verification,
) -> dict[str, float | None]:
    """The logged totals: the figures less nested runs plus earlier segments. Returns them;
    when the totals cover more than the report carries (the Lightning callback's stages), the
    logged values instead (the footprint is then checked against them) and says so."""
    adjustments = _get(acc, "adjustments", Mapping)
    nested = _floats(_get(adjustments, "nested_runs", Mapping))
    earlier = _floats(_get(adjustments, "earlier_segments", Mapping))
    metrics = report.get("rank0_metrics", report.get("metrics"))
    if not isinstance(metrics, Mapping):
        raise _Malformed("metrics: missing")
    if "rank0_metrics" in report and "nodes" not in report:
        out.unverifiable.append(
            "metrics: summed over the job's ranks; only rank 0's measurement is in this report "
            "(its totals, rank0_metrics, are checked)"
        )
    nodes = report.get("nodes")
    if isinstance(nodes, Mapping) and isinstance(report.get("metrics"), Mapping):
        _check_job_sum(report["metrics"], metrics, nodes, out)
    energy = report.get("energy")
    duration = _number(energy, "duration_s") if isinstance(energy, Mapping) else None
    logged = metrics.get("green/duration_s")
    if duration is not None and isinstance(logged, int | float):
        covered = duration + earlier.get("green/duration_s", 0.0)
        if not math.isclose(logged, covered, rel_tol=1e-6, abs_tol=1e-6):
            out.unverifiable.append(
                f"metrics: the run's totals cover {logged:.6g} s, this report's measurement "
                f"{covered:.6g} s (other stages of the Trainer, or other processes): the totals "
                "cannot be recomputed from this report; its own figures are checked"
            )
            logged_values = {n: metrics.get(k.format(unit=unit)) for n, k in METRIC_KEYS.items()}
            return {
                n: float(v) if isinstance(v, int | float) else None
                for n, v in logged_values.items()
            }
    expected: dict[str, float | None] = {}
    for name, template in METRIC_KEYS.items():
        key = template.format(unit=unit)
        value = recomputed[name]
        if value is not None:
            value = value - nested.get(key, 0.0) + earlier.get(key, 0.0)
        expected[name] = value
        out.checks.append(_same(key, metrics.get(key), value))
    return expected


def _check_job_sum(
    job: Mapping[str, Any], own: Mapping[str, Any], nodes: Mapping[str, Any], out: Verification
) -> None:
    """A multi-node job's totals: rank 0's node's (checked above) plus each other node's
    figures as that node reported them (its intervals are not in the report)."""
    parts = [n for n in nodes.values() if isinstance(n, Mapping)]
    for key in JOB_SUM_KEYS:
        if isinstance(job.get(key), int | float) and isinstance(own.get(key), int | float):
            added = sum(float(n.get(key, 0.0)) for n in parts)
            out.checks.append(_same(f"{key} (job: rank 0 + nodes)", job[key], own[key] + added))
    out.unverifiable.append(
        f"metrics: the job's totals add {len(parts)} other node(s)' figures as each reported "
        "them (nodes); only rank 0's node's intervals are in this report (rank0_metrics checked)"
    )


def price_timeline(
    timeline: Sequence[tuple[float, float]], intervals: Sequence[tuple[float, float, float]]
) -> tuple[float, float, float]:
    """(grams, priced kWh, unpriced kWh) of ``timeline`` ((Unix s, cumulative J)) priced by
    ``intervals`` ((start, end, g/kWh), sorted, disjoint). Power is constant between two
    points; an interval of zero length is a nudge past its start (as ``carbon.account``)."""
    ends = [b for _, b, _ in intervals]
    grams = priced_j = unpriced_j = 0.0
    for (t0, e0), (t1, e1) in itertools.pairwise(timeline):
        joules = e1 - e0
        if joules <= 0:
            continue
        if t1 <= t0:
            t1 = math.nextafter(t0, math.inf)
        watts = joules / (t1 - t0)
        covered = 0.0
        i = bisect.bisect_right(ends, t0)
        while i < len(intervals) and intervals[i][0] < t1:
            a, b, g = intervals[i]
            seconds = min(b, t1) - max(a, t0)
            piece = joules if a <= t0 and t1 <= b else watts * seconds
            grams += piece / J_PER_KWH * g
            covered += piece
            i += 1
        priced_j += covered
        unpriced_j += max(0.0, joules - covered)
    return grams, priced_j / J_PER_KWH, unpriced_j / J_PER_KWH


# --- checks and parsing ----------------------------------------------------------------------


def _check_energy_timeline(
    report: Mapping[str, Any], timeline: list[tuple[float, float]], out: Verification
) -> None:
    """``accounting.timeline`` is the energy timeline of ``energy`` (each point's joules summed
    over components, then the snapshot's end when later); times within a microsecond."""
    energy = report.get("energy")
    if not isinstance(energy, Mapping):
        raise _Malformed("energy: missing")
    derived: list[tuple[float, float]] = []
    for point in _get(energy, "timeline", list):
        if not isinstance(point, Mapping):
            raise _Malformed("energy.timeline: a point is not an object")
        joules = _floats(_get(point, "joules_by_component", Mapping))
        derived.append((_number(point, "time"), sum(joules.values())))
    end = (_number(energy, "started_at") + _number(energy, "duration_s"), _number(energy, "joules"))
    if not derived or end[0] > derived[-1][0]:
        derived.append(end)
    first = next(
        (
            i
            for i, (a, b) in enumerate(zip(derived, timeline, strict=False))
            if not (math.isclose(a[0], b[0], rel_tol=0, abs_tol=1e-6) and _close(a[1], b[1]))
        ),
        None,
    )
    if first is None and len(derived) != len(timeline):
        first = min(len(derived), len(timeline))
    if first is None:
        out.checks.append(Check("accounting.timeline", len(timeline), len(derived), True))
        return
    mine = list(timeline[first]) if first < len(timeline) else None
    again = list(derived[first]) if first < len(derived) else None
    out.checks.append(Check(f"accounting.timeline[{first}] vs energy.timeline", mine, again, False))


def _check_energy_parts(energy: Mapping[str, Any], out: Verification) -> None:
    """The measurement's parts add up to its total: ``kwh``, the components, each component's
    devices and the phases (a figure edited alone shows; the total itself is the timeline's)."""
    total = _number(energy, "joules")
    out.checks.append(_same("energy.kwh", energy.get("kwh"), total / J_PER_KWH))
    parts = _floats(_get(energy, "joules_by_component", Mapping))
    out.checks.append(_same("energy.joules_by_component (sum)", sum(parts.values()), total))
    devices: dict[str, float] = {}
    for device in _get(energy, "devices", list):
        if not isinstance(device, Mapping):
            raise _Malformed("energy.devices: a device is not an object")
        component = _get(device, "component", str)
        devices[component] = devices.get(component, 0.0) + _number(device, "joules")
    for component in sorted(set(parts) | set(devices)):
        out.checks.append(
            _same(
                f"energy.joules_by_component.{component} (its devices)",
                parts.get(component, 0.0),
                devices.get(component, 0.0),
            )
        )
    phases = _get(energy, "phases", Mapping)
    if phases:
        joules = sum(_number(p, "joules") for p in phases.values() if isinstance(p, Mapping))
        out.checks.append(_same("energy.phases (sum)", joules, total))


def _check_breakdown(
    report: Mapping[str, Any], acc: Mapping[str, Any], intensity: float | None, out: Verification
) -> None:
    """A run with no nested runs and no earlier segments logs its energy per component and per
    phase, and its mean intensity (grams per priced kWh, before PUE), as the report has them."""
    adjustments = _get(acc, "adjustments", Mapping)
    if any(_get(adjustments, k, Mapping) for k in ("nested_runs", "earlier_segments")):
        return  # those totals are adjusted: the figures above check them
    metrics = report.get("rank0_metrics", report.get("metrics"))
    energy = report["energy"]
    logged = _number(metrics, "green/duration_s", optional=True)
    if logged is None or not math.isclose(logged, _number(energy, "duration_s"), rel_tol=1e-6):
        return  # not a run's own totals (other stages or processes): said by _check_metrics
    kwh = {
        f"green/energy/{c}_kwh": j / J_PER_KWH
        for c, j in _floats(_get(energy, "joules_by_component", Mapping)).items()
    }
    for name, phase in _get(energy, "phases", Mapping).items():
        if isinstance(phase, Mapping):
            kwh[f"green/phase/{name}_kwh"] = _number(phase, "joules") / J_PER_KWH
    for key, value in sorted(kwh.items()):
        if key in metrics:
            out.checks.append(_same(key, metrics[key], value))
    if intensity is not None:
        out.checks.append(
            _same("green/intensity_g_per_kwh", metrics.get("green/intensity_g_per_kwh"), intensity)
        )
        fp = report.get("footprint")
        if isinstance(fp, Mapping):
            out.checks.append(
                _same("footprint.intensity_g_per_kwh", fp.get("intensity_g_per_kwh"), intensity)
            )


def _same(
    name: str, reported: Any, recomputed: float | str | None, *, exact: bool = False
) -> Check:
    if recomputed is None or reported is None:
        return Check(name, reported, recomputed, reported is None and recomputed is None)
    if exact or isinstance(recomputed, str):
        return Check(name, reported, recomputed, reported == recomputed)
    ok = isinstance(reported, int | float) and not isinstance(reported, bool)
    return Check(name, reported, recomputed, ok and _close(float(reported), recomputed))


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _get(mapping: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    if not isinstance(value, kind):
        raise _Malformed(f"{key}: missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _number(mapping: Any, key: str, *, optional: bool = False) -> Any:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Malformed(f"{key}: missing or not a finite number (got {value!r})")
    return float(value)


def _floats(mapping: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): _number(mapping, k) for k in mapping} if mapping else {}


def _timeline(raw: list[Any]) -> list[tuple[float, float]]:
    points = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2):
            raise _Malformed("accounting.timeline: a point is not [time, joules]")
        points.append((_pair(item, 0), _pair(item, 1)))
    return points


def _pair(item: list[Any], index: int) -> float:
    return float(_number({"value": item[index]}, "value"))


def _intervals(raw: Any, what: str) -> list[tuple[float, float, float]]:
    if not isinstance(raw, list):
        raise _Malformed(f"accounting.{what}: not a list")
    out: list[tuple[float, float, float]] = []
    for item in raw:
        interval = (_number(item, "start"), _number(item, "end"), _number(item, "g_per_kwh"))
        if interval[1] <= interval[0] or (out and interval[0] < out[-1][1]):
            raise _Malformed(f"accounting.{what}: intervals must be sorted, disjoint, non-empty")
        out.append(interval)
    return out
