"""Forecasts for planning, from the intensity providers' optional ``forecast`` method.

The configured providers (``GREEN_MLOPS_INTENSITY_PROVIDERS``, or the names given) are asked
in order; the first whose forecast covers the start is used. One that declines, times out or
answers garbage is skipped with its reason. When none answers, planning is refused: a yearly
table or a constant does not vary, and is never dressed up as a forecast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from green_mlops.intensity import MARKET_BASED, IntensitySeries, IntensityUnavailable
from green_mlops.scheduling.planner import Forecast, PlanError

if TYPE_CHECKING:
    from green_mlops.config import Settings
    from green_mlops.intensity import IntensityProvider
    from green_mlops.location import Location

__all__ = ["MAX_LEAD_S", "FetchedForecast", "fetch_forecast"]

#: A forecast may begin this long after the requested start (its first point is the next
#: 5-minute or hourly step); planning then starts there. Later than that: not usable.
MAX_LEAD_S = 1800.0


@dataclass(frozen=True)
class FetchedForecast:
    forecast: Forecast
    series: IntensitySeries
    #: Providers tried before (name: why not), for the output.
    skipped: tuple[str, ...]


def fetch_forecast(
    settings: Settings,
    location: Location,
    start: float,
    end: float,
    *,
    names: Sequence[str] | None = None,
    providers: Sequence[IntensityProvider] | None = None,
) -> FetchedForecast:
    """The first usable forecast of ``location`` over ``[start, end)``; PlanError naming each
    provider's reason when there is none."""
    skipped: list[str] = []
    if providers is None:
        from dataclasses import replace

        from green_mlops.carbon import chosen_providers

        if names:
            settings = replace(settings, intensity_providers=tuple(names))
        chosen, problems = chosen_providers(settings)
        skipped += [f"{name}: {why}" for name, why in problems.items()]
        providers = chosen
    try:
        for provider in providers:
            name = provider.name or type(provider).__name__
            why = provider.configured()
            if why is not None:
                skipped.append(f"{name}: {why}")
                continue
            try:
                series = provider.forecast(location, start, end)
            except IntensityUnavailable as exc:
                skipped.append(str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
                continue
            except Exception as exc:  # a broken third-party provider must not stop planning
                skipped.append(f"{name}: failed ({type(exc).__name__}: {exc})")
                continue
            reason = _unusable(series, start)
            if reason is None:
                try:
                    forecast = Forecast.from_series(series)
                except PlanError as exc:
                    reason = str(exc)
                else:
                    return FetchedForecast(forecast, series, tuple(skipped))
            skipped.append(f"{name}: {reason}")
    finally:
        for provider in providers:
            with contextlib.suppress(Exception):  # closing is best effort
                provider.close()
    tried = "; ".join(skipped) or "no intensity provider configured"
    raise PlanError(
        f"no forecast for {location.describe()} ({tried}). Not planning: a yearly or constant "
        "intensity does not vary over time. Configure a provider with a forecast "
        "(electricitymaps, watttime, uk) in GREEN_MLOPS_INTENSITY_PROVIDERS or --provider."
    )


def _unusable(series: object, start: float) -> str | None:
    if not isinstance(series, IntensitySeries):
        return f"forecast() returned {type(series).__name__}, not an IntensitySeries"
    if series.basis == MARKET_BASED:
        return "a market-based (contractual) figure is not a grid forecast"
    if not series.points:
        return "empty forecast"
    first = min(p.start for p in series.points)
    if first > start + MAX_LEAD_S:
        return f"the forecast begins {(first - start) / 60:.0f} min after the start"
    return None
