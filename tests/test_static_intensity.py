"""Offline providers: the bundled yearly tables (``static``) and the user's constant."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from green_mlops.carbon import SKIPPED_DEFAULT, CarbonAccountant, account
from green_mlops.config import Settings
from green_mlops.intensity import IntensityUnavailable
from green_mlops.location import UNKNOWN, Location, bundled_json, parse_location
from green_mlops.plugins import constant_intensity, static_intensity
from green_mlops.plugins.constant_intensity import ConstantIntensityProvider
from green_mlops.plugins.static_intensity import StaticIntensityProvider

DATA = Path(__file__).resolve().parents[1] / "green_mlops" / "data"
T0 = 1_700_000_000.0

#: Reference values of /work/shared/data/README.md (Ember, gCO2e/kWh).
EMBER_REFERENCE = {
    "World": 472.94,
    "DEU": 342.06,
    "FRA": 44.18,
    "GBR": 215.79,
    "USA": 383.55,
    "CHN": 557.5,
    "IND": 708.96,
    "SWE": 35.89,
    "POL": 614.98,
}


def _country_only(alpha3: str) -> Location:
    """A country without a zone (as a caller that knows only the country would build it)."""
    loc = parse_location(alpha3)
    return Location(raw=alpha3, country=loc.country, country_alpha3=loc.country_alpha3)


def _em_table() -> dict[str, dict[str, dict[str, object]]]:
    table: dict[str, dict[str, dict[str, object]]] = json.loads(
        (DATA / "electricitymaps-yearly-2025.json").read_text("utf-8")
    )
    return table


@pytest.mark.parametrize(("alpha3", "value"), sorted(EMBER_REFERENCE.items()))
def test_ember_reference_values(alpha3: str, value: float) -> None:
    location = UNKNOWN if alpha3 == "World" else _country_only(alpha3)
    series = StaticIntensityProvider().series(location, T0, T0 + 3600)
    assert series.points[0].g_per_kwh == value
    assert series.dataset == "ember-yearly" and series.zone == alpha3


def test_every_electricity_maps_zone_gives_its_yearly_value() -> None:
    provider = StaticIntensityProvider()
    table = _em_table()
    assert len(table) > 300
    for zone, entry in table.items():
        series = provider.series(Location(raw=zone, zone=zone), T0, T0 + 1)
        assert series.points[0].g_per_kwh == entry["carbonIntensity"]["value"], zone
        assert (series.dataset, series.zone) == ("electricitymaps-yearly-2025", zone)


@pytest.mark.parametrize(
    ("text", "dataset", "zone", "value"),
    [
        ("DE", "electricitymaps-yearly-2025", "DE", 342.0),
        ("deu", "electricitymaps-yearly-2025", "DE", 342.0),
        ("FR", "electricitymaps-yearly-2025", "FR", 31.0),
        ("aws:eu-west-1", "electricitymaps-yearly-2025", "IE", 301.0),
        ("gcp:europe-west4", "electricitymaps-yearly-2025", "NL", 253.0),
        ("US-CAL-CISO", "electricitymaps-yearly-2025", "US-CAL-CISO", 208.0),
        ("US", "ember-yearly", "USA", 383.55),  # no single zone: Ember national figure
        ("SE", "ember-yearly", "SWE", 35.89),
        ("AD", "ember-yearly", "World", 472.94),  # in neither table: world, noted
    ],
)
def test_parsed_locations_pick_the_right_table(
    text: str, dataset: str, zone: str, value: float
) -> None:
    series = StaticIntensityProvider().series(parse_location(text), T0, T0 + 60)
    assert (series.dataset, series.zone, series.points[0].g_per_kwh) == (dataset, zone, value)


def test_provenance_of_electricity_maps_figures() -> None:
    series = StaticIntensityProvider().series(parse_location("DE"), T0, T0 + 60)
    assert series.source == "static"
    assert series.basis == "average" and series.scope == "lifecycle"
    assert series.estimated is False and series.vintage == "2025"
    assert "Electricity Maps" in series.attribution and "CO2.js" in series.attribution
    assert "consumption-based (flow-traced)" in series.notes
    (point,) = series.points
    assert point.start == -math.inf and point.end == math.inf
    assert series.covered(T0, T0 + 86400) == 86400


def test_provenance_of_ember_figures_carries_their_year() -> None:
    table = json.loads((DATA / "ember-yearly-average-intensity.json").read_text("utf-8"))
    series = StaticIntensityProvider().series(parse_location("USA"), T0, T0 + 60)
    assert series.source == "static" and series.dataset == "ember-yearly"
    assert series.basis == "average" and series.scope == "lifecycle"
    assert series.vintage == str(table["USA"]["year"]) == "2024"
    assert series.attribution.startswith("Ember (ember-energy.org)")
    assert "generation-based" in series.notes and not series.estimated
    assert series.points[0].start == -math.inf and series.points[0].end == math.inf


def test_unknown_location_gets_the_world_average_with_a_note() -> None:
    series = StaticIntensityProvider().series(UNKNOWN, T0, T0 + 60)
    assert series.zone == "World" and series.points[0].g_per_kwh == 472.94
    assert series.notes[0] == "location unknown: world average"
    andorra = StaticIntensityProvider().series(parse_location("AND"), T0, T0 + 60)
    assert andorra.zone == "World" and "no yearly figure for AND" in andorra.notes[0]


def test_account_with_a_static_series_is_kwh_times_the_value() -> None:
    series = StaticIntensityProvider().series(parse_location("DE"), T0, T0 + 7200)
    # 2.5 kWh in the first hour, 1 kWh in the second.
    timeline = [(T0, 0.0), (T0 + 3600, 9.0e6), (T0 + 7200, 12.6e6)]
    result = account(timeline, [series])
    assert result.kwh == 3.5
    assert result.grams == 3.5 * 342.0
    assert result.unpriced_kwh == 0.0
    assert result.kwh_by_source == {series.describe(): 3.5}


def test_accountant_skips_an_unset_constant_and_falls_back_to_static(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, location="DE", cache_dir=tmp_path)
    assert settings.intensity_g_per_kwh is None
    providers = [ConstantIntensityProvider(None), StaticIntensityProvider()]
    accountant = CarbonAccountant(settings, providers)
    try:
        result = accountant.result([(T0, 0.0), (T0 + 3600, 3.6e6)], wait_s=10.0)
    finally:
        accountant.close()
    # the default list: an unset constant was never chosen (not a fallback, `compare` reads it)
    assert accountant.skipped == {
        "constant": f"GREEN_MLOPS_INTENSITY_G_PER_KWH not set {SKIPPED_DEFAULT}"
    }
    assert result.grams == 342.0 and result.kwh == 1.0
    assert result.primary_source.startswith("static/electricitymaps-yearly-2025 zone DE")


def test_accountant_uses_a_set_constant_and_never_needs_static(tmp_path: Path) -> None:
    settings = Settings.load(environ={"GREEN_MLOPS_INTENSITY_G_PER_KWH": "100"}, cache_dir=tmp_path)
    accountant = CarbonAccountant(
        settings,
        [ConstantIntensityProvider(settings.intensity_g_per_kwh), StaticIntensityProvider()],
    )
    try:
        result = accountant.result([(T0, 0.0), (T0 + 60, 7.2e6)], wait_s=10.0)
    finally:
        accountant.close()
    assert accountant.skipped == {}
    assert result.grams == 200.0
    assert list(result.kwh_by_source) == [
        "constant/user constant zone unknown, average unknown (user constant), measured, "
        "user constant"
    ]


def test_constant_provider_contract() -> None:
    unset = ConstantIntensityProvider(None)
    assert unset.name == "constant"
    assert unset.configured() == "GREEN_MLOPS_INTENSITY_G_PER_KWH not set"
    with pytest.raises(IntensityUnavailable, match="GREEN_MLOPS_INTENSITY_G_PER_KWH not set"):
        unset.series(UNKNOWN, T0, T0 + 1)
    series = ConstantIntensityProvider(55.5).series(parse_location("gcp:us-central1"), T0, T0 + 1)
    assert series.points[0].g_per_kwh == 55.5 and series.zone == "US-MIDW-MISO"
    assert (series.source, series.basis, series.vintage) == ("constant", "average", "user constant")
    assert "unknown" in series.scope and series.estimated is False
    assert ConstantIntensityProvider(0.0).configured() is None  # 0 is a value, not "unset"


def test_hooks_return_the_providers(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, intensity_g_per_kwh=12.0, cache_dir=tmp_path)
    (constant,) = constant_intensity.green_mlops_intensity_providers(settings)
    (static,) = static_intensity.green_mlops_intensity_providers(settings)
    assert (constant.name, static.name) == ("constant", "static")
    assert isinstance(constant, ConstantIntensityProvider) and constant.g_per_kwh == 12.0
    assert static.configured() is None


def test_plugins_are_found_through_entry_points(tmp_path: Path) -> None:
    from green_mlops.carbon import chosen_providers

    settings = Settings.load(environ={}, intensity_providers="static,constant", cache_dir=tmp_path)
    assert [p.name for p in chosen_providers(settings)[0]] == ["static", "constant"]


def test_tables_are_parsed_once() -> None:
    bundled_json.cache_clear()
    provider = StaticIntensityProvider()
    for text in ["DE", "US", "FR", "aws:eu-west-1"]:
        provider.series(parse_location(text), T0, T0 + 1)
    provider.series(UNKNOWN, T0, T0 + 1)
    assert bundled_json.cache_info().misses == 2  # the two JSON files, once each


def test_importing_loads_no_table() -> None:
    code = (
        "import green_mlops.location as l, green_mlops.plugins.static_intensity, "
        "green_mlops.plugins.constant_intensity\n"
        "assert l.bundled_json.cache_info().currsize == 0\n"
        "assert l._countries.cache_info().currsize == 0\n"
        "assert l._cloud_regions.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
