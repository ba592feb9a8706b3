"""The ``green_mlops`` logger, and warnings said once per process (loudly, never repeated).

Problems a user must fix for the numbers to be right (a missing extra, an unknown location, a
missing permission) are :class:`GreenMlopsWarning` warnings, so ``-W`` and pytest's
``filterwarnings`` can act on them; the rest are log records of the ``green_mlops`` logger.
"""

from __future__ import annotations

import logging
import threading
import warnings

__all__ = ["GreenMlopsWarning", "log", "warn_once"]

log = logging.getLogger("green_mlops")

_warned: set[str] = set()
_lock = threading.Lock()


class GreenMlopsWarning(UserWarning):
    """A problem the user must fix for green-mlops' numbers to be complete or right."""


def warn_once(message: str, *, fix: bool = False, stacklevel: int = 2) -> None:
    """Say ``green-mlops: <message>`` the first time this message is seen in the process.

    ``fix=True``: the user must act (the message says how), so it is a
    :class:`GreenMlopsWarning`; otherwise a warning record of the ``green_mlops`` logger.
    """
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    if fix:
        warnings.warn(f"green-mlops: {message}", GreenMlopsWarning, stacklevel=stacklevel + 1)
    else:
        log.warning("green-mlops: %s", message)
