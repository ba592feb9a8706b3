"""green-mlops: energy, carbon and quality-per-FLOP for MLflow and PyTorch Lightning.

``import green_mlops`` is cheap: the engine, plugins and integrations load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Tracker": "green_mlops.tracker",
    "Snapshot": "green_mlops.snapshot",
    "Settings": "green_mlops.config",
    "ConfigError": "green_mlops.config",
    "GreenMlopsWarning": "green_mlops.log",
    "hookimpl": "green_mlops.hookspecs",
    "Meter": "green_mlops.meters",
    "Device": "green_mlops.meters",
    "DeviceError": "green_mlops.meters",
    "MeterUnavailable": "green_mlops.meters",
    "Method": "green_mlops.meters",
    "Component": "green_mlops.meters",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from green_mlops.config import ConfigError, Settings
    from green_mlops.hookspecs import hookimpl
    from green_mlops.log import GreenMlopsWarning
    from green_mlops.meters import Component, Device, DeviceError, Meter, MeterUnavailable, Method
    from green_mlops.snapshot import Snapshot
    from green_mlops.tracker import Tracker


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'green_mlops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
