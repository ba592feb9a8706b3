"""`green-mlops doctor` in an 80-column terminal: the meter table stays readable."""

from __future__ import annotations

from pathlib import Path

from green_mlops.plugins.rapl_zones import NOT_EXPOSED_FIX
from tests.test_cli import cli


def _meter_table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "Meters on this machine" in line)
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("└"))
    return lines[start : end + 1]


def test_doctor_at_80_columns_keeps_names_whole_and_details_readable(tmp_path: Path) -> None:
    out = cli("doctor", "--sample", "0", COLUMNS="80", GREEN_MLOPS_RAPL_ROOT=str(tmp_path / "no"))
    assert out.returncode == 0, out.stderr
    table = _meter_table(out.stdout)
    assert max(len(line) for line in table) <= 80
    text = " ".join(line.strip("│ ") for line in table)
    for name in ("cpu_estimate", "ram_estimate", "unavailable", "cpu:estimate"):
        assert name in text  # not cut to "cpu_est…"
    assert " ".join(NOT_EXPOSED_FIX.split()) in " ".join(text.split())  # the whole fix, in order
    # a detail column of a few characters wrapped the fix to one word a line: 100+ lines
    assert len(table) < 45, "\n".join(table)
