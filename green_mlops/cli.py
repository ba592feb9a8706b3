"""The ``green-mlops`` command: ``doctor``, ``demo``, ``config``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from green_mlops.config import ConfigError, Settings, settings_table

if TYPE_CHECKING:
    from rich.console import Console

    from green_mlops.snapshot import Snapshot


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def doctor(settings: Settings, sample_s: float) -> int:
    """Which meters are active here, which are not and why, with the fix; then a short sample."""
    from rich.table import Table

    from green_mlops.plugin_manager import get_plugin_manager
    from green_mlops.tracker import Tracker, offers_from_plugins, select_meters

    console = _console()
    pm = get_plugin_manager(settings.disable_plugins)
    names = sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)
    console.print(f"[bold]Plugins loaded:[/] {', '.join(names) or 'none'}")
    if settings.disable_plugins:
        console.print(f"[bold]Disabled:[/] {', '.join(sorted(settings.disable_plugins))}")
    used, superseded, unavailable = select_meters(offers_from_plugins(settings))

    table = Table(title="Meters on this machine", show_lines=True)
    for column in ("meter", "status", "device", "component", "method", "uncertainty", "detail"):
        table.add_column(column)
    for status, meters in (("[green]active[/]", used), ("[yellow]superseded[/]", superseded)):
        for meter in meters:
            for d in meter.devices:
                table.add_row(
                    meter.name,
                    status,
                    d.id,
                    d.component.value,
                    d.method.value,
                    f"±{d.uncertainty:.0%}",
                    d.label,
                )
    for item in unavailable:
        detail = item.reason + (f"\n[bold]fix:[/] {item.fix}" if item.fix else "")
        table.add_row(item.name, "[red]unavailable[/]", "", item.component.value, "", "", detail)
    console.print(table)
    _print_providers(console, settings)
    if not used:
        console.print("[red]No meter is active: nothing would be measured.[/]")
        return 1
    if sample_s > 0:
        quiet = logging.getLogger("green_mlops")
        level, quiet.level = quiet.level, logging.ERROR  # the table above said it already
        try:
            tracker = Tracker(settings, meters=[*used, *unavailable]).start()
            time.sleep(sample_s)
            snapshot = tracker.stop()
        finally:
            quiet.level = level
        _print_snapshot(console, snapshot, title=f"Power over {sample_s:g} s")
    return 0


def _print_providers(console: Console, settings: Settings) -> None:
    """Carbon-intensity providers in the configured order, and whether each can be used."""
    from rich.table import Table

    from green_mlops.carbon import providers_from_plugins

    location = settings.location or "[yellow]unknown: world average (set GREEN_MLOPS_LOCATION)[/]"
    table = Table(title=f"Carbon intensity for location {location}")
    for column in ("order", "provider", "status"):
        table.add_column(column)
    for i, provider in enumerate(providers_from_plugins(settings), 1):
        reason = provider.configured()
        status = "[green]configured[/]" if reason is None else f"[yellow]skipped:[/] {reason}"
        table.add_row(str(i), provider.name, status)
    console.print(table)


def _print_snapshot(console: Console, snapshot: Snapshot, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("device", "method", "energy (J)", "mean power (W)", "status"):
        table.add_column(column, justify="right" if "(" in column else "left")
    seconds = max(snapshot.duration_s, 1e-9)
    for d in snapshot.devices:
        status = d.status + (f": {d.problem}" if d.problem else "")
        table.add_row(d.device, d.method, f"{d.joules:.1f}", f"{d.joules / seconds:.1f}", status)
    console.print(table)
    for heading, lines in (
        ("Notes", snapshot.notes),
        ("Problems", snapshot.problems),
    ):
        for line in lines:
            console.print(f"[bold]{heading}:[/] {line}")


def demo(settings: Settings, epochs: int) -> int:
    from rich.table import Table

    from green_mlops.demo import run_demo

    console = _console()
    console.print(f"Training a small MLP for {epochs} epochs on synthetic data (CPU)...")
    result = run_demo(epochs=epochs, settings=settings)
    snap = result.snapshot
    table = Table(title=f"Energy of run {result.run_id}")
    table.add_column("what")
    table.add_column("kWh", justify="right")
    table.add_column("J", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_row("total", f"{snap.kwh:.3e}", f"{snap.joules:.1f}", f"{snap.duration_s:.1f}")
    for component, joules in sorted(snap.joules_by_component().items()):
        table.add_row(
            f"  {component} ({snap.methods[component]})",
            f"{joules / 3.6e6:.3e}",
            f"{joules:.1f}",
            "",
        )
    for name, phase in sorted(snap.phases.items()):
        table.add_row(
            f"  phase {name}",
            f"{phase.joules / 3.6e6:.3e}",
            f"{phase.joules:.1f}",
            f"{phase.duration_s:.1f}",
        )
    console.print(table)
    console.print(
        f"±{snap.uncertainty_j:.1f} J; {'measured' if snap.measured else 'includes estimates'}; "
        f"final val_loss {result.val_loss:.4f}"
    )
    for line in (*snap.unavailable, *snap.problems):
        console.print(f"[yellow]note:[/] {line}")
    console.print(
        f"\nStored in MLflow ({result.tracking_uri}), experiment 'green-mlops-demo'. Open the UI:\n"
        f"  [bold]mlflow ui --backend-store-uri {result.tracking_uri}[/]  then http://127.0.0.1:5000"
    )
    return 0


def sync(settings: Settings) -> int:
    """Send the MLflow batches that could not be delivered during runs (kept in the spool)."""
    from green_mlops.integrations.mlflow import replay_spool

    console = _console()
    files = sorted((settings.cache_dir / "spool").glob("*.jsonl"))
    sent = failed = 0
    for path in files:
        try:
            sent += replay_spool(path)
        except Exception as exc:
            failed += 1
            console.print(f"[red]{path.stem}: still not delivered ({type(exc).__name__})[/]")
    console.print(f"sent {sent} batch(es) of {len(files)} run(s); {failed} run(s) still pending")
    return 1 if failed else 0


def show_config() -> int:
    from rich.table import Table

    table = Table(title="Settings (keyword argument > environment variable > default)")
    for column in ("variable", "default", "accepted", "meaning"):
        table.add_column(column)
    for row in settings_table():
        table.add_row(*row)
    _console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="green-mlops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_doctor = sub.add_parser("doctor", help="which meters work here, which do not, and the fix")
    p_doctor.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="measure for this long and show power per device (0: skip)",
    )
    p_demo = sub.add_parser("demo", help="train a small model, measure it, store it in MLflow")
    p_demo.add_argument("--epochs", type=int, default=3)
    sub.add_parser("config", help="list every setting with its variable and accepted values")
    sub.add_parser("sync", help="send MLflow values kept while the tracking server was down")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "config":
        return show_config()
    try:
        settings = _demo_settings() if args.command == "demo" else Settings.load()
    except ConfigError as exc:
        print(f"green-mlops: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "doctor":
        return doctor(settings, args.sample)
    if args.command == "sync":
        return sync(settings)
    return demo(settings, args.epochs)


def _demo_settings() -> Settings:
    """The environment's settings, with a finer time series unless the user chose one."""
    settings = Settings.load()
    if "GREEN_MLOPS_LOG_INTERVAL_S" not in os.environ:
        settings = settings.replace(log_interval_s=1.0)
    return settings


if __name__ == "__main__":
    sys.exit(main())
