"""Rows in CodeCarbon's ``emissions.csv`` columns and units, so its dashboards read our runs.

The columns are the fields of CodeCarbon's ``EmissionsData`` (codecarbon 3.x,
``codecarbon/output_methods/emissions_data.py``), in its order; the units are CodeCarbon's:
``duration`` s, ``emissions`` kg CO2e, ``emissions_rate`` kg/s, ``*_power`` W (mean over the
run), ``*_energy`` and ``energy_consumed`` kWh. CodeCarbon multiplies energy and power by the
PUE (``EmissionsTracker(pue=...)``), so these do too: ``energy_consumed`` is our facility energy.
A quantity the run did not measure (water, utilisation, a component without a meter, the OS)
is an empty cell, never 0.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from green_mlops.reports.options import ReportOptions
from green_mlops.reports.view import RunView, iso_utc
from green_mlops.runs import RunRecord
from green_mlops.units import J_PER_KWH

__all__ = ["COLUMNS", "render", "row"]

#: ``EmissionsData``'s fields, in order (tests/test_reports.py checks them against codecarbon).
COLUMNS = (
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "cpu_utilization_percent",
    "gpu_utilization_percent",
    "ram_utilization_percent",
    "ram_used_gb",
    "on_cloud",
    "pue",
    "wue",
)


def row(record: RunRecord) -> dict[str, str | float]:
    """One run as an ``emissions.csv`` row (absent columns are empty strings)."""
    view = RunView.of(record)
    out: dict[str, str | float] = dict.fromkeys(COLUMNS, "")
    pue = _pue(view)
    duration = view.duration_s
    end = view.started_at + duration if view.started_at is not None and duration else None
    # CodeCarbon writes local time without a zone; UTC here, so rows from anywhere sort
    out["timestamp"] = iso_utc(end or record.end_time, "%Y-%m-%dT%H:%M:%S")
    out["project_name"] = record.experiment
    out["run_id"] = record.run_id
    out["experiment_id"] = record.experiment
    if duration is not None:
        out["duration"] = duration
    co2e = view.metric("green/co2e_g")
    if co2e is not None:
        out["emissions"] = co2e / 1000
        if duration:
            out["emissions_rate"] = co2e / 1000 / duration
    for component, kwh in view.components().items():
        if component in ("cpu", "gpu", "ram"):
            out[f"{component}_energy"] = kwh * pue
            if duration:
                out[f"{component}_power"] = kwh * pue * J_PER_KWH / duration
    facility = view.metric("green/energy_facility_kwh")
    it = view.metric("green/energy_kwh")
    if facility is not None or it is not None:
        out["energy_consumed"] = facility if facility is not None else (it or 0.0) * pue
    loc = view.location
    if loc is not None:
        out["country_name"] = view.country_name or ""
        out["country_iso_code"] = loc.country_alpha3 or ""
        if loc.zone and loc.zone != loc.country:
            out["region"] = loc.zone
        if loc.cloud_region:
            provider, _, region = loc.cloud_region.partition(":")
            out["cloud_provider"], out["cloud_region"] = provider, region
        out["on_cloud"] = "Y" if loc.cloud_region else "N"
    gpus = [d for d in view.devices() if d.get("component") == "gpu"]
    if gpus:  # CodeCarbon's cpu_count counts cores, which the report does not carry
        out["gpu_count"] = float(len(gpus))
    out["pue"] = pue
    return out


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row(record).items()})
    return buffer.getvalue()


def _pue(view: RunView) -> float:
    try:
        return float(view.tag("green.pue") or view.footprint.get("pue") or 1.0)
    except ValueError:
        return 1.0
