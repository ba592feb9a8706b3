"""The one background sampler thread of a process, shared by every running tracker.

Periodic full samples, and counter-only samples on request at phase boundaries; idle costs
nothing. See docs/energy-measurement.md.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = ["Sampled", "get_sampler"]


class Sampled(Protocol):
    """What the sampler drives: a tracker."""

    @property
    def interval_s(self) -> float: ...

    def sample_now(self, now: float | None = None, *, counters_only: bool = False) -> None:
        """Take one sample at ``now`` (default: the target's own clock); ``counters_only``: only
        what a phase boundary needs. Must not raise (the sampler logs and continues if it does)."""


class Sampler:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due: dict[Sampled, float] = {}
        self._urgent: set[Sampled] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, target: Sampled) -> None:
        with self._lock:
            self._due[target] = time.monotonic() + target.interval_s
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(
                    target=self._run, name="green-mlops-sampler", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def remove(self, target: Sampled) -> None:
        with self._lock:
            self._due.pop(target, None)
            self._urgent.discard(target)
        self._wake.set()

    def request(self, target: Sampled) -> None:
        """Ask for a boundary sample of ``target`` as soon as possible (O(1): a set insertion
        under the lock, which the sampler thread holds only to swap its bookkeeping, and a
        wake)."""
        with self._lock:
            self._urgent.add(target)
        self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._due:
                    self._thread = None
                    return
                now = time.monotonic()
                timeout = max(0.0, min(self._due.values()) - now)
                pending = bool(self._urgent)
            if not pending:
                self._wake.wait(timeout)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    self._thread = None
                    return
                urgent, self._urgent = self._urgent, set()
                due = [t for t, at in self._due.items() if at <= now]
                for target in due:
                    self._due[target] = now + target.interval_s
                boundary = [t for t in urgent if t in self._due and t not in due]
            for target, counters_only in [(t, False) for t in due] + [(t, True) for t in boundary]:
                try:
                    target.sample_now(counters_only=counters_only)
                except Exception:  # the thread must survive anything a tracker does
                    log.exception("green-mlops: sampling failed")


_sampler: Sampler | None = None
_sampler_lock = threading.Lock()


def get_sampler() -> Sampler:
    """The process's sampler (created on first use, and anew in a forked child)."""
    global _sampler
    with _sampler_lock:
        if _sampler is None:
            _sampler = Sampler()
        return _sampler


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here; its locks may be held by it. Start afresh.
    global _sampler, _sampler_lock
    _sampler = None
    _sampler_lock = threading.Lock()


def _at_exit() -> None:
    if _sampler is not None:
        _sampler.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
