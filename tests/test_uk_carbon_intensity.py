"""The UK Carbon Intensity provider against a real HTTP server on 127.0.0.1 that serves the
documented shapes: national ``/intensity/{from}/{to}`` and ``/intensity/{from}/fw48h`` ->
``{"data": [{"from", "to", "intensity": {"forecast", "actual", "index"}}]}``, and regional
``/regional/intensity/{from}/{to}/postcode/{pc}`` -> ``{"data": {"regionid", "shortname",
"postcode", "data": [{"from", "to", "intensity": {"forecast", "index"}, "generationmix"}]}}``.

Like the real API, the fake answers half-hours in UTC, includes the period that ends at
``from`` (the API's range is inclusive of its start), gives ``actual`` only for completed
periods and ``null`` afterwards, and has only forecasts regionally.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from green_mlops.carbon import CarbonAccountant
from green_mlops.config import Settings
from green_mlops.intensity import (
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)
from green_mlops.location import Location, parse_location
from green_mlops.plugins.uk_carbon_intensity import ATTRIBUTION, UkCarbonIntensityProvider

GB = Location(raw="GB", zone="GB", country="GB")
HALF_HOUR = 1800.0
ACTUAL, FORECAST = 200, 250  # served for every period, so the test sees which one was used


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def fmt(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


NOW = ts("2026-04-01T12:00:00")


class FakeUkApi:
    def __init__(self, server: HTTPServer, now: float = NOW, *, serve: bool = True) -> None:
        self.server = server
        self.now = now
        if serve:  # otherwise the test registers the handlers it needs
            server.expect_request(re.compile(r"^/intensity/.+")).respond_with_handler(self.national)
            server.expect_request(re.compile(r"^/regional/intensity/.+")).respond_with_handler(
                self.regional
            )

    def paths(self) -> list[str]:
        return [request.path for request, _ in self.server.log]

    def periods(self, first: str, second: str, *, regional: bool) -> list[dict[str, Any]]:
        start = math.floor(parse(first) / HALF_HOUR) * HALF_HOUR
        if start == parse(first):
            start -= HALF_HOUR  # inclusive of the start: the period that ends at `from`
        end = start + 48 * 3600 if second == "fw48h" else parse(second)
        rows = []
        t = start
        while t < end:
            intensity: dict[str, Any] = {"forecast": FORECAST, "index": "moderate"}
            if not regional:
                intensity["actual"] = ACTUAL if t + HALF_HOUR <= self.now else None
            row: dict[str, Any] = {"from": fmt(t), "to": fmt(t + HALF_HOUR)}
            row["intensity"] = intensity
            if regional:
                row["generationmix"] = [{"fuel": "wind", "perc": 41.5}, {"fuel": "gas", "perc": 20}]
            rows.append(row)
            t += HALF_HOUR
        return rows

    def national(self, request: Request) -> Response:
        _, first, second = request.path.strip("/").split("/")
        body = {"data": self.periods(first, second, regional=False)}
        return Response(json.dumps(body), content_type="application/json")

    def regional(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")  # regional/intensity/a/b/postcode/RG10
        first, second, postcode = parts[2], parts[3], parts[5]
        body = {
            "data": {
                "regionid": 12,
                "dnoregion": "SSE South",
                "shortname": "South England",
                "postcode": postcode,
                "data": self.periods(first, second, regional=True),
            }
        }
        return Response(json.dumps(body), content_type="application/json")


@pytest.fixture
def api(httpserver: HTTPServer) -> FakeUkApi:
    return FakeUkApi(httpserver)


def settings_for(server: HTTPServer, tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "uk_url": server.url_for("/").rstrip("/"),
        "http_timeout_s": 5.0,
        **changes,
    }
    return Settings.load(environ={}, **values)


def provider(
    server: HTTPServer, tmp_path: Path, now: float = NOW, **changes: Any
) -> UkCarbonIntensityProvider:
    return UkCarbonIntensityProvider(settings_for(server, tmp_path, **changes), clock=lambda: now)


def test_national_actual_then_forecast(api: FakeUkApi, tmp_path: Path) -> None:
    uk = provider(api.server, tmp_path)
    start, end = ts("2026-04-01T10:00:00"), ts("2026-04-01T13:00:00")
    series = uk.series(GB, start, end)
    assert api.paths() == [
        "/intensity/2026-04-01T00:00Z/2026-04-01T12:00Z",  # the UTC day, to the next full hour
        "/intensity/2026-04-01T12:00Z/fw48h",
    ]
    assert [(p.start, p.end) for p in series.points] == [
        (start + i * HALF_HOUR, start + (i + 1) * HALF_HOUR) for i in range(6)
    ]
    assert [p.g_per_kwh for p in series.points] == [ACTUAL] * 4 + [FORECAST] * 2
    assert series.estimated is True
    assert (series.source, series.dataset, series.zone) == ("uk", "national", "GB")
    assert (series.basis, series.scope) == ("average", "direct")
    assert series.attribution == ATTRIBUTION == "Carbon Intensity API (NESO), CC BY 4.0"
    assert any("not lifecycle" in note for note in series.notes)
    assert uk.configured() is None


def test_only_actual_values_are_measured(api: FakeUkApi, tmp_path: Path) -> None:
    start, end = ts("2026-04-01T10:00:00"), ts("2026-04-01T11:00:00")
    for where in ("GB-ORK", "GBR", "aws:eu-west-2"):  # Orkney, alpha-3, AWS London
        series = provider(api.server, tmp_path).series(parse_location(where), start, end)
        assert [p.g_per_kwh for p in series.points] == [ACTUAL, ACTUAL]
        assert series.estimated is False
    assert not any("fw48h" in path for path in api.paths())


def test_regional_postcode_is_forecast_only(api: FakeUkApi, tmp_path: Path) -> None:
    uk = provider(api.server, tmp_path, uk_postcode="rg10")
    start, end = ts("2026-04-01T10:00:00"), ts("2026-04-01T11:30:00")
    series = uk.series(GB, start, end)
    assert api.paths() == ["/regional/intensity/2026-04-01T00:00Z/2026-04-01T12:00Z/postcode/RG10"]
    assert [p.g_per_kwh for p in series.points] == [FORECAST] * 3
    assert series.covered(start, end) == end - start
    assert series.estimated is True
    assert series.dataset == "regional"
    assert series.zone == "GB postcode RG10 (South England)"
    future = uk.series(GB, NOW, NOW + 3600)
    assert api.paths()[-1] == "/regional/intensity/2026-04-01T12:00Z/fw48h/postcode/RG10"
    assert future.covered(NOW, NOW + 3600) == 3600


def test_regional_answer_as_a_list_is_accepted(httpserver: HTTPServer, tmp_path: Path) -> None:
    row = {"from": "2026-04-01T10:00Z", "to": "2026-04-01T10:30Z", "intensity": {"forecast": 99}}
    body = {"data": [{"regionid": 3, "shortname": "North West England", "data": [row]}]}
    httpserver.expect_request(re.compile("^/regional/")).respond_with_json(body)
    uk = provider(httpserver, tmp_path, uk_postcode="M1")
    series = uk.series(GB, ts("2026-04-01T10:00:00"), ts("2026-04-01T10:30:00"))
    assert [p.g_per_kwh for p in series.points] == [99.0]
    assert "North West England" in series.zone


@pytest.mark.parametrize(
    "location",
    [
        Location(raw="DE", zone="DE", country="DE"),
        Location(raw="US-CAL-CISO", zone="US-CAL-CISO", country="US"),
        Location(raw="GB-NIR", zone="GB-NIR", country="GB"),
        Location(raw="unknown"),
    ],
    ids=["DE", "US", "northern-ireland", "unknown"],
)
def test_outside_great_britain_is_refused(
    api: FakeUkApi, tmp_path: Path, location: Location
) -> None:
    with pytest.raises(IntensityUnavailable, match="Great Britain"):
        provider(api.server, tmp_path).series(location, NOW - 3600, NOW)
    assert api.server.log == []


@pytest.fixture
def london_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Europe/London, to show that nothing depends on it."""
    monkeypatch.setenv("TZ", "Europe/London")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("london_time")
@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"], ids=["BST-starts", "BST-ends"])
def test_half_hours_stay_30_minutes_across_dst(api: FakeUkApi, tmp_path: Path, day: str) -> None:
    assert time.localtime(ts(f"{day}T12:00:00")).tm_isdst in (0, 1)  # the zone is active
    start = ts(f"{day}T00:00:00")
    end = start + 86400
    api.now = end + 3 * 86400  # both the server's and the provider's "now"
    uk = provider(api.server, tmp_path, now=api.now)
    series = uk.series(GB, start, end)
    next_day = (datetime.fromisoformat(day) + timedelta(days=1)).date().isoformat()
    assert api.paths() == [f"/intensity/{day}T00:00Z/{next_day}T00:00Z"]
    assert len(series.points) == 48  # not 46 or 50: the UTC day has 48 half-hours
    assert all(p.end - p.start == HALF_HOUR for p in series.points)
    assert all(a.end == b.start for a, b in zip(series.points, series.points[1:], strict=False))
    assert series.covered(start, end) == 86400
    # the clock change itself (01:00 UTC both days) is an ordinary boundary
    assert ts(f"{day}T01:00:00") in {p.start for p in series.points}
    assert series.estimated is False


def test_null_actual_and_missing_fields(httpserver: HTTPServer, tmp_path: Path) -> None:
    def row(t: str, **intensity: Any) -> dict[str, Any]:
        end = fmt(ts(f"2026-04-01T{t}:00") + HALF_HOUR)
        return {"from": f"2026-04-01T{t}Z", "to": end, "intensity": intensity}

    rows: list[Any] = [
        row("08:00", forecast=180, actual=170, index="low"),
        row("08:30", forecast=190, actual=None, index="moderate"),  # null actual: forecast
        row("09:00", forecast=None, actual=None, index="moderate"),  # nothing: a gap
        row("09:30", forecast=210, actual="n/a"),  # not a number: forecast
        {"from": "2026-04-01T10:00Z", "intensity": {"actual": 1}},  # no "to"
        {"from": "2026-04-01T10:30Z", "to": "2026-04-01T11:00Z"},  # no "intensity"
        {"from": "2026-04-01T11:00Z", "to": "2026-04-01T11:30Z", "intensity": "high"},
        row("11:30", index="high"),  # the index alone is not a number
        "junk",
    ]
    httpserver.expect_request(re.compile("^/intensity/")).respond_with_json({"data": rows})
    start, end = ts("2026-04-01T08:00:00"), ts("2026-04-01T12:00:00")
    series = provider(httpserver, tmp_path).series(GB, start, end)
    assert [(fmt(p.start), p.g_per_kwh) for p in series.points] == [
        ("2026-04-01T08:00Z", 170.0),
        ("2026-04-01T08:30Z", 190.0),
        ("2026-04-01T09:30Z", 210.0),
    ]
    assert series.estimated is True
    assert series.covered(start, end) == 3 * HALF_HOUR  # the rest is left to the next provider
    assert any("6 half-hours without a usable value" in note for note in series.notes)


def test_malformed_answers(httpserver: HTTPServer, tmp_path: Path) -> None:
    uk = provider(httpserver, tmp_path, cache_ttl_s=0)
    httpserver.expect_oneshot_request(re.compile("^/intensity/")).respond_with_json({"error": 1})
    httpserver.expect_oneshot_request(re.compile("^/intensity/")).respond_with_data(
        "<html>maintenance</html>", content_type="text/html"
    )
    httpserver.expect_oneshot_request(re.compile("^/intensity/")).respond_with_json({"data": []})
    for message in ("no data list", "malformed JSON", "no national data"):
        with pytest.raises(IntensityUnavailable, match=message):
            uk.series(GB, NOW - 3600, NOW)


def test_responses_are_cached_per_day_and_hour(api: FakeUkApi, tmp_path: Path) -> None:
    # a sweep: ten runs in the same hour, each with a fresh provider (as each run gets)
    for i in range(10):
        run = provider(api.server, tmp_path, now=NOW - 60 * i)
        run.series(GB, NOW - 3600 - 60 * i, NOW - 60 * i)
    assert len(api.server.log) == 1


class Constant(IntensityProvider):
    name = "constant"

    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        point = IntensityPoint(-math.inf, math.inf, 100.0)
        return IntensitySeries(
            (point,), "constant", "test", "GB", "average", "direct", False, "user value"
        )


def test_500_falls_back_to_the_next_provider(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request(re.compile("^/intensity/")).respond_with_data("oops", status=500)
    settings = settings_for(httpserver, tmp_path, location="GB")
    start = NOW - 7200
    uk = UkCarbonIntensityProvider(settings, clock=lambda: NOW)
    accountant = CarbonAccountant(settings, providers=[uk, Constant()])
    assert accountant.location.country == "GB"
    try:
        result = accountant.result([(start, 0.0), (start + 3600, 3.6e6)], wait_s=20)
    finally:
        accountant.close()
    assert result.kwh == pytest.approx(1.0)
    assert result.grams == pytest.approx(100.0)
    assert result.primary_source.startswith("constant/")
    assert "HTTP 500" in accountant.skipped["uk"]
    assert len(httpserver.log) == 4  # the first try and three retries with backoff


def test_failed_forecast_keeps_the_measured_part(httpserver: HTTPServer, tmp_path: Path) -> None:
    api = FakeUkApi(httpserver, serve=False)
    httpserver.expect_request(re.compile(r"^/intensity/.+/fw48h$")).respond_with_data(
        "gone", status=404
    )
    httpserver.expect_request(re.compile(r"^/intensity/")).respond_with_handler(api.national)
    series = provider(httpserver, tmp_path).series(GB, NOW - 3600, NOW + 3600)
    assert series.covered(NOW - 3600, NOW + 3600) == 3600
    assert series.estimated is False
    assert any(note.startswith("no forecast:") and "404" in note for note in series.notes)
