"""One report for the stages of a run: ``fit`` then ``test`` (or ``validate``, ``predict``) on one
Trainer write into the same MLflow run (or ``log_dir``), and each stage's totals continue the
earlier ones. The report written at a later stage is the merge of every stage EnergyMonitor
measured in this process for that run: one energy timeline from the first stage's start to the
last one's end, the devices, phases and figures summed, the intensity intervals of each stage,
so that the report's parts add up to the run's totals and ``green-mlops verify`` recomputes them.

Why a merge (not a report per stage): the run's totals (``green/energy_kwh``, ...) cover every
stage, and so must the report that ``verify`` checks against them and the chart drawn from it.
See docs/report-format.md ("Several stages in one report").
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from green_mlops.log import warn_once
from green_mlops.units import J_PER_KWH
from green_mlops.verify import report_digests

__all__ = ["MAX_RUNS", "merge", "report_for_run", "stage_entry"]

#: Runs whose latest report is kept (a process of many short runs keeps the newest ones).
MAX_RUNS = 64
#: Seconds: the run's ``green/duration_s`` and the stages' durations agree within this.
DURATION_TOL_S = 1e-6

_reports: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
_lock = threading.Lock()


def stage_entry(document: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The ``energy.stages`` entry of a one-stage report: its name, span and joules."""
    energy = document["energy"]
    return {
        "stage": stage,
        "started_at": float(energy["started_at"]),
        "duration_s": float(energy["duration_s"]),
        "joules": float(energy["joules"]),
    }


def report_for_run(key: Hashable, document: dict[str, Any], stage: str) -> dict[str, Any]:
    """The report to write for the run ``key`` at the end of ``stage``: ``document`` (the
    stage's) merged into the run's earlier stages when its totals continue them; remembered
    for the next stage. Never raises: a merge that fails leaves the stage's own report, with
    the earlier one kept whole under ``earlier_stage_reports`` (nothing measured is lost)."""
    own = dict(document)
    energy = own.get("energy")
    if not isinstance(energy, Mapping) or "rank0_metrics" in own or "nodes" in own:
        return own  # several ranks or nodes: rank 0's measurement only, as before
    own["energy"] = {**energy, "stages": [stage_entry(own, stage)]}
    with _lock:
        earlier = _reports.get(key)
    chosen = own
    if earlier is not None and _continues(earlier, own):
        try:
            chosen = merge(earlier, own)
        except Exception as exc:
            warn_once(
                f"EnergyMonitor: the report of the {stage} stage could not be merged with the "
                f"run's earlier stages ({type(exc).__name__}: {exc}); it carries them whole "
                "under earlier_stage_reports"
            )
            chosen = {**own, "earlier_stage_reports": [earlier]}
    with _lock:
        _reports[key] = chosen
        _reports.move_to_end(key)
        while len(_reports) > MAX_RUNS:
            _reports.popitem(last=False)
    return chosen


def _continues(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> bool:
    """The later stage's totals are the earlier report's plus its own (same Trainer's run)."""
    logged = (later.get("metrics") or {}).get("green/duration_s")
    if not isinstance(logged, int | float):
        return False
    covered = float(earlier["energy"]["duration_s"]) + float(later["energy"]["duration_s"])
    return math.isclose(logged, covered, rel_tol=1e-6, abs_tol=DURATION_TOL_S)


def merge(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """``later``'s report (metrics, tags, footprint: the run's totals already) whose energy and
    accounting also hold ``earlier``'s. Raises ValueError when the two cannot be one report
    (overlapping spans, different PUE, price, currency, functional unit or embodied inputs,
    adjusted totals)."""
    a, b = earlier["energy"], later["energy"]
    points_a, points_b = _points(a), _points(b)
    if not points_a or not points_b or points_a[-1]["time"] > points_b[0]["time"]:
        raise ValueError("the stages' measurements overlap in time")
    offset = dict(a["joules_by_component"])
    shifted = [
        {
            **p,
            "joules_by_component": _add(offset, p["joules_by_component"]),
        }
        for p in points_b
    ]
    devices = _devices(a["devices"], b["devices"])
    joules = sum(float(d["joules"]) for d in devices)
    by_component: dict[str, float] = {}
    for d in devices:
        by_component[d["component"]] = by_component.get(d["component"], 0.0) + float(d["joules"])
    energy = {
        **b,
        "started_at": a["started_at"],
        "duration_s": float(a["duration_s"]) + float(b["duration_s"]),
        "devices": devices,
        "phases": _phases(a["phases"], b["phases"]),
        "timeline": points_a + shifted,
        "unavailable": _union(a, b, "unavailable"),
        "superseded": _union(a, b, "superseded"),
        "problems": _union(a, b, "problems"),
        "notes": _union(a, b, "notes"),
        "extra": {**(a.get("extra") or {}), **(b.get("extra") or {})},
        "joules": joules,
        "kwh": joules / J_PER_KWH,
        "uncertainty_j": sum(float(d["joules"]) * float(d["uncertainty"]) for d in devices),
        "joules_by_component": by_component,
        "stages": [*a.get("stages", []), *b.get("stages", [])],
    }
    spans = (
        (points_a[0]["time"], math.nextafter(points_a[-1]["time"], math.inf)),
        (points_b[0]["time"], math.nextafter(points_b[-1]["time"], math.inf)),
    )
    if spans[0][1] > spans[1][0]:
        raise ValueError("the stages' measurements touch in time")
    accounting = _accounting(earlier["accounting"], later["accounting"], spans, energy)
    return {
        **later,
        "energy": energy,
        "accounting": accounting,
        "digests": report_digests(accounting),
    }


def _points(energy: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The energy timeline with the measurement's end as its last point (as verify reads it)."""
    points = [dict(p) for p in energy.get("timeline") or []]
    end = float(energy["started_at"]) + float(energy["duration_s"])
    if not points or end > float(points[-1]["time"]):
        points.append({"time": end, "joules_by_component": dict(energy["joules_by_component"])})
    return points


def _add(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: float(a.get(k, 0.0)) + float(b.get(k, 0.0)) for k in {**a, **b}}


def _union(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> list[Any]:
    out: list[Any] = []
    for item in [*(a.get(key) or ()), *(b.get(key) or ())]:
        if item not in out:
            out.append(item)
    return out


_STATUS_RANK = {"ok": 0, "degraded": 1, "failed": 2}


def _devices(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each device once: joules summed, the uncertainty band weighted by joules, the worse
    status (and its problem) kept."""
    out: dict[str, dict[str, Any]] = {}
    for device in [*a, *b]:
        seen = out.get(device["device"])
        if seen is None:
            out[device["device"]] = dict(device)
            continue
        j0, j1 = float(seen["joules"]), float(device["joules"])
        total = j0 + j1
        band = j0 * float(seen["uncertainty"]) + j1 * float(device["uncertainty"])
        seen["uncertainty"] = band / total if total else float(device["uncertainty"])
        seen["joules"] = total
        if (
            _STATUS_RANK.get(device.get("status", "ok"), 0)
            >= _STATUS_RANK.get(seen.get("status", "ok"), 0)
            and device.get("status", "ok") != "ok"
        ):
            seen["status"], seen["problem"] = device.get("status"), device.get("problem")
        seen["resolution_s"] = max(
            float(seen.get("resolution_s", 0.0)), float(device.get("resolution_s", 0.0))
        )
    return list(out.values())


def _phases(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in [*a, *(k for k in b if k not in a)]:
        parts = [p for p in (a.get(name), b.get(name)) if isinstance(p, Mapping)]
        by_device: dict[str, float] = {}
        for p in parts:
            for device, joules in (p.get("joules_by_device") or {}).items():
                by_device[device] = by_device.get(device, 0.0) + float(joules)
        out[name] = {
            "name": name,
            "duration_s": sum(float(p.get("duration_s", 0.0)) for p in parts),
            "entries": sum(int(p.get("entries", 0)) for p in parts),
            "joules_by_device": by_device,
            "joules": sum(by_device.values()),
        }
    return out


#: Inputs both stages must share to be priced as one report.
_SAME = ("pue", "price_per_kwh", "currency", "functional_unit")
_SAME_EMBODIED = ("total_kgco2e", "hardware_lifetime_years", "resource_share")
_SUMMED = ("energy_facility_kwh", "co2e_g", "co2e_market_g", "cost", "embodied_g")


def _accounting(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    spans: tuple[tuple[float, float], tuple[float, float]],
    energy: Mapping[str, Any],
) -> dict[str, Any]:
    for key in _SAME:
        if a.get(key) != b.get(key):
            raise ValueError(f"accounting.{key} differs ({a.get(key)!r}, {b.get(key)!r})")
    emb_a, emb_b = a.get("embodied") or {}, b.get("embodied") or {}
    for key in _SAME_EMBODIED:
        if emb_a.get(key) != emb_b.get(key):
            raise ValueError(f"accounting.embodied.{key} differs")
    for adjusted in (a.get("adjustments") or {}, b.get("adjustments") or {}):
        if any(adjusted.get(k) for k in ("nested_runs", "earlier_segments")):
            raise ValueError("a stage's totals are adjusted (nested runs or earlier segments)")
    if (a.get("market_intervals") is None) != (b.get("market_intervals") is None):
        raise ValueError("one stage has market-based intervals, the other none")
    fig_a, fig_b = a.get("figures") or {}, b.get("figures") or {}
    figures: dict[str, Any] = {"energy_kwh": float(energy["joules"]) / J_PER_KWH}
    for key in _SUMMED:
        x, y = fig_a.get(key), fig_b.get(key)
        if (x is None) != (y is None):
            raise ValueError(f"accounting.figures.{key}: one stage has it, the other not")
        figures[key] = None if x is None or y is None else float(x) + float(y)
    units = _units(a, b)
    sci = None
    grams = (figures["co2e_g"], figures["embodied_g"])
    if fig_a.get("sci_g") is not None and fig_b.get("sci_g") is not None and units:
        sci = (grams[0] + grams[1]) / units if None not in grams else None
    figures["sci_g"] = sci
    market = None
    if a.get("market_intervals") is not None:
        market = _clip(a["market_intervals"], spans[0]) + _clip(b["market_intervals"], spans[1])
    ra, rb = emb_a.get("reserved_s"), emb_b.get("reserved_s")
    reserved = (
        float(ra) + float(rb) if isinstance(ra, int | float) and isinstance(rb, int | float) else rb
    )
    return {
        **b,
        "timeline": _accounting_timeline(energy),
        "intervals": _clip(a.get("intervals") or [], spans[0])
        + _clip(b.get("intervals") or [], spans[1]),
        "market_intervals": market,
        "embodied": {
            **emb_b,
            "reserved_s": reserved,
        },
        "functional_units": units,
        "figures": figures,
    }


def _units(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """The functional units of the merged report: each stage's SCI is summed into the run's
    (``green/sci_g_per_<unit>`` is additive), so the units that give that sum: the stages'
    own when they agree, else (carbon + embodied) / the summed SCI."""
    ua, ub = a.get("functional_units"), b.get("functional_units")
    if ua == ub:
        return None if ua is None else float(ua)
    fa, fb = a.get("figures") or {}, b.get("figures") or {}
    values: list[float] = []
    for figures in (fa, fb):
        for key in ("sci_g", "co2e_g", "embodied_g"):
            value = figures.get(key)
            if not isinstance(value, int | float):
                return None
            values.append(float(value))
    sci = values[0] + values[3]
    grams = values[1] + values[2] + values[4] + values[5]
    return grams / sci if sci > 0 else None


def _clip(
    intervals: Sequence[Mapping[str, Any]], span: tuple[float, float]
) -> list[dict[str, Any]]:
    """The intervals within ``span`` (a stage's): pricing inside the span is unchanged, and
    the stages' intervals stay disjoint."""
    out = []
    for interval in intervals:
        start, end = max(float(interval["start"]), span[0]), min(float(interval["end"]), span[1])
        if end > start:
            out.append({**interval, "start": start, "end": end})
    return out


def _accounting_timeline(energy: Mapping[str, Any]) -> list[list[float]]:
    """``accounting.timeline`` from the merged energy timeline, as verify derives it."""
    out: list[list[float]] = [
        [float(p["time"]), sum(float(j) for j in p["joules_by_component"].values())]
        for p in energy["timeline"]
    ]
    end = float(energy["started_at"]) + float(energy["duration_s"])
    if not out or end > out[-1][0]:
        out.append([end, float(energy["joules"])])
    return out
