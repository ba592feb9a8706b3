"""The Electricity Maps API v3 provider against a real HTTP server on 127.0.0.1.

The server (pytest-httpserver) answers with the documented response shapes; "now" is pinned
through the provider's ``clock`` so the choice of endpoint (history / past-range / forecast)
is deterministic. Fallbacks go through the real CarbonAccountant chain, with a tiny constant
provider standing in for the static table. urllib3's backoff factor is shrunk for speed.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from green_mlops import http
from green_mlops.carbon import CarbonAccountant, CarbonResult
from green_mlops.config import Settings
from green_mlops.intensity import (
    FOREVER,
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)
from green_mlops.location import Location
from green_mlops.plugin_manager import create_plugin_manager
from green_mlops.plugins import electricitymaps
from green_mlops.plugins.electricitymaps import (
    MAX_RANGE_S,
    ElectricityMapsProvider,
    past_range_windows,
)

H = 3600.0
TOKEN = "test-token"
DE = Location(raw="DE", zone="DE", country="DE")
PRODUCTION_RETRY = http._retry
#: Pinned "now": 2026-11-26 10:20 UTC.
NOW = datetime(2026, 11, 26, 10, 20, tzinfo=timezone.utc).timestamp()
HOUR_NOW = NOW - 20 * 60  # 10:00
BASE = "/v3/carbon-intensity/"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        http, "_retry", lambda total: PRODUCTION_RETRY(total).new(backoff_factor=0.01)
    )


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def item(t: float, ci: float | None, **extra: Any) -> dict[str, Any]:
    """One item as the API documents it."""
    out: dict[str, Any] = {
        "zone": "DE",
        "carbonIntensity": ci,
        "datetime": iso(t),
        "updatedAt": "2026-11-26T09:45:00.000Z",
        "createdAt": "2026-11-23T10:00:00.000Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": False,
        "estimationMethod": None,
    }
    out.update(extra)
    return out


def history(first: float, values: Sequence[float | None], **extra: Any) -> dict[str, Any]:
    return {
        "zone": "DE",
        "history": [item(first + i * H, v, **extra) for i, v in enumerate(values)],
    }


def forecast(first: float, values: list[float]) -> dict[str, Any]:
    return {
        "zone": "DE",
        "forecast": [
            {"carbonIntensity": v, "datetime": iso(first + i * H)} for i, v in enumerate(values)
        ],
        "updatedAt": "2026-11-26T10:05:00.000Z",
    }


def make_settings(server: HTTPServer | str, tmp_path: Path, **overrides: Any) -> Settings:
    url = server if isinstance(server, str) else server.url_for("/")
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "electricitymaps_token": TOKEN,
        "electricitymaps_url": url,
        "http_timeout_s": 2.0,
    }
    values.update(overrides)
    return Settings.load(environ={}, **values)


def provider(
    server: HTTPServer | str, tmp_path: Path, now: float = NOW, **overrides: Any
) -> ElectricityMapsProvider:
    return ElectricityMapsProvider(make_settings(server, tmp_path, **overrides), clock=lambda: now)


def expect(server: HTTPServer, endpoint: str, **query: str) -> Any:
    """A request that must carry the zone, the no-IP-fallback flag and the token header."""
    return server.expect_request(
        BASE + endpoint,
        query_string={"zone": "DE", **query, "shouldUseFallbackCallerLookup": "false"},
        headers={"auth-token": TOKEN},
    )


def requests_to(server: HTTPServer, endpoint: str) -> list[Request]:
    return [request for request, _ in server.log if request.path == BASE + endpoint]


def contiguous_hours(series: IntensitySeries) -> list[float]:
    starts = [p.start for p in series.points]
    assert all(p.end - p.start == H for p in series.points)
    assert all(b.start == a.end for a, b in itertools.pairwise(series.points))
    return starts


class Constant(IntensityProvider):
    """Stands in for the static table at the end of the chain: covers all time."""

    name = "fallback"

    def __init__(self, g_per_kwh: float) -> None:
        self.g_per_kwh = g_per_kwh

    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        return IntensitySeries(
            points=(IntensityPoint(*FOREVER, self.g_per_kwh),),
            source="fallback",
            dataset="test-constant",
            zone=location.zone or "unknown",
            basis="average",
            scope="lifecycle",
            estimated=True,
            vintage="test",
        )


def priced(
    em: ElectricityMapsProvider, start: float, end: float, watts: float = 1000.0
) -> tuple[CarbonResult, CarbonAccountant]:
    """Price a constant-power run through the real chain [electricitymaps, constant 300]."""
    accountant = CarbonAccountant(em.settings, [em, Constant(300.0)])
    accountant.location = DE  # parse_location is not ours; the accountant uses this attribute
    timeline = [(start + k * (end - start) / 8, watts * k * (end - start) / 8) for k in range(9)]
    try:
        return accountant.result(timeline, wait_s=10.0), accountant
    finally:
        accountant.close()


def kwh(seconds: float, watts: float = 1000.0) -> float:
    return watts * seconds / 3.6e6


# --- configuration and contract ------------------------------------------------------------


def test_not_configured_without_token(tmp_path: Path) -> None:
    em = provider("http://127.0.0.1:9", tmp_path, electricitymaps_token=None)
    assert em.configured() == "no token: set GREEN_MLOPS_ELECTRICITYMAPS_TOKEN"
    with pytest.raises(IntensityUnavailable, match="no token"):
        em.series(DE, NOW - H, NOW)
    assert em.client.requests_sent == 0


def test_location_without_zone(httpserver: HTTPServer, tmp_path: Path) -> None:
    em = provider(httpserver, tmp_path)
    assert em.configured() is None
    with pytest.raises(IntensityUnavailable, match="has no Electricity Maps zone"):
        em.series(Location(raw="unknown"), NOW - H, NOW)
    assert httpserver.log == []


def test_hook_offers_the_provider(tmp_path: Path) -> None:
    conf = make_settings("http://127.0.0.1:9", tmp_path)
    (offered,) = electricitymaps.green_mlops_intensity_providers(settings=conf)
    assert isinstance(offered, ElectricityMapsProvider) and offered.name == "electricitymaps"
    # Built-ins are registered by module (plugin_manager.DEFAULT_PLUGINS), under their name.
    assert create_plugin_manager().get_plugin("electricitymaps") is electricitymaps


# --- response shapes ----------------------------------------------------------------------


def test_history(httpserver: HTTPServer, tmp_path: Path) -> None:
    first = HOUR_NOW - 23 * H
    values = [float(200 + i) for i in range(24)]  # ... 09:00 = 222, 10:00 = 223
    expect(httpserver, "history").respond_with_json(history(first, values))
    series = provider(httpserver, tmp_path).series(DE, NOW - 2 * H, NOW)  # 08:20-10:20
    assert contiguous_hours(series) == [HOUR_NOW - 2 * H, HOUR_NOW - H, HOUR_NOW]
    assert [p.g_per_kwh for p in series.points] == [221.0, 222.0, 223.0]
    assert series.covered(NOW - 2 * H, NOW) == 2 * H
    assert (series.source, series.dataset, series.zone) == (
        "electricitymaps",
        "api-v3 history",
        "DE",
    )
    assert (series.basis, series.scope, series.estimated) == ("average", "lifecycle", False)
    assert series.vintage == "retrieved 2026-11-26T10:20:00Z, updated 2026-11-26T09:45:00.000Z"
    assert "Electricity Maps" in series.attribution
    assert len(httpserver.log) == 1  # history reaches the current hour: no /latest


def test_latest_fills_the_current_hour(httpserver: HTTPServer, tmp_path: Path) -> None:
    first = HOUR_NOW - 24 * H
    expect(httpserver, "history").respond_with_json(history(first, [300.0] * 24))  # to 09:00
    expect(httpserver, "latest").respond_with_json(
        item(HOUR_NOW, 123, isEstimated=True, estimationMethod="TIME_SLICER_AVERAGE")
    )
    series = provider(httpserver, tmp_path).series(DE, NOW - H, NOW)
    assert [(p.start, p.g_per_kwh) for p in series.points] == [
        (HOUR_NOW - H, 300.0),
        (HOUR_NOW, 123.0),
    ]
    assert series.dataset == "api-v3 history+latest"
    assert series.estimated
    assert "estimation methods: TIME_SLICER_AVERAGE" in series.notes
    assert [r.path for r, _ in httpserver.log] == [BASE + "history", BASE + "latest"]


def test_past_range_is_chunked_on_whole_days(httpserver: HTTPServer, tmp_path: Path) -> None:
    start = NOW - 20 * 24 * H + 1234.0  # 20 days ago, mid-hour
    end = NOW - 3 * 24 * H - 777.0

    def handler(request: Request) -> Response:
        lo = datetime.fromisoformat(request.args["start"].replace("Z", "+00:00")).timestamp()
        hi = datetime.fromisoformat(request.args["end"].replace("Z", "+00:00")).timestamp()
        assert hi - lo <= MAX_RANGE_S
        data = [item(t, t % 1000) for t in range(int(lo), int(hi), 3600)]
        return Response(json.dumps({"zone": "DE", "data": data}), content_type="application/json")

    httpserver.expect_request(BASE + "past-range").respond_with_handler(handler)
    em = provider(httpserver, tmp_path)
    series = em.series(DE, start, end)
    windows = past_range_windows(start, end, NOW)
    sent = requests_to(httpserver, "past-range")
    assert [(r.args["start"], r.args["end"]) for r in sent] == [
        (iso(lo)[:-5] + "Z", iso(hi)[:-5] + "Z") for lo, hi in windows
    ]
    assert len(sent) == 3  # 18 days on the fixed 10-day grid: cut twice
    for lo, hi in windows:
        assert lo % (24 * H) == 0 and hi % (24 * H) == 0 and hi - lo <= MAX_RANGE_S
        assert all(r.headers["auth-token"] == TOKEN for r in sent)
    starts = contiguous_hours(series)
    assert starts[0] <= start < starts[0] + H and starts[-1] < end <= starts[-1] + H
    assert series.covered(start, end) == end - start
    assert series.dataset == "api-v3 past-range" and not series.estimated
    # the same days for another run: same URLs, served by the cache
    again = provider(httpserver, tmp_path).series(DE, start + 5 * H, end - 5 * H)
    assert len(httpserver.log) == 3 and again.points[0].g_per_kwh == series.points[5].g_per_kwh


def test_past_range_windows() -> None:
    day = 24 * H
    assert past_range_windows(10 * day + 5, 10 * day + 6, 100 * day) == [(10 * day, 11 * day)]
    assert past_range_windows(9 * day, 11 * day, 100 * day) == [
        (9 * day, 10 * day),
        (10 * day, 11 * day),
    ]
    # never past the current hour
    assert past_range_windows(50 * day, 51 * day, 50 * day + 5.5 * H) == [
        (50 * day, 50 * day + 6 * H)
    ]


def test_forecast_for_planning(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "forecast").respond_with_json(forecast(HOUR_NOW, [100, 110, 120, 130, 140]))
    series = provider(httpserver, tmp_path).series(DE, NOW + H, NOW + 3 * H)  # 11:20-13:20
    assert [p.g_per_kwh for p in series.points] == [110.0, 120.0, 130.0]
    assert series.dataset == "api-v3 forecast"
    assert series.estimated  # a forecast always is
    assert series.scope == "lifecycle"
    assert any("emissionFactorType not reported" in note for note in series.notes)
    assert series.vintage.endswith("updated 2026-11-26T10:05:00.000Z")
    assert [r.path for r, _ in httpserver.log] == [BASE + "forecast"]


def test_run_across_now_uses_history_then_forecast(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 23 * H, [200.0] * 24))
    expect(httpserver, "forecast").respond_with_json(forecast(HOUR_NOW, [999, 150, 160]))
    series = provider(httpserver, tmp_path).series(DE, NOW - H, NOW + 2 * H)
    # the current hour comes from history (measured beats forecast), later hours from forecast
    assert [p.g_per_kwh for p in series.points] == [200.0, 200.0, 150.0, 160.0]
    contiguous_hours(series)
    assert series.dataset == "api-v3 history+forecast" and series.estimated


# --- gaps and fallbacks through the real chain ----------------------------------------------


def test_null_items_are_gaps_priced_by_the_fallback(httpserver: HTTPServer, tmp_path: Path) -> None:
    values: list[float | None] = [100.0] * 24
    values[20] = None  # 07:00
    values[21] = None  # 08:00
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 23 * H, values))
    em = provider(httpserver, tmp_path)
    start, end = HOUR_NOW - 4 * H, HOUR_NOW  # 06:00-10:00
    result, accountant = priced(em, start, end)
    (em_key, fallback_key) = result.kwh_by_source
    assert em_key.startswith("electricitymaps/api-v3 history") and "fallback" in fallback_key
    assert result.kwh_by_source[em_key] == pytest.approx(kwh(2 * H))
    assert result.kwh_by_source[fallback_key] == pytest.approx(kwh(2 * H))
    assert result.grams == pytest.approx(kwh(2 * H) * 100 + kwh(2 * H) * 300)
    assert result.unpriced_kwh == 0 and accountant.skipped == {}
    series = em.series(DE, start, end)
    assert any("2 item(s) with carbonIntensity null" in note for note in series.notes)
    assert any("120 min of 240 not covered" in note for note in series.notes)


@pytest.mark.parametrize(("status", "words"), [(401, "token rejected"), (403, "access denied")])
def test_auth_errors_fall_back_with_reason(
    httpserver: HTTPServer, tmp_path: Path, status: int, words: str
) -> None:
    httpserver.expect_request(BASE + "history").respond_with_data("denied", status=status)
    httpserver.expect_request(BASE + "latest").respond_with_data("denied", status=status)
    result, accountant = priced(provider(httpserver, tmp_path), NOW - H, NOW)
    reason = accountant.skipped["electricitymaps"]
    assert f"HTTP {status}" in reason and words in reason and httpserver.host in reason
    assert list(result.kwh_by_source) == [
        "fallback/test-constant zone DE, average lifecycle, estimated, test"
    ]
    assert result.grams == pytest.approx(kwh(H) * 300)


def test_429_retry_after_then_success(httpserver: HTTPServer, tmp_path: Path) -> None:
    answers = [
        Response("slow down", status=429, headers={"Retry-After": "1"}),
        Response(
            json.dumps(history(HOUR_NOW - 23 * H, [250.0] * 24)), content_type="application/json"
        ),
    ]
    httpserver.expect_request(BASE + "history").respond_with_handler(
        lambda request: answers.pop(0) if len(answers) > 1 else answers[0]
    )
    em = provider(httpserver, tmp_path)
    t0 = time.monotonic()
    series = em.series(DE, NOW - H, NOW)
    assert time.monotonic() - t0 >= 0.95
    assert len(httpserver.log) == 2 and em.client.requests_sent == 1
    assert series.points[-1].g_per_kwh == 250.0


def test_500_then_success_is_retried(httpserver: HTTPServer, tmp_path: Path) -> None:
    answers = [
        Response("oops", status=500),
        Response(
            json.dumps(history(HOUR_NOW - 23 * H, [250.0] * 24)), content_type="application/json"
        ),
    ]
    httpserver.expect_request(BASE + "history").respond_with_handler(
        lambda request: answers.pop(0) if len(answers) > 1 else answers[0]
    )
    series = provider(httpserver, tmp_path).series(DE, NOW - H, NOW)
    assert len(httpserver.log) == 2 and series.covered(NOW - H, NOW) == H


def test_persistent_500_falls_back(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request(BASE + "history").respond_with_data("down", status=500)
    result, accountant = priced(provider(httpserver, tmp_path), NOW - H, NOW)
    assert "HTTP 500" in accountant.skipped["electricitymaps"]
    assert len(httpserver.log) == 4  # 1 + 3 retries, then no other endpoint is tried
    assert result.grams == pytest.approx(kwh(H) * 300)


def test_malformed_json_falls_back(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request(BASE + "history").respond_with_data('{"history": [', status=200)
    result, accountant = priced(provider(httpserver, tmp_path), NOW - H, NOW)
    assert "malformed JSON" in accountant.skipped["electricitymaps"]
    assert result.grams == pytest.approx(kwh(H) * 300)


def test_missing_and_invalid_fields_are_skipped(httpserver: HTTPServer, tmp_path: Path) -> None:
    body = history(HOUR_NOW - 23 * H, [100.0] * 24)
    items = body["history"]
    del items[20]["carbonIntensity"]  # 07:00
    del items[21]["datetime"]  # 08:00
    items[22]["carbonIntensity"] = "high"  # 09:00
    items[19]["carbonIntensity"] = -5  # 06:00
    items[18] = "not an object"  # 05:00
    del items[23]["isEstimated"]  # 10:00: no flag is not a measurement
    expect(httpserver, "history").respond_with_json(body)
    series = provider(httpserver, tmp_path).series(DE, HOUR_NOW - 6 * H, NOW)
    assert [p.start for p in series.points] == [HOUR_NOW - 6 * H, HOUR_NOW]
    assert series.estimated
    assert any("5 item(s) skipped for missing or invalid" in note for note in series.notes)


@pytest.mark.parametrize(
    "body",
    [
        {"zone": "DE", "history": [{"zone": "DE", "carbonIntensity": 100}]},
        {"zone": "DE", "data": []},  # no "history" list
        [1, 2, 3],
        {"zone": "DE", "history": [], "temporalGranularity": "daily"},
    ],
)
def test_nothing_usable_is_unavailable(httpserver: HTTPServer, tmp_path: Path, body: Any) -> None:
    expect(httpserver, "history").respond_with_json(body)
    expect(httpserver, "latest").respond_with_json({"zone": "DE"})
    with pytest.raises(IntensityUnavailable, match="nothing usable for zone DE"):
        provider(httpserver, tmp_path).series(DE, NOW - H, NOW)


def test_items_for_another_zone_are_dropped(httpserver: HTTPServer, tmp_path: Path) -> None:
    body = history(HOUR_NOW - 23 * H, [100.0] * 24)
    body["history"][23]["zone"] = "FR"
    expect(httpserver, "history").respond_with_json(body)
    expect(httpserver, "latest").respond_with_json(item(HOUR_NOW, 55, zone="FR"))
    series = provider(httpserver, tmp_path).series(DE, NOW - H, NOW)
    assert [p.start for p in series.points] == [HOUR_NOW - H]
    assert any("another zone" in note for note in series.notes)


def test_failure_after_data_keeps_the_data(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 24 * H, [100.0] * 24))
    httpserver.expect_request(BASE + "latest").respond_with_data("down", status=500)
    em = provider(httpserver, tmp_path)
    series = em.series(DE, NOW - H, NOW + H)
    assert [p.start for p in series.points] == [HOUR_NOW - H]
    assert any("latest: electricitymaps: HTTP 500" in note for note in series.notes)
    assert any("forecast: not requested after the latest failure" in n for n in series.notes)
    assert len(requests_to(httpserver, "latest")) == 4  # 1 + 3 retries
    assert requests_to(httpserver, "forecast") == []


@pytest.mark.parametrize("status", [400, 404])
def test_unknown_zone(httpserver: HTTPServer, tmp_path: Path, status: int) -> None:
    httpserver.expect_request(
        BASE + "history", query_string={"zone": "XX", "shouldUseFallbackCallerLookup": "false"}
    ).respond_with_json({"error": "zone XX not found"}, status=status)
    em = provider(httpserver, tmp_path)
    with pytest.raises(IntensityUnavailable) as info:
        em.series(Location(raw="XX", zone="XX"), NOW - H, NOW)
    assert "zone 'XX' unknown" in str(info.value) and f"HTTP {status}" in str(info.value)
    assert len(httpserver.log) == 1


def test_forecast_shorter_than_the_run(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "forecast").respond_with_json(
        forecast(HOUR_NOW, [100, 110, 120])
    )  # to 13:00
    em = provider(httpserver, tmp_path)
    start, end = HOUR_NOW + H, HOUR_NOW + 7 * H  # 11:00-17:00
    result, accountant = priced(em, start, end)
    em_key = next(k for k in result.kwh_by_source if k.startswith("electricitymaps/"))
    fallback_key = next(k for k in result.kwh_by_source if k.startswith("fallback/"))
    assert "api-v3 forecast" in em_key and "estimated" in em_key
    assert result.kwh_by_source[em_key] == pytest.approx(kwh(2 * H))
    assert result.kwh_by_source[fallback_key] == pytest.approx(kwh(4 * H))
    assert result.grams == pytest.approx(kwh(H) * (110 + 120) + kwh(4 * H) * 300)
    assert accountant.skipped == {}


def test_past_range_refused_falls_back_to_history(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request(BASE + "past-range").respond_with_data("plan", status=403)
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 23 * H, [100.0] * 24))
    series = provider(httpserver, tmp_path).series(DE, NOW - 30 * H, NOW)
    assert series.points[0].start == HOUR_NOW - 23 * H and series.points[-1].end == HOUR_NOW + H
    assert series.dataset == "api-v3 history"
    assert any("HTTP 403" in note for note in series.notes)
    assert any("not covered" in note for note in series.notes)


# --- time --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "offsets"),
    [
        # Europe/Berlin: CET (+01:00) -> CEST (+02:00) at 01:00 UTC on 2026-03-29
        ((2026, 3, 29), ["+01:00", "+02:00", "+02:00", "+02:00", "+02:00", "+02:00"]),
        # CEST -> CET at 01:00 UTC on 2026-10-25: local 02:00 happens twice
        ((2026, 10, 25), ["+02:00", "+01:00", "+01:00", "+01:00", "+01:00", "+01:00"]),
    ],
)
def test_dst_changes_keep_one_hour_utc_intervals(
    httpserver: HTTPServer, tmp_path: Path, day: tuple[int, int, int], offsets: list[str]
) -> None:
    midnight = datetime(*day, tzinfo=timezone.utc)
    data = []
    for k, offset in enumerate(offsets):
        sign = 1 if offset[0] == "+" else -1
        shift = timedelta(hours=sign * int(offset[1:3]))
        local = (midnight + timedelta(hours=k) + shift).replace(tzinfo=None)
        data.append(item(0, 100 + k) | {"datetime": local.isoformat() + offset})
    expect(
        httpserver,
        "past-range",
        start=midnight.strftime("%Y-%m-%dT%H:%M:%SZ"),
        end=(midnight + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    ).respond_with_json({"zone": "DE", "data": data})
    start = midnight.timestamp()
    series = provider(httpserver, tmp_path).series(DE, start, start + 6 * H)
    assert contiguous_hours(series) == [start + k * H for k in range(6)]
    assert [p.g_per_kwh for p in series.points] == [100.0 + k for k in range(6)]
    assert series.covered(start, start + 6 * H) == 6 * H


# --- network faults ------------------------------------------------------------------------


@pytest.fixture
def slow_server() -> Iterator[tuple[HTTPServer, threading.Event]]:
    release = threading.Event()

    def handler(request: Request) -> Response:
        release.wait(5.0)
        return Response("{}", content_type="application/json")

    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.expect_request(BASE + "history").respond_with_handler(handler)
    server.start()
    try:
        yield server, release
    finally:
        release.set()
        server.clear()
        server.stop()


def test_read_timeout_is_unavailable_in_bounded_time(
    slow_server: tuple[HTTPServer, threading.Event], tmp_path: Path
) -> None:
    server, release = slow_server
    em = provider(server, tmp_path, http_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(IntensityUnavailable, match=r"cannot reach 127\.0\.0\.1"):
        em.series(DE, NOW - H, NOW + H)  # history and forecast: stops after the first
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 2.0  # 2 attempts x 0.5 s (a read timeout is retried once), no second endpoint
    assert em.client.requests_sent == 1


def test_unreachable_host(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    em = provider(f"http://127.0.0.1:{port}", tmp_path)
    result, accountant = priced(em, NOW - H, NOW)
    assert f"cannot reach 127.0.0.1:{port}" in accountant.skipped["electricitymaps"]
    assert result.grams == pytest.approx(kwh(H) * 300)


# --- cache ---------------------------------------------------------------------------------


def test_runs_in_the_same_hour_share_one_request(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 23 * H, [100.0] * 24))
    first = provider(httpserver, tmp_path)
    second = provider(httpserver, tmp_path)  # another accountant of the same process
    results = [priced(p, NOW - H + k * 60, NOW)[0] for p in (first, second, first) for k in (0, 5)]
    assert all(r.grams > 0 and len(r.kwh_by_source) == 1 for r in results)
    assert len(httpserver.log) == 1
    assert (first.client.requests_sent, second.client.requests_sent) == (1, 0)
    fresh = provider(httpserver, tmp_path)  # a fresh process: only the disk cache is shared
    assert fresh.series(DE, NOW - H, NOW).points
    assert fresh.client.requests_sent == 0 and len(httpserver.log) == 1


def test_cache_ttl_expiry(httpserver: HTTPServer, tmp_path: Path) -> None:
    expect(httpserver, "history").respond_with_json(history(HOUR_NOW - 23 * H, [100.0] * 24))
    em = provider(httpserver, tmp_path, cache_ttl_s=0.2)
    em.series(DE, NOW - H, NOW)
    em.series(DE, NOW - H, NOW)
    assert len(httpserver.log) == 1
    time.sleep(0.3)
    em.series(DE, NOW - H, NOW)
    assert len(httpserver.log) == 2 and em.client.requests_sent == 2


def test_empty_range(httpserver: HTTPServer, tmp_path: Path) -> None:
    with pytest.raises(IntensityUnavailable, match="empty"):
        provider(httpserver, tmp_path).series(DE, NOW, NOW)
    assert httpserver.log == []
