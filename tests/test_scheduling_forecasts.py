"""Planning on the providers' forecasts, served by real HTTP servers on 127.0.0.1 in each API's
documented shape (Electricity Maps ``/v3/carbon-intensity/forecast``, WattTime ``/v3/forecast``,
the UK ``/intensity/{from}/fw48h`` and its regional postcode form), and ``green-mlops plan``."""

from __future__ import annotations

import base64
import json
import math
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from green_mlops import cli, http
from green_mlops.config import Settings
from green_mlops.intensity import (
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)
from green_mlops.location import Location
from green_mlops.plugins import watttime
from green_mlops.plugins.electricitymaps import ElectricityMapsProvider
from green_mlops.plugins.uk_carbon_intensity import UkCarbonIntensityProvider
from green_mlops.plugins.watttime import LBS_PER_MWH_TO_G_PER_KWH, WattTimeProvider
from green_mlops.scheduling import Job, PlanError, plan
from green_mlops.scheduling.forecasts import fetch_forecast

H = 3600.0
NOW = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc).timestamp()
DE = Location(raw="DE", zone="DE", country="DE")
GB = Location(raw="GB", zone="GB", country="GB")
PACW = Location(raw="US-NW-PACW", zone="US-NW-PACW", country="US")
TOKEN = "em-token-3f9a"
PRODUCTION_RETRY = http._retry


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(
        http, "_retry", lambda total: PRODUCTION_RETRY(total).new(backoff_factor=0.01)
    )
    watttime._TOKENS.clear()
    yield
    watttime._TOKENS.clear()


def iso(t: float, fmt: str = "%Y-%m-%dT%H:%M:%S.000Z") -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime(fmt)


def settings(tmp_path: Path, **values: Any) -> Settings:
    values = {"cache_dir": tmp_path / "cache", "http_timeout_s": 2.0, **values}
    return Settings.load(environ={}, **values)


def serve_electricitymaps(server: HTTPServer, first: float, values: Sequence[float]) -> None:
    """The documented ``/forecast`` answer: hourly items ``{carbonIntensity, datetime}``."""
    body = {
        "zone": "DE",
        "forecast": [
            {"carbonIntensity": v, "datetime": iso(first + i * H)} for i, v in enumerate(values)
        ],
        "updatedAt": iso(first),
    }
    server.expect_request(
        "/v3/carbon-intensity/forecast",
        query_string={"zone": "DE", "shouldUseFallbackCallerLookup": "false"},
        headers={"auth-token": TOKEN},
    ).respond_with_json(body)


def electricitymaps(server: HTTPServer | str, tmp_path: Path, **extra: Any) -> Settings:
    url = server if isinstance(server, str) else server.url_for("/")
    return settings(tmp_path, electricitymaps_token=TOKEN, electricitymaps_url=url, **extra)


def test_electricitymaps_forecast_gives_the_exact_window(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    serve_electricitymaps(httpserver, NOW, [300, 250, 100, 120, 400, 300])
    s = electricitymaps(httpserver, tmp_path)
    got = fetch_forecast(
        s, DE, NOW, NOW + 6 * H, providers=[ElectricityMapsProvider(s, clock=lambda: NOW)]
    )
    assert got.series.source == "electricitymaps" and got.series.basis == "average"
    p = plan(got.forecast, Job(2 * H, energy_kwh=4.0), earliest=NOW, finish_by=NOW + 6 * H)
    assert p.decision == "wait"
    assert p.chosen.slots == ((NOW + 2 * H, NOW + 4 * H),)
    assert p.chosen.carbon_g == pytest.approx(4.0 * 110)
    assert p.now.carbon_g == pytest.approx(4.0 * 275)


def test_watttime_forecast_is_marginal(httpserver: HTTPServer, tmp_path: Path) -> None:
    user, password = "bo@example.org", "never-shown-9"
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    httpserver.expect_request("/login", headers={"Authorization": basic}).respond_with_json(
        {"token": "wt-token-1"}
    )
    # 5-minute MOER in lbs/MWh: 1000, except 500 from 01:00 to 02:30 after now
    data = [
        {"point_time": iso(NOW + i * 300, "%Y-%m-%dT%H:%M:%S+00:00"),
         "value": 500.0 if 12 <= i < 30 else 1000.0}
        for i in range(72 * 12)
    ]  # fmt: skip
    meta = {"region": "PACW", "signal_type": "co2_moer", "units": "lbs_co2_per_mwh",
            "data_point_period_seconds": 300, "model": {"date": "2026-10-01"}}  # fmt: skip
    httpserver.expect_request(
        "/v3/forecast", headers={"Authorization": "Bearer wt-token-1"}
    ).respond_with_json({"data": data, "meta": meta})
    s = settings(
        tmp_path,
        watttime_url=httpserver.url_for("/").rstrip("/"),
        watttime_username=user,
        watttime_password=password,
    )
    got = fetch_forecast(
        s, PACW, NOW, NOW + 6 * H, providers=[WattTimeProvider(s, clock=lambda: NOW)]
    )
    assert got.series.basis == "marginal"
    p = plan(got.forecast, Job(H), earliest=NOW, finish_by=NOW + 6 * H)
    assert p.chosen.slots == ((NOW + H, NOW + 2 * H),)
    assert p.chosen.mean_g_per_kwh == pytest.approx(500 * LBS_PER_MWH_TO_G_PER_KWH)


def uk_rows(first: float, values: Sequence[float]) -> list[dict[str, Any]]:
    return [
        {
            "from": iso(first + i * 1800, "%Y-%m-%dT%H:%MZ"),
            "to": iso(first + (i + 1) * 1800, "%Y-%m-%dT%H:%MZ"),
            "intensity": {"forecast": v, "actual": None, "index": "moderate"},
        }
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize("postcode", [None, "RG10"])
def test_uk_fw48h_national_and_regional(
    httpserver: HTTPServer, tmp_path: Path, postcode: str | None
) -> None:
    values = [200.0] * 96
    values[6:9] = [50.0, 40.0, 60.0]  # 03:00-04:30 after now
    origin = iso(NOW, "%Y-%m-%dT%H:%MZ")
    if postcode is None:
        httpserver.expect_request(f"/intensity/{origin}/fw48h").respond_with_json(
            {"data": uk_rows(NOW, values)}
        )
    else:
        body = {"data": {"regionid": 12, "shortname": "South England", "postcode": postcode,
                         "data": uk_rows(NOW, values)}}  # fmt: skip
        httpserver.expect_request(
            f"/regional/intensity/{origin}/fw48h/postcode/{postcode}"
        ).respond_with_json(body)
    s = settings(tmp_path, uk_url=httpserver.url_for("/").rstrip("/"), uk_postcode=postcode)
    got = fetch_forecast(
        s, GB, NOW, NOW + 8 * H, providers=[UkCarbonIntensityProvider(s, clock=lambda: NOW)]
    )
    assert ("South England" in got.series.zone) == (postcode is not None)
    p = plan(got.forecast, Job(1.5 * H), earliest=NOW, finish_by=NOW + 8 * H)
    assert p.chosen.slots == ((NOW + 3 * H, NOW + 4.5 * H),)
    assert p.chosen.mean_g_per_kwh == pytest.approx(50.0)


def test_a_provider_timing_out_hands_over_to_the_next_or_planning_is_refused(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        dead = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        s = electricitymaps(dead, tmp_path, http_timeout_s=0.3)
        alive = settings(tmp_path, uk_url=httpserver.url_for("/").rstrip("/"))
        httpserver.expect_request(
            f"/intensity/{iso(NOW, '%Y-%m-%dT%H:%MZ')}/fw48h"
        ).respond_with_json({"data": uk_rows(NOW, [100.0] * 96)})
        chain = [
            ElectricityMapsProvider(s, clock=lambda: NOW),
            UkCarbonIntensityProvider(alive, clock=lambda: NOW),
        ]
        got = fetch_forecast(s, GB, NOW, NOW + 4 * H, providers=chain)
        assert got.series.source == "uk"
        assert len(got.skipped) == 1 and "cannot reach" in got.skipped[0]
        assert "electricitymaps" in got.skipped[0]
        with pytest.raises(PlanError, match=r"electricitymaps: .*cannot reach.*Not planning"):
            fetch_forecast(s, GB, NOW, NOW + 4 * H, providers=chain[:1])
    finally:
        silent.close()


def test_static_and_constant_intensities_are_never_a_forecast(tmp_path: Path) -> None:
    s = settings(tmp_path, intensity_providers=("constant", "static"), intensity_g_per_kwh=300.0)
    with pytest.raises(PlanError) as refused:
        fetch_forecast(s, DE, NOW, NOW + 4 * H)
    text = str(refused.value)
    assert "no forecast for" in text and "does not vary" in text
    assert "constant: no forecast" in text and "static: no forecast" in text


class ThirdParty(IntensityProvider):
    """A plugin's provider that adds a forecast through the optional method."""

    name = "acme"

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail

    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        raise IntensityUnavailable("acme: history not offered")

    def forecast(self, location: Location, start: float, end: float) -> IntensitySeries:
        if self.fail is not None:
            raise self.fail
        points = tuple(IntensityPoint(start + i * H, start + (i + 1) * H, v)
                       for i, v in enumerate([90.0, 30.0, 90.0, 90.0]))  # fmt: skip
        return IntensitySeries(points, "acme", "grid-v1", location.zone or "", "average",
                               "lifecycle", True, "test")  # fmt: skip


def test_a_third_party_forecast_and_a_broken_one(tmp_path: Path) -> None:
    s = settings(tmp_path)
    chain = [ThirdParty(RuntimeError("boom")), ThirdParty()]
    got = fetch_forecast(s, DE, NOW, NOW + 4 * H, providers=chain)
    assert got.series.source == "acme"
    assert got.skipped == ("acme: failed (RuntimeError: boom)",)
    p = plan(got.forecast, Job(H), earliest=NOW, finish_by=NOW + 4 * H)
    assert p.chosen.slots == ((NOW + H, NOW + 2 * H),)


# --- green-mlops plan ----------------------------------------------------------------------


@pytest.fixture
def plan_env(httpserver: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """Electricity Maps on loopback for the real "now" (the CLI uses the wall clock)."""
    hour = math.floor(time.time() / H) * H
    serve_electricitymaps(httpserver, hour, [300, 300, 300, 100, 100, 120, 400, 400] + [350] * 40)
    for key, value in {
        "GREEN_MLOPS_ELECTRICITYMAPS_TOKEN": TOKEN,
        "GREEN_MLOPS_ELECTRICITYMAPS_URL": httpserver.url_for("/"),
        "GREEN_MLOPS_INTENSITY_PROVIDERS": "electricitymaps,static",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(key, value)
    return hour


def test_plan_json_has_the_carbon_aware_sdk_shape(
    plan_env: float, capsys: pytest.CaptureFixture[str]
) -> None:
    hour = plan_env
    finish = iso(hour + 10 * H, "%Y-%m-%dT%H:%MZ")
    argv = ["plan", "--duration", "2h", "--finish-by", finish, "--location", "DE",
            "--energy-kwh", "12", "--format", "json"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 1
    doc = out[0]
    assert {"location", "dataStartAt", "dataEndAt", "windowSize", "optimalDataPoints",
            "forecastData", "generatedAt", "requestedAt"} <= set(doc)  # fmt: skip
    assert doc["location"] == "DE" and doc["windowSize"] == 120
    assert doc["dataEndAt"] == iso(hour + 10 * H, "%Y-%m-%dT%H:%M:%SZ")
    (best,) = doc["optimalDataPoints"]
    assert best == {"location": "DE", "timestamp": iso(hour + 3 * H, "%Y-%m-%dT%H:%M:%SZ"),
                    "duration": 120, "value": 100}  # fmt: skip
    assert all(p["duration"] == 60 and p["location"] == "DE" for p in doc["forecastData"])
    assert [p["value"] for p in doc["forecastData"][:4]] == [300, 300, 300, 100]
    extra = doc["greenMlops"]
    assert extra["decision"] == "wait" and extra["chosen"]["co2eG"] == pytest.approx(1200)
    assert extra["runNow"]["co2eG"] > extra["chosen"]["co2eG"]
    assert extra["savingG"] == pytest.approx(extra["runNow"]["co2eG"] - 1200, abs=1e-3)


def test_plan_table_and_its_refusals(
    plan_env: float, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["plan", "--duration", "3h", "--finish-by", "+9h", "--location", "DE",
            "--interruptible", "--resume-overhead", "5m"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "decision: wait" in out and "electricitymaps" in out
    # the figures are the forecast's, and say so (not a measurement)
    assert "forecast mean intensity" in out and "expected carbon" in out
    too_long = ["plan", "--duration", "60h", "--finish-by", "+70h", "--location", "DE"]
    assert cli.main(too_long) == 2
    assert "longer than the forecast horizon" in capsys.readouterr().out
    monkeypatch.setenv("GREEN_MLOPS_INTENSITY_PROVIDERS", "static")
    assert cli.main(["plan", "--duration", "1h", "--start-by", "+2h", "--location", "DE"]) == 2
    assert "static: no forecast" in capsys.readouterr().out
    assert cli.main(["plan", "--duration", "soon", "--start-by", "+2h"]) == 2
    assert "duration 'soon'" in capsys.readouterr().out


PAST = "2020-01-01T00:00Z"


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--duration", "6x", "--finish-by", "+8h"], "--duration '6x': expected e.g. 6h, 90m"),
        (["--duration", "0h", "--finish-by", "+8h"], "--duration '0h': expected a duration > 0"),
        (["--duration", "1h", "--finish-by", PAST], f"--finish-by '{PAST}': in the past"),
        (["--duration", "1h", "--start-by", PAST], f"--start-by '{PAST}': in the past"),
        (["--duration", "1h", "--finish-by", "soon"], "--finish-by 'soon': expected ISO 8601"),
        (["--duration", "1h", "--finish-by", "+8h", "--min-saving", "50"], "--min-saving '50'"),
        (["--duration", "1h", "--finish-by", "+8h", "--min-saving", "100%"], "--min-saving '100%'"),
        (["--duration", "1h", "--finish-by", "+8h", "--interruptible", "--resume-overhead", "5q"],
         "--resume-overhead '5q': expected e.g."),
    ],
)  # fmt: skip
def test_bad_plan_options_fail_early_naming_the_option(
    extra: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GREEN_MLOPS_INTENSITY_PROVIDERS", "static")  # no forecast: never asked
    assert cli.main(["plan", *extra, "--location", "DE"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert said in out, out
    assert "no forecast" not in out and "does not vary" not in out, out
