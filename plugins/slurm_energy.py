"""Slurm's own energy accounting (``ConsumedEnergy``) as a reference for a job's total.

Where the cluster's ``AcctGatherEnergyType`` plugin records energy (``acct_gather_energy/ipmi``:
the node's BMC, so power supplies and fans are in; ``/rapl``; ``/gpu``), ``sstat`` reports the
running job step's ``ConsumedEnergyRaw`` in joules, summed over the step's nodes. It is read at
the run's start and end (``sacct`` where ``sstat`` cannot answer) and logged beside the measured
total (:mod:`green_mlops.references`). Slurm's caveats hold: the figure is node-level (right for
exclusive allocations only) and is updated every ``JobAcctGatherFrequency`` (30 s by default).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING

from green_mlops.hookspecs import hookimpl
from green_mlops.meters import Component, MeterUnavailable
from green_mlops.references import EnergyReference, ReferenceUnavailable

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = ["SlurmEnergy", "green_mlops_energy_references"]

NAME = "slurm"
_FIELDS = ("--noheader", "--parsable2", "--format=ConsumedEnergyRaw")
NOT_RECORDED_FIX = (
    "ask the cluster's administrators to set AcctGatherEnergyType in slurm.conf "
    "(acct_gather_energy/ipmi measures the whole node; /rapl or /gpu the CPUs or GPUs) and "
    "JobAcctGatherFrequency=energy=<seconds>"
)


class SlurmEnergy(EnergyReference):
    """``ConsumedEnergyRaw`` of one job step, read with ``sstat`` (``sacct`` as the fallback)."""

    name = NAME

    def __init__(self, step: str, nodes: str, sstat: str | None, sacct: str | None) -> None:
        self.step = step
        self.nodes = nodes
        self._tools = [tool for tool in (sstat, sacct) if tool]
        self._used = ""

    def read(self, timeout_s: float) -> float:
        """Joules with the first tool that answers; once one has (the start reading), with
        that one only: sstat's live figure and sacct's database record differ, so a
        difference of the two would not be the run's energy."""
        problems = []
        tools = [t for t in self._tools if os.path.basename(t) == self._used] or self._tools
        for tool in tools:
            try:
                joules = self._read(tool, timeout_s)
            except ReferenceUnavailable as exc:
                problems.append(str(exc))
                continue
            self._used = os.path.basename(tool)
            return joules
        raise ReferenceUnavailable("; ".join(problems))

    def _read(self, tool: str, timeout_s: float) -> float:
        command = os.path.basename(tool)
        try:
            done = subprocess.run(
                [tool, f"--jobs={self.step}", *_FIELDS],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ReferenceUnavailable(f"{command} did not answer in {timeout_s:.1f} s") from None
        except OSError as exc:
            raise ReferenceUnavailable(f"{command} could not be run ({exc})") from None
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise ReferenceUnavailable(f"{command} -j {self.step} failed: {said[0][:200]}")
        values = [line.strip().rstrip("|") for line in done.stdout.splitlines() if line.strip()]
        if not values:
            raise ReferenceUnavailable(f"{command} -j {self.step} printed no line for the step")
        if not all(v.isdigit() for v in values):
            raise ReferenceUnavailable(
                f"{command} -j {self.step} printed ConsumedEnergyRaw {values[0][:40]!r}, not "
                f"joules. Fix: {NOT_RECORDED_FIX}"
            )
        return float(sum(int(v) for v in values))

    def no_growth(self, start_j: float, end_j: float) -> str:
        if end_j <= 0 and self._used == "sacct":
            return (
                f"sacct reports ConsumedEnergyRaw 0 for job step {self.step} (its record of a "
                "step that has not ended may hold no energy yet; sstat, the live figure, could "
                "not be read at the run's start)"
            )
        if end_j <= 0:
            return (
                f"Slurm records no energy for job step {self.step} (ConsumedEnergyRaw 0: the "
                f"cluster's AcctGatherEnergyType is none or not readable). Fix: {NOT_RECORDED_FIX}"
            )
        return super().no_growth(start_j, end_j)

    def describe(self) -> str:
        tool = self._used or "sstat"
        return (
            f"Slurm ConsumedEnergy of job step {self.step} ({self.nodes} node(s), read with "
            f"{tool} at the run's start and end): the acct_gather_energy plugin's node-level "
            "figure (what RAPL/NVML miss included; right for exclusive allocations only; "
            "updated every JobAcctGatherFrequency); a cross-check, not added to the totals"
        )


def reference(
    env: Mapping[str, str], which: Mapping[str, str | None]
) -> SlurmEnergy | MeterUnavailable:
    """The step's reference, or why there is none (quiet outside a Slurm job)."""
    job = env.get("SLURM_JOB_ID", "")
    if not job:
        return MeterUnavailable(NAME, Component.OTHER, "not a Slurm job", quiet=True)
    sstat, sacct = which.get("sstat"), which.get("sacct")
    if not sstat and not sacct:
        return MeterUnavailable(
            NAME,
            Component.OTHER,
            f"Slurm job {job}, but neither sstat nor sacct is on PATH",
            "put Slurm's client commands on PATH (e.g. `module load slurm`) or disable the "
            "plugin: GREEN_MLOPS_DISABLE_PLUGINS=slurm_energy",
        )
    step = env.get("SLURM_STEP_ID", "")
    step = step if step.isdigit() else "batch"  # a batch script's processes: the batch step
    nodes = env.get(
        "SLURM_STEP_NUM_NODES", "1" if step == "batch" else env.get("SLURM_NNODES", "?")
    )
    return SlurmEnergy(f"{job}.{step}", nodes, sstat, sacct)


@hookimpl
def green_mlops_energy_references(
    settings: Settings,
) -> list[EnergyReference | MeterUnavailable]:
    return [reference(os.environ, {t: shutil.which(t) for t in ("sstat", "sacct")})]
