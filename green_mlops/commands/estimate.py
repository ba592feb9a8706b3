"""``green-mlops estimate --pilot RUN_ID (--flops N | --scale params=4x,tokens=10x | --epochs E)``:
the full run priced from a measured pilot run (green_mlops.pilot computes; this module reads the
run from MLflow and prints).

Exit codes: 0 an estimate; 2 the pilot cannot price it (no FLOPs, unknown hardware: the message
says what to log or pass); 4 the run could not be read, or --save FILE not written.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="price a full run (energy, time, carbon, cost) from a measured pilot run",
        description=(
            "Estimate the full run's energy, time, carbon and cost from a pilot run's joules "
            "per FLOP, MFU, phase shares and power, with an interval and the assumptions."
        ),
    )
    parser.add_argument(
        "--pilot",
        required=True,
        action="append",
        metavar="RUN_ID",
        help="the pilot's MLflow run; twice (two sizes of one family, the same data): the "
        "per-batch overhead and the J/FLOP trend are fitted through both",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--flops", type=float, help="the full run's FLOPs")
    what.add_argument("--scale", help="params=<f>x,tokens=<f>x: 6 N D FLOPs scaled")
    what.add_argument("--epochs", type=float, help="the full run's epochs (the pilot's data)")
    parser.add_argument(
        "--pilot-epochs", type=float, help="the pilot's epochs (default: its param)"
    )
    parser.add_argument("--hardware", help='the full run\'s device, e.g. "NVIDIA H100 SXM"')
    parser.add_argument("--dtype", default="bf16", help="compute dtype for --hardware's peak")
    parser.add_argument(
        "--save",
        metavar="FILE",
        help="write the estimate to FILE; a run started with GREEN_MLOPS_ESTIMATE=FILE is "
        "tagged with the pilot and logs green/estimate/error at its end",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.set_defaults(run=run)


def run(args: Any) -> int:
    from rich.console import Console

    from green_mlops.pilot import PilotError, estimate, estimate_trend, parse_scale
    from green_mlops.runs import RunsUnavailable

    console = Console(highlight=False)
    try:
        from green_mlops.integrations.mlflow.reader import read_runs

        records = read_runs(args.tracking_uri, run_ids=list(args.pilot))
    except (RunsUnavailable, ImportError) as exc:
        console.print(f"green-mlops estimate: {exc}")
        return 4
    if len(args.pilot) > 2:
        console.print(
            f"green-mlops estimate: --pilot given {len(args.pilot)} times: at most two pilots"
        )
        return 2
    found = {r.run_id: r for r in records}
    missing = [p for p in args.pilot if p not in found]
    if missing:
        console.print(f"green-mlops estimate: no run {missing[0]!r} at the tracking URI")
        return 4
    chosen = [found[p] for p in args.pilot]
    pilot = max(chosen, key=lambda r: r.metrics.get("green/flops") or 0.0)
    pilot_epochs = args.pilot_epochs
    for key in ("max_epochs", "epochs"):
        if pilot_epochs is None and key in pilot.params:
            with contextlib.suppress(ValueError):
                pilot_epochs = float(pilot.params[key])
    try:
        size = {
            "flops": args.flops,
            "scale": parse_scale(args.scale) if args.scale is not None else None,
            "epochs": args.epochs,
            "pilot_epochs": pilot_epochs,
            "hardware": args.hardware,
        }
        if len(chosen) == 2:
            result = estimate_trend([(r.metrics, r.tags) for r in chosen], **size)
        else:
            result = estimate(pilot.metrics, pilot.tags, dtype=args.dtype, **size)
    except PilotError as exc:
        names = " and ".join(f"{r.run_id} ({r.name})" for r in chosen)
        console.print(f"green-mlops estimate: pilot {names}: {exc}")
        return 2
    others = "".join(f" and {r.run_id} ({r.name})" for r in chosen if r is not pilot)
    console.print(f"Full run estimated from pilot {pilot.run_id} ({pilot.name}){others}:")
    console.print(f"  FLOPs     {result.flops:.4g}")
    console.print(
        f"  energy    {result.energy_kwh:.4g} kWh  ({result.low_kwh:.4g} .. {result.high_kwh:.4g})"
    )
    console.print(f"  time      {result.duration_s:.4g} s ({result.duration_s / 3600:.3g} h)")
    if result.co2e_g is not None:
        console.print(f"  carbon    {result.co2e_g:.4g} g CO2e")
    if result.cost is not None:
        console.print(f"  cost      {result.cost:.4g} {result.currency}".rstrip())
    shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(result.phases.items()) if v > 0)
    if shares:
        console.print(f"  phases    {shares} (the pilot's shares)")
    console.print("Assumptions:")
    for line in result.assumptions:
        console.print(f"  - {line}")
    if args.save:
        from pathlib import Path

        from green_mlops.pilot import ESTIMATE_ENV, save_estimate

        try:
            save_estimate(Path(args.save), pilot.run_id, result)
        except OSError as exc:
            console.print(f"green-mlops estimate: --save {args.save!r}: {exc}")
            return 4
        console.print(f"Saved to {args.save}: start the full run with {ESTIMATE_ENV}={args.save}")
    return 0
