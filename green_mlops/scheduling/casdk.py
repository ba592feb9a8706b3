"""A plan in the Carbon Aware SDK's response shape (``/emissions/forecasts/current``):
``[{"location", "dataStartAt", "dataEndAt", "windowSize", "optimalDataPoints",
"forecastData", "generatedAt", "requestedAt"}]``, times ISO 8601 UTC, durations in minutes,
values in gCO2e/kWh. What the SDK has no field for (run now, the saving, the decision) is under
``greenMlops``; readers of the SDK's shape ignore it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from green_mlops.intensity import IntensitySeries
from green_mlops.scheduling.planner import Forecast, Placement, Plan

__all__ = ["iso", "slot_means", "to_casdk"]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _minutes(seconds: float) -> float:
    return round(seconds / 60.0, 3)


def slot_means(forecast: Forecast, placement: Placement) -> list[float]:
    """Mean forecast intensity over each slot (its restore included)."""
    a = np.array([s for s, _ in placement.slots])
    b = np.array([e for _, e in placement.slots])
    integral, _ = forecast.integrals(a, b)
    return [float(x) for x in integral / (b - a)]


def _point(location: str, start: float, end: float, value: float) -> dict[str, Any]:
    return {
        "location": location,
        "timestamp": iso(start),
        "duration": _minutes(end - start),
        "value": round(value, 3),
    }


def _placement(p: Placement) -> dict[str, Any]:
    return {
        "start": iso(p.start),
        "end": iso(p.end),
        "slots": [[iso(a), iso(b)] for a, b in p.slots],
        "meanGPerKwh": round(p.mean_g_per_kwh, 3),
        "energyKwh": p.energy_kwh,
        "co2eG": None if p.carbon_g is None else round(p.carbon_g, 3),
        "resumes": p.resumes,
    }


def to_casdk(
    result: Plan,
    forecast: Forecast,
    series: IntensitySeries,
    *,
    location: str,
    requested_at: float,
    data_end: float,
    duration_s: float,
    skipped: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    chosen = result.chosen
    optimal = [
        _point(location, a, b, v)
        for (a, b), v in zip(chosen.slots, slot_means(forecast, chosen), strict=True)
    ]
    data = [
        _point(location, float(a), float(b), float(v))
        for a, b, v in zip(forecast.edges[:-1], forecast.edges[1:], forecast.values, strict=True)
        if not np.isnan(v) and b > requested_at and a < data_end
    ]
    extra = {
        "decision": result.decision,
        "reason": result.reason,
        "minSaving": result.min_saving,
        "chosen": _placement(chosen),
        "best": _placement(result.best),
        "runNow": _placement(result.now),
        "savingPercent": round(100 * result.saving_fraction, 3),
        "savingG": None if result.saving_g is None else round(result.saving_g, 3),
        "source": series.describe(),
        "basis": series.basis,
        "attribution": series.attribution,
        "notes": [*series.notes, *result.notes],
        "skippedProviders": list(skipped),
    }
    return [
        {
            "generatedAt": iso(requested_at),
            "requestedAt": iso(requested_at),
            "location": location,
            "dataStartAt": iso(requested_at),
            "dataEndAt": iso(data_end),
            "windowSize": _minutes(duration_s),
            "optimalDataPoints": optimal,
            "forecastData": data,
            "greenMlops": extra,
        }
    ]
