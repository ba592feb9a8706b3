"""Location parsing: country codes, Electricity Maps zones, cloud regions, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from green_mlops.config import ConfigError, Settings
from green_mlops.location import (
    ACCEPTED_FORMS,
    SPLIT_COUNTRIES,
    UNKNOWN,
    Location,
    parse_location,
)

DATA = Path(__file__).resolve().parents[1] / "green_mlops" / "data"


def _em_zones() -> dict[str, dict[str, object]]:
    zones: dict[str, dict[str, object]] = json.loads(
        (DATA / "electricitymaps-yearly-2025.json").read_text("utf-8")
    )
    return zones


def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("text", ["DE", "de", " De ", "DEU", "deu", "dEu"])
def test_country_codes_any_case_resolve_to_germany(text: str) -> None:
    loc = parse_location(text)
    assert (loc.zone, loc.country, loc.country_alpha3) == ("DE", "DE", "DEU")
    assert loc.name == "Germany" and loc.cloud_region is None and loc.known
    assert loc.raw == text.strip().upper()


@pytest.mark.parametrize("text", ["GB", "gb", "GBR", "UK", "uk"])
def test_united_kingdom_codes_and_the_uk_alias(text: str) -> None:
    loc = parse_location(text)
    assert (loc.zone, loc.country, loc.country_alpha3) == ("GB", "GB", "GBR")
    assert loc.raw in ("GB", "GBR")


@pytest.mark.parametrize("text", ["US", "usa"])
def test_a_country_with_several_grid_zones_has_no_zone(text: str) -> None:
    loc = parse_location(text)
    assert loc.zone is None
    assert (loc.country, loc.country_alpha3, loc.name) == ("US", "USA", "United States")
    assert loc.known


def test_split_countries_all_have_sub_zones_in_the_table() -> None:
    zones = _em_zones()
    for code in SPLIT_COUNTRIES:
        assert any(z.startswith(code + "-") for z in zones), code
        assert parse_location(code).zone is None


@pytest.mark.parametrize(
    ("text", "zone", "country", "alpha3"),
    [
        ("US-CAL-CISO", "US-CAL-CISO", "US", "USA"),
        ("us-cal-ciso", "US-CAL-CISO", "US", "USA"),
        ("se-se3", "SE-SE3", "SE", "SWE"),
        ("Us-Mida-Pjm", "US-MIDA-PJM", "US", "USA"),
        ("dk-dk1", "DK-DK1", "DK", "DNK"),
        ("xk", "XK", "XK", "XKX"),  # Kosovo: user-assigned code used by both data sets
    ],
)
def test_zones_match_case_insensitively_and_come_back_canonical(
    text: str, zone: str, country: str, alpha3: str
) -> None:
    loc = parse_location(text)
    assert (loc.raw, loc.zone, loc.country, loc.country_alpha3) == (zone, zone, country, alpha3)
    assert loc.name  # the zone's name from the table


@pytest.mark.parametrize(
    ("text", "region", "zone", "country"),
    [
        ("aws:us-east-1", "aws:us-east-1", "US-MIDA-PJM", "US"),
        ("AWS:EU-WEST-1", "aws:eu-west-1", "IE", "IE"),
        ("aws:us-west-2", "aws:us-west-2", "US-NW-BPAT", "US"),
        ("aws:us-east-1a", "aws:us-east-1", "US-MIDA-PJM", "US"),  # availability zone
        ("gcp:europe-west4", "gcp:europe-west4", "NL", "NL"),
        ("gcp:us-central1", "gcp:us-central1", "US-MIDW-MISO", "US"),
        ("gcp:europe-west4-a", "gcp:europe-west4", "NL", "NL"),  # zone of the region
        ("azure:westeurope", "azure:westeurope", "NL", "NL"),
        ("azure:West Europe", "azure:westeurope", "NL", "NL"),  # display name
        (" azure : uksouth ", "azure:uksouth", "GB", "GB"),
    ],
)
def test_cloud_regions(text: str, region: str, zone: str, country: str) -> None:
    loc = parse_location(text)
    assert (loc.raw, loc.cloud_region, loc.zone, loc.country) == (region, region, zone, country)
    assert loc.country_alpha3 and loc.name


def test_parsing_the_canonical_form_again_is_idempotent() -> None:
    for text in ["de", "deu", "uk", "us", "se-se3", "AWS:us-east-1a", "azure:West Europe"]:
        loc = parse_location(text)
        assert parse_location(loc.raw) == loc


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("XX", None),
        ("12", None),
        ("aws:nowhere", "aws regions"),
        ("aws:eu-west-9", "aws:eu-west-1"),
        ("gcp:europe-west44", "gcp:europe-west4"),
        ("azure:westerneurope", "azure:westeurope"),
        ("ibm:us-south", "aws, gcp, azure"),
        ("DE-XYZ", "DE"),
        ("US-CAL-CIS", "US-CAL-CISO"),
        ("Germany", "DE (Germany)"),
        ("frnace", "FR (France)"),
        ("aws/eu-west-1", None),  # only the colon form is accepted
        ("unknown", None),
        ("   ", None),
    ],
)
def test_invalid_locations_raise_with_close_matches_and_the_accepted_forms(
    text: str, hint: str | None
) -> None:
    with pytest.raises(ValueError) as info:
        parse_location(text)
    message = str(info.value)
    assert ACCEPTED_FORMS in message
    assert repr(text.strip()) in message or not text.strip()
    if hint is not None:
        assert hint in message


def test_close_matches_are_at_most_three() -> None:
    with pytest.raises(ValueError) as info:
        parse_location("US-FOO")
    suggested = str(info.value).split("did you mean ", 1)[1].split("?", 1)[0]
    assert len(suggested.split(", ")) == 3


def test_settings_load_rejects_an_unknown_location_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="GREEN_MLOPS_LOCATION='Germany'"):
        Settings.load(environ={"GREEN_MLOPS_LOCATION": "Germany"})
    with pytest.raises(ConfigError, match="argument location"):
        Settings.load(environ={}, location="aws:nowhere")


def test_settings_load_stores_the_canonical_location_and_empty_means_unset() -> None:
    assert Settings.load(environ={"GREEN_MLOPS_LOCATION": "uk"}).location == "GB"
    assert Settings.load(environ={"GREEN_MLOPS_LOCATION": "aws:EU-WEST-1"}).location == (
        "aws:eu-west-1"
    )
    assert Settings.load(environ={"GREEN_MLOPS_LOCATION": "  "}).location is None
    assert Settings.load(environ={}).location is None


def test_unknown_location_is_not_known() -> None:
    assert not UNKNOWN.known and UNKNOWN.describe() == "unknown"
    assert parse_location("aws:eu-west-1").describe() == "aws:eu-west-1, zone IE, Europe (Ireland)"
    assert Location(raw="x", country="DE").known


# --- the bundled tables --------------------------------------------------------------------


def test_every_cloud_region_maps_to_an_existing_zone_of_its_country() -> None:
    zones = _em_zones()
    rows = _rows("cloud-regions.csv")
    alpha2 = {r["alpha2"] for r in _rows("iso3166.csv")}
    seen = set()
    for row in rows:
        key = f"{row['provider']}:{row['region']}"
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        assert row["zone"] in zones, f"{key}: zone {row['zone']} not in the yearly table"
        assert row["country"] in alpha2, key
        assert row["zone"].split("-")[0] == row["country"], key
        assert row["location"] and row["source"].startswith("https://"), key
        loc = parse_location(key)
        assert (loc.zone, loc.country, loc.cloud_region) == (row["zone"], row["country"], key)
    for provider in ("aws", "gcp", "azure"):
        assert sum(r["provider"] == provider for r in rows) >= 15, provider


@pytest.mark.parametrize(
    "region",
    [
        "aws:us-east-1", "aws:us-east-2", "aws:us-west-1", "aws:us-west-2", "aws:eu-west-1",
        "aws:eu-west-2", "aws:eu-west-3", "aws:eu-central-1", "aws:eu-north-1",
        "aws:ap-northeast-1", "aws:ap-southeast-1", "aws:ap-south-1", "aws:ca-central-1",
        "aws:sa-east-1", "gcp:us-central1", "gcp:us-east1", "gcp:us-east4", "gcp:us-west1",
        "gcp:europe-west1", "gcp:europe-west2", "gcp:europe-west3", "gcp:europe-west4",
        "gcp:europe-west6", "gcp:europe-north1", "gcp:asia-northeast1", "gcp:asia-southeast1",
        "azure:eastus", "azure:eastus2", "azure:westus2", "azure:westeurope",
        "azure:northeurope", "azure:uksouth", "azure:swedencentral", "azure:francecentral",
        "azure:germanywestcentral",
    ],
)  # fmt: skip
def test_the_common_regions_are_present(region: str) -> None:
    assert parse_location(region).zone is not None


def test_iso_table_is_complete_and_consistent() -> None:
    rows = _rows("iso3166.csv")
    assert len(rows) == 249  # ISO 3166-1 officially assigned codes (pycountry 26.2.16)
    assert len({r["alpha2"] for r in rows}) == len({r["alpha3"] for r in rows}) == 249
    assert all(len(r["alpha2"]) == 2 and len(r["alpha3"]) == 3 and r["name"] for r in rows)
    for row in rows:
        loc = parse_location(row["alpha3"])
        assert (loc.country, loc.country_alpha3) == (row["alpha2"], row["alpha3"])
