"""The optional parts of green-mlops (the extras in ``pyproject.toml``) and the command that
installs a missing one. Checked without importing anything (``importlib.util.find_spec``)."""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "install_command", "missing_modules"]

# extra -> (what it is for, the modules it brings)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlflow": ("GREEN_MLOPS_ENABLE=1 in MLflow scripts", ("mlflow", "filelock")),
    "lightning": ("the EnergyMonitor and AdaptiveValidation callbacks", ("lightning",)),
    "nvidia": ("NVIDIA GPU energy (NVML)", ("pynvml",)),
    "plot": ("the power chart of a run", ("matplotlib",)),
    "dashboard-auth": ("the green dashboard with MLflow's basic-auth", ("flask_wtf",)),
}


def install_command(extra: str) -> str:
    """``pip install "green-mlops[<extra>]"``: what a user runs to get ``extra``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    return f'pip install "green-mlops[{extra}]"'


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty: it is installed)."""
    missing = []
    for module in EXTRAS[extra][1]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing
