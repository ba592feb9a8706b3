"""Time-resolved carbon accounting (`green_mlops.carbon.account`).

Hand-computed cases, chains with gaps (the next series prices the rest), zero-length
intervals, unpriced energy, and the property that makes per-phase and per-epoch reporting
consistent: the carbon of a run split in two at any instant equals the sum of the parts.
Performance is measured by benchmarks/carbon_accounting.py, not asserted here.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from green_mlops import GreenMlopsWarning
from green_mlops import log as log_module
from green_mlops.carbon import SKIPPED_DEFAULT, CarbonResult, account
from green_mlops.intensity import FOREVER, IntensityPoint, IntensitySeries, sorted_points

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
KWH = 3.6e6


def series(
    points: list[tuple[float, float, float]], source: str = "api", *, basis: str = "average"
) -> IntensitySeries:
    """A series from (start offset s, end offset s, gCO2e/kWh) relative to T0."""
    return IntensitySeries(
        points=sorted_points([IntensityPoint(T0 + a, T0 + b, g) for a, b, g in points]),
        source=source,
        dataset="test",
        zone="DE",
        basis=basis,
        scope="lifecycle",
        estimated=False,
        vintage="2026",
    )


def yearly(g: float) -> IntensitySeries:
    return IntensitySeries(
        points=(IntensityPoint(FOREVER[0], FOREVER[1], g),),
        source="static",
        dataset="ember-yearly",
        zone="DE",
        basis="average",
        scope="lifecycle",
        estimated=False,
        vintage="2024",
    )


def timeline(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(offset s from T0, cumulative joules)."""
    return [(T0 + t, j) for t, j in points]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# --- exact, hand-computed -----------------------------------------------------------------


def test_constant_power_and_intensity() -> None:
    # 1000 W for one hour = 1 kWh; at 400 g/kWh = 400 g.
    grid = series([(0, 3600, 400.0)])
    result = account(timeline([(0, 0), (3600, 3.6e6)]), [grid])
    assert close(result.grams, 400.0)
    assert close(result.kwh, 1.0)
    assert result.kwh_by_source == {grid.describe(): pytest.approx(1.0, rel=1e-12)}
    assert result.unpriced_kwh == 0.0
    assert close(result.mean_g_per_kwh, 400.0)
    assert result.primary_source == grid.describe()


def test_intervals_straddle_intensity_boundaries() -> None:
    # Intensity 200 for the first half hour, 600 for the second. Timeline points at 0, 1200 s
    # and 3600 s with 1000 W, then 2000 W:
    #   [0, 1200)     1000 W: 1/3 kWh at 200                       = 66.666... g
    #   [1200, 1800)  2000 W: 1/3 kWh at 200                       = 66.666... g
    #   [1800, 3600)  2000 W: 1 kWh at 600                         = 600 g
    grid = series([(0, 1800, 200.0), (1800, 3600, 600.0)])
    result = account(timeline([(0, 0), (1200, 1.2e6), (3600, 1.2e6 + 4.8e6)]), [grid])
    assert close(result.kwh, 1 / 3 + 4 / 3)
    assert close(result.grams, 200 / 3 + 200 / 3 + 600)
    assert close(result.mean_g_per_kwh, (200 / 3 + 200 / 3 + 600) / (5 / 3))


def test_power_is_constant_between_timeline_points() -> None:
    # One interval of 2 h with 2 kWh crossing four 30-min points: 0.5 kWh each.
    grid = series([(1800 * k, 1800 * (k + 1), g) for k, g in enumerate([100, 200, 300, 400])])
    result = account(timeline([(0, 0), (7200, 2 * KWH)]), [grid])
    assert close(result.grams, 0.5 * (100 + 200 + 300 + 400))


def test_energy_that_goes_down_is_not_counted() -> None:
    # A cumulative total that falls (a counter the engine reset) adds nothing, never negative.
    grid = series([(0, 300, 500.0)])
    result = account(timeline([(0, 0), (100, KWH), (200, 0.5 * KWH), (300, 1.5 * KWH)]), [grid])
    assert close(result.kwh, 2.0)
    assert close(result.grams, 1000.0)


# --- chains: the next series prices what the first does not cover -------------------------


def test_forecast_shorter_than_the_run_falls_back_to_the_next_series() -> None:
    forecast = series([(300 * k, 300 * (k + 1), 100.0) for k in range(6)], "forecast")  # 30 min
    table = yearly(500.0)
    result = account(timeline([(0, 0), (1800, 0.5 * KWH), (3600, KWH)]), [forecast, table])
    assert close(result.grams, 0.5 * 100 + 0.5 * 500)
    assert result.kwh_by_source == {
        forecast.describe(): pytest.approx(0.5, rel=1e-12),
        table.describe(): pytest.approx(0.5, rel=1e-12),
    }
    assert close(sum(result.kwh_by_source.values()), result.kwh)
    assert result.unpriced_kwh == 0.0


def test_holes_inside_a_series_are_filled_in_place() -> None:
    # The API has [0, 600) and [1200, 1800); the hole [600, 1200) and the tail take 300 g/kWh.
    api = series([(0, 600, 50.0), (1200, 1800, 150.0)])
    table = yearly(300.0)
    result = account(timeline([(0, 0), (2400, 2400 * 1000.0)]), [api, table])  # 1000 W
    kwh_per_600s = 600 * 1000.0 / KWH
    assert close(result.grams, kwh_per_600s * (50 + 300 + 150 + 300))
    assert close(result.kwh_by_source[api.describe()], 2 * kwh_per_600s)
    assert close(result.kwh_by_source[table.describe()], 2 * kwh_per_600s)
    assert close(sum(result.kwh_by_source.values()), result.kwh)


def test_first_covering_series_wins_even_when_a_later_one_also_covers() -> None:
    first = series([(0, 3600, 10.0)], "first")
    second = series([(0, 3600, 999.0)], "second")
    result = account(timeline([(0, 0), (3600, KWH)]), [first, second])
    assert close(result.grams, 10.0)
    assert list(result.kwh_by_source) == [first.describe()]  # sources that priced nothing: absent


def test_three_series_each_price_their_part() -> None:
    a = series([(0, 1200, 100.0)], "a")
    b = series([(0, 2400, 200.0)], "b")  # only [1200, 2400) is left for it
    c = yearly(300.0)
    result = account(timeline([(0, 0), (3600, 3 * KWH)]), [a, b, c])  # 1 kWh per 20 min
    assert close(result.grams, 100 + 200 + 300)
    assert [round(v, 12) for v in result.kwh_by_source.values()] == [1.0, 1.0, 1.0]


# --- zero-length intervals ------------------------------------------------------------------


def test_energy_at_an_instant_is_priced_at_that_instant() -> None:
    # Two timeline points at the same time with energy between them (a final flush).
    grid = series([(0, 10, 100.0), (10, 20, 700.0)])
    result = account(timeline([(10, 0), (10, KWH)]), [grid])  # intervals are [start, end)
    assert close(result.kwh, 1.0)
    assert math.isclose(result.grams, 700.0, rel_tol=1e-9)
    assert result.unpriced_kwh == 0.0


def test_zero_length_interval_without_energy_adds_nothing() -> None:
    grid = series([(0, 100, 100.0)])
    result = account(timeline([(0, 0), (50, 0.5 * KWH), (50, 0.5 * KWH), (100, KWH)]), [grid])
    assert close(result.grams, 100.0)
    assert close(result.kwh, 1.0)


def test_empty_and_single_point_timelines() -> None:
    grid = yearly(300.0)
    for points in ([], [(0.0, 5.0)]):
        result = account(timeline(points), [grid])
        assert (result.grams, result.kwh, result.unpriced_kwh) == (0.0, 0.0, 0.0)
        assert result.kwh_by_source == {}
        assert math.isnan(result.mean_g_per_kwh)


# --- unpriced energy -------------------------------------------------------------------------


def test_no_series_leaves_all_energy_unpriced() -> None:
    result = account(timeline([(0, 0), (3600, 2 * KWH)]), [])
    assert result.grams == 0.0
    assert close(result.kwh, 2.0)
    assert close(result.unpriced_kwh, 2.0)
    assert math.isnan(result.mean_g_per_kwh)  # never a 0 g/kWh that looks like clean power
    assert result.primary_source == "none"


def test_partly_covered_run_reports_the_uncovered_energy() -> None:
    api = series([(0, 1800, 400.0)])
    result = account(timeline([(0, 0), (3600, KWH)]), [api])
    assert close(result.grams, 200.0)
    assert close(result.unpriced_kwh, 0.5)
    assert close(result.mean_g_per_kwh, 400.0)  # mean over the priced energy only
    assert close(sum(result.kwh_by_source.values()) + result.unpriced_kwh, result.kwh)


def test_carbon_result_properties() -> None:
    r = CarbonResult(grams=300.0, kwh=2.0, kwh_by_source={"a": 0.5, "b": 1.0}, unpriced_kwh=0.5)
    assert r.mean_g_per_kwh == 200.0
    assert r.primary_source == "b"


# --- the split property ----------------------------------------------------------------------


def split(
    points: list[tuple[float, float]], at: float
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Cut a timeline at ``at`` (power constant between points, as account() assumes)."""
    times = [t for t, _ in points]
    i = bisect.bisect_right(times, at) - 1
    if i == len(points) - 1:
        return points, [points[-1]]
    (ta, ea), (tb, eb) = points[i], points[i + 1]
    e_at = ea + (eb - ea) * (at - ta) / (tb - ta)
    before = [*points[: i + 1], (at, e_at)] if at > ta else points[: i + 1]
    after = [(at, e_at), *points[i + 1 :]]
    return before, after


steps = st.lists(
    st.tuples(
        st.floats(0.01, 3600.0, allow_nan=False),  # seconds to the next point
        st.floats(0.0, 1e7, allow_nan=False),  # joules in that interval
    ),
    min_size=1,
    max_size=25,
)
raw_series = st.lists(
    st.tuples(
        st.floats(-2000.0, 60_000.0, allow_nan=False),  # start offset
        st.floats(1.0, 7200.0, allow_nan=False),  # length
        st.floats(0.0, 1500.0, allow_nan=False),  # g/kWh
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=steps,
    chain_specs=st.lists(raw_series, max_size=3),
    with_table=st.booleans(),
    cut=st.floats(0.0, 1.0, allow_nan=False),
)
def test_split_at_any_instant_adds_up(
    steps: list[tuple[float, float]],
    chain_specs: list[list[tuple[float, float, float]]],
    with_table: bool,
    cut: float,
) -> None:
    points = [(T0, 0.0)]
    for dt, joules in steps:
        t, e = points[-1]
        points.append((t + dt, e + joules))
    chain = [
        series([(a, a + n, g) for a, n, g in spec], f"s{k}") for k, spec in enumerate(chain_specs)
    ]
    if with_table:
        chain.append(yearly(321.0))
    at = points[0][0] + cut * (points[-1][0] - points[0][0])

    whole = account(points, chain)
    before, after = split(points, at)
    first, second = account(before, chain), account(after, chain)

    def same(x: float, y: float) -> bool:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)

    assert same(first.grams + second.grams, whole.grams)
    assert same(first.kwh + second.kwh, whole.kwh)
    assert same(first.unpriced_kwh + second.unpriced_kwh, whole.unpriced_kwh)
    for key in set(whole.kwh_by_source) | set(first.kwh_by_source) | set(second.kwh_by_source):
        parts = first.kwh_by_source.get(key, 0.0) + second.kwh_by_source.get(key, 0.0)
        assert same(parts, whole.kwh_by_source.get(key, 0.0))
    # And the energy is fully accounted for: priced by some source, or reported unpriced.
    assert same(sum(whole.kwh_by_source.values()) + whole.unpriced_kwh, whole.kwh)
    if with_table:
        assert whole.unpriced_kwh == 0.0


# --- the accountant: background fetches, live vs final results ------------------------------


def test_final_result_fetches_the_whole_run_and_clears_stale_fetch_notes(tmp_path: object) -> None:
    import threading
    import time

    from green_mlops.carbon import CarbonAccountant
    from green_mlops.config import Settings
    from green_mlops.intensity import IntensityProvider
    from green_mlops.location import Location

    class Recording(IntensityProvider):
        name = "recording"

        def __init__(self) -> None:
            self.ranges: list[tuple[float, float]] = []
            self.gate = threading.Event()

        def series(self, location: Location, start: float, end: float) -> IntensitySeries:
            self.gate.wait(5)  # the first fetch is slow: still running when results are asked
            self.ranges.append((start, end))
            return IntensitySeries(
                (IntensityPoint(start, end, 100.0),),
                "recording",
                "test",
                "DE",
                "average",
                "lifecycle",
                False,
                "now",
            )

    provider = Recording()
    accountant = CarbonAccountant(Settings.load(environ={}, location="DE"), providers=[provider])
    t0 = time.time()
    accountant.refresh(t0, t0 + 1)  # like the prefetch at start
    live = accountant.result([(t0, 0.0), (t0 + 10, 3.6e6)], wait_s=0)  # does not wait
    assert live.unpriced_kwh == pytest.approx(1.0)  # nothing fetched yet: said, not guessed
    provider.gate.set()
    final = accountant.result([(t0, 0.0), (t0 + 10, 3.6e6)], wait_s=5)
    assert provider.ranges[-1] == (t0, t0 + 10)  # the final fetch covered the whole run
    assert final.grams == pytest.approx(100.0) and final.unpriced_kwh == 0
    assert "fetch" not in accountant.skipped
    accountant.close()


# --- a provider that cannot answer and no fallback: carbon absent, never 0 ----------------------


def test_run_that_no_provider_could_price_has_no_carbon_metric(
    httpserver: object, tmp_path: object
) -> None:
    import re
    import time
    from pathlib import Path

    from pytest_httpserver import HTTPServer

    from green_mlops.config import Settings
    from green_mlops.session import Measurement
    from tests.conftest import ClockMeter

    assert isinstance(httpserver, HTTPServer) and isinstance(tmp_path, Path)
    httpserver.expect_request(re.compile(".*")).respond_with_data("no", status=401)
    settings = Settings.load(
        environ={},
        location="DE",
        intensity_providers="electricitymaps",  # no yearly fallback
        electricitymaps_token="token",
        electricitymaps_url=httpserver.url_for("/"),
        cache_dir=tmp_path / "cache",
    )
    measurement = Measurement(settings, meters=[ClockMeter(100.0)]).start()
    live = measurement.result()
    with measurement.phase("train"):
        time.sleep(0.2)
    result = measurement.stop()
    for res in (live, result):
        assert not any("co2e" in key for key in res.metrics), res.metrics
    assert result.metrics["green/energy_kwh"] > 0
    assert "green/intensity_g_per_kwh" not in result.metrics
    reasons = result.tags["green.not_reported"]
    assert "co2e:" in reasons and "not priced" in reasons
    assert "HTTP 401" in result.tags["green.intensity.fallbacks"]
    assert "not computed" in result.sentence


@pytest.mark.parametrize(
    ("name", "location", "extra"),
    [
        ("electricitymaps", "DE", {"electricitymaps_token": "token"}),
        (
            "watttime",
            "DE",
            {"watttime_username": "u", "watttime_password": "p", "watttime_region": "DE"},
        ),
        ("uk", "GB", {}),
    ],
)
def test_closing_the_accountant_closes_the_providers_connections(
    tmp_path: object, name: str, location: str, extra: dict[str, str]
) -> None:
    import http.server
    import threading
    import time
    from pathlib import Path

    import psutil

    from green_mlops.carbon import CarbonAccountant
    from green_mlops.config import Settings

    assert isinstance(tmp_path, Path)

    class KeepAlive(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections stay open until the client closes them

        def do_GET(self) -> None:
            body = b'{"zone": "DE", "data": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def open_connections() -> int:
        return sum(
            1
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        )

    try:
        settings = Settings.load(
            environ={},
            location=location,
            intensity_providers=f"{name},static",
            **{
                f"{prefix}_url": f"http://127.0.0.1:{port}"
                for prefix in ("electricitymaps", "watttime", "uk")
            },
            **extra,
            cache_dir=tmp_path / "cache",
        )
        accountant = CarbonAccountant(settings)
        t0 = time.time()
        result = accountant.result([(t0 - 7200, 0.0), (t0, 3.6e6)], wait_s=10)
        assert result.unpriced_kwh == 0  # static priced what the API did not
        assert open_connections() >= 1  # the provider's session keeps its connection alive
        accountant.close()
        assert open_connections() == 0
    finally:
        server.shutdown()
        server.server_close()


# --- problems the user must fix: GreenMlopsWarning -------------------------------------------


def test_unknown_location_warns_the_user_how_to_set_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from green_mlops.carbon import CarbonAccountant
    from green_mlops.config import Settings

    monkeypatch.setattr(log_module, "_warned", set())
    settings = Settings.load(environ={}, cache_dir=tmp_path)
    with pytest.warns(GreenMlopsWarning, match="WORLD AVERAGE.*Set GREEN_MLOPS_LOCATION to a"):
        CarbonAccountant(settings, providers=[]).close()


PROVIDER_OF_A_BROKEN_PLUGIN = textwrap.dedent(
    """
    import json, warnings
    from green_mlops.carbon import CarbonAccountant
    from green_mlops.config import Settings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = Settings.load(location="DE", intensity_providers="mine,static")
        accountant = CarbonAccountant(settings)
        accountant.close()
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "skipped": accountant.skipped,
    }))
    """
)


def test_a_named_provider_whose_plugin_failed_to_load_warns_the_user(tmp_path: Path) -> None:
    # GREEN_MLOPS_INTENSITY_PROVIDERS names the provider of a plugin that fails to import: the
    # settings load (the plugin may have offered it), the run says why in its provenance, and
    # the user gets a GreenMlopsWarning naming the setting.
    (tmp_path / "broken_provider.py").write_text("raise ImportError('oops')\n")
    info = tmp_path / "broken_provider-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-provider\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[green_mlops]\nmine = broken_provider\n")
    (info / "RECORD").write_text("")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROVIDER_OF_A_BROKEN_PLUGIN],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"]["mine"].startswith("not offered by any loaded plugin")
    assert "failed to load" in out["skipped"]["plugin mine"]
    ours = [m for category, m in out["warnings"] if category == "GreenMlopsWarning"]
    assert ours == [
        "green-mlops: intensity provider 'mine' is not offered by any loaded plugin "
        "(GREEN_MLOPS_INTENSITY_PROVIDERS); available: constant, electricitymaps, static, uk, "
        "watttime"
    ]


def test_an_unconfigured_provider_of_the_default_list_is_not_a_fallback(tmp_path: Path) -> None:
    # a new user with no token: `compare` marked every run "fallback intensity"
    import time

    from green_mlops.compare import _row
    from green_mlops.config import Settings
    from green_mlops.runs import RunRecord
    from green_mlops.session import Measurement
    from tests.conftest import ClockMeter

    tags = {}
    for providers in (None, "electricitymaps,static"):
        chosen = {} if providers is None else {"intensity_providers": providers}
        s = Settings.load(environ={}, location="DE", cache_dir=tmp_path / "cache", **chosen)
        measurement = Measurement(s, meters=[ClockMeter(100.0)]).start()
        time.sleep(0.1)
        tags[providers] = measurement.stop().tags["green.intensity.fallbacks"]
    assert "electricitymaps: no token" in tags[None] and SKIPPED_DEFAULT in tags[None]
    assert "electricitymaps: no token" in tags["electricitymaps,static"]  # chosen: a fallback
    assert SKIPPED_DEFAULT not in tags["electricitymaps,static"]
    rows = {
        p: _row(
            RunRecord(
                str(p), str(p), "e", "FINISHED", None, None, tags={"green.intensity.fallbacks": tag}
            ),
            None,
            "max",
            None,
        )
        for p, tag in tags.items()
    }
    assert rows[None].intensity_fallback is None and "fallback intensity" not in rows[None].marks
    assert "electricitymaps: no token" in (rows["electricitymaps,static"].intensity_fallback or "")
