"""MLflow integration: every run gets energy, carbon and efficiency metrics, with no code change.

    GREEN_MLOPS_ENABLE=1 python train.py          # any script that uses MLflow
    # or, from code:
    from green_mlops.integrations.mlflow import autolog
    autolog()

Importing this package is cheap (MLflow imports its ``autoload`` entry point during
``import mlflow``): the functions below load :mod:`.plugin` on first use. See
docs/mlflow-plugin.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "autolog",
    "autolog_from_env",
    "disable",
    "flush",
    "forecast",
    "replay_spool",
    "tracked_runs",
]

_LAZY = {
    "autolog": "plugin",
    "autolog_from_env": "plugin",
    "disable": "plugin",
    "flush": "plugin",
    "forecast": "plugin",
    "tracked_runs": "plugin",
    "replay_spool": "writer",
}

if TYPE_CHECKING:
    from green_mlops.integrations.mlflow.plugin import (
        autolog,
        autolog_from_env,
        disable,
        flush,
        forecast,
        tracked_runs,
    )
    from green_mlops.integrations.mlflow.writer import replay_spool


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
