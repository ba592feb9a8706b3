"""Energy figures from outside the process, checked against the measured total.

A *reference* is a whole-job energy figure kept by something else (a resource manager's
accounting, such as Slurm's ``ConsumedEnergy``; a PDU): node-level, so it includes what the
component meters (RAPL, NVML) do not see (power supplies, fans, NICs), but coarse (updated every
so many seconds) and without a per-device or per-phase breakdown. It is read at the run's start
and end by the process that reports the job's totals, logged as
``green/reference/<name>/energy_kwh`` beside the measured total, never added to it, with
``green/reference/<name>/measured_fraction`` = measured IT energy / reference. See
docs/multi-node.md ("Slurm's energy accounting").
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from green_mlops.log import warn_once
from green_mlops.meters import MeterUnavailable
from green_mlops.metrics import add_not_reported
from green_mlops.units import joules_to_kwh

__all__ = [
    "EnergyReference",
    "ReferenceUnavailable",
    "ReferenceWindow",
    "carried",
    "compare",
    "left_out",
]

PREFIX = "green/reference/"
#: Longest wait for the readings when the run ends, all of them together (a resource manager's
#: RPC on a busy cluster).
END_TIMEOUT_S = 5.0


class ReferenceUnavailable(Exception):
    """A reading that could not be taken, with the reason (and the fix) in words."""


class EnergyReference(abc.ABC):
    """Base class for references returned by the ``green_mlops_energy_references`` hook."""

    #: Short name, used in metric keys (``green/reference/<name>/energy_kwh``) and tags.
    name: str = ""

    @abc.abstractmethod
    def read(self, timeout_s: float) -> float:
        """Cumulative joules of the job (or job step) now; raises
        :class:`ReferenceUnavailable` with the reason when no figure can be read."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What the figure covers and how it is obtained, for the run's tag."""

    def no_growth(self, start_j: float, end_j: float) -> str:
        """Why a figure that did not grow over the run is not reported."""
        return (
            "the figure did not grow during the run (it is updated less often than the run lasted)"
        )


@dataclass
class _Window:
    reference: EnergyReference
    start_j: float | None = None
    problem: str = ""


class ReferenceWindow:
    """The references of one run: the start readings are taken in a background thread (a
    slow resource manager never delays the start), the end readings by :meth:`figures`."""

    def __init__(
        self,
        references: Sequence[EnergyReference],
        unavailable: Sequence[MeterUnavailable] = (),
    ) -> None:
        self._windows = [_Window(r) for r in references]
        #: What a plugin would read but cannot here (said in the run; quiet ones are not).
        self._unavailable = [u for u in unavailable if not u.quiet]
        for item in self._unavailable:
            warn_once(f"energy reference {item.describe()}", fix=bool(item.fix))
        self._thread: threading.Thread | None = None

    def start(self) -> ReferenceWindow:
        if self._windows:
            self._thread = threading.Thread(
                target=self._read_start, name="green-mlops-references", daemon=True
            )
            self._thread.start()
        return self

    def _read_start(self) -> None:
        for window in self._windows:
            try:
                window.start_j = window.reference.read(END_TIMEOUT_S)
            except ReferenceUnavailable as exc:
                window.problem = str(exc)
            except Exception as exc:  # a plugin's bug: said, never raised into the run
                window.problem = f"failed ({type(exc).__name__}: {exc})"

    def figures(self) -> tuple[dict[str, float], dict[str, str]]:
        """``green/reference/<name>/energy_kwh`` over the run so far, and the tags: what each
        covers, or why it is not reported (``green.not_reported`` items)."""
        late = ""
        deadline = time.monotonic() + END_TIMEOUT_S  # for the start and end readings in all
        if self._thread is not None:
            self._thread.join(END_TIMEOUT_S)
            if self._thread.is_alive():
                late = "the start reading did not answer in time"
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        missing = [f"{PREFIX}{u.name}/energy_kwh: {u.describe()}" for u in self._unavailable]
        for window in self._windows:
            name = window.reference.name
            key = f"{PREFIX}{name}/energy_kwh"
            problem = window.problem or (
                "" if window.start_j is not None else late or "no start reading"
            )
            end = None
            left = deadline - time.monotonic()
            if not problem and left <= 0:
                problem = "no time was left for the end reading"
            if not problem:
                try:
                    end = window.reference.read(left)
                except ReferenceUnavailable as exc:
                    problem = str(exc)
                except Exception as exc:
                    problem = f"failed ({type(exc).__name__}: {exc})"
            if end is not None and window.start_j is not None:
                if end > window.start_j:
                    metrics[key] = joules_to_kwh(end - window.start_j)
                    tags[f"green.reference.{name}"] = window.reference.describe()
                    continue
                problem = window.reference.no_growth(window.start_j, end)
            missing.append(f"{key}: {problem}")
            warn_once(f"{name} energy reference not reported: {problem}", fix="Fix:" in problem)
        if missing:
            tags["green.not_reported"] = "; ".join(missing)
        return metrics, tags


def compare(
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    earlier: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """``green/reference/<name>/measured_fraction``: the measured IT energy over each
    reference, where the measured total covers the whole job (every node reported).

    ``earlier``: the totals of a resumed run's earlier segments, added to ``metrics``; a
    reference they do not hold covers this segment only, so this segment's energy is used."""
    scope = tags.get("green.job.scope", "all")
    if tags.get("green.job.partial") == "true" or not scope.startswith("all"):
        return {}
    # a parent run's reference covers its nested runs' time: compare with its inclusive total
    inclusive = "green/inclusive/energy_kwh"
    which = inclusive if inclusive in metrics else "green/energy_kwh"
    measured = metrics.get(which)
    if measured is None:
        return {}
    before = (earlier or {}).get(which, 0.0)
    return {
        key.removesuffix("energy_kwh") + "measured_fraction": (
            measured if key in (earlier or {}) else measured - before
        )
        / value
        for key, value in metrics.items()
        if key.startswith(PREFIX) and key.endswith("/energy_kwh") and value > 0
    }


def carried(
    source: Mapping[str, float], metrics: Mapping[str, float], tags: Mapping[str, str]
) -> dict[str, float]:
    """The references of ``source`` (the measuring process's result), compared with the
    totals ``metrics`` (summed over ranks): what a callback that sums the ranks logs."""
    out = {k: v for k, v in source.items() if k.startswith(PREFIX) and k.endswith("/energy_kwh")}
    return {**out, **compare({**metrics, **out}, tags)}


def left_out(tags: dict[str, str], why: str) -> None:
    """A reference read for a part of the run only (a resumed fit's last stage): its tag goes,
    and ``green.not_reported`` says why it is absent."""
    for key in [k for k in tags if k.startswith("green.reference.")]:
        name = key.removeprefix("green.reference.")
        del tags[key]
        add_not_reported(tags, f"{PREFIX}{name}/energy_kwh: {why}")
