"""Metric keys and provenance tags: one scheme, whichever integration logs them.

Keys carry their unit and use ``/`` groups (the MLflow UI turns them into chart sections, and
``system/...`` into its System metrics tab). Provenance goes into ``green.*`` tags so runs can be
filtered with ``mlflow.search_runs(filter_string="tags.`green.measured` = 'true'")``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from green_mlops.meters import Component
from green_mlops.snapshot import Snapshot
from green_mlops.units import clip, joules_to_kwh

__all__ = [
    "EXCLUSIVE_KEYS",
    "POWER_KEY",
    "add_not_reported",
    "additive_keys",
    "energy_metrics",
    "is_additive",
    "power_series",
    "provenance_tags",
]

#: Time series of average power between timeline points, in watts.
POWER_KEY = "system/green/power_w"

# --- totals that add up ------------------------------------------------------------------------

_AMOUNTS = ("_kwh", "_g", "_s", "/cost", "_flops", "/flops")
#: Series, quality, another callback's figures, predictions, plans and the per-node breakdown
#: (already in the job's totals): not run totals of a measurement (a forecast's ``_kwh`` or a
#: plan's ``co2e_if_run_now_g`` never add up).
_NOT_TOTALS = (
    "green/epoch/",
    "green/step/",
    "green/quality/",
    "green/validation/",
    "green/forecast/",
    "green/estimate/",
    "green/schedule/",
    "green/budget/",
    "green/node/",
)
#: Rates and one-off values that end like an amount.
_NOT_ADDITIVE = frozenset(
    {"green/intensity_g_per_kwh", "green/flops_per_s", "green/energy_to_target_kwh"}
)


def is_additive(key: str) -> bool:
    """Whether metric ``key`` is a run total that adds up over disjoint pieces of a run: the
    segments of a resumed run, the stages of one Trainer, the ranks of a distributed job.

    Amounts are additive (energy ``_kwh``, carbon ``_g``, time ``_s``, ``cost``, FLOPs), also
    per component, per phase and inclusive of nested runs; so is SCI (carbon per functional
    unit of the whole run). Rates, ratios, series and quality are not
    (``green/intensity_g_per_kwh``, ``green/mfu``, ``green/flops_per_s``, ``green/epoch/...``).
    """
    if not key.startswith("green/") or key.startswith(_NOT_TOTALS) or key in _NOT_ADDITIVE:
        return False
    return key.startswith("green/sci_g_per_") or key.endswith(_AMOUNTS)


def additive_keys(functional_unit: str, phases: Iterable[str]) -> tuple[str, ...]:
    """Every additive total a measurement (plus FLOP counting) reports, in a fixed order: what
    a distributed job sums across ranks as one vector. Phase carbon is left out (it is derived
    from the summed totals)."""
    components = [c.value for c in Component]
    keys = [
        "green/energy_kwh",
        "green/energy_uncertainty_kwh",
        "green/duration_s",
        "green/energy_facility_kwh",
        "green/co2e_g",
        "green/co2e_uncertainty_g",
        "green/co2e_market_g",
        "green/cost",
        "green/embodied_g",
        f"green/sci_g_per_{functional_unit}",
        "green/flops",
        *(f"green/energy/{c}_kwh" for c in components),
    ]
    for p in phases:
        keys += [f"green/phase/{p}_kwh", f"green/phase/{p}_s", f"green/phase/{p}_flops"]
        keys += [f"green/phase/{p}/{c}_kwh" for c in components]
    return tuple(k for k in keys if is_additive(k))


#: The additive totals a parent run reports exclusive of its nested runs: energy, carbon and
#: cost (not durations, which the parent lives through, uncertainties, which do not subtract,
#: phases or SCI).
EXCLUSIVE_KEYS = (
    "green/energy_kwh",
    *(f"green/energy/{c.value}_kwh" for c in Component),
    "green/energy_facility_kwh",
    "green/co2e_g",
    "green/co2e_market_g",
    "green/cost",
    "green/embodied_g",
)


def energy_metrics(snapshot: Snapshot) -> dict[str, float]:
    """Totals of a snapshot as metric key -> value."""
    metrics = {
        "green/energy_kwh": snapshot.kwh,
        "green/energy_uncertainty_kwh": joules_to_kwh(snapshot.uncertainty_j),
        "green/duration_s": snapshot.duration_s,
    }
    for component, joules in sorted(snapshot.joules_by_component().items()):
        metrics[f"green/energy/{component}_kwh"] = joules_to_kwh(joules)
    for name, phase in sorted(snapshot.phases.items()):
        metrics[f"green/phase/{name}_kwh"] = joules_to_kwh(phase.joules)
        metrics[f"green/phase/{name}_s"] = phase.duration_s
        for component, joules in sorted(snapshot.phase_joules_by_component(name).items()):
            metrics[f"green/phase/{name}/{component}_kwh"] = joules_to_kwh(joules)
    return metrics


def power_series(snapshot: Snapshot) -> list[tuple[float, float]]:
    """(Unix time at the end of each timeline interval, average watts over the interval)."""
    points = snapshot.timeline
    series = []
    for before, after in itertools.pairwise(points):
        seconds = after.time - before.time
        if seconds <= 0:
            continue
        joules = sum(after.joules_by_component.values()) - sum(before.joules_by_component.values())
        series.append((after.time, joules / seconds))
    return series


def provenance_tags(snapshot: Snapshot) -> dict[str, str]:
    """How the numbers were obtained, as short ``green.*`` tag values (MLflow caps tags at 8k)."""
    meters: dict[str, set[str]] = {}
    for device in snapshot.devices:
        meters.setdefault(f"{device.meter}:{device.method}", set()).add(device.component)
    tags = {
        "green.meters": ",".join(
            f"{name}({'+'.join(sorted(components))})" for name, components in sorted(meters.items())
        )
        or "none",
        "green.measured": "true" if snapshot.measured else "false",
        "green.devices": ",".join(sorted(d.device for d in snapshot.devices)) or "none",
    }
    for component, method in sorted(snapshot.methods.items()):
        tags[f"green.method.{component}"] = method
    if snapshot.unavailable:
        tags["green.unavailable"] = clip("; ".join(snapshot.unavailable))
    if snapshot.problems:
        tags["green.problems"] = clip("; ".join(snapshot.problems))
    if snapshot.notes:
        tags["green.notes"] = clip("; ".join(snapshot.notes))
    return tags


def add_not_reported(tags: dict[str, str], items: str) -> None:
    """Add ``items`` (``what: why; ...``) to the run's ``green.not_reported`` (which says
    ``none`` when nothing else is missing)."""
    if not items:
        return
    current = tags.get("green.not_reported", "")
    tags["green.not_reported"] = items if current in ("", "none") else f"{current}; {items}"
