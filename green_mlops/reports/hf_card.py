"""The Hugging Face model card's ``co2_eq_emissions`` block (README.md front matter).

Fields as https://huggingface.co/docs/hub/model-cards-co2 defines them: ``emissions`` in grams
CO2e, ``source``, ``training_type`` (``pre-training`` or ``fine-tuning``),
``geographical_location`` and ``hardware_used``. Several runs (an experiment) are summed:
their ``green/co2e_g`` are exclusive of nested runs, so nothing is counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from green_mlops import __version__
from green_mlops.reports.options import ReportError, ReportOptions
from green_mlops.reports.view import RunView
from green_mlops.runs import RunRecord

__all__ = ["co2_eq_emissions", "render"]


def co2_eq_emissions(
    records: Sequence[RunRecord], options: ReportOptions
) -> dict[str, float | str]:
    """The block's fields (``training_type`` only when ``options`` says it)."""
    views = [RunView.of(r) for r in records]
    grams = 0.0
    for view in views:
        value = view.metric("green/co2e_g")
        if value is None:
            why = view.tag("green.not_reported") or "no green/co2e_g metric"
            raise ReportError(f"run {view.record.run_id}: carbon not reported ({why})")
        grams += value
    measured = all(v.tag("green.measured") == "true" for v in views)
    meters = _unique(
        m.split(":")[0] for v in views for m in (v.tag("green.meters") or "").split(",")
    )
    block: dict[str, float | str] = {
        "emissions": float(f"{grams:.6g}"),
        "source": f"green-mlops {__version__} ({'measured' if measured else 'estimated'}: "
        f"{', '.join(meters) or 'no meter'})",
    }
    if options.training_type:
        block["training_type"] = options.training_type
    places = _unique(_place(v) for v in views)
    if places:
        block["geographical_location"] = "; ".join(places)
    hardware = _unique(v.hardware or "" for v in views)
    if hardware:
        block["hardware_used"] = "; ".join(hardware)
    return block


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    block = co2_eq_emissions(records, options)
    lines = ["co2_eq_emissions:"]
    for key, value in block.items():
        # JSON scalars are YAML: strings double-quoted with JSON escapes, numbers plain
        lines.append(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    if "training_type" not in block:
        lines.append(
            "  # training_type: pre-training or fine-tuning (green-mlops report --training-type)"
        )
    return "\n".join(lines) + "\n"


def _place(view: RunView) -> str:
    loc = view.location
    if loc is None:
        return ""
    if loc.cloud_region:
        return f"{loc.name}, {loc.cloud_region}" if loc.name else loc.cloud_region
    if loc.zone and loc.zone != loc.country:
        return f"{loc.name} ({loc.zone})" if loc.name else loc.zone
    return f"{loc.name} ({loc.country})" if loc.name else str(loc.country)


def _unique(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out
