"""Offline carbon intensity from bundled yearly tables (provider ``static``).

Electricity Maps yearly 2025 by zone, else Ember yearly by country, else the world average: one
interval covering all time, so it closes every provider chain. See docs/carbon-accounting.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from green_mlops.hookspecs import hookimpl
from green_mlops.intensity import FOREVER, IntensityPoint, IntensityProvider, IntensitySeries
from green_mlops.location import EM_YEARLY_FILE, Location, bundled_json

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = [
    "EMBER_ATTRIBUTION",
    "EM_ATTRIBUTION",
    "StaticIntensityProvider",
    "green_mlops_intensity_providers",
]

EMBER_FILE = "ember-yearly-average-intensity.json"
EM_DATASET = "electricitymaps-yearly-2025"
EMBER_DATASET = "ember-yearly"
EM_ATTRIBUTION = "Electricity Maps (electricitymaps.com), yearly carbon intensity 2025, via CO2.js"
EMBER_ATTRIBUTION = (
    "Ember (ember-energy.org), yearly electricity data, via CO2.js (Green Web Foundation)"
)
WORLD = "World"
UNKNOWN_NOTE = "location unknown: world average"
_YEARLY_NOTE = "yearly average applied to every hour of the run"


def _forever(value: float) -> tuple[IntensityPoint, ...]:
    return (IntensityPoint(FOREVER[0], FOREVER[1], value),)


class StaticIntensityProvider(IntensityProvider):
    """Electricity Maps yearly 2025 by zone, else Ember yearly by country, else world."""

    name = "static"

    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        em: dict[str, Any] = bundled_json(EM_YEARLY_FILE)
        if location.zone is not None and location.zone in em:
            value = float(em[location.zone]["carbonIntensity"]["value"])
            return IntensitySeries(
                points=_forever(value),
                source=self.name,
                dataset=EM_DATASET,
                zone=location.zone,
                basis="average",
                scope="lifecycle",
                estimated=False,
                vintage="2025",
                attribution=EM_ATTRIBUTION,
                notes=("consumption-based (flow-traced)", _YEARLY_NOTE),
            )
        ember: dict[str, Any] = bundled_json(EMBER_FILE)
        alpha3 = location.country_alpha3
        if alpha3 is not None and alpha3 in ember:
            return self._ember(ember[alpha3], alpha3, ())
        if not location.known:
            note = UNKNOWN_NOTE
        else:
            note = f"no yearly figure for {location.describe()}: world average"
        return self._ember(ember[WORLD], WORLD, (note,))

    def _ember(self, entry: dict[str, Any], zone: str, notes: tuple[str, ...]) -> IntensitySeries:
        return IntensitySeries(
            points=_forever(float(entry["emissions_intensity_gco2_per_kwh"])),
            source=self.name,
            dataset=EMBER_DATASET,
            zone=zone,
            basis="average",
            scope="lifecycle",
            estimated=False,
            vintage=str(entry["year"]),
            attribution=EMBER_ATTRIBUTION,
            notes=(*notes, "generation-based", _YEARLY_NOTE),
        )


@hookimpl
def green_mlops_intensity_providers(settings: Settings) -> list[IntensityProvider]:
    return [StaticIntensityProvider()]
