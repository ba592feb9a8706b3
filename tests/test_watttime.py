"""The WattTime v3 provider against a real HTTP server on 127.0.0.1 that speaks the documented
shapes: ``GET /login`` with HTTP Basic -> ``{"token"}``; ``/v3/historical`` and ``/v3/forecast``
-> ``{"data": [{"point_time", "value"}], "meta": {"units", "data_point_period_seconds", ...}}``.
The server checks the credentials and the bearer token like the real one, so login, token reuse
and re-login on 401 are exercised end to end.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from green_mlops.config import Settings
from green_mlops.intensity import IntensityUnavailable
from green_mlops.location import Location
from green_mlops.plugins import watttime
from green_mlops.plugins.watttime import (
    LBS_PER_MWH_TO_G_PER_KWH,
    ZONE_TO_REGION,
    WattTimeProvider,
    region_for,
)

USER = "alice@example.org"
PASSWORD = "pa55-W0rd-never-shown"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PACW = Location(raw="US-NW-PACW", zone="US-NW-PACW", country="US")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


NOW = ts("2026-04-01T12:00:00")


def parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def answer(
    start: float,
    count: int,
    value: Callable[[float], float],
    *,
    units: str | None = "lbs_co2_per_mwh",
    period: int | None = 300,
    signal: str = "co2_moer",
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "region": "PACW",
        "signal_type": signal,
        "model": {"date": "2023-03-01"},
    }
    if units is not None:
        meta["units"] = units
    if period is not None:
        meta["data_point_period_seconds"] = period
    step = period or 300
    data = [
        {
            "point_time": datetime.fromtimestamp(start + i * step, tz=timezone.utc).isoformat(),
            "value": value(start + i * step),
        }
        for i in range(count)
    ]
    return {"data": data, "meta": meta}


class FakeWattTime:
    """The server side: issues tokens, checks them, serves MOER in lbs/MWh."""

    def __init__(
        self,
        server: HTTPServer,
        value: Callable[[float], float] = lambda t: 1000.0,
        *,
        data: bool = True,
    ) -> None:
        self.server = server
        self.value = value
        self.issued: list[str] = []
        self.reject_next = 0  # answer the next N data requests with 401 (token revoked)
        self.units: str | None = "lbs_co2_per_mwh"
        server.expect_request("/login").respond_with_handler(self.login)
        if data:  # otherwise the test serves its own answers
            server.expect_request("/v3/historical").respond_with_handler(self.historical)
            server.expect_request("/v3/forecast").respond_with_handler(self.forecast)

    @property
    def logins(self) -> int:
        return len(self.issued)

    def requests(self, path: str) -> list[Request]:
        return [request for request, _ in self.server.log if request.path == path]

    def login(self, request: Request) -> Response:
        if request.headers.get("Authorization") != BASIC:
            return Response("", status=401)
        self.issued.append(f"tok-{len(self.issued)}-8c1f0e5a9d")
        return Response(json.dumps({"token": self.issued[-1]}), content_type="application/json")

    def _unauthorized(self, request: Request) -> bool:
        if self.reject_next > 0:
            self.reject_next -= 1
            return True
        return (
            not self.issued or request.headers.get("Authorization") != "Bearer " + self.issued[-1]
        )

    def historical(self, request: Request) -> Response:
        if self._unauthorized(request):
            return Response("", status=401)
        assert request.args["signal_type"] == "co2_moer"
        start, end = parse(request.args["start"]), parse(request.args["end"])
        last = min(end, NOW - 300)  # the API's end is inclusive; no data after "now"
        count = max(0, int((last - start) // 300) + 1)
        body = answer(start, count, self.value, units=self.units)
        return Response(json.dumps(body), content_type="application/json")

    def forecast(self, request: Request) -> Response:
        if self._unauthorized(request):
            return Response("", status=401)
        hours = int(request.args["horizon_hours"])
        body = answer(NOW, hours * 12, lambda t: 2000.0, units=self.units)
        return Response(json.dumps(body), content_type="application/json")


@pytest.fixture(autouse=True)
def _no_shared_token() -> Iterator[None]:
    watttime._TOKENS.clear()
    yield
    watttime._TOKENS.clear()


@pytest.fixture
def fake(httpserver: HTTPServer) -> FakeWattTime:
    return FakeWattTime(httpserver)


def settings_for(server: HTTPServer, tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "watttime_url": server.url_for("/").rstrip("/"),
        "watttime_username": USER,
        "watttime_password": PASSWORD,
        "http_timeout_s": 5.0,
        **changes,
    }
    return Settings.load(environ={}, **values)


def provider(server: HTTPServer, tmp_path: Path, **changes: Any) -> WattTimeProvider:
    return WattTimeProvider(settings_for(server, tmp_path, **changes), clock=lambda: NOW)


# --- configuration and region -------------------------------------------------------------


def test_not_configured_without_credentials(httpserver: HTTPServer, tmp_path: Path) -> None:
    none = WattTimeProvider(
        settings_for(httpserver, tmp_path, watttime_username=None, watttime_password=None)
    )
    reason = none.configured()
    assert reason is not None
    assert "GREEN_MLOPS_WATTTIME_USERNAME" in reason and "GREEN_MLOPS_WATTTIME_PASSWORD" in reason
    half = WattTimeProvider(settings_for(httpserver, tmp_path, watttime_password=None))
    assert "PASSWORD" in (half.configured() or "") and "USERNAME" not in (half.configured() or "")
    with pytest.raises(IntensityUnavailable, match="no WattTime account"):
        none.series(PACW, NOW - 600, NOW)
    assert provider(httpserver, tmp_path).configured() is None
    assert httpserver.log == []


def test_region_mapping_unknown_zone_is_unavailable(fake: FakeWattTime, tmp_path: Path) -> None:
    assert region_for(PACW) == "PACW"
    assert ZONE_TO_REGION["US-NW-BPAT"] == "BPA"
    wt = provider(fake.server, tmp_path)
    with pytest.raises(IntensityUnavailable, match="no WattTime region for zone DE"):
        wt.series(Location(raw="DE", zone="DE", country="DE"), NOW - 600, NOW)
    # CAISO is split in sub-regions by WattTime: not guessed, but named in the message
    with pytest.raises(IntensityUnavailable, match="CAISO_NORTH") as caiso:
        wt.series(Location(raw="US-CAL-CISO", zone="US-CAL-CISO", country="US"), NOW - 600, NOW)
    assert "region=" in str(caiso.value)
    with pytest.raises(IntensityUnavailable, match="no WattTime region for location"):
        wt.series(Location(raw="unknown"), NOW - 600, NOW)
    assert fake.server.log == []  # refused before any request, login included
    # an explicit region is used as given, whatever the zone
    caiso_north = WattTimeProvider(wt.settings, region="caiso_north", clock=lambda: NOW)
    series = caiso_north.series(Location(raw="DE", zone="DE", country="DE"), NOW - 600, NOW)
    assert series.zone == "CAISO_NORTH"
    assert fake.requests("/v3/historical")[0].args["region"] == "CAISO_NORTH"
    with pytest.raises(ValueError):
        WattTimeProvider(wt.settings, region="CAISO NORTH; DROP")


# --- login, token, data ---------------------------------------------------------------------


def test_login_then_historical_in_g_per_kwh(fake: FakeWattTime, tmp_path: Path) -> None:
    wt = provider(fake.server, tmp_path)
    start, end = ts("2026-04-01T10:00:00"), ts("2026-04-01T10:30:00")
    series = wt.series(PACW, start, end)
    assert fake.logins == 1
    (request,) = fake.requests("/v3/historical")
    assert request.headers["Authorization"] == "Bearer " + fake.issued[0]
    assert request.args["region"] == "PACW"
    # one whole UTC day, up to the next full hour after "now" (shared by the runs of a sweep)
    assert request.args["start"] == "2026-04-01T00:00:00Z"
    assert request.args["end"] == "2026-04-01T12:00:00Z"
    assert len(series.points) == 6
    assert [p.end - p.start for p in series.points] == [300.0] * 6
    assert series.points[0].start == start and series.points[-1].end == end
    assert series.covered(start, end) == end - start
    assert all(p.g_per_kwh == 1000.0 * 0.45359237 for p in series.points)
    assert (series.source, series.zone, series.basis, series.scope) == (
        "watttime",
        "PACW",
        "marginal",
        "direct",
    )
    assert series.estimated is False
    assert any("not CO2e" in note for note in series.notes)
    assert any("2023-03-01" in note for note in series.notes)


def test_conversion_factor_is_exact() -> None:
    # 1 lb = 453.59237 g exactly; 1 MWh = 1000 kWh
    assert LBS_PER_MWH_TO_G_PER_KWH == 453.59237 / 1000
    assert math.isclose(2204.62262185 * LBS_PER_MWH_TO_G_PER_KWH, 1000.0, rel_tol=1e-11)


def test_token_is_reused_and_responses_cached(fake: FakeWattTime, tmp_path: Path) -> None:
    first = provider(fake.server, tmp_path)
    first.series(PACW, ts("2026-04-01T10:00:00"), ts("2026-04-01T10:30:00"))
    first.series(PACW, ts("2026-03-30T10:00:00"), ts("2026-03-30T11:00:00"))
    # a second provider (the next run of a sweep) in the same hour: same token, cached data
    second = provider(fake.server, tmp_path)
    series = second.series(PACW, ts("2026-04-01T09:00:00"), ts("2026-04-01T11:00:00"))
    assert series.covered(ts("2026-04-01T09:00:00"), ts("2026-04-01T11:00:00")) == 7200
    assert fake.logins == 1
    assert len(fake.requests("/v3/historical")) == 2  # one per UTC day, then cache hits
    assert second.http.requests_sent == 0


def test_relogin_once_on_401(fake: FakeWattTime, tmp_path: Path) -> None:
    wt = provider(fake.server, tmp_path)
    wt.series(PACW, ts("2026-04-01T10:00:00"), ts("2026-04-01T10:30:00"))
    assert fake.logins == 1
    fake.reject_next = 1  # the token is revoked server-side
    series = wt.series(PACW, ts("2026-03-31T10:00:00"), ts("2026-03-31T10:30:00"))
    assert len(series.points) == 6
    assert fake.logins == 2  # exactly one extra login
    data = fake.requests("/v3/historical")
    assert data[-1].headers["Authorization"] == "Bearer " + fake.issued[1]


def test_401_after_fresh_login_gives_up(fake: FakeWattTime, tmp_path: Path) -> None:
    wt = provider(fake.server, tmp_path)
    fake.reject_next = 5
    with pytest.raises(IntensityUnavailable, match=r"HTTP 401\) even after a fresh login"):
        wt.series(PACW, ts("2026-04-01T10:00:00"), ts("2026-04-01T10:30:00"))
    assert fake.logins == 2  # first login, one re-login, no loop
    assert len(fake.requests("/v3/historical")) == 2


def test_wrong_password_is_reported(fake: FakeWattTime, tmp_path: Path) -> None:
    wt = provider(fake.server, tmp_path, watttime_password="not-the-password")
    with pytest.raises(IntensityUnavailable, match="login refused \\(HTTP 401\\)"):
        wt.series(PACW, NOW - 600, NOW)
    assert fake.requests("/v3/historical") == []


def test_forecast_for_the_future(fake: FakeWattTime, tmp_path: Path) -> None:
    wt = provider(fake.server, tmp_path)
    start, end = ts("2026-04-01T11:00:00"), ts("2026-04-01T14:00:00")
    series = wt.series(PACW, start, end)
    (forecast,) = fake.requests("/v3/forecast")
    assert forecast.args["horizon_hours"] == "24"
    assert forecast.args["signal_type"] == "co2_moer" and forecast.args["region"] == "PACW"
    assert series.estimated is True
    assert series.covered(start, end) == end - start
    past = [p for p in series.points if p.end <= NOW]
    future = [p for p in series.points if p.start >= NOW]
    assert len(past) + len(future) == len(series.points)
    assert {p.g_per_kwh for p in past} == {1000.0 * LBS_PER_MWH_TO_G_PER_KWH}
    assert {p.g_per_kwh for p in future} == {2000.0 * LBS_PER_MWH_TO_G_PER_KWH}
    # a range beyond the longest horizon is covered in part, and says so
    far = wt.series(PACW, NOW, NOW + 100 * 3600)
    assert fake.requests("/v3/forecast")[-1].args["horizon_hours"] == "72"
    assert far.covered(NOW, NOW + 100 * 3600) == 72 * 3600
    assert any("72 h" in note for note in far.notes)


@pytest.mark.parametrize("units", ["percentile", None, "kg_co2_per_mwh"])
def test_units_other_than_lbs_per_mwh_are_refused(
    fake: FakeWattTime, tmp_path: Path, units: str | None
) -> None:
    fake.units = units
    with pytest.raises(IntensityUnavailable, match="refused") as refused:
        provider(fake.server, tmp_path).series(PACW, NOW - 600, NOW)
    assert repr(units) in str(refused.value)


def test_signal_index_answer_is_never_an_intensity(httpserver: HTTPServer, tmp_path: Path) -> None:
    # What /v3/signal-index returns (a 0-100 percentile), served where MOER is expected.
    FakeWattTime(httpserver, data=False)
    body = answer(NOW - 600, 2, lambda t: 42.0, units="percentile", signal="co2_moer")
    httpserver.expect_request("/v3/historical").respond_with_json(body)
    with pytest.raises(IntensityUnavailable, match="percentile"):
        provider(httpserver, tmp_path).series(PACW, NOW - 600, NOW)


def test_missing_period_is_inferred_and_bad_points_skipped(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    FakeWattTime(httpserver, data=False)
    body = answer(NOW - 900, 3, lambda t: 500.0, period=None)
    body["data"] += [{"point_time": "2026-04-01T11:59:00Z"}, {"value": 3.0}, {"point_time": 1}]
    body["data"].append({"point_time": "2026-04-01T11:59:00Z", "value": "high"})
    httpserver.expect_request("/v3/historical").respond_with_json(body)
    series = provider(httpserver, tmp_path).series(PACW, NOW - 900, NOW)
    assert [p.end - p.start for p in series.points] == [300.0] * 3
    assert any("4 malformed data points skipped" in note for note in series.notes)


def test_malformed_answers(httpserver: HTTPServer, tmp_path: Path) -> None:
    FakeWattTime(httpserver, data=False)
    httpserver.expect_oneshot_request("/v3/historical").respond_with_data(
        "{not json", content_type="application/json"
    )
    httpserver.expect_oneshot_request("/v3/historical").respond_with_json({"data": []})
    httpserver.expect_oneshot_request("/v3/historical").respond_with_json(
        {"meta": {"units": "lbs_co2_per_mwh"}, "data": {"point_time": "x"}}
    )
    wt = provider(httpserver, tmp_path, cache_ttl_s=0)
    for message in ("malformed JSON", "no meta", "no data list"):
        with pytest.raises(IntensityUnavailable, match=message):
            wt.series(PACW, NOW - 600, NOW)
    httpserver.expect_request("/v3/historical").respond_with_json(answer(NOW, 0, float))
    with pytest.raises(IntensityUnavailable, match="no MOER data for region PACW"):
        wt.series(PACW, NOW - 600, NOW)


def test_403_names_the_plan(httpserver: HTTPServer, tmp_path: Path) -> None:
    fake = FakeWattTime(httpserver, data=False)
    httpserver.expect_request("/v3/historical").respond_with_data("forbidden", status=403)
    with pytest.raises(IntensityUnavailable, match="HTTP 403") as refused:
        provider(httpserver, tmp_path).series(PACW, NOW - 600, NOW)
    assert "plan" in str(refused.value) and "PACW" in str(refused.value)
    assert len(fake.issued) == 1  # a 403 is not an expired token: no re-login


def test_429_retry_after_is_honoured(fake: FakeWattTime, tmp_path: Path) -> None:
    fake.server.expect_oneshot_request("/v3/historical").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "1"}
    )
    began = time.monotonic()
    series = provider(fake.server, tmp_path).series(PACW, NOW - 600, NOW)
    assert time.monotonic() - began >= 0.9
    assert len(series.points) == 2
    statuses = [r.status_code for q, r in fake.server.log if q.path == "/v3/historical"]
    assert statuses == [429, 200]


def test_credentials_never_in_logs_errors_reprs_or_cache(
    fake: FakeWattTime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    wt = provider(fake.server, tmp_path)
    series = wt.series(PACW, NOW - 600, NOW)
    fake.reject_next = 1
    wt.series(PACW, ts("2026-03-31T10:00:00"), ts("2026-03-31T10:30:00"))
    fake.reject_next = 5
    for attempt in (
        lambda: wt.series(PACW, ts("2026-03-29T10:00:00"), ts("2026-03-29T10:30:00")),
        lambda: provider(fake.server, tmp_path, watttime_password="wrong-pw-123").series(
            PACW, NOW - 600, NOW
        ),
    ):
        with pytest.raises(IntensityUnavailable) as failure:
            attempt()
        errors += [str(failure.value), repr(failure.value)]
    assert fake.logins >= 3 and caplog.records  # the flows ran and urllib3 logged them
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    shown = "\n".join(
        [caplog.text, *errors, repr(wt), repr(wt.settings), repr(series), repr(watttime._TOKENS)]
    )
    assert cached  # data answers were cached (on disk), without credentials
    for secret in [PASSWORD, BASIC.split()[1], "wrong-pw-123", *fake.issued]:
        assert secret not in shown
        assert secret not in cached
    assert USER not in "\n".join(errors)


def test_failed_forecast_keeps_the_measured_part(httpserver: HTTPServer, tmp_path: Path) -> None:
    fake = FakeWattTime(httpserver, data=False)
    httpserver.expect_request("/v3/historical").respond_with_handler(fake.historical)
    httpserver.expect_request("/v3/forecast").respond_with_data("bad horizon", status=400)
    wt = provider(httpserver, tmp_path)
    series = wt.series(PACW, NOW - 1800, NOW + 1800)
    assert series.covered(NOW - 1800, NOW + 1800) == 1800  # the future is left to the next one
    assert series.estimated is False
    assert any(note.startswith("no forecast:") and "400" in note for note in series.notes)
    with pytest.raises(IntensityUnavailable, match="HTTP 400"):  # nothing else: the reason
        wt.series(PACW, NOW, NOW + 1800)
