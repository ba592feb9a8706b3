"""Reports of finished runs, one module per format, each rendering from the runs' versioned
JSON report (``green/report.json``, ``green_report.json``) and their
:class:`~green_mlops.runs.RunRecord`: see docs/reports.md.

``render(format, records, options)`` returns the report as text; the formats' modules are
imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from green_mlops.reports.options import TRAINING_TYPES, ReportError, ReportOptions
from green_mlops.runs import RunRecord

__all__ = ["FORMATS", "TRAINING_TYPES", "ReportError", "ReportOptions", "render"]

#: Format name -> module of green_mlops.reports that renders it.
FORMATS: dict[str, str] = {
    "html": "html",
    "markdown": "markdown",
    "json": "json_report",
    "hf-card": "hf_card",
    "codecarbon-csv": "codecarbon_csv",
    "boamps": "boamps",
}


def render(fmt: str, records: Sequence[RunRecord], options: ReportOptions | None = None) -> str:
    """``records`` as a report in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not records:
        raise ReportError("no run to report")
    module = importlib.import_module(f"green_mlops.reports.{FORMATS[fmt]}")
    text: str = module.render(list(records), options or ReportOptions())
    return text
