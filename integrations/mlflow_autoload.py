"""Loads green-mlops' MLflow instrumentation when ``GREEN_MLOPS_ENABLE`` is set.

Registered as an ``mlflow.run_context_provider`` entry point, which MLflow imports *during*
``import mlflow``, while ``mlflow.tracking.client`` is still half-initialised. So this module
imports nothing from MLflow (nor anything heavy), and nothing here may raise: MLflow only
forgives ImportError and AttributeError from a provider, and anything else would break
``import mlflow`` for the user. The real work is in :mod:`green_mlops.integrations.mlflow`.

Instrumentation happens at the first of: MLflow finishing its import (a one-shot import
watcher sees ``MlflowClient`` defined), or MLflow resolving run-context tags (every
``mlflow.start_run`` and Lightning's ``MLFlowLogger`` do that before creating a run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _wanted() -> bool:
    """Whether to load: set to anything but a false value (a bad value fails at run creation)."""
    return os.environ.get("GREEN_MLOPS_ENABLE", "").strip().lower() not in _FALSE


def _load() -> None:
    try:
        from green_mlops.integrations.mlflow import autolog_from_env

        autolog_from_env()
    except Exception:  # never break MLflow; say why once
        logging.getLogger("green_mlops").exception(
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
