"""The ``green-mlops`` command line (``green-mlops --help`` lists its commands)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from green_mlops.config import ConfigError, Settings, settings_table
from green_mlops.log import GreenMlopsWarning
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:
    from rich.console import Console

    from green_mlops.meters import Meter, MeterUnavailable
    from green_mlops.plugin_manager import PluginManager
    from green_mlops.snapshot import Snapshot


#: Commands that read finished runs, one module each in :mod:`green_mlops.commands`; each has
#: ``register(subparsers)``, which adds its parser with ``run`` (``args -> exit code``) as default.
COMMANDS: tuple[str, ...] = ("compare", "audit", "report", "verify", "plan", "run", "estimate")


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def doctor(settings: Settings, sample_s: float) -> int:
    """Which meters are active here, which are not and why, with the fix; then a short sample."""
    from green_mlops.plugin_manager import get_plugin_manager
    from green_mlops.tracker import Tracker, offers_from_plugins, select_meters

    console = _console()
    _print_plugins(console, get_plugin_manager(settings.disable_plugins))
    _print_extras(console)
    used, superseded, unavailable = select_meters(offers_from_plugins(settings))

    _print_meters(console, used, superseded, unavailable)
    _print_references(console, settings)
    _print_providers(console, settings)
    if not used:
        console.print("[red]No meter is active: nothing would be measured.[/]")
        return 1
    if sample_s > 0:
        # the tables above said it already: no log record, no GreenMlopsWarning (setLevel: clears
        # the level cache that logging keeps per logger; assigning .level would not)
        quiet = logging.getLogger("green_mlops")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GreenMlopsWarning)
                tracker = Tracker(settings, meters=[*used, *unavailable]).start()
                before = _cpu_seconds()
                time.sleep(sample_s)
                others = _others_share(before, _cpu_seconds())
                snapshot = tracker.stop()
        finally:
            quiet.setLevel(level)
        _print_snapshot(console, snapshot, title=f"Power over {sample_s:g} s")
        if settings.share == "machine":
            _print_share_hint(console, used, others)
    return 0


#: Share of the machine's CPU time used by other processes than this one, over the sample,
#: above which doctor says that the machine share bills them too.
OTHERS_CPU_HINT = 0.25


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy, total) CPU seconds of the whole machine, and this process's own (its threads)."""
    import psutil

    from green_mlops.plugins.cpu_estimate import _busy_total  # the CPU estimate's own count

    own = psutil.Process().cpu_times()
    return (*_busy_total(psutil.cpu_times()), own.user + own.system)


def _others_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Fraction of all CPUs' time that processes other than this one kept busy in between."""
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, busy - own) / total if total > 0 else 0.0


def _print_share_hint(console: Console, used: Sequence[Meter], others: float) -> None:
    """Under the machine share, a CPU or RAM estimate bills every process on the machine: say
    so when other processes kept a large part of the CPU busy during the sample."""
    from green_mlops.meters import Component, Method

    estimated = sorted(
        {
            d.component.value
            for meter in used
            for d in meter.devices
            if d.method is Method.ESTIMATE and d.component in (Component.CPU, Component.RAM)
        }
    )
    if not estimated or others < OTHERS_CPU_HINT:
        return
    what = " and ".join(c.upper() for c in estimated)
    verb = "estimates include" if len(estimated) > 1 else "estimate includes"
    console.print(
        f"[yellow]Shared machine:[/] other processes kept {others:.0%} of this machine's CPU "
        f"time busy during the sample, and the {what} {verb} their load "
        "(GREEN_MLOPS_SHARE=machine). On a shared host, set "
        "[bold]GREEN_MLOPS_SHARE=process[/] to count only the training job's process tree "
        "(energy counters such as RAPL and NVML measure the whole device either way)."
    )


_METER_COLUMNS = ("meter", "status", "device", "component", "method", "uncertainty")


def _print_meters(
    console: Console,
    used: Sequence[Meter],
    superseded: Sequence[Meter],
    unavailable: Sequence[MeterUnavailable],
) -> None:
    """One entry per device: its short fields on one line, its detail (basis, reason and fix)
    under it at the table's full width, so that an 80-column terminal does not wrap the
    detail to a word a line (a table column of its own gets what six other columns leave)."""
    from rich import box
    from rich.console import Group
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    entries: list[tuple[tuple[str, ...], str, Text]] = []  # (fields, status style, detail)
    for status, style, meters in (("active", "green", used), ("superseded", "yellow", superseded)):
        for meter in meters:
            for d in meter.devices:
                shown = (meter.name, status, d.id, d.component.value, d.method.value)
                entries.append(((*shown, f"±{d.uncertainty:.0%}"), style, Text(d.label)))
    for item in unavailable:
        detail = Text(item.reason)
        if item.fix:
            detail.append("\nfix: ", style="bold").append(item.fix)
        entries.append(
            ((item.name, "unavailable", "", item.component.value, "", ""), "red", detail)
        )
    widths = [max(len(c), *(len(e[0][i]) for e in entries)) for i, c in enumerate(_METER_COLUMNS)]

    def line(fields: Sequence[str], status_style: str = "") -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, (field, width) in enumerate(zip(fields, widths, strict=True)):
            text.append(field.ljust(width), style=status_style if i == 1 else "")
            text.append("  " if i < len(widths) - 1 else "")
        text.rstrip()
        return text

    header = line(_METER_COLUMNS)
    header.stylize("bold")
    table = Table(title="Meters on this machine", show_lines=True, box=box.HEAVY_HEAD)
    table.add_column(header)
    for cells, style, detail in entries:
        table.add_row(Group(line(cells, style), Padding(detail, (0, 0, 0, 4))))
    console.print(table)


def _print_references(console: Console, settings: Settings) -> None:
    """Whole-job energy figures kept outside the process (Slurm's), read for each run."""
    from rich.markup import escape

    from green_mlops.session import reference_offers

    used, unavailable = reference_offers(settings)
    for ref in used:
        console.print(f"Energy reference [green]{ref.name}[/]: {escape(ref.describe())}")
    for item in unavailable:
        said = item.reason + (f". Fix: {item.fix}" if item.fix else "")
        console.print(f"Energy reference {item.name}: [yellow]unavailable[/]: {escape(said)}")


def _print_plugins(console: Console, pm: PluginManager) -> None:
    """Each plugin, the distribution (and version) it comes from, and whether it loaded."""
    from rich.table import Table

    table = Table(title="Plugins")
    for column in ("plugin", "distribution", "status"):
        table.add_column(column)
    for name, origin in pm.origins.items():
        if name in pm.load_errors:
            status = f"[red]failed:[/] {pm.load_errors[name]}"
        elif pm.is_blocked(name):
            status = "[yellow]disabled[/]"
        else:
            status = "[green]loaded[/]"
        table.add_row(name, origin, status)
    console.print(table)


def _print_extras(console: Console) -> None:
    """One line per extra of the distribution: installed, or the command that installs it."""
    from rich.markup import escape

    from green_mlops.extras import EXTRAS, install_command, missing_modules

    console.print("[bold]Extras:[/]")
    for extra, (purpose, _) in EXTRAS.items():
        missing = missing_modules(extra)
        if missing:
            console.print(
                f"  {extra}: [yellow]missing[/] ({', '.join(missing)}): "
                f"[bold]{escape(install_command(extra))}[/]  for {purpose}",
                soft_wrap=True,
            )
        else:
            console.print(f"  {extra}: [green]installed[/]  ({purpose})", soft_wrap=True)


def _print_providers(console: Console, settings: Settings) -> None:
    """Carbon-intensity providers in the configured order, and whether each can be used."""
    from rich.table import Table

    from green_mlops.carbon import chosen_providers

    location = settings.location or "[yellow]unknown: world average (set GREEN_MLOPS_LOCATION)[/]"
    table = Table(title=f"Carbon intensity for location {location}")
    for column in ("order", "provider", "status"):
        table.add_column(column)
    providers, problems = chosen_providers(settings)
    for i, provider in enumerate(providers, 1):
        reason = provider.configured()
        status = "[green]configured[/]" if reason is None else f"[yellow]skipped:[/] {reason}"
        table.add_row(str(i), provider.name, status)
    for what, why in problems.items():
        table.add_row("", what, f"[red]unavailable:[/] {why}")
    console.print(table)
    if not providers:
        console.print("[red]No intensity provider is available: carbon would not be reported.[/]")


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


def demo(overrides: dict[str, Any], epochs: int) -> int:
    import importlib.util

    from rich.table import Table

    from green_mlops.integrations.demo import DEFAULT_TRACKING_URI, run_demo

    # Lightning, and MLflow with the server side where the run goes to a local sqlite store
    # (mlflow-skinny cannot open one): the `demo` extra
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    needed = [
        "lightning",
        "mlflow",
        *(["sqlalchemy", "alembic"] if uri.startswith("sqlite:") else []),
    ]
    missing = [module for module in needed if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"green-mlops demo: not installed: {', '.join(missing)}; the demo needs Lightning and "
            f'MLflow with its local store ({uri}): pip install "green-mlops[demo]"',
            file=sys.stderr,
        )
        return 1
    console = _console()
    console.print(f"Training a small MLP for {epochs} epochs on synthetic data (CPU)...")
    result = run_demo(epochs=epochs, settings=overrides)
    m, tags = result.metrics, result.tags
    table = Table(title=f"MLflow run {result.run_id}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("how it was obtained")
    table.add_row(
        "energy", f"{m['green/energy_kwh'] * J_PER_KWH:.1f} J", tags.get("green.meters", "")
    )
    for key in sorted(k for k in m if k.startswith("green/energy/")):
        component = key.split("/")[-1].removesuffix("_kwh")
        method = tags.get(f"green.method.{component}", "")
        table.add_row(f"  {component}", f"{m[key] * J_PER_KWH:.1f} J", method)
    for key in sorted(k for k in m if k.startswith("green/phase/") and k.count("/") == 2):
        if key.endswith("_kwh"):
            phase = key.split("/")[-1].removesuffix("_kwh")
            seconds = m.get(f"green/phase/{phase}_s", 0.0)
            table.add_row(f"  phase {phase}", f"{m[key] * J_PER_KWH:.1f} J", f"{seconds:.1f} s")
    if "green/co2e_g" in m:
        table.add_row(
            "carbon",
            f"{m['green/co2e_g'] * 1000:.3f} mg CO2e",
            tags.get("green.intensity.source", ""),
        )
    if "green/flops" in m:
        table.add_row("FLOPs", f"{m['green/flops']:.3e}", "torch FlopCounterMode, once per shape")
    if "green/flops_per_joule" in m:
        table.add_row("FLOPs per joule", f"{m['green/flops_per_joule']:.3e}", "")
    table.add_row("final val_acc", f"{result.val_acc:.4f}", "")
    console.print(table)
    console.print(
        f"Location: {tags.get('green.location', 'unknown')}; measured: "
        f"{tags.get('green.measured', '?')} (false means some numbers are estimates, "
        "see `green-mlops doctor`)"
    )
    console.print(
        f"\nStored in MLflow ({result.tracking_uri}), experiment 'green-mlops-demo'. Open the UI:\n"
        f"  [bold]{mlflow_command()} ui --backend-store-uri {result.tracking_uri}[/]"
        "  then http://127.0.0.1:5000"
    )
    return 0


def mlflow_command(executable: str | None = None) -> str:
    """The ``mlflow`` script installed beside this Python (a virtual environment's ``bin``), if
    there is one; else plain ``mlflow``, found on the PATH."""
    from pathlib import Path

    beside = Path(executable or sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


def sync(settings: Settings) -> int:
    """Send the MLflow batches that could not be delivered during runs (kept in the spool)."""
    from green_mlops.extras import install_command, missing_modules

    files = sorted((settings.cache_dir / "spool").glob("*.jsonl"))
    missing = missing_modules("mlflow")
    if files and missing:
        print(
            f"green-mlops sync: {len(files)} run(s) wait in the spool, but MLflow is not installed "
            f"({', '.join(missing)}): {install_command('mlflow')}",
            file=sys.stderr,
        )
        return 1
    from green_mlops.integrations.mlflow import replay_spool

    console = _console()
    sent = failed = 0
    for path in files:
        try:
            sent += replay_spool(path)
        except Exception as exc:
            failed += 1
            console.print(f"[red]{path.stem}: still not delivered ({type(exc).__name__})[/]")
    if not missing:
        from green_mlops.integrations.mlflow.spool import remove_orphan_locks

        remove_orphan_locks(settings.cache_dir / "spool")  # a spool's lock goes with it
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
    parser = argparse.ArgumentParser(
        prog="green-mlops",
        description="Measure, compare and budget the energy and carbon of ML training runs.",
    )
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
    for name in COMMANDS:
        importlib.import_module(f"green_mlops.commands.{name}").register(sub)
    args = parser.parse_args(argv)

    if getattr(args, "run", None) is not None:  # a command of green_mlops.commands
        return int(args.run(args))
    if args.command == "config":
        return show_config()
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"green-mlops: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        # a finer power time series for a short run, unless the user chose one
        fine = {} if "GREEN_MLOPS_LOG_INTERVAL_S" in os.environ else {"log_interval_s": 1.0}
        return demo(fine, args.epochs)
    if args.command == "doctor":
        return doctor(settings, args.sample)
    return sync(settings)


if __name__ == "__main__":
    sys.exit(main())
