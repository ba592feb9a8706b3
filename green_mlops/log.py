"""The ``green_mlops`` logger, and warnings said once per process (loudly, never repeated)."""

from __future__ import annotations

import logging
import threading

__all__ = ["log", "warn_once"]

log = logging.getLogger("green_mlops")

_warned: set[str] = set()
_lock = threading.Lock()


def warn_once(message: str) -> None:
    """Log ``green-mlops: <message>`` as a warning the first time this message is seen."""
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("green-mlops: %s", message)
