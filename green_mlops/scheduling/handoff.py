"""The plan handed from ``green-mlops run`` to the command it launches, and what a measured run
under it records: ``green.schedule.*`` tags and ``green/schedule/co2e_if_run_now_g``.

The launcher puts the plan in the :data:`ENV` variable (JSON, an internal hand-off); a
measured run in the child (GREEN_MLOPS_ENABLE=1) reads it at its end. The counterfactual
"run now" carbon prices the run's own energy timeline, shifted to the time the job was
submitted, with a fresh accountant of the same settings: the same providers, signal and basis
as the run's own ``green/co2e_g``, and the same factor from grid carbon to that figure (PUE).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

from green_mlops.metrics import add_not_reported

log = logging.getLogger(__name__)

__all__ = ["ENV", "RUN_NOW_KEY", "Schedule", "attach_schedule", "schedule_tags"]

ENV = "GREEN_MLOPS_SCHEDULE"
RUN_NOW_KEY = "green/schedule/co2e_if_run_now_g"
#: Longest wait for the intensity of the run-now window at the end of the run.
WAIT_S = 3.0


@dataclass(frozen=True)
class Schedule:
    submitted_at: float
    planned_start: float
    planned_end: float
    started_at: float
    deadline: float
    decision: str
    reason: str
    zone: str
    source: str
    basis: str
    planned_mean_g_per_kwh: float
    run_now_mean_g_per_kwh: float
    planned_saving_fraction: float
    min_saving: float
    replans: int = 0

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Schedule | None:
        """The plan in :data:`ENV`, None when unset; ValueError naming what is wrong when it
        is not the launcher's JSON (numbers finite, texts strings)."""
        text = (os.environ if environ is None else environ).get(ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
            schedule = cls(**data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"malformed {ENV} ({type(exc).__name__}: {exc})") from None
        for f in fields(cls):
            value = getattr(schedule, f.name)
            kind = {"float": float, "str": str, "int": int}[str(f.type)]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = isinstance(value, str) if kind is str else number and math.isfinite(value)
            if not ok or (kind is int and not isinstance(value, int)):
                raise ValueError(f"malformed {ENV}: {f.name}={value!r} is not a finite {f.type}")
        return schedule


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule_tags(s: Schedule) -> dict[str, str]:
    """The ``green.schedule.*`` tags (docs/scheduling.md)."""
    return {
        "green.schedule.decision": s.decision,
        "green.schedule.reason": s.reason,
        "green.schedule.submitted_at": _iso(s.submitted_at),
        "green.schedule.planned_start": _iso(s.planned_start),
        "green.schedule.started_at": _iso(s.started_at),
        "green.schedule.deadline": _iso(s.deadline),
        "green.schedule.waited_s": f"{max(0.0, s.started_at - s.submitted_at):.0f}",
        "green.schedule.forecast": f"{s.source} ({s.basis})",
        "green.schedule.zone": s.zone,
        "green.schedule.planned_mean_g_per_kwh": f"{s.planned_mean_g_per_kwh:.1f}",
        "green.schedule.run_now_mean_g_per_kwh": f"{s.run_now_mean_g_per_kwh:.1f}",
        "green.schedule.planned_saving_pct": f"{100 * s.planned_saving_fraction:.2f}",
        "green.schedule.min_saving_pct": f"{100 * s.min_saving:.1f}",
        "green.schedule.replans": str(s.replans),
    }


def attach_schedule(
    settings: Any,
    timeline: Sequence[tuple[float, float]],
    carbon: Any,
    metrics: dict[str, float],
    tags: dict[str, str],
) -> None:
    """Add the plan's tags and the run-now carbon to a final result, when the run was launched
    by ``green-mlops run``. Never raises."""
    try:
        schedule = Schedule.from_env()
    except ValueError as exc:  # never harm the run: no plan, and say why
        log.warning("green-mlops: ignoring the plan: %s", exc)
        problems = tags.get("green.problems", "")
        tags["green.problems"] = f"{problems}; {exc}" if problems else str(exc)
        add_not_reported(tags, f"{RUN_NOW_KEY}: {exc}")
        return
    if schedule is None:
        return
    try:
        tags.update(schedule_tags(schedule))
        value, why = _run_now_grams(settings, timeline, carbon, metrics, schedule)
    except Exception as exc:  # never harm the run
        value, why = None, f"failed ({type(exc).__name__}: {exc})"
    if value is not None:
        metrics[RUN_NOW_KEY] = value
    else:
        add_not_reported(tags, f"{RUN_NOW_KEY}: {why}")


def _run_now_grams(
    settings: Any,
    timeline: Sequence[tuple[float, float]],
    carbon: Any,
    metrics: Mapping[str, float],
    schedule: Schedule,
) -> tuple[float | None, str]:
    co2e = metrics.get("green/co2e_g")
    grams = getattr(carbon, "grams", None)
    if co2e is None or grams is None or not timeline:
        return None, "the run's own carbon is not known"
    if grams <= 0 or getattr(carbon, "unpriced_kwh", 0.0) > 0:
        return None, "the run's own carbon is not fully priced"
    shift = schedule.submitted_at - schedule.started_at
    shifted = [(t + shift, j) for t, j in timeline]
    from green_mlops.carbon import CarbonAccountant

    accountant = CarbonAccountant(settings)
    try:
        now = accountant.result(shifted, wait_s=WAIT_S)
    finally:
        accountant.close()
    if now.unpriced_kwh > 0 or not math.isfinite(now.grams):
        return None, "no intensity for the run-now window"
    ours, theirs = _sources(carbon), _sources(now)
    if ours != theirs:  # another signal or basis: not comparable
        return None, (
            f"the run-now window would be priced by {', '.join(sorted(theirs))}, the run by "
            f"{', '.join(sorted(ours))}"
        )
    return now.grams * (co2e / grams), ""


def _sources(carbon: Any) -> set[str]:
    """Provider names that priced ``carbon`` (``kwh_by_source`` keys are describe() texts)."""
    return {str(key).split("/", 1)[0] for key in getattr(carbon, "kwh_by_source", {})}
