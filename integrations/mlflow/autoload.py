"""Loads green-mlops' MLflow instrumentation when ``GREEN_MLOPS_ENABLE`` is set.

The ``mlflow.run_context_provider`` entry point: MLflow imports it *during* ``import mlflow``, so
it imports nothing from MLflow (nor anything heavy) and never raises. See docs/mlflow-plugin.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

_FALSE = {"", "0", "false", "no", "off"}


def _wanted() -> bool:
    """Whether to load: set to anything but a false value (a bad value fails at run creation)."""
    return os.environ.get("GREEN_MLOPS_ENABLE", "").strip().lower() not in _FALSE


def _load() -> None:
    try:
        from green_mlops.integrations.mlflow.plugin import autolog_from_env

        autolog_from_env()
    except Exception:  # never break MLflow; say why once
        log.exception(
            "green-mlops: GREEN_MLOPS_ENABLE is set but the MLflow integration failed to load; "
            "runs are not measured"
        )


class _ImportWatcher:
    """A meta-path finder that finds nothing: it only notices when MLflow is fully imported."""

    def __init__(self) -> None:
        self.busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if self.busy:
            return None
        client = sys.modules.get("mlflow.tracking.client")
        fluent = sys.modules.get("mlflow.tracking.fluent")
        if client is None or fluent is None or not hasattr(fluent, "start_run"):
            return None
        if not hasattr(client, "MlflowClient"):
            return None
        self.busy = True
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        _load()
        return None


class GreenMlopsAutoload:
    """The entry point's object: contributes no tags; triggers the instrumentation."""

    def __init__(self) -> None:
        self._loaded = False
        try:
            if _wanted():
                sys.meta_path.insert(0, _ImportWatcher())
        except Exception:
            pass

    def in_context(self) -> bool:
        if not self._loaded:
            self._loaded = True
            if _wanted():
                _load()
        return False

    def tags(self) -> dict[str, str]:
        return {}
