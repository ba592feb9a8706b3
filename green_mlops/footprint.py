"""The footprint of a run: facility energy, operational and embodied carbon, cost and SCI.

Each step of the calculation and its uncertainty: see docs/carbon-accounting.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from green_mlops import __version__
from green_mlops.carbon import MARKET_BASED, CarbonResult
from green_mlops.config import Settings
from green_mlops.facility import KNOWN_EMBODIED
from green_mlops.intensity import IntensitySeries
from green_mlops.location import Location
from green_mlops.snapshot import Snapshot
from green_mlops.units import HOUR, YEAR, clip

__all__ = [
    "Footprint",
    "footprint",
    "footprint_metrics",
    "footprint_tags",
    "reporting_sentence",
    "with_totals",
]

_NO_EMBODIED = (
    "not configured: set GREEN_MLOPS_EMBODIED_KGCO2E to the embodied kgCO2e of the reserved "
    "hardware (0 to leave embodied emissions out knowingly)"
)


@dataclass(frozen=True)
class Footprint:
    """Everything a report needs about a run's footprint. ``None`` means *not reported*; the
    reason is in :attr:`not_reported`."""

    duration_s: float
    hardware: str
    location: str
    it_kwh: float
    #: Relative half-width of the IT energy band (0.05 = +/-5 %).
    energy_uncertainty: float
    pue: float
    pue_source: str
    facility_kwh: float
    #: Operational carbon of the facility energy, grams CO2e (priced energy only).
    operational_g: float | None
    operational_uncertainty_g: float | None
    #: Mean grid intensity over the priced energy, gCO2e/kWh.
    intensity_g_per_kwh: float | None
    intensity_source: str
    intensity_basis: str
    intensity_scope: str
    intensity_estimated: str
    intensity_vintage: str
    intensity_fallbacks: str
    cost: float | None
    currency: str
    embodied_g: float | None
    embodied_source: str
    functional_unit: str
    functional_units: float | None
    sci_g: float | None
    #: ``what: why`` for every quantity that is not reported or only partly.
    not_reported: tuple[str, ...] = ()
    #: Market-based operational carbon (a contract's figure, GHG Protocol Scope 2), grams; the
    #: location-based one is :attr:`operational_g`, the only one in SCI.
    market_g: float | None = None
    #: The series that priced it (``source/dataset zone (share)``), ``none`` without one.
    market_source: str = "none"
    #: The inputs of cost and embodied carbon, for a reader who recomputes them.
    price_per_kwh: float | None = None
    #: SCI's TE (kgCO2e of the hardware), EL (years), RS (share) and reserved time (s).
    embodied_total_kgco2e: float | None = None
    hardware_lifetime_years: float | None = None
    resource_share: float | None = None
    reserved_s: float | None = None


def footprint(
    snapshot: Snapshot,
    carbon: CarbonResult | None,
    settings: Settings,
    *,
    location: Location | str | None = None,
    intensity_sources: Sequence[IntensitySeries] = (),
    fallbacks: Mapping[str, str] | None = None,
    functional_units: float | None = None,
    reserved_s: float | None = None,
) -> Footprint:
    """The footprint of ``snapshot``. Never raises for missing or odd inputs: what cannot be
    computed is ``None`` with the reason in :attr:`Footprint.not_reported`.

    ``carbon`` is :func:`~green_mlops.carbon.account`'s result on the IT energy (``None``:
    carbon not computed). ``intensity_sources`` is the chain of series it was priced with and
    ``fallbacks`` the providers skipped, with why (``CarbonAccountant.skipped``), for
    provenance. ``functional_units`` is SCI's R (default 1 for the unit ``run``; required for
    any other unit). ``reserved_s`` is how long the hardware was reserved (default: the
    snapshot's duration).
    """
    missing: list[str] = []
    it_kwh = snapshot.kwh
    joules = snapshot.joules
    rel = snapshot.uncertainty_j / joules if joules > 0 else 0.0
    pue = settings.pue
    facility_kwh = it_kwh * pue

    # Operational carbon: account() priced the IT energy; the facility emits PUE times that.
    operational: float | None = None
    operational_unc: float | None = None
    mean: float | None = None
    used: list[IntensitySeries] = []
    market = carbon.market if carbon is not None else None
    market_priced = market is not None and any(v > 0 for v in market.kwh_by_source.values())
    if carbon is None:
        missing.append("co2e: carbon not computed (no intensity result)")
    elif market_priced and not any(v > 0 for v in carbon.kwh_by_source.values()):
        missing.append(
            "co2e: only market-based intensity (GREEN_MLOPS_INTENSITY_BASIS=market-based) "
            "priced the run, see green/co2e_market_g; add static to "
            "GREEN_MLOPS_INTENSITY_PROVIDERS for the location-based figure"
        )
    elif carbon.unpriced_kwh > 0 and not any(v > 0 for v in carbon.kwh_by_source.values()):
        # Nothing priced any of the energy: carbon is unknown, not 0 g.
        missing.append(
            f"co2e: {carbon.unpriced_kwh:.6g} of {carbon.kwh:.6g} kWh (IT) not priced: no "
            "intensity provider answered (see green.intensity.fallbacks); add static to "
            "GREEN_MLOPS_INTENSITY_PROVIDERS for an offline fallback"
        )
    else:
        operational = carbon.grams * pue
        operational_unc = operational * rel
        if carbon.kwh - carbon.unpriced_kwh > 0:
            mean = carbon.mean_g_per_kwh
        if carbon.unpriced_kwh > 0:
            missing.append(
                f"co2e: {carbon.unpriced_kwh:.6g} of {carbon.kwh:.6g} kWh (IT) not priced: no "
                "intensity series covered that time, so green/co2e_g covers the priced energy "
                "only (a lower bound)"
            )
        used = [s for s in intensity_sources if carbon.kwh_by_source.get(s.describe(), 0) > 0]
    market_g = market.grams * pue if market is not None and market_priced else None
    market_used = [
        s
        for s in intensity_sources
        if market is not None and market.kwh_by_source.get(s.describe(), 0) > 0
    ]

    cost: float | None = None
    if settings.price_per_kwh is None:
        missing.append("cost: no price: set GREEN_MLOPS_PRICE_PER_KWH")
    else:
        cost = facility_kwh * settings.price_per_kwh

    seconds = snapshot.duration_s if reserved_s is None else reserved_s
    embodied, embodied_source, total_kg = _embodied(snapshot, settings, seconds)
    if embodied is None:
        missing.append(f"embodied: {embodied_source}")

    unit = settings.functional_unit
    count = functional_units
    if count is None and unit == "run":
        count = 1.0
    sci: float | None = None
    if count is None:
        missing.append(f"sci: the number of {unit}s (functional units) was not given")
    elif not (math.isfinite(count) and count > 0):
        missing.append(f"sci: the number of {unit}s must be > 0, got {count!r}")
        count = None
    elif operational is None and market_g is not None:
        missing.append(
            "sci: SCI excludes market-based intensity, and no location-based intensity priced "
            "the run; add static to GREEN_MLOPS_INTENSITY_PROVIDERS"
        )
    elif operational is None or embodied is None:
        missing.append("sci: needs both operational (E x I) and embodied (M) carbon")
    elif carbon is not None and carbon.unpriced_kwh > 0:
        missing.append("sci: part of the energy has no carbon intensity")
    else:
        sci = (operational + embodied) / count

    return Footprint(
        duration_s=snapshot.duration_s,
        hardware=hardware_summary(snapshot),
        location=_location_text(location),
        it_kwh=it_kwh,
        energy_uncertainty=rel,
        pue=pue,
        pue_source=pue_source(pue),
        facility_kwh=facility_kwh,
        operational_g=operational,
        operational_uncertainty_g=operational_unc,
        intensity_g_per_kwh=mean,
        intensity_source=_sources_text(used, carbon),
        intensity_basis=_distinct(s.basis for s in used),
        intensity_scope=_distinct(s.scope for s in used),
        intensity_estimated=(  # an unknown location is priced by a stand-in: an estimate
            "unknown"
            if not used
            else "true"
            if any(s.estimated for s in used) or _location_text(location) == "unknown"
            else "false"
        ),
        intensity_vintage=_distinct(s.vintage for s in used),
        intensity_fallbacks="; ".join(f"{k}: {v}" for k, v in (fallbacks or {}).items()) or "none",
        cost=cost,
        currency=settings.currency,
        embodied_g=embodied,
        embodied_source=embodied_source,
        functional_unit=unit,
        functional_units=count,
        sci_g=sci,
        not_reported=tuple(missing),
        market_g=market_g,
        market_source=_sources_text(market_used, market) if market_g is not None else "none",
        price_per_kwh=settings.price_per_kwh,
        embodied_total_kgco2e=total_kg,
        hardware_lifetime_years=settings.hardware_lifetime_years,
        resource_share=settings.resource_share,
        reserved_s=seconds,
    )


def pue_source(pue: float) -> str:
    """Where a PUE value comes from (settings keep it on the value: ``config.Pue.source``)."""
    return str(getattr(pue, "source", "user value (GREEN_MLOPS_PUE)"))


def with_totals(fp: Footprint, metrics: Mapping[str, float], **changes: Any) -> Footprint:
    """``fp`` (one measurement's: a stage, a process, rank 0's node) with the run's totals
    ``metrics`` (earlier stages, a checkpoint, the ranks or the nodes of a job)."""
    fields = {
        "duration_s": "green/duration_s",
        "it_kwh": "green/energy_kwh",
        "facility_kwh": "green/energy_facility_kwh",
        "operational_g": "green/co2e_g",
        "operational_uncertainty_g": "green/co2e_uncertainty_g",
        "intensity_g_per_kwh": "green/intensity_g_per_kwh",
        "cost": "green/cost",
        "embodied_g": "green/embodied_g",
        "sci_g": f"green/sci_g_per_{fp.functional_unit}",
    }
    changes |= {
        name: metrics[key]
        for name, key in fields.items()
        if key in metrics and getattr(fp, name) is not None
    }
    return dataclasses.replace(fp, **changes)


def hardware_summary(snapshot: Snapshot) -> str:
    """``2 x NVIDIA H100 80GB HBM3, 1 x RAPL package-0`` from the devices' labels."""
    counts: dict[str, int] = {}
    for device in snapshot.devices:
        name = _model(device.label) or device.device
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in counts.items()) or "no measured device"


def footprint_metrics(fp: Footprint) -> dict[str, float]:
    """Metric key -> value; a quantity that is not reported has no key (see the tags)."""
    metrics = {"green/energy_facility_kwh": fp.facility_kwh}
    if fp.operational_g is not None:
        metrics["green/co2e_g"] = fp.operational_g
    if fp.operational_uncertainty_g is not None:
        metrics["green/co2e_uncertainty_g"] = fp.operational_uncertainty_g
    if fp.intensity_g_per_kwh is not None:
        metrics["green/intensity_g_per_kwh"] = fp.intensity_g_per_kwh
    if fp.cost is not None:
        metrics["green/cost"] = fp.cost
    if fp.embodied_g is not None:
        metrics["green/embodied_g"] = fp.embodied_g
    if fp.sci_g is not None:
        metrics[f"green/sci_g_per_{fp.functional_unit}"] = fp.sci_g
    if fp.market_g is not None:
        metrics["green/co2e_market_g"] = fp.market_g
    return metrics


def footprint_tags(fp: Footprint) -> dict[str, str]:
    """Provenance as ``green.*`` tags; the same keys for every footprint."""
    return {
        "green.location": fp.location,
        "green.intensity.source": fp.intensity_source,
        "green.intensity.basis": fp.intensity_basis,
        "green.intensity.scope": fp.intensity_scope,
        "green.intensity.estimated": fp.intensity_estimated,
        "green.intensity.vintage": fp.intensity_vintage,
        "green.intensity.fallbacks": clip(fp.intensity_fallbacks),
        "green.intensity.market": (
            f"{MARKET_BASED} (green/co2e_market_g, not in SCI): {fp.market_source}"
            if fp.market_g is not None
            else "none"
        ),
        "green.pue": f"{fp.pue:g}",
        "green.pue.source": clip(fp.pue_source),
        "green.currency": fp.currency,
        "green.embodied.source": clip(fp.embodied_source),
        "green.functional_unit": fp.functional_unit,
        "green.not_reported": clip("; ".join(fp.not_reported)) or "none",
    }


def reporting_sentence(fp: Footprint) -> str:
    """One sentence for a paper or model card (ML CO2 Impact / Green Algorithms style)."""
    where = "an unknown location" if fp.location == "unknown" else fp.location
    text = (
        f"The run took {_duration_text(fp.duration_s)} on {fp.hardware} in {where} and used "
        f"{fp.facility_kwh:.3g} kWh (IT energy {fp.it_kwh:.3g} kWh x PUE {fp.pue:g})"
    )
    if fp.operational_g is not None:
        unc = fp.operational_uncertainty_g or 0.0
        # "co2e: X of Y kWh (IT) not priced: ...": the carbon of the priced part, a lower bound
        unpriced = next((r for r in fp.not_reported if r.startswith("co2e: ")), None)
        bound = "at least " if unpriced else ""
        text += f", emitting {bound}{fp.operational_g / 1000:.3g} kgCO2e"
        text += f" (+/- {unc / 1000:.2g} kg"
        if fp.intensity_g_per_kwh is not None:
            text += f"; grid {fp.intensity_g_per_kwh:.0f} gCO2e/kWh {fp.intensity_basis}"
        text += f", {fp.intensity_source}"
        if unpriced:
            text += f"; {unpriced.removeprefix('co2e: ').split(' (IT)', 1)[0]} not priced"
        text += ")"
    else:
        text += "; its carbon emissions were not computed"
    if fp.embodied_g is not None:
        text += f" plus {fp.embodied_g / 1000:.3g} kgCO2e embodied in the hardware"
    return f"{text}. Measured with green-mlops {__version__}."


# --- helpers -------------------------------------------------------------------------------


def _embodied(
    snapshot: Snapshot, settings: Settings, seconds: float
) -> tuple[float | None, str, float | None]:
    """(grams, source, TE kg) of SCI's M, or (None, why, None)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        return None, f"reserved time must be >= 0 seconds, got {seconds!r}", None
    if settings.embodied_kgco2e is not None:
        total_kg = settings.embodied_kgco2e
        source = "GREEN_MLOPS_EMBODIED_KGCO2E"
    else:
        known: dict[str, int] = {}
        for device in snapshot.devices:
            model = _model(device.label)
            if model in KNOWN_EMBODIED:
                known[model] = known.get(model, 0) + 1
        if not known:
            return None, _NO_EMBODIED, None
        total_kg = sum(KNOWN_EMBODIED[m].kgco2e * n for m, n in known.items())
        source = "; ".join(
            f"{n} x {m} at {KNOWN_EMBODIED[m].kgco2e:g} kg ({KNOWN_EMBODIED[m].scope}): "
            f"{KNOWN_EMBODIED[m].source}"
            for m, n in known.items()
        )
        source += "; set GREEN_MLOPS_EMBODIED_KGCO2E for the whole machine"
    share = seconds / (settings.hardware_lifetime_years * YEAR)
    grams = total_kg * 1000 * share * settings.resource_share
    return (
        grams,
        f"{source}; TE {total_kg:g} kg over {settings.hardware_lifetime_years:g} years, "
        f"share {settings.resource_share:g}",
        total_kg,
    )


def _model(label: str) -> str:
    return label.split(" (", 1)[0].strip()


def _duration_text(seconds: float) -> str:
    """``2.00 h``; under an hour ``42 min``, under ten minutes ``5.5 s`` / ``312 s``."""
    if seconds >= HOUR:
        return f"{seconds / HOUR:.2f} h"
    if seconds >= 600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


def _location_text(location: Location | str | None) -> str:
    if location is None:
        return "unknown"
    if isinstance(location, Location):
        return location.describe()
    return location.strip() or "unknown"


def _sources_text(used: Sequence[IntensitySeries], carbon: CarbonResult | None) -> str:
    if carbon is None:
        return "none"
    if not used:  # the caller did not pass the series: fall back on describe() keys
        return ", ".join(carbon.kwh_by_source) or "none"
    priced = sum(carbon.kwh_by_source.values())
    parts = []
    for s in used:
        share = carbon.kwh_by_source[s.describe()] / priced * 100
        parts.append(f"{s.source}/{s.dataset} {s.zone} ({share:.0f}%)")
    return ", ".join(parts)


def _distinct(values: Iterable[str]) -> str:
    seen: list[str] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return "+".join(seen) or "unknown"
