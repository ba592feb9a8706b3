"""The incumbent's copy for ``AdaptiveValidation(incumbent="weights")``: its kept weights and
the shadow module that evaluates them, leaving the training module untouched.

See docs/adaptive-validation.md ("Two incumbent modes").
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch

from green_mlops.integrations.lightning._namespaces import Misconfiguration

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["IncumbentCopy"]


class IncumbentCopy:
    """The incumbent's weights (a ``state_dict`` copy on the CPU or the module's device) and,
    during a validation run that evaluates it, a shadow copy of the module loaded with them."""

    def __init__(self, device: Literal["cpu", "module"]) -> None:
        self.device = device
        self.weights: dict[str, torch.Tensor] | None = None
        self._shadow: pl.LightningModule | None = None

    def keep(self, pl_module: pl.LightningModule) -> None:
        """Keep a copy of the module's ``state_dict`` (it became the incumbent)."""
        device = torch.device("cpu") if self.device == "cpu" else pl_module.device
        with torch.inference_mode(False), torch.no_grad():
            self.weights = {
                name: tensor.detach().to(device, copy=True)
                for name, tensor in pl_module.state_dict().items()
            }

    def restore(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Weights from a checkpoint (on the CPU: the shadow copy loads them onto the device)."""
        self.weights = None if weights is None else dict(weights)
        self._shadow = None

    def release(self) -> None:
        """Free the shadow copy (its device memory) at the end of a validation run."""
        self._shadow = None

    def outputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> Any:
        """``validation_step``'s output of the incumbent on this (local) batch.

        Raises:
            Misconfiguration: the weights are missing (a checkpoint without them).
        """
        weights = self.weights
        if weights is None:
            raise Misconfiguration(
                "AdaptiveValidation: the incumbent must be evaluated but its weights are missing "
                "(restored from a checkpoint without them?)"
            )
        if self._shadow is None:
            with torch.inference_mode(False), torch.no_grad():
                # LightningModule.__getstate__ drops the trainer reference: the copy is detached
                shadow = copy.deepcopy(pl_module)
                shadow.load_state_dict(weights)
            shadow.eval()
            shadow.requires_grad_(False)
            self._shadow = shadow
        device = pl_module.device
        devices = [] if device.type == "cpu" else [device]
        device_type = None if device.type == "cpu" else device.type
        with (
            torch.random.fork_rng(devices=devices, device_type=device_type),
            trainer.precision_plugin.val_step_context(),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            # the shadow has no trainer: its self.log(...) calls warn and do nothing
            warnings.filterwarnings("ignore", message=".*self.log\\(\\)")
            return self._shadow.validation_step(batch, batch_idx)
