"""Our versioned JSON report as the run carries it (docs/report-format.md); a list of them
for several runs."""

from __future__ import annotations

import json
from collections.abc import Sequence

from green_mlops.reports.options import ReportError, ReportOptions
from green_mlops.runs import RunRecord

__all__ = ["render"]


def render(records: Sequence[RunRecord], options: ReportOptions) -> str:
    missing = [r.run_id for r in records if r.report is None]
    if missing:
        raise ReportError(
            f"no JSON report for run(s) {', '.join(missing)} (no green/report.json artifact: "
            "the run was not measured by green-mlops, or its upload failed)"
        )
    reports = [r.report for r in records]
    return json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n"
