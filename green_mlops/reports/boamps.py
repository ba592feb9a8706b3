"""Boavizta's BoAmps energy report (JSON), one per run.

Schema: BoAmps 1.1.0, https://github.com/Boavizta/BoAmps ``model/report_schema.json`` and the
schemas it refers to (``measure``, ``hardware``, ``algorithm``, ``dataset``; CC BY 4.0), read at
commit 3bfefec. Required fields the run cannot know (``taskFamily``, the dataset's ``dataType``)
are ``unspecified`` / ``other`` unless given; ``quality`` comes from the IT energy's
uncertainty band with BoAmps' own bounds (high: ±10 %, medium: ±25 %, low: ±50 %) and is left
out for a wider band.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from green_mlops import __version__
from green_mlops.reports.options import ReportError, ReportOptions
from green_mlops.reports.view import RunView, iso_utc
from green_mlops.runs import RunRecord

__all__ = ["FORMAT_VERSION", "quality", "render", "report"]

FORMAT_VERSION = "1.1.0"
SPECIFICATION_URI = "https://github.com/Boavizta/BoAmps/tree/main/model"
#: BoAmps ``quality`` and the largest relative error each allows.
QUALITY_BOUNDS = (("high", 0.10), ("medium", 0.25), ("low", 0.50))
_STAGES = {"pre-training": "training", "fine-tuning": "finetuning"}
_DATETIME = "%Y-%m-%d %H:%M:%S"


def quality(relative_uncertainty: float | None) -> str | None:
    """BoAmps' ``quality`` for a relative half-width (0.05 = ±5 %); None beyond ±50 %."""
    if relative_uncertainty is None:
        return None
    for name, bound in QUALITY_BOUNDS:
        if relative_uncertainty <= bound + 1e-12:
            return name
    return None


def report(record: RunRecord, options: ReportOptions) -> dict[str, Any]:
    """The BoAmps report of one run."""
    view = RunView.of(record)
    generated = view.report.get("generated_at")
    final = record.status == "FINISHED" and view.report.get("final", True)
    out: dict[str, Any] = {
        "header": {
            "formatVersion": FORMAT_VERSION,
            "formatVersionSpecificationUri": SPECIFICATION_URI,
            # the same run gives the same id, so a re-render replaces, not duplicates
            "reportId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"green-mlops:{record.run_id}")),
            "reportDatetime": iso_utc(
                float(generated) if isinstance(generated, (int, float)) else record.end_time,
                _DATETIME,
            ),
            "reportStatus": "final" if final else "draft",
        },
        "task": {
            "taskStage": _STAGES.get(options.training_type or "", "training"),
            "taskFamily": options.task_family or "unspecified",
            "algorithms": [{"trainingType": options.training_type}]
            if options.training_type
            else [{}],
            "dataset": [{"dataUsage": "input", "dataType": "other"}],
            "taskDescription": f"run {record.name} ({record.run_id}) of {record.experiment}",
        },
        "measures": [_measure(view)],
        "software": {"language": "python"},
        "infrastructure": _infrastructure(view),
    }
    environment = _environment(view)
    if environment:
        out["environment"] = environment
    band = quality(view.relative_uncertainty)
    if band is not None:
        out["quality"] = band
    return out


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    reports = [report(r, options) for r in records]
    return json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n"


def _measure(view: RunView) -> dict[str, Any]:
    measure: dict[str, Any] = {"measurementMethod": "green-mlops", "version": __version__}
    for component in ("cpu", "gpu"):
        meters = sorted(
            {
                f"{d.get('meter')} ({d.get('method')})"
                for d in view.devices()
                if d.get("component") == component
            }
        )
        if meters:
            measure[f"{component}TrackingMode"] = ", ".join(meters)
    kwh = view.metric("green/energy_kwh")
    if kwh is None:
        raise ReportError(f"run {view.record.run_id}: no green/energy_kwh (not measured)")
    measure["powerConsumption"] = kwh  # kWh (BoAmps' name), IT energy as measured
    if view.duration_s is not None:
        measure["measurementDuration"] = view.duration_s
    if view.started_at is not None:
        measure["measurementDateTime"] = iso_utc(view.started_at, _DATETIME)
    return measure


def _infrastructure(view: RunView) -> dict[str, Any]:
    loc = view.location
    infra: dict[str, Any] = {"infraType": "publicCloud" if loc and loc.cloud_region else "other"}
    if loc and loc.cloud_region:
        infra["cloudProvider"] = loc.cloud_region.split(":")[0]
    components: dict[str, dict[str, Any]] = {}
    for d in view.devices():
        kind = str(d.get("component"))
        entry = components.setdefault(kind, {"componentType": kind, "nbComponent": 0})
        entry["nbComponent"] += 1
        name = str(d.get("label") or d.get("device") or "").split(":")[0].strip()
        if name and "componentName" not in entry:
            entry["componentName"] = name
    infra["components"] = list(components.values()) or [
        {"componentType": "other", "nbComponent": 1}
    ]
    return infra


def _environment(view: RunView) -> dict[str, Any]:
    loc = view.location
    if loc is None:
        return {}
    env: dict[str, Any] = {"country": view.country_name or str(loc.country or loc.raw)}
    if loc.cloud_region or (loc.zone and loc.zone != loc.country):
        env["location"] = loc.cloud_region or loc.zone
    intensity = view.metric("green/intensity_g_per_kwh")
    if intensity is not None:
        env["powerSourceCarbonIntensity"] = intensity
    return env
