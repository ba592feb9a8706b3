"""WattTime v3 marginal emissions (MOER) as a carbon-intensity provider (``watttime``).

5-minute marginal CO2 rates, lbs/MWh x 0.45359237 = g/kWh, for regions mapped from the zone
only where unambiguous. See docs/carbon-accounting.md.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
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
from green_mlops.units import DAY, HOUR

if TYPE_CHECKING:
    from green_mlops.config import Secret, Settings
    from green_mlops.http import HttpClient

__all__ = ["LBS_PER_MWH_TO_G_PER_KWH", "ZONE_TO_REGION", "WattTimeProvider", "region_for"]

#: lbs/MWh -> g/kWh: 453.59237 g per lb / 1000 kWh per MWh.
LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
UNITS = "lbs_co2_per_mwh"
SIGNAL = "co2_moer"
TOKEN_LIFETIME_S = 25 * 60  # WattTime tokens live 30 min; renew early
MAX_HORIZON_H = 72
MAX_DAYS = 100  # bound on requests for one range (one per UTC day)

# Electricity Maps zone -> WattTime region, for US balancing authorities that both services name by
# the same utility. Source: WattTime's region list (watttime-python-client,
# data/us_region_meta_data.csv) checked against Electricity Maps' zone names. The zone's suffix is
# the EIA balancing-authority code, which WattTime uses too, except for the four commented ones.
#: Zone -> WattTime region, where the mapping is one to one (same utility).
ZONE_TO_REGION: Mapping[str, str] = {
    "US-CAL-BANC": "BANC",
    "US-CAL-IID": "IID",
    "US-CAL-LDWP": "LDWP",
    "US-CAL-TIDC": "TID",  # Turlock Irrigation District
    "US-CAR-CPLE": "CPLE",
    "US-CAR-CPLW": "CPLW",
    "US-CAR-DUK": "DUK",
    "US-CAR-SC": "SC",
    "US-CAR-SCEG": "SCEG",
    "US-CENT-SPA": "SPA",
    "US-FLA-FMPP": "FMPP",
    "US-FLA-FPC": "FPC",
    "US-FLA-FPL": "FPL",
    "US-FLA-GVL": "GVL",
    "US-FLA-JEA": "JEA",
    "US-FLA-SEC": "SEC",
    "US-FLA-TAL": "TAL",
    "US-FLA-TEC": "TEC",
    "US-MIDW-AECI": "AECI",
    "US-MIDW-LGEE": "LGEE",
    "US-NW-AVA": "AVA",
    "US-NW-BPAT": "BPA",  # Bonneville Power Administration
    "US-NW-CHPD": "CHPD",
    "US-NW-DOPD": "DOPD",
    "US-NW-IPCO": "IPCO",
    "US-NW-NEVP": "NEVP",
    "US-NW-NWMT": "MPCO",  # NorthWestern Energy
    "US-NW-PACE": "PACE",
    "US-NW-PACW": "PACW",
    "US-NW-PGE": "PGE",
    "US-NW-PSCO": "PSCO",
    "US-NW-PSEI": "PSEI",
    "US-NW-SCL": "SCL",
    "US-NW-TPWR": "TPWR",
    "US-NW-WACM": "WACM",
    "US-NW-WAUW": "WAUW",
    "US-SE-SOCO": "SOCO",
    "US-SW-AZPS": "AZPS",
    "US-SW-EPE": "ELE",  # El Paso Electric
    "US-SW-PNM": "PNM",
    "US-SW-SRP": "SRP",
    "US-SW-TEPC": "TEPC",
    "US-SW-WALC": "WALC",
    "US-TEN-TVA": "TVA",
}
# Zones WattTime splits into sub-regions (names from the same list; "..." where it has more).
_SPLIT: Mapping[str, str] = {
    "US-CAL-CISO": "CAISO_NORTH, CAISO_SANDIEGO, CAISO_LONGBEACH, CAISO_ESCONDIDO, "
    "CAISO_PALMSPRINGS, CAISO_REDDING, CAISO_SANBERNARDINO",
    "US-MIDA-PJM": "PJM_NJ, PJM_EASTERN_OH, PJM_SOUTHWEST_OH, PJM_EASTERN_KY, ...",
    "US-TEX-ERCO": "ERCOT_NORTHCENTRAL, ERCOT_COAST, ERCOT_AUSTIN, ERCOT_SANANTONIO, ...",
    "US-MIDW-MISO": "MISO_INDIANAPOLIS, MISO_N_DAKOTA, ...",
    "US-NE-ISNE": "ISONE_CT, ISONE_ME, ISONE_NEMA, ISONE_SEMA, ISONE_WCMA, ...",
    "US-NY-NYIS": "NYISO_NYC, ...",
    "US-CENT-SWPP": "SPP_KANSAS, SPP_KC, SPP_OKCTY, SPP_TX, ...",
}


def region_for(location: Location) -> str:
    """The WattTime region of ``location``; IntensityUnavailable when there is no sure one."""
    zone = location.zone
    if zone is None:
        raise IntensityUnavailable(
            f"watttime: no WattTime region for location {location.describe()}: it has no "
            "grid zone; choose one with WattTimeProvider(settings, region=...)"
        )
    if zone in ZONE_TO_REGION:
        return ZONE_TO_REGION[zone]
    if zone in _SPLIT:
        raise IntensityUnavailable(
            f"watttime: no WattTime region for zone {zone}: WattTime splits it into "
            f"sub-regions ({_SPLIT[zone]}) and the zone does not say which one; "
            "choose one with WattTimeProvider(settings, region=...)"
        )
    raise IntensityUnavailable(
        f"watttime: no WattTime region for zone {zone}; only US balancing authorities that "
        "match one WattTime region are mapped (e.g. US-NW-PACW, US-TEN-TVA); choose one with "
        "WattTimeProvider(settings, region=...)"
    )


class _Tokens:
    """Bearer tokens in memory only, per (base URL, user, password). Never logged or cached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, Secret], tuple[str, float]] = {}
        #: Held while logging in, so that concurrent fetches log in once.
        self.login_lock = threading.Lock()

    def get(self, key: tuple[str, str, Secret], now: float) -> str | None:
        with self._lock:
            entry = self._tokens.get(key)
        return entry[0] if entry is not None and entry[1] > now else None

    def put(self, key: tuple[str, str, Secret], token: str, expires: float) -> None:
        with self._lock:
            self._tokens[key] = (token, expires)

    def drop(self, key: tuple[str, str, Secret], token: str) -> None:
        with self._lock:
            entry = self._tokens.get(key)
            if entry is not None and entry[0] == token:
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()

    def __repr__(self) -> str:
        return f"<WattTime tokens: {len(self._tokens)}>"


_TOKENS = _Tokens()


class WattTimeProvider(IntensityProvider):
    """Marginal CO2 (MOER) of one WattTime region, historical and forecast."""

    name = "watttime"

    def __init__(
        self,
        settings: Settings,
        *,
        region: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if region is not None:
            region = region.strip().upper()
            if not region or not region.replace("_", "").isalnum():
                raise ValueError("a WattTime region is letters, digits and _, e.g. CAISO_NORTH")
        self.settings = settings
        #: Explicit WattTime region; None: mapped from the location's zone.
        self.region = region
        self._clock = clock
        self._http: HttpClient | None = None

    def __repr__(self) -> str:
        return f"WattTimeProvider(url={self.settings.watttime_url!r}, region={self.region!r})"

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
        missing = [
            variable
            for variable, value in (
                ("GREEN_MLOPS_WATTTIME_USERNAME", self.settings.watttime_username),
                ("GREEN_MLOPS_WATTTIME_PASSWORD", self.settings.watttime_password),
            )
            if not value
        ]
        if missing:
            return f"no WattTime account: set {' and '.join(missing)}"
        return None

    def forecast(self, location: Location, start: float, end: float) -> IntensitySeries:
        """The ``/v3/forecast`` MOER: a MARGINAL rate (the emissions of the plant that follows
        demand), not the average of the run's own carbon; a plan on it minimises marginal
        emissions (the series says ``basis="marginal"``)."""
        now = self._clock()
        return self.series(location, max(start, now), end, now=now)  # the future part

    def series(
        self, location: Location, start: float, end: float, *, now: float | None = None
    ) -> IntensitySeries:
        reason = self.configured()
        if reason is not None:
            raise IntensityUnavailable(f"watttime: {reason}")
        if not (math.isfinite(start) and math.isfinite(end) and start < end):
            raise IntensityUnavailable("watttime: needs a finite, non-empty time range")
        region = self.region or region_for(location)
        now = self._clock() if now is None else now
        measured: list[IntensityPoint] = []
        forecast: list[IntensityPoint] = []
        notes = [
            "MOER: marginal CO2 (not CO2e) of the generators responding to load; operating "
            "emissions, not lifecycle",
            f"converted from {UNITS} x {LBS_PER_MWH_TO_G_PER_KWH}",
        ]
        skipped = 0
        models: set[str] = set()
        stop = min(end, now)
        if start < stop:
            for a, b in day_blocks(start, stop, now, provider=self.name, max_days=MAX_DAYS):
                params = {"region": region, "start": _iso(a), "end": _iso(b), "signal_type": SIGNAL}
                data = self._get("/v3/historical", params, region)
                got, bad = _parse_moer(data, "historical", models)
                measured += got
                skipped += bad
        failure = ""
        if end > now:
            hours = min(MAX_HORIZON_H, 24 * math.ceil((end - now) / DAY))
            params = {"region": region, "signal_type": SIGNAL, "horizon_hours": str(hours)}
            try:  # a failed forecast leaves the measured part usable
                data = self._get("/v3/forecast", params, region)
                got, bad = _parse_moer(data, "forecast", models)
            except IntensityUnavailable as exc:
                failure = str(exc)
                notes.append(f"no forecast: {failure}")
            else:
                forecast += got
                skipped += bad
                if end > now + hours * HOUR:
                    notes.append(
                        f"forecast horizon is {hours} h; the rest of the range is not covered"
                    )
        if skipped:
            notes.append(f"{skipped} malformed data points skipped")
        if models:
            notes.append("WattTime model " + ", ".join(sorted(models)))
        points, estimated = merge_forecast(measured, forecast, start, end)
        if not points:
            between = f"between {_iso(start)} and {_iso(end)}"
            raise IntensityUnavailable(
                failure or f"watttime: no MOER data for region {region} {between}"
            )
        return IntensitySeries(
            points=points,
            source=self.name,
            dataset=SIGNAL,
            zone=region,
            basis="marginal",
            scope="direct",
            estimated=estimated,
            vintage=f"WattTime API v3, as of {_iso(now)}",
            attribution="Marginal emissions data: WattTime (watttime.org)",
            notes=tuple(notes),
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _key(self) -> tuple[str, str, Secret]:
        user, password = self.settings.watttime_username, self.settings.watttime_password
        assert user is not None and password is not None  # checked by configured()
        return (self.settings.watttime_url, user, password)

    def _get(self, path: str, params: Mapping[str, str], region: str) -> Any:
        """GET a data endpoint with the bearer token; one fresh login and retry on a 401."""
        from green_mlops.http import HttpStatusError

        url = self.settings.watttime_url + path
        for attempt in (1, 2):
            token = self._token()
            try:
                return self.http.get_json(
                    url, params=params, headers={"Authorization": "Bearer " + token}
                )
            except HttpStatusError as exc:
                if exc.status == 401 and attempt == 1:
                    _TOKENS.drop(self._key(), token)  # expired or revoked: log in again once
                    continue
                if exc.status == 401:
                    raise IntensityUnavailable(
                        f"watttime: {path} refused (HTTP 401) even after a fresh login"
                    ) from None
                if exc.status == 403:
                    raise IntensityUnavailable(
                        f"{exc} (the WattTime plan of this account may not include region "
                        f"{region} or {path}; free accounts get CAISO_NORTH only)"
                    ) from None
                if exc.status in (400, 404):
                    raise IntensityUnavailable(
                        f"{exc} (WattTime may not know region {region})"
                    ) from None
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _token(self) -> str:
        key = self._key()
        token = _TOKENS.get(key, self._clock())
        if token is not None:
            return token
        from green_mlops.http import HttpStatusError

        with _TOKENS.login_lock:
            token = _TOKENS.get(key, self._clock())
            if token is not None:
                return token
            url, user, password = key
            try:
                data = self.http.get_json(
                    url + "/login", auth=(user, password.reveal()), cache=False
                )
            except HttpStatusError as exc:
                if exc.status in (401, 403):
                    raise IntensityUnavailable(
                        f"watttime: login refused (HTTP {exc.status}); check "
                        "GREEN_MLOPS_WATTTIME_USERNAME and GREEN_MLOPS_WATTTIME_PASSWORD"
                    ) from None
                raise
            token = data.get("token") if isinstance(data, dict) else None
            if not isinstance(token, str) or not token:
                raise IntensityUnavailable("watttime: the login answer has no token")
            _TOKENS.put(key, token, self._clock() + TOKEN_LIFETIME_S)
            return token


# -- parsing -------------------------------------------------------------------------------


def _parse_moer(data: Any, what: str, models: set[str]) -> tuple[list[IntensityPoint], int]:
    """Points in g/kWh from a v3 data answer, and the number of malformed points skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise IntensityUnavailable(f"watttime: malformed {what} answer (no meta)")
    meta = data["meta"]
    units = meta.get("units")
    if units != UNITS:
        raise IntensityUnavailable(
            f"watttime: {what} values are in {units!r}, not {UNITS!r}; refused (a percentile "
            "or index is not an intensity)"
        )
    signal = meta.get("signal_type")
    if signal is not None and signal != SIGNAL:
        raise IntensityUnavailable(f"watttime: {what} answer is signal {signal!r}, not {SIGNAL}")
    rows = data.get("data")
    if not isinstance(rows, list):
        raise IntensityUnavailable(f"watttime: malformed {what} answer (no data list)")
    model = meta.get("model")
    if isinstance(model, dict) and isinstance(model.get("date"), str):
        models.add(model["date"])
    values: list[tuple[float, float]] = []
    skipped = 0
    for row in rows:
        try:
            values.append((parse_time(row["point_time"]), _number(row["value"])))
        except (KeyError, TypeError, ValueError):
            skipped += 1
    period = _period(meta.get("data_point_period_seconds"), [t for t, _ in values], what)
    points = [IntensityPoint(t, t + period, v * LBS_PER_MWH_TO_G_PER_KWH) for t, v in values]
    return points, skipped


def _period(declared: object, times: list[float], what: str) -> float:
    """The declared point period, else the spacing of the points."""
    try:
        return _number(declared, positive=True)
    except (TypeError, ValueError):
        pass
    steps = sorted({b - a for a, b in itertools.pairwise(sorted(times)) if b > a})
    if steps:
        return steps[0]
    if not times:
        return 300.0  # no points: the value is never used
    raise IntensityUnavailable(f"watttime: {what} answer gives no data_point_period_seconds")


def _number(value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError
    return number


# -- time ----------------------------------------------------------------------------------


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@hookimpl
def green_mlops_intensity_providers(settings: Settings) -> list[IntensityProvider]:
    return [WattTimeProvider(settings, region=settings.watttime_region)]
