"""A carbon intensity given by the user (provider ``constant``).

``GREEN_MLOPS_INTENSITY_G_PER_KWH`` for all time and any location; skipped when unset.
``GREEN_MLOPS_INTENSITY_BASIS=market-based`` marks it a contract's figure (a PPA): priced apart
from the grid and left out of SCI (:data:`green_mlops.intensity.MARKET_BASED`). See
docs/carbon-accounting.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from green_mlops.hookspecs import hookimpl
from green_mlops.intensity import (
    FOREVER,
    MARKET_BASED,
    IntensityPoint,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)

if TYPE_CHECKING:
    from green_mlops.config import Settings
    from green_mlops.location import Location

__all__ = ["NOT_SET", "ConstantIntensityProvider", "green_mlops_intensity_providers"]

NOT_SET = "GREEN_MLOPS_INTENSITY_G_PER_KWH not set"


class ConstantIntensityProvider(IntensityProvider):
    """``settings.intensity_g_per_kwh`` over all time; ``method``: ``location-based`` (a grid
    average) or ``market-based`` (a contract)."""

    name = "constant"

    def __init__(self, g_per_kwh: float | None, method: str = "location-based") -> None:
        self.g_per_kwh = g_per_kwh
        self.method = method

    def configured(self) -> str | None:
        return NOT_SET if self.g_per_kwh is None else None

    def series(self, location: Location, start: float, end: float) -> IntensitySeries:
        if self.g_per_kwh is None:
            raise IntensityUnavailable(NOT_SET)
        market = self.method == MARKET_BASED
        return IntensitySeries(
            points=(IntensityPoint(FOREVER[0], FOREVER[1], self.g_per_kwh),),
            source=self.name,
            dataset="user constant (contract)" if market else "user constant",
            zone=location.zone or location.country or "unknown",
            basis=MARKET_BASED if market else "average",
            scope="unknown (user constant)",
            estimated=False,
            vintage="user constant",
            notes=(
                f"GREEN_MLOPS_INTENSITY_G_PER_KWH={self.g_per_kwh:g}",
                f"GREEN_MLOPS_INTENSITY_BASIS={self.method}",
            ),
        )


@hookimpl
def green_mlops_intensity_providers(settings: Settings) -> list[IntensityProvider]:
    return [ConstantIntensityProvider(settings.intensity_g_per_kwh, settings.intensity_basis)]
