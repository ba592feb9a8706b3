"""The tables the HTML and Markdown reports share: a run's totals and the comparison of an
experiment's runs (:func:`green_mlops.compare.compare`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from green_mlops.reports.view import RunView, significant

__all__ = ["Total", "comparison_table", "totals"]


@dataclass(frozen=True)
class Total:
    """One figure of a run: its metric key, value in ``unit`` and band (both None: absent)."""

    label: str
    key: str
    value: float
    unit: str
    band: float | None = None

    @property
    def shown(self) -> str:
        text = significant(self.value)
        return f"{text} ± {significant(self.band, 2)}" if self.band is not None else text


#: (label, metric key, unit, band key)
_TOTALS = (
    ("IT energy", "green/energy_kwh", "kWh", "green/energy_uncertainty_kwh"),
    ("facility energy (x PUE)", "green/energy_facility_kwh", "kWh", None),
    ("operational carbon", "green/co2e_g", "gCO2e", "green/co2e_uncertainty_g"),
    ("market-based carbon", "green/co2e_market_g", "gCO2e", None),
    ("mean grid intensity", "green/intensity_g_per_kwh", "gCO2e/kWh", None),
    ("embodied carbon", "green/embodied_g", "gCO2e", None),
    ("cost", "green/cost", "", None),
    ("duration", "green/duration_s", "s", None),
    ("FLOPs", "green/flops", "FLOP", None),
    ("FLOPs per joule", "green/flops_per_joule", "FLOP/J", None),
)


def totals(view: RunView) -> list[Total]:
    """The run's totals that it reports (absent ones are left out), SCI included."""
    out = []
    currency = view.tag("green.currency") or ""
    for label, key, unit, band_key in _TOTALS:
        value = view.metric(key)
        if value is None:
            continue
        band = view.metric(band_key) if band_key else None
        out.append(Total(label, key, value, currency if key == "green/cost" else unit, band))
    unit = view.tag("green.functional_unit") or "run"
    sci = view.metric(f"green/sci_g_per_{unit}")
    if sci is not None:
        out.append(Total(f"SCI (per {unit})", f"green/sci_g_per_{unit}", sci, "gCO2e"))
    return out


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else significant(value, digits)


def comparison_table(comparison: Any) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of :class:`~green_mlops.compare.Comparison`'s rows, in its order."""
    metric = comparison.metric
    headers = ["run", "status", "duration (s)", "energy (kWh)", "CO2e (g)", "cost", "FLOPs"]
    if metric:
        headers += [metric, f"{metric} per kWh", "Pareto front"]
    if comparison.baseline is not None:
        headers += ["saving vs baseline (kWh)", "saving (%)", f"change in {metric or 'metric'}"]
    headers.append("marks")
    rows: list[list[str]] = []
    for row in comparison.rows:
        energy = _num(row.energy_kwh)
        if energy and row.energy_uncertainty_kwh is not None:
            energy += f" ± {significant(row.energy_uncertainty_kwh, 2)}"
        cells = [
            row.name,
            row.status,
            _num(row.duration_s),
            energy,
            _num(row.co2e_g),
            _num(row.cost) + (f" {row.currency}" if row.cost is not None and row.currency else ""),
            _num(row.flops, 3),
        ]
        if metric:
            cells += [_num(row.metric), _num(row.quality_per_kwh), "yes" if row.on_front else ""]
        if comparison.baseline is not None:
            delta = row.vs_baseline
            cells += (
                ["baseline", "", ""]
                if row.run_id == comparison.baseline.run_id
                else [
                    _num(delta.saving_kwh if delta else None),
                    _num(delta.saving_kwh_pct if delta else None, 3),
                    _num(delta.metric_change if delta else None),
                ]
            )
        cells.append(", ".join(row.marks))
        rows.append(cells)
    return headers, rows


def join_notes(notes: Sequence[str]) -> list[str]:
    return [n for n in notes if n]
