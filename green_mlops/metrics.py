"""Metric keys and provenance tags: one scheme, whichever integration logs them.

Keys carry their unit and use ``/`` groups (the MLflow UI turns them into chart sections, and
``system/...`` into its System metrics tab). Provenance goes into ``green.*`` tags so runs can be
filtered with ``mlflow.search_runs(filter_string="tags.`green.measured` = 'true'")``.
"""

from __future__ import annotations

import itertools

from green_mlops.snapshot import Snapshot, joules_to_kwh

__all__ = ["POWER_KEY", "energy_metrics", "power_series", "provenance_tags"]

#: Time series of average power between timeline points, in watts.
POWER_KEY = "system/green/power_w"


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
        tags["green.unavailable"] = _clip("; ".join(snapshot.unavailable))
    if snapshot.problems:
        tags["green.problems"] = _clip("; ".join(snapshot.problems))
    if snapshot.notes:
        tags["green.notes"] = _clip("; ".join(snapshot.notes))
    return tags


def _clip(text: str, limit: int = 5000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
