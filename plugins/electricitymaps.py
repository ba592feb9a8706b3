"""Grid carbon intensity from the Electricity Maps API v3 (time-resolved, average, lifecycle).

Hourly history, past ranges and forecasts for a zone, with the token only in a header; gaps are
left to the next provider. See docs/carbon-accounting.md.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from green_mlops.hookspecs import hookimpl
from green_mlops.intensity import (
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)
from green_mlops.units import DAY, HOUR

if TYPE_CHECKING:
    from green_mlops.config import Settings
    from green_mlops.http import HttpClient
    from green_mlops.location import Location

__all__ = ["ElectricityMapsProvider", "green_mlops_intensity_providers"]

#: ``/history`` covers the last 24 hours.
HISTORY_S = 24 * HOUR
#: ``/past-range`` accepts at most 10 days (240 h) per request at hourly granularity.
MAX_RANGE_S = 240 * HOUR
GRANULARITY_S = {"5_minutes": 300.0, "15_minutes": 900.0, "hourly": HOUR}
#: The API's default emission factors when an item does not say (documented default).
DEFAULT_SCOPE = "lifecycle"
ATTRIBUTION = "Electricity Maps (https://www.electricitymaps.com)"

# Endpoint, dataset label, key of the item list in the response ("" = the response is the item).
LATEST = ("latest", "")
HISTORY = ("history", "history")
PAST_RANGE = ("past-range", "data")
FORECAST = ("forecast", "forecast")
#: Order of preference where two endpoints cover the same time.
_PRIORITY = {"history": 0, "latest": 1, "past-range": 2, "forecast": 3}


@dataclass(frozen=True)
class _Item:
    start: float
    end: float
    g_per_kwh: float
    estimated: bool
    dataset: str
    scope: str | None
    method: str | None
    updated: str | None


@dataclass
class _Tally:
    null: int = 0
    invalid: int = 0
    other_zone: int = 0

    def notes(self, dataset: str) -> list[str]:
        out = []
        if self.null:
            out.append(
                f"{dataset}: {self.null} item(s) with carbonIntensity null left as gaps "
                "(priced by the next provider)"
            )
        if self.invalid:
            out.append(
                f"{dataset}: {self.invalid} item(s) skipped for missing or invalid "
                "carbonIntensity/datetime"
            )
        if self.other_zone:
            out.append(f"{dataset}: {self.other_zone} item(s) for another zone dropped")
        return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object) -> float | None:
    """Unix seconds of an ISO 8601 timestamp; ``Z`` and offsets honoured, naive means UTC."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _floor(t: float, step: float) -> float:
    return math.floor(t / step) * step


def _ceil(t: float, step: float) -> float:
    return math.ceil(t / step) * step


def past_range_windows(start: float, end: float, now: float) -> list[tuple[float, float]]:
    """Request windows for ``/past-range`` covering ``[start, end)``: whole UTC days, cut on a
    fixed 10-day grid (so the same days always give the same URLs), never past the current
    hour, each at most :data:`MAX_RANGE_S` long."""
    lo = _floor(start, DAY)
    hi = min(_ceil(end, DAY), _ceil(now, HOUR))
    windows = []
    while lo < hi:
        cell_end = _floor(lo, MAX_RANGE_S) + MAX_RANGE_S
        upper = min(cell_end, hi)
        windows.append((lo, upper))
        lo = upper
    return windows


class ElectricityMapsProvider(IntensityProvider):
    """Electricity Maps API v3. ``clock`` gives "now" (Unix seconds); tests may pin it."""

    name = "electricitymaps"

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.base_url = settings.electricitymaps_url.rstrip("/")
        self.host = urlsplit(self.base_url).netloc
        self._clock = clock

    @functools.cached_property
    def client(self) -> HttpClient:
        """Created on first use: importing requests costs ~100 ms, not paid at tracker start."""
        from green_mlops.http import HttpClient

        return HttpClient(self.settings, self.name)

    def close(self) -> None:
        client = self.__dict__.pop("client", None)  # only if series() created it
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        token = "***" if self.settings.electricitymaps_token is not None else "unset"
        return f"ElectricityMapsProvider(url={self.base_url!r}, token={token})"

    def configured(self) -> str | None:
        if self.settings.electricitymaps_token is None:
            return "no token: set GREEN_MLOPS_ELECTRICITYMAPS_TOKEN"
        return None

    def forecast(self, location: Location, start: float, end: float) -> IntensitySeries:
        """The ``/forecast`` endpoint (hourly, average, lifecycle) for the future part of the
        range; past parts from history, as :meth:`series`."""
        now = self._clock()
        return self.series(location, max(start, now), end, now=now)  # the future part

    # -- the series --------------------------------------------------------------------------

    def series(
        self, location: Location, start: float, end: float, *, now: float | None = None
    ) -> IntensitySeries:
        zone = location.zone
        if not zone:
            raise IntensityUnavailable(
                f"{self.name}: location {location.describe()} has no Electricity Maps zone"
            )
        reason = self.configured()
        if reason is not None:
            raise IntensityUnavailable(f"{self.name}: {reason}")
        if not end > start:
            raise IntensityUnavailable(f"{self.name}: empty time range")
        now = self._clock() if now is None else now
        items: list[_Item] = []
        notes: list[str] = []
        failures: list[str] = []
        stopped: list[str] = []

        def fetch(endpoint: tuple[str, str], params: Mapping[str, str] | None = None) -> bool:
            """One endpoint. A soft failure (403, odd shape) leaves a gap; a hard one (401,
            unknown zone, 429/5xx after retries, timeout, unreachable, malformed JSON) raises
            when nothing was collected yet, else leaves a gap and stops further requests."""
            if stopped:
                failures.append(f"{endpoint[0]}: not requested after the {stopped[0]} failure")
                return False
            try:
                got, tally = self._fetch(zone, endpoint, params or {}, start, end)
            except _Declined as exc:
                failures.append(str(exc))
                return False
            except IntensityUnavailable as exc:
                if not items:
                    raise
                failures.append(f"{endpoint[0]}: {exc}")
                stopped.append(endpoint[0])
                return False
            items.extend(got)
            notes.extend(tally.notes(endpoint[0]))
            return True

        past_end = min(end, now)
        if start < past_end:
            if start >= now - HISTORY_S:
                self._recent(fetch, items, past_end)
            else:
                answered = [
                    fetch(PAST_RANGE, {"start": _iso(lo), "end": _iso(hi)})
                    for lo, hi in past_range_windows(start, past_end, now)
                ]
                if not all(answered) and past_end > now - HISTORY_S:
                    notes.append("past-range unavailable; the last 24 h come from history")
                    self._recent(fetch, items, past_end)
        if end > now:
            fetch(FORECAST)

        kept = _merge(items)
        if not kept:
            why = "; ".join(failures + notes) or "no data for the requested time"
            raise IntensityUnavailable(f"{self.name}: nothing usable for zone {zone}: {why}")
        uncovered = (end - start) - _covered(kept, start, end)
        if uncovered > 1e-6:
            notes.append(
                f"{uncovered / 60:.0f} min of {(end - start) / 60:.0f} not covered "
                "(gaps, priced by the next provider)"
            )
        notes.extend(f"{failure} (gap)" for failure in failures)
        datasets = list(dict.fromkeys(item.dataset for item in kept))
        scopes = sorted({item.scope for item in kept if item.scope})
        if not scopes:
            notes.append(f"emissionFactorType not reported; the API's default is {DEFAULT_SCOPE}")
            scopes = [DEFAULT_SCOPE]
        elif len(scopes) > 1:
            notes.append("items mix emission factor types: " + ", ".join(scopes))
        methods = sorted({item.method for item in kept if item.method})
        if methods:
            notes.append("estimation methods: " + ", ".join(methods))
        updated = max((item.updated for item in kept if item.updated), default=None)
        vintage = f"retrieved {_iso(now)}" + (f", updated {updated}" if updated else "")
        return IntensitySeries(
            points=tuple(IntensityPoint(i.start, i.end, i.g_per_kwh) for i in kept),
            source=self.name,
            dataset="api-v3 " + "+".join(datasets),
            zone=zone,
            basis="average",
            scope="+".join(scopes),
            estimated=any(item.estimated for item in kept),
            vintage=vintage,
            attribution=ATTRIBUTION,
            notes=tuple(notes),
        )

    def _recent(
        self,
        fetch: Callable[[tuple[str, str]], bool],
        items: list[_Item],
        past_end: float,
    ) -> None:
        """History, plus the latest value when history does not reach the last past hour."""
        fetch(HISTORY)
        last = past_end - 1e-6
        if not any(item.start <= last < item.end for item in items):
            fetch(LATEST)

    # -- one request -------------------------------------------------------------------------

    def _fetch(
        self,
        zone: str,
        endpoint: tuple[str, str],
        params: Mapping[str, str],
        start: float,
        end: float,
    ) -> tuple[list[_Item], _Tally]:
        dataset, key = endpoint
        token = self.settings.electricitymaps_token
        assert token is not None  # checked by series()
        query = {"zone": zone, **params, "shouldUseFallbackCallerLookup": "false"}
        from green_mlops.http import HttpStatusError

        try:
            data = self.client.get_json(
                f"{self.base_url}/v3/carbon-intensity/{dataset}",
                params=query,
                headers={"auth-token": token.reveal()},
            )
        except HttpStatusError as exc:
            status = exc.status
            if status == 401:
                raise IntensityUnavailable(
                    f"{self.name}: token rejected (HTTP 401 from {self.host}); "
                    "check GREEN_MLOPS_ELECTRICITYMAPS_TOKEN"
                ) from None
            if status in (400, 404):
                raise IntensityUnavailable(
                    f"{self.name}: zone {zone!r} unknown to the API or without {dataset} data "
                    f"(HTTP {status} from {self.host}), or GREEN_MLOPS_ELECTRICITYMAPS_URL "
                    "is wrong"
                ) from None
            if status == 403:
                raise _Declined(
                    f"{dataset}: access denied (HTTP 403 from {self.host}); the token's plan "
                    f"may not include zone {zone} or this endpoint"
                ) from None
            raise IntensityUnavailable(f"{exc} for {dataset}") from None
        # Anything else (unreachable, timeout, malformed JSON; HttpClient already retried)
        # propagates: the other endpoints are on the same host, so series() stops there
        # rather than multiply the wait before the chain falls back.
        return _parse(data, zone, dataset, key, start, end)


class _Declined(Exception):
    """One endpoint gave nothing usable; the others may still answer."""


def _parse(
    data: Any, zone: str, dataset: str, key: str, start: float, end: float
) -> tuple[list[_Item], _Tally]:
    if not isinstance(data, dict):
        raise _Declined(f"{dataset}: unexpected response (not a JSON object)")
    raw = [data] if not key else data.get(key)
    if not isinstance(raw, list):
        raise _Declined(f"{dataset}: unexpected response (no {key!r} list)")
    step = GRANULARITY_S.get(str(data.get("temporalGranularity", "hourly")))
    if step is None:
        raise _Declined(
            f"{dataset}: unsupported temporalGranularity {data.get('temporalGranularity')!r}"
        )
    top_scope = data.get("emissionFactorType")
    forecast = dataset == "forecast"
    tally = _Tally()
    items: list[_Item] = []
    for entry in raw:
        if not isinstance(entry, dict):
            tally.invalid += 1
            continue
        item_zone = entry.get("zone", data.get("zone", zone))
        if item_zone != zone:
            tally.other_zone += 1
            continue
        t0 = _parse_time(entry.get("datetime"))
        if "carbonIntensity" in entry and entry["carbonIntensity"] is None and t0 is not None:
            tally.null += 1
            continue
        value = _number(entry.get("carbonIntensity"))
        if t0 is None or value is None:
            tally.invalid += 1
            continue
        t1 = t0 + step
        if t1 <= start or t0 >= end:
            continue
        scope = entry.get("emissionFactorType", top_scope)
        estimated_flag = entry.get("isEstimated")
        method = entry.get("estimationMethod")
        updated = entry.get("updatedAt", data.get("updatedAt"))
        items.append(
            _Item(
                start=t0,
                end=t1,
                g_per_kwh=value,
                # a missing flag is not evidence of a measurement
                estimated=forecast or estimated_flag is not False,
                dataset=dataset,
                scope=scope if isinstance(scope, str) and scope else None,
                method=method if isinstance(method, str) and method else None,
                updated=updated if isinstance(updated, str) and updated else None,
            )
        )
    return items, tally


def _merge(items: list[_Item]) -> list[_Item]:
    """Sorted, non-overlapping items; where two overlap, the earlier start wins, then the
    preferred endpoint (history over latest over past-range over forecast)."""
    out: list[_Item] = []
    for item in sorted(items, key=lambda i: (i.start, _PRIORITY[i.dataset], i.end)):
        if out and item.start < out[-1].end:
            if item.end <= out[-1].end:
                continue
            item = _Item(
                out[-1].end,
                item.end,
                item.g_per_kwh,
                item.estimated,
                item.dataset,
                item.scope,
                item.method,
                item.updated,
            )
        out.append(item)
    return out


def _covered(items: list[_Item], start: float, end: float) -> float:
    return sum(max(0.0, min(end, i.end) - max(start, i.start)) for i in items)


@hookimpl
def green_mlops_intensity_providers(settings: Settings) -> list[IntensityProvider]:
    return [ElectricityMapsProvider(settings)]
