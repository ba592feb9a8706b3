"""`green-mlops doctor` says when the machine share bills other tenants' CPU load."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import cli

HINT = "GREEN_MLOPS_SHARE=process"


@pytest.fixture
def other_tenant() -> Iterator[None]:
    """Another process that keeps one CPU busy (half of this 2-CPU machine, or more)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait(timeout=30)


def test_doctor_says_the_machine_share_includes_other_tenants(
    other_tenant: None, tmp_path: Path
) -> None:
    out = cli("doctor", "--sample", "1", GREEN_MLOPS_RAPL_ROOT=str(tmp_path / "none"))
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert HINT in text, text[-1500:]
    assert "other processes kept" in text and "estimates include their load" in text


def test_doctor_says_nothing_of_other_tenants_under_the_process_share(
    other_tenant: None, tmp_path: Path
) -> None:
    out = cli(
        "doctor",
        "--sample",
        "1",
        GREEN_MLOPS_RAPL_ROOT=str(tmp_path / "none"),
        GREEN_MLOPS_SHARE="process",
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "CPU estimate (process share)" in text
    assert HINT not in text
