"""PyTorch Lightning callbacks: ``EnergyMonitor``, ``AdaptiveValidation``, ``EnergyBudget``
and ``CarbonAwarePause``.

from green_mlops.integrations.lightning import AdaptiveValidation, EnergyMonitor
trainer = Trainer(callbacks=[EnergyMonitor(), AdaptiveValidation(monitor="val_loss")])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AdaptiveValidation", "CarbonAwarePause", "EnergyBudget", "EnergyMonitor"]

_LAZY = {
    "EnergyMonitor": "green_mlops.integrations.lightning.energy_monitor",
    "AdaptiveValidation": "green_mlops.integrations.lightning.adaptive_validation",
    "EnergyBudget": "green_mlops.integrations.lightning.budget_guard",
    "CarbonAwarePause": "green_mlops.integrations.lightning.carbon_aware_pause",
}

if TYPE_CHECKING:
    from green_mlops.integrations.lightning.adaptive_validation import AdaptiveValidation
    from green_mlops.integrations.lightning.budget_guard import EnergyBudget
    from green_mlops.integrations.lightning.carbon_aware_pause import CarbonAwarePause
    from green_mlops.integrations.lightning.energy_monitor import EnergyMonitor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("lightning", "torch"):
            raise
        from green_mlops.extras import install_command

        raise ImportError(
            f"green-mlops: {name} needs Lightning, which is not installed "
            f"({exc.name}): {install_command('lightning')}",
            name=exc.name,
        ) from exc
