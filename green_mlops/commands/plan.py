"""``green-mlops plan``: when to run a job so that it emits least, on the providers' forecast
(green_mlops.scheduling plans; this module parses and presents).

Exit codes: 0 a plan (wait or run now), 2 no plan (no forecast for the location, a job longer
than the forecast, a bad argument), with the reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from green_mlops.scheduling.planner import DEFAULT_MIN_SAVING, Job, Plan, PlanError

__all__ = ["PlanRequest", "make_plan", "parse_duration", "parse_moment", "register", "run"]

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def parse_duration(text: str) -> float:
    """Seconds of ``6h``, ``90m``, ``1h30m``, ``300s``, ``1.5d``; ValueError otherwise."""
    compact = text.strip().lower().replace(" ", "")
    parts = _PART.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"duration {text!r}: expected e.g. 6h, 90m, 1h30m, 300s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_moment(text: str, now: float) -> float:
    """Unix seconds of an ISO 8601 time (``2026-12-02T08:00Z``; no offset: UTC) or of ``+8h``
    (from now); ValueError otherwise."""
    from green_mlops.intensity import parse_time

    value = text.strip()
    if value.startswith("+"):
        return now + parse_duration(value[1:])
    try:
        return parse_time(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"time {text!r}: expected ISO 8601 (2026-12-02T08:00Z) or +DURATION (+8h)"
        ) from None


@dataclass(frozen=True)
class PlanRequest:
    duration_s: float
    finish_by: float | None
    start_by: float | None
    location: str | None
    interruptible: bool = False
    resume_overhead_s: float = 0.0
    energy_kwh: float | None = None
    min_saving: float = DEFAULT_MIN_SAVING
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Planned:
    plan: Plan
    json: list[dict[str, Any]]
    source: str
    basis: str


def add_plan_arguments(parser: Any, *, interruptible: bool = True) -> None:
    """The job and deadline options, shared with ``green-mlops run`` (which starts its
    command once: no interruptible options)."""
    parser.add_argument("--duration", required=True, help="how long the job runs: 6h, 90m")
    deadline = parser.add_mutually_exclusive_group(required=True)
    deadline.add_argument("--finish-by", metavar="TIME", help="done by: 2026-12-02T08:00Z, +8h")
    deadline.add_argument("--start-by", metavar="TIME", help="started by (latest start)")
    parser.add_argument("--location", help="DE, US-CAL-CISO, aws:eu-west-1 (default: settings)")
    if interruptible:
        parser.add_argument("--interruptible", action="store_true", help="may pause, resume")
        parser.add_argument("--resume-overhead", default="0s", help="restore time per resume")
    parser.add_argument("--energy-kwh", type=float, help="the job's energy, for carbon in g")
    parser.add_argument(
        "--min-saving",
        default=f"{DEFAULT_MIN_SAVING:.0%}",
        help="wait only for at least this saving (default 5%%, the forecast's error); 0 always",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=[],
        help="intensity provider to ask (repeatable; default GREEN_MLOPS_INTENSITY_PROVIDERS)",
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="the cleanest time to run a job before its deadline, on the grid forecast",
        description=(
            "Plan a job into the lowest-carbon window of the intensity forecast (the Carbon "
            "Aware SDK's best window; interruptible jobs: the cheapest slots with a restore "
            "cost), with the saving vs running now. Exit 2 when no plan can be made."
        ),
    )
    add_plan_arguments(parser)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(run=run)


def option(name: str, text: str, parse: Any) -> Any:
    """``parse(text)``; its ValueError names the option (``--duration '6x': expected ...``)."""
    try:
        return parse(text)
    except ValueError as exc:
        said = str(exc).split(": ", 1)[-1]
        raise ValueError(f"{name} {text!r}: {said}") from None


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if not seconds > 0:
        raise ValueError("expected a duration > 0, e.g. 6h, 90m")
    return seconds


def request_from(args: Any, now: float) -> PlanRequest:
    """ValueError naming the option, the value and the accepted form for a bad value."""
    text = str(args.min_saving).strip()
    try:
        min_saving = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        min_saving = math.nan
    if not 0 <= min_saving < 1:
        raise ValueError(
            f"--min-saving {text!r}: expected a fraction in [0, 1) or a percentage below 100% "
            "(0.05, 5%)"
        )
    if args.energy_kwh is not None and not (0 <= args.energy_kwh < math.inf):
        raise ValueError(f"--energy-kwh {args.energy_kwh}: expected a number >= 0")
    deadlines = {}
    for name, value in (("--finish-by", args.finish_by), ("--start-by", args.start_by)):
        if value is not None:
            deadlines[name] = at = option(name, value, lambda t: parse_moment(t, now))
            if at < now:
                raise ValueError(
                    f"{name} {value!r}: in the past (now is {_iso(now)}); expected a later time, "
                    "ISO 8601 (2026-12-02T08:00Z) or +DURATION (+8h)"
                )
    return PlanRequest(
        duration_s=option("--duration", args.duration, _positive_duration),
        finish_by=deadlines.get("--finish-by"),
        start_by=deadlines.get("--start-by"),
        location=args.location,
        interruptible=bool(getattr(args, "interruptible", False)),
        resume_overhead_s=option(
            "--resume-overhead", getattr(args, "resume_overhead", "0s"), parse_duration
        ),
        energy_kwh=args.energy_kwh,
        min_saving=min_saving,
        providers=tuple(args.provider or ()),
    )


def _iso(t: float) -> str:
    from green_mlops.scheduling.casdk import iso

    return iso(t)


def make_plan(request: PlanRequest, settings: Any, now: float) -> Planned:
    """Fetch the forecast and plan; PlanError (or ValueError) with the reason."""
    from green_mlops.location import parse_location
    from green_mlops.scheduling.casdk import to_casdk
    from green_mlops.scheduling.forecasts import fetch_forecast
    from green_mlops.scheduling.planner import plan

    where = request.location or settings.location
    if not where:
        raise PlanError("no location: give --location (DE, US-CAL-CISO) or GREEN_MLOPS_LOCATION")
    location = parse_location(where)
    deadline = request.finish_by if request.finish_by is not None else request.start_by
    assert deadline is not None
    end = deadline if request.finish_by is not None else deadline + request.duration_s
    end = max(end, now + request.duration_s)  # "run now" is always priced
    fetched = fetch_forecast(settings, location, now, end, names=request.providers or None)
    job = Job(
        request.duration_s,
        request.energy_kwh,
        request.interruptible,
        request.resume_overhead_s if request.interruptible else 0.0,
    )
    earliest = max(now, fetched.forecast.start)  # a forecast may begin at the next step
    result = plan(
        fetched.forecast,
        job,
        earliest=earliest,
        finish_by=request.finish_by,
        start_by=request.start_by,
        min_saving=request.min_saving,
    )
    shape = to_casdk(
        result,
        fetched.forecast,
        fetched.series,
        location=location.raw,
        requested_at=now,
        data_end=end,
        duration_s=request.duration_s,
        skipped=fetched.skipped,
    )
    return Planned(result, shape, fetched.series.describe(), fetched.series.basis)


def run(args: Any) -> int:
    from rich.console import Console

    from green_mlops.config import ConfigError, Settings

    console = Console(highlight=False)
    now = time.time()
    try:
        settings = Settings.load()
        planned = make_plan(request_from(args, now), settings, now)
    except ConfigError as exc:
        console.print(f"green-mlops: configuration error: {exc}", markup=False)
        return 2
    except (PlanError, ValueError) as exc:
        console.print(f"green-mlops plan: no plan: {exc}", markup=False)
        return 2
    if args.format == "json":
        print(json.dumps(planned.json, indent=2))
    else:
        render_table(planned, console)
    return 0


def render_table(planned: Planned, console: Any) -> None:
    from rich.table import Table

    from green_mlops.scheduling.casdk import iso

    result = planned.plan
    table = Table(title="green-mlops plan", show_header=True)
    table.add_column("")
    table.add_column("planned" if result.decision == "wait" else "chosen: run now")
    table.add_column("run now")

    def when(p: Any) -> str:
        return "\n".join(f"{iso(a)} -> {iso(b)}" for a, b in p.slots)

    def carbon(p: Any) -> str:
        return "-" if p.carbon_g is None else f"{p.carbon_g:,.1f} g"

    marginal = " (marginal)" if planned.basis == "marginal" else ""
    table.add_row("window", when(result.chosen), when(result.now))
    table.add_row(
        f"forecast mean intensity{marginal}",
        f"{result.chosen.mean_g_per_kwh:.1f} g/kWh",
        f"{result.now.mean_g_per_kwh:.1f} g/kWh",
    )
    table.add_row(
        f"expected carbon{marginal} (forecast)", carbon(result.chosen), carbon(result.now)
    )
    if result.chosen.resumes:
        table.add_row("resumes", str(result.chosen.resumes), "0")
    console.print(table)
    saving = result.saving_g
    grams = "" if saving is None else f" ({saving:,.1f} g)"
    console.print(f"decision: {result.decision}: {result.reason}{grams}", markup=False)
    if result.decision == "run-now" and result.best is not result.now:
        console.print(f"(best window: {when(result.best)})", markup=False)
    console.print(f"forecast: {planned.source}", markup=False)
    if planned.basis == "marginal":
        console.print(
            "note: a MARGINAL signal (WattTime MOER): the plan minimises marginal emissions"
        )
    for note in planned.json[0]["greenMlops"]["notes"]:
        console.print(f"note: {note}", markup=False)
