"""A run's report as MLflow shows it: ``green/report.html`` (the self-contained HTML report,
rendered by MLflow's artifact viewer), and the power chart as ``green/power.png`` and as an image
logged under the key ``green/power``, which MLflow's chart view compares across runs.

Written into the upload folder of :func:`~green_mlops.integrations.mlflow.writer.deliver`, in
the background upload thread (the plugin) or at the end of a fit (the callback). A view that
cannot be made is left out and said in ``green.notes``; the JSON report goes all the same.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from green_mlops.extras import install_command
from green_mlops.integrations.mlflow.chart import draw_power
from green_mlops.runs import RunRecord, record_from_report

__all__ = ["CHART_ARTIFACT", "HTML_ARTIFACT", "IMAGE_KEY", "LOGGED_IMAGES_TAG", "write"]

HTML_ARTIFACT = "green/report.html"
CHART_ARTIFACT = "green/power.png"
#: The key of the chart among the run's images (``mlflow.log_image(key=...)``'s layout).
IMAGE_KEY = "green/power"
#: MLflow's tag for a run with logged images (its UI then lists them in the chart view).
LOGGED_IMAGES_TAG = "mlflow.loggedImages"


def write(client: Any, run_id: str, report: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write the HTML report and the chart under ``folder`` (the artifact root's layout);
    returns the tags to set: :data:`LOGGED_IMAGES_TAG`, and ``green.notes`` when a view is
    missing. Never raises."""
    missing: list[str] = []
    tags: dict[str, str] = {}
    try:
        from green_mlops.reports.html import render
        from green_mlops.reports.options import ReportOptions

        html = render([_record(client, run_id, report)], ReportOptions())
        (folder / HTML_ARTIFACT).write_text(html, encoding="utf-8")
    except Exception as exc:
        missing.append(f"{HTML_ARTIFACT} not written ({type(exc).__name__}: {exc})")
    try:
        import matplotlib  # noqa: F401  (draw_power says nothing when it is missing)
    except ImportError:
        missing.append(f"no power chart: matplotlib is missing ({install_command('plot')})")
    else:
        try:
            if draw_power(report, folder / CHART_ARTIFACT):
                _image(folder / CHART_ARTIFACT, folder)
                tags[LOGGED_IMAGES_TAG] = "true"
        except Exception as exc:
            missing.append(f"no power chart ({type(exc).__name__}: {exc})")
    if missing:
        notes = str((report.get("tags") or {}).get("green.notes") or "")
        tags["green.notes"] = "; ".join([notes, *missing] if notes else missing)
    return tags


def _record(client: Any, run_id: str, report: dict[str, Any]) -> RunRecord:
    """The run as the HTML report reads it: the report, with the run's name and metrics
    from MLflow when it answers (one request)."""
    name, experiment, metrics = run_id, "", {}
    try:
        run = client.get_run(run_id)
        name = run.info.run_name or run_id
        experiment = f"experiment {run.info.experiment_id}"
        metrics = {k: float(v) for k, v in run.data.metrics.items()}
    except Exception:
        pass
    record = record_from_report(
        report, run_id=run_id, name=name, experiment=experiment, source=f"MLflow run {run_id}"
    )
    if metrics:
        from dataclasses import replace

        record = replace(record, metrics={**record.metrics, **metrics})
    return record


def _image(png: Path, folder: Path) -> None:
    """The chart in ``mlflow.log_image(key=IMAGE_KEY, step=0)``'s layout: the PNG and a
    compressed WebP under ``images/``."""
    from mlflow.tracking.multimedia import compress_image_size
    from PIL import Image

    stem = (
        f"images/{IMAGE_KEY.replace('/', '~')}+step+0+timestamp+{int(time.time() * 1000)}"
        f"+{uuid.uuid4()}"
    )
    (folder / "images").mkdir(exist_ok=True)
    with Image.open(png) as image:
        image.save(folder / f"{stem}.png")
        compress_image_size(image).save(folder / f"{stem}+compressed.webp")
