"""Real runs on a real MLflow server, made by the real plugin (``GREEN_MLOPS_ENABLE=1``) in one
subprocess: for the tests of the commands that read finished runs (compare, report, audit).

    ids = make_runs(mlflow_server, [RunSpec("exp-a", "fast", params={"lr": "0.1"},
                                            metrics={"val_acc": 0.9})], tmp_path)
    ids["fast"]  # the run id

Carbon is deterministic: the ``constant`` intensity provider at :data:`INTENSITY_G_PER_KWH`
(override with ``GREEN_MLOPS_INTENSITY_PROVIDERS=...`` in ``env``), location DE, a 0.5 s
logging interval. Each run busies the CPU for ``busy_s`` so its energy is > 0. Call it from a
session- or module-scoped fixture: one subprocess makes every run of a call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.mlflow_server import MlflowServer

__all__ = ["INTENSITY_G_PER_KWH", "PRICE_PER_KWH", "RunSpec", "make_runs", "plugin_env"]

#: The constant grid intensity every run is priced with (gCO2e/kWh), unless ``env`` says else.
INTENSITY_G_PER_KWH = 300.0
#: The electricity price (per kWh), so ``green/cost`` is reported.
PRICE_PER_KWH = 0.25


@dataclass(frozen=True)
class RunSpec:
    """One run to make. ``name`` is the run name and the key of its id in the result (unique
    within one :func:`make_runs` call, children included). ``metrics`` are logged at the end
    (after the busy loop), like a final validation metric; ``children`` are nested runs made
    inside this one, after its own busy loop."""

    experiment: str
    name: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    busy_s: float = 0.3
    children: Sequence[RunSpec] = ()


_SCRIPT = """
import json, sys, time
import mlflow

def busy(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x

def make(spec, ids, nested):
    mlflow.set_experiment(spec["experiment"])
    with mlflow.start_run(run_name=spec["name"], nested=nested) as run:
        ids[spec["name"]] = run.info.run_id
        if spec["params"]:
            mlflow.log_params(spec["params"])
        if spec["tags"]:
            mlflow.set_tags(spec["tags"])
        busy(spec["busy_s"])
        for child in spec["children"]:
            make(child, ids, True)
        if spec["metrics"]:
            mlflow.log_metrics(spec["metrics"])

ids = {}
for spec in json.loads(sys.argv[1]):
    make(spec, ids, False)
print(json.dumps(ids))
"""


def plugin_env(server: MlflowServer, workdir: Path, **env: str) -> dict[str, str]:
    """The environment of a user process with the plugin on, against ``server``: no
    ``GREEN_MLOPS_*`` or ``MLFLOW_*`` of the caller's, deterministic carbon, then ``env``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "GREEN_MLOPS_ENABLE": "1",
        "GREEN_MLOPS_CACHE_DIR": str(workdir / "green-cache"),
        "GREEN_MLOPS_LOCATION": "DE",
        "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
        "GREEN_MLOPS_INTENSITY_PROVIDERS": "constant",
        "GREEN_MLOPS_INTENSITY_G_PER_KWH": f"{INTENSITY_G_PER_KWH:g}",
        "GREEN_MLOPS_PRICE_PER_KWH": f"{PRICE_PER_KWH:g}",
        "MLFLOW_TRACKING_URI": server.url,
        "PYTHONUNBUFFERED": "1",
        **env,
    }


def make_runs(
    server: MlflowServer,
    specs: Sequence[RunSpec],
    workdir: Path,
    *,
    timeout: float = 300,
    **env: str,
) -> dict[str, str]:
    """Make the runs of ``specs`` (in order) with the real plugin in one subprocess; returns
    run name -> run id (children included). Raises ``RuntimeError`` with the process's output
    when it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([_plain(spec) for spec in specs])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), payload],
        cwd=workdir,
        env=plugin_env(server, workdir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"making runs failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    ids: dict[str, str] = json.loads(lines[-1])
    return ids


def _plain(spec: RunSpec) -> dict[str, Any]:
    plain = asdict(spec)
    plain["params"] = {str(k): str(v) for k, v in spec.params.items()}
    plain["tags"] = {str(k): str(v) for k, v in spec.tags.items()}
    plain["metrics"] = {str(k): float(v) for k, v in spec.metrics.items()}
    plain["children"] = [_plain(child) for child in spec.children]
    return plain
