"""The Carbon Intensity API of Great Britain's grid operator (NESO) as a provider (``uk``).

Half-hourly average intensity (direct CO2), national or by outward postcode; no key needed.
See docs/carbon-accounting.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from green_mlops.hookspecs import hookimpl
from green_mlops.intensity import (
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
    day_blocks,
    merge_forecast,
    parse_time,
)
from green_mlops.location import Location
from green_mlops.units import HOUR

if TYPE_CHECKING:
    from green_mlops.config import Settings
    from green_mlops.http import HttpClient

__all__ = ["ATTRIBUTION", "UkCarbonIntensityProvider"]

ATTRIBUTION = "Carbon Intensity API (NESO), CC BY 4.0"
FORECAST_H = 48
MAX_DAYS = 100  # bound on requests for one range (one per UTC day)
#: Electricity Maps zones of Great Britain's grid (GB-NIR, Northern Ireland, is not on it).
GB_ZONES = frozenset({"GB", "GB-ORK"})


class UkCarbonIntensityProvider(IntensityProvider):
    """Half-hourly intensity of Great Britain, national or for an outward postcode."""

    name = "uk"

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._http: HttpClient | None = None

    def __repr__(self) -> str:
        return (
            f"UkCarbonIntensityProvider(url={self.settings.uk_url!r}, "
            f"postcode={self.settings.uk_postcode!r})"
        )

    @property
    def http(self) -> HttpClient:
        if self._http is None:
            from green_mlops.http import HttpClient

            self._http = HttpClient(self.settings, self.name)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def configured(self) -> str | None:
        return None  # no key; series() declines locations outside Great Britain

    def forecast(self, location: Location, start: float, end: float) -> IntensitySeries:
        """``/intensity/{from}/fw48h`` (national) or its ``/regional/.../postcode/{pc}`` form when
        GREEN_MLOPS_UK_POSTCODE is set: 48 h of half-hourly average (direct) forecasts."""
        now = self._clock()
        return self.series(location, max(start, now), end, now=now)  # the future part

    def series(
        self, location: Location, start: float, end: float, *, now: float | None = None
    ) -> IntensitySeries:
        _check_gb(location)
        if not (math.isfinite(start) and math.isfinite(end) and start < end):
            raise IntensityUnavailable("uk: needs a finite, non-empty time range")
        postcode = self.settings.uk_postcode
        now = self._clock() if now is None else now
        measured: list[IntensityPoint] = []
        forecast: list[IntensityPoint] = []
        skipped = 0
        region = ""
        notes: list[str] = [
            "NESO methodology: CO2 from generation in Great Britain, not lifecycle",
        ]
        stop = min(end, now)
        if start < stop:
            for a, b in day_blocks(start, stop, now, provider=self.name, max_days=MAX_DAYS):
                got, predicted, bad, name = self._fetch(f"{_fmt(a)}/{_fmt(b)}", postcode)
                measured += got
                forecast += predicted
                skipped += bad
                region = region or name
        failure = ""
        if end > now:
            origin = math.floor(now / HOUR) * HOUR
            try:  # a failed forecast leaves the measured part usable
                got, predicted, bad, name = self._fetch(f"{_fmt(origin)}/fw{FORECAST_H}h", postcode)
            except IntensityUnavailable as exc:
                failure = str(exc)
                notes.append(f"no forecast: {failure}")
            else:
                measured += got
                forecast += predicted
                skipped += bad
                region = region or name
            if not failure and end > origin + FORECAST_H * HOUR:
                notes.append(
                    f"forecast covers {FORECAST_H} h; the rest of the range is not covered"
                )
        points, estimated = merge_forecast(measured, forecast, start, end)
        if skipped:
            notes.append(f"{skipped} half-hours without a usable value skipped")
        if estimated:
            notes.append("forecast values used where no actual value exists")
        where = "national" if postcode is None else f"postcode {postcode}"
        if not points:
            raise IntensityUnavailable(
                failure or f"uk: no {where} data between {_fmt(start)} and {_fmt(end)}"
            )
        if postcode is None:
            dataset, zone = "national", "GB"
        else:
            dataset = "regional"
            zone = f"GB postcode {postcode}" + (f" ({region})" if region else "")
        return IntensitySeries(
            points=points,
            source=self.name,
            dataset=dataset,
            zone=zone,
            basis="average",
            scope="direct",
            estimated=estimated,
            vintage=f"Carbon Intensity API, as of {_fmt(now)}",
            attribution=ATTRIBUTION,
            notes=tuple(notes),
        )

    def _fetch(
        self, window: str, postcode: str | None
    ) -> tuple[list[IntensityPoint], list[IntensityPoint], int, str]:
        """(measured, forecast, skipped periods, region name) from one request."""
        base = self.settings.uk_url
        region = ""
        if postcode is None:
            data = self.http.get_json(f"{base}/intensity/{window}")
            rows = data.get("data") if isinstance(data, dict) else None
        else:
            data = self.http.get_json(f"{base}/regional/intensity/{window}/postcode/{postcode}")
            rows, region = _regional_rows(data)
        if not isinstance(rows, list):
            raise IntensityUnavailable("uk: malformed answer (no data list)")
        return (*_parse_rows(rows), region)


def _check_gb(location: Location) -> None:
    if location.country != "GB":
        raise IntensityUnavailable(
            f"uk: the Carbon Intensity API covers Great Britain only, not {location.describe()}"
        )
    if location.zone is not None and location.zone not in GB_ZONES:
        raise IntensityUnavailable(
            f"uk: zone {location.zone} is not on Great Britain's grid (the API covers England, "
            "Scotland and Wales)"
        )


def _regional_rows(data: Any) -> tuple[Any, str]:
    """Periods and region name of a regional answer: ``{"data": {"shortname", "data": [...]}}``
    (the range endpoints), also accepted as a one-element list (the current-period endpoint)."""
    body = data.get("data") if isinstance(data, dict) else None
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        raise IntensityUnavailable("uk: malformed regional answer (no data object)")
    name = body.get("shortname")
    return body.get("data"), name if isinstance(name, str) else ""


def _parse_rows(rows: list[Any]) -> tuple[list[IntensityPoint], list[IntensityPoint], int]:
    """(measured, forecast, skipped) from the API's half-hour periods."""
    measured: list[IntensityPoint] = []
    forecast: list[IntensityPoint] = []
    skipped = 0
    for row in rows:
        try:
            t0, t1 = parse_time(row["from"]), parse_time(row["to"])
            intensity = row["intensity"]
            actual, predicted = intensity.get("actual"), intensity.get("forecast")
        except (KeyError, TypeError, ValueError, AttributeError):
            skipped += 1
            continue
        if t1 <= t0:
            skipped += 1
        elif _usable(actual):
            measured.append(IntensityPoint(t0, t1, float(actual)))
        elif _usable(predicted):
            forecast.append(IntensityPoint(t0, t1, float(predicted)))
        else:
            skipped += 1
    return measured, forecast, skipped


def _usable(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


# -- time ----------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    """The API's time format, in UTC: ``2026-03-29T01:30Z``."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


@hookimpl
def green_mlops_intensity_providers(settings: Settings) -> list[IntensityProvider]:
    return [UkCarbonIntensityProvider(settings)]
