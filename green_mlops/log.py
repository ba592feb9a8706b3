"""The ``green_mlops`` logger, and warnings said once per process (loudly, never repeated).

Problems a user must fix for the numbers to be right (a missing extra, an unknown location, a
missing permission) are :class:`GreenMlopsWarning` warnings, so ``-W`` and pytest's
``filterwarnings`` can act on them (``ignore`` silences them; ``error`` makes them log errors,
never exceptions in the training job); the rest are log records of the ``green_mlops`` logger.
"""

from __future__ import annotations

import logging
import threading
import warnings

__all__ = ["GreenMlopsWarning", "log", "warn_once", "warn_user"]

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
        warn_user(message, stacklevel=stacklevel + 1)
    else:
        log.warning("green-mlops: %s", message)


def warn_user(message: str, *, stacklevel: int = 2) -> None:
    """Issue ``green-mlops: <message>`` as a :class:`GreenMlopsWarning` (every time). A filter
    that makes it an error gets a log error instead: never an exception in the training job."""
    try:
        warnings.warn(f"green-mlops: {message}", GreenMlopsWarning, stacklevel=stacklevel + 1)
    except Warning:
        log.error("green-mlops: %s (GreenMlopsWarning made an error by a filter)", message)
