"""Where the electricity is drawn: parsing ``GREEN_MLOPS_LOCATION`` into a zone and a country.

A country code, an Electricity Maps zone or a cloud region (``aws:eu-west-1``); never guessed
from the IP address. The accepted forms in detail: docs/carbon-accounting.md.
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.resources
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACCEPTED_FORMS",
    "CLOUD_PROVIDERS",
    "SPLIT_COUNTRIES",
    "UNKNOWN",
    "Location",
    "bundled_json",
    "parse_location",
]

ACCEPTED_FORMS = (
    "an ISO 3166-1 country code (DE, DEU; UK for GB), an Electricity Maps zone (US-CAL-CISO), "
    "or a cloud region (aws:eu-west-1, gcp:europe-west4, azure:westeurope)"
)
CLOUD_PROVIDERS = ("aws", "gcp", "azure")

#: Countries whose Electricity Maps key is an aggregate of separate grid sub-zones: a country
#: code resolves to no zone for these (which sub-zone is meant is unknown).
SPLIT_COUNTRIES = frozenset(
    {"AU", "BR", "CA", "DK", "FO", "IN", "IT", "JP", "MY", "NO", "PH", "SE", "US"}
)

#: Alpha-2 aliases: common non-ISO spellings.
_ALIASES = {"UK": "GB"}
#: Codes outside ISO 3166-1 that the data sets use (user-assigned code for Kosovo).
_EXTRA_COUNTRIES = (("XK", "XKX", "Kosovo"),)

EM_YEARLY_FILE = "electricitymaps-yearly-2025.json"


@dataclass(frozen=True)
class Location:
    """A resolved location. ``zone`` is an Electricity Maps zone key, ``country`` ISO alpha-2."""

    raw: str
    zone: str | None = None
    country: str | None = None
    country_alpha3: str | None = None
    cloud_region: str | None = None
    name: str = ""

    @property
    def known(self) -> bool:
        return self.zone is not None or self.country is not None

    def describe(self) -> str:
        if not self.known:
            return "unknown"
        parts = [self.raw]
        if self.zone and self.zone != self.raw:
            parts.append(f"zone {self.zone}")
        if self.name:
            parts.append(self.name)
        return ", ".join(parts)


UNKNOWN = Location(raw="unknown")


# --- bundled tables, loaded on first use --------------------------------------------------


@functools.cache
def bundled_json(filename: str) -> Any:
    """A JSON file of ``green_mlops/data``, parsed once per process (do not mutate it)."""
    text = importlib.resources.files("green_mlops").joinpath(f"data/{filename}").read_text("utf-8")
    return json.loads(text)


def _csv_rows(filename: str) -> list[dict[str, str]]:
    text = importlib.resources.files("green_mlops").joinpath(f"data/{filename}").read_text("utf-8")
    return list(csv.DictReader(text.splitlines()))


@dataclass(frozen=True)
class _Country:
    alpha2: str
    alpha3: str
    name: str


@functools.cache
def _countries() -> tuple[dict[str, _Country], dict[str, _Country]]:
    """(by alpha-2, by alpha-3), both upper case."""
    rows = [_Country(r["alpha2"], r["alpha3"], r["name"]) for r in _csv_rows("iso3166.csv")]
    rows += [_Country(*extra) for extra in _EXTRA_COUNTRIES]
    return {c.alpha2: c for c in rows}, {c.alpha3: c for c in rows}


@functools.cache
def _zones() -> dict[str, str]:
    """Upper-cased zone key -> canonical zone key."""
    return {key.upper(): key for key in bundled_json(EM_YEARLY_FILE)}


def _zone_name(zone: str) -> str:
    info = bundled_json(EM_YEARLY_FILE)[zone].get("zone", {})
    name = str(info.get("zoneName", ""))
    country = str(info.get("countryName", ""))
    return f"{name}, {country}" if country and country != name else name


@dataclass(frozen=True)
class _Region:
    provider: str
    region: str
    zone: str
    country: str
    location: str


@functools.cache
def _cloud_regions() -> dict[str, _Region]:
    """``provider:region`` (lower case) -> row of ``cloud-regions.csv``."""
    out = {}
    for r in _csv_rows("cloud-regions.csv"):
        region = _Region(r["provider"], r["region"], r["zone"], r["country"], r["location"])
        out[f"{region.provider}:{region.region}"] = region
    return out


# --- parsing -------------------------------------------------------------------------------


def _country_location(raw: str, country: _Country) -> Location:
    zone = None
    if country.alpha2 not in SPLIT_COUNTRIES:
        zone = _zones().get(country.alpha2)
    return Location(
        raw=raw,
        zone=zone,
        country=country.alpha2,
        country_alpha3=country.alpha3,
        name=country.name,
    )


def _zone_location(zone: str) -> Location:
    by_alpha2, _ = _countries()
    country = by_alpha2.get(zone.split("-", 1)[0])
    return Location(
        raw=zone,
        zone=zone,
        country=country.alpha2 if country else None,
        country_alpha3=country.alpha3 if country else None,
        name=_zone_name(zone),
    )


_AWS_AZ = re.compile(r"^(.*-\d+)[a-z]$")  # us-east-1a -> us-east-1
_GCP_ZONE = re.compile(r"^(.*\d)-[a-z]$")  # europe-west4-a -> europe-west4


def _cloud_location(text: str) -> Location:
    provider, _, region = text.partition(":")
    provider = provider.strip().lower()
    region = region.strip().lower()
    if provider == "azure":
        region = region.replace(" ", "")
    regions = _cloud_regions()
    key = f"{provider}:{region}"
    if key not in regions:
        match = (_AWS_AZ if provider == "aws" else _GCP_ZONE).match(region)
        if provider in ("aws", "gcp") and match and f"{provider}:{match[1]}" in regions:
            key = f"{provider}:{match[1]}"
        else:
            raise ValueError(_cloud_error(text, provider, region))
    row = regions[key]
    by_alpha2, _ = _countries()
    country = by_alpha2[row.country]
    return Location(
        raw=key,
        zone=row.zone,
        country=country.alpha2,
        country_alpha3=country.alpha3,
        cloud_region=key,
        name=row.location,
    )


def parse_location(text: str) -> Location:
    """Resolve ``text``; raise ``ValueError`` (with close matches) for an unknown value.

    ``Location.raw`` is the canonical spelling (``DE``, ``DEU``, ``US-CAL-CISO``,
    ``aws:eu-west-1``), so parsing it again gives the same location.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"empty location; expected {ACCEPTED_FORMS}")
    if ":" in stripped:
        return _cloud_location(stripped)
    upper = stripped.upper()
    by_alpha2, by_alpha3 = _countries()
    code = _ALIASES.get(upper, upper)
    if code in by_alpha2:
        return _country_location(code, by_alpha2[code])
    if upper in by_alpha3:
        return _country_location(upper, by_alpha3[upper])
    zone = _zones().get(upper)
    if zone is not None:
        return _zone_location(zone)
    raise ValueError(_unknown_error(stripped))


# --- error messages --------------------------------------------------------------------------


def _suggest(word: str, candidates: dict[str, str]) -> list[str]:
    """Up to 3 suggestions (the values) whose keys are close to ``word`` (lower case)."""
    keys = difflib.get_close_matches(word.lower(), list(candidates), n=6, cutoff=0.6)
    out: list[str] = []
    for key in keys:
        if candidates[key] not in out:
            out.append(candidates[key])
    return out[:3]


def _unknown_error(text: str) -> str:
    by_alpha2, _ = _countries()
    candidates: dict[str, str] = {key.lower(): key for key in _zones().values()}
    for c in by_alpha2.values():
        shown = f"{c.alpha2} ({c.name})"
        candidates[c.alpha2.lower()] = shown
        candidates.setdefault(c.name.lower(), shown)
        if len(text) == 3:
            candidates[c.alpha3.lower()] = f"{c.alpha3} ({c.name})"
    for key in _cloud_regions():
        candidates.setdefault(key, key)
        candidates.setdefault(key.split(":", 1)[1], key)
    close = _suggest(text, candidates)
    prefix = text.split("-", 1)[0].upper()
    if "-" in text and len(close) < 3:  # "DE-XYZ": the zones of that country
        zones = _zones().values()
        close += [
            z for z in zones if (z == prefix or z.startswith(prefix + "-")) and z not in close
        ]
    return _message(text, close[:3])


def _cloud_error(text: str, provider: str, region: str) -> str:
    if provider not in CLOUD_PROVIDERS:
        return (
            f"unknown cloud provider {provider!r} in location {text!r}: use one of "
            f"{', '.join(CLOUD_PROVIDERS)} (e.g. aws:eu-west-1), or {ACCEPTED_FORMS}"
        )
    candidates = {k.split(":", 1)[1]: k for k in _cloud_regions() if k.startswith(provider + ":")}
    close = _suggest(region, candidates)
    if not close:
        return (
            f"unknown {provider} region {text!r}: green-mlops knows {len(candidates)} {provider} "
            "regions (green_mlops/data/cloud-regions.csv); set the country or Electricity Maps "
            f"zone of the data centre instead, or {ACCEPTED_FORMS}"
        )
    return _message(text, close, known=f"{provider} region")


def _message(text: str, close: list[str], *, known: str = "location") -> str:
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown {known} {text!r}{hint}; expected {ACCEPTED_FORMS}"
