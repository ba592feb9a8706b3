"""Offline carbon intensity from bundled yearly tables (provider ``static``).

What it answers: one yearly average intensity (gCO2e/kWh) that covers all time, so it can
price any run without a network and closes every provider chain.

* Location with an Electricity Maps zone present in the yearly table (``DE``, ``US-CAL-CISO``,
  cloud regions): Electricity Maps yearly 2025, lifecycle, consumption-based (flow-traced:
  imports count at the intensity of where they were generated). ODbL 1.0.
* Otherwise a country (``US``: a country whose grid has several zones): Ember yearly data by
  ISO alpha-3, lifecycle, generation-based, the latest year Ember has for it (2022-2024).
  CC BY-SA 4.0.
* Unknown location: Ember's ``World`` figure, noted "location unknown: world average". A
  country that neither table covers (Andorra, Monaco, ...) also gets the world figure, noted.

Uncertainty: a yearly average ignores the hour-to-hour and seasonal swing of the grid (large
where solar or wind are a large share), and the two sources differ in method (consumption vs
generation basis, emission factors, data year): e.g. France 31 (Electricity Maps 2025) vs
44.18 (Ember 2024), Great Britain 176 vs the United Kingdom's 215.79, Germany 342 vs 342.06.
The provenance (dataset, zone, basis, vintage) says which figure priced the energy. Sources and
licences: ``green_mlops/data/README.md``. The JSON tables are parsed on first use, once.
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
