"""Lightning's two namespaces: ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

They are copies of the same code with distinct classes: a ``pytorch_lightning.Trainer`` holds
``pytorch_lightning`` strategies, loggers and callbacks, which are not instances of the
``lightning.pytorch`` classes. So every class check here accepts the class of either namespace
(:func:`classes`), the callbacks subclass the ``Callback`` of both (:data:`Callback`: accepted
by either ``Trainer`` and ``LightningCLI``), and refusals are a ``MisconfigurationException``
of both and a :class:`~green_mlops.config.ConfigError` (:class:`Misconfiguration`), caught by
``except ValueError``, ``except ConfigError`` and ``except MisconfigurationException`` of either
namespace.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from green_mlops.config import ConfigError

__all__ = ["NAMESPACES", "Callback", "Misconfiguration", "classes"]

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def classes(module: str, name: str) -> tuple[type[Any], ...]:
    """``name`` from ``<namespace>.<module>`` of each namespace that is imported.

    An object of a namespace's class implies its package was imported, so nothing is imported
    here (a dictionary look-up per namespace).
    """
    found: list[type[Any]] = []
    for namespace in NAMESPACES:
        cls = getattr(sys.modules.get(f"{namespace}.{module}"), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _legacy(module: str, name: str) -> tuple[Any, ...]:
    """The standalone package's class, if it is installed (a dependency of ``lightning``)."""
    try:
        return (getattr(importlib.import_module(module), name),)
    except ImportError:
        return ()


if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    class Misconfiguration(MisconfigurationException, ConfigError):
        """A refused configuration: a ``MisconfigurationException`` and a ``ConfigError``."""

else:
    from lightning.pytorch.callbacks import Callback as _Callback

    Callback = type(
        "Callback",
        (_Callback, *_legacy("pytorch_lightning.callbacks", "Callback")),
        {"__module__": __name__, "__doc__": "A ``Callback`` of both Lightning namespaces."},
    )
    Misconfiguration = type(
        "Misconfiguration",
        (
            MisconfigurationException,
            *_legacy("lightning_fabric.utilities.exceptions", "MisconfigurationException"),
            ConfigError,
        ),
        {
            "__module__": __name__,
            "__doc__": "A ``MisconfigurationException`` of both namespaces and a ``ConfigError``.",
        },
    )
