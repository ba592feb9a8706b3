"""``green-mlops report``: a run, an experiment or report files as HTML, Markdown, our JSON,
a Hugging Face model card block, CodeCarbon CSV rows or a BoAmps report (green_mlops.reports
renders; this module reads the runs and writes the text)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from green_mlops.reports import FORMATS, TRAINING_TYPES, ReportError, ReportOptions, render
from green_mlops.runs import RunRecord, RunsUnavailable

__all__ = ["read_records", "register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="a report of runs: html, markdown, json, hf-card, codecarbon-csv, boamps",
        description=(
            "Render runs from MLflow (RUN_ID..., --experiment) or report files (PATH...: "
            "report.json / green_report.json, or directories holding them). Writes to stdout "
            "unless --output is given."
        ),
    )
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="RUN_ID|PATH",
        help="MLflow run ids, and/or report files or directories",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="MLflow experiment name or glob; repeatable",
    )
    parser.add_argument(
        "--filter", default="", metavar="FILTER", help="MLflow filter_string for --experiment"
    )
    parser.add_argument("--format", required=True, choices=tuple(FORMATS))
    parser.add_argument("--output", default=None, metavar="FILE", help="default: stdout")
    parser.add_argument(
        "--tracking-uri", default=None, metavar="URI", help="default: MLFLOW_TRACKING_URI"
    )
    parser.add_argument(
        "--metric", default=None, metavar="NAME", help="quality metric of the comparison"
    )
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument("--baseline", default=None, metavar="RUN_ID")
    parser.add_argument(
        "--training-type",
        choices=TRAINING_TYPES,
        default=None,
        help="model card training_type (and BoAmps taskStage)",
    )
    parser.add_argument("--task-family", default=None, metavar="TEXT", help="BoAmps taskFamily")
    parser.add_argument("--title", default=None, metavar="TEXT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The command: exit 0, or 1 with one line on stderr (no traceback)."""
    try:
        records = read_records(args.targets, args.experiment, args.tracking_uri, args.filter)
        comparison = None
        if len(records) > 1 and args.format in ("html", "markdown"):
            from green_mlops.compare import compare

            comparison = compare(
                records, metric=args.metric, mode=args.mode, baseline=args.baseline
            )
        options = ReportOptions(
            training_type=args.training_type,
            task_family=args.task_family,
            title=args.title,
            comparison=comparison,
        )
        text = render(args.format, records, options)
    except (RunsUnavailable, ReportError, ValueError) as exc:
        print(f"green-mlops report: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"green-mlops report: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.output} ({args.format}, {len(records)} run(s))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def read_records(
    targets: list[str], experiments: list[str], tracking_uri: str | None, filter_string: str = ""
) -> list[RunRecord]:
    """Report files (a target that is a path), MLflow runs (any other target: a run id) and
    the runs of ``experiments``, each MLflow run with its ``green/report.json``."""
    from green_mlops.runs import read_report_files

    if not targets and not experiments:
        raise RunsUnavailable("nothing to report: give RUN_IDs, --experiment NAME or PATHs")
    paths = [t for t in targets if Path(t).exists()]
    for t in targets:
        if t not in paths and (t.endswith(".json") or "/" in t or "\\" in t):
            raise RunsUnavailable(f"{t}: no such file or directory")
    run_ids = [t for t in targets if t not in paths]
    records = read_report_files(paths) if paths else []
    if run_ids or experiments:
        from green_mlops.extras import install_command, missing_modules

        if missing_modules("mlflow"):
            raise RunsUnavailable(f"reading MLflow runs needs MLflow: {install_command('mlflow')}")
        from green_mlops.integrations.mlflow.reader import load_report, read_runs

        # the report goes to stdout: no download progress bars on the terminal
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

        found = read_runs(tracking_uri, experiments, filter_string=filter_string, run_ids=run_ids)
        records += [load_report(tracking_uri, r) for r in found]
    return records
