"""The spool: values that could not be delivered to MLflow, kept until they can be.

One file per run, ``<cache dir>/spool/<run id>.jsonl``, one plain-data batch per line, shared by
the training process and ``green-mlops sync`` under a cross-process lock, rewritten atomically,
compacted as it grows. See docs/mlflow-plugin.md ("The spool").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from green_mlops.log import warn_once

__all__ = [
    "COMPACT_LINES",
    "Refused",
    "SpoolBusy",
    "SpoolUnusable",
    "append",
    "merge",
    "path_for",
    "pending",
    "remove_orphan_locks",
    "replay",
]

log = logging.getLogger(__name__)

#: How long an append waits for another process's replay of the same run (it then gives up).
APPEND_LOCK_TIMEOUT_S = 10.0
#: A replay never waits: the holder of the lock is delivering the same lines.
REPLAY_LOCK_TIMEOUT_S = 0.0
COMPACT_LINES = 256
_appends: dict[Path, int] = {}


class SpoolBusy(Exception):
    """Another process holds this spool file."""


class Refused(Exception):
    """Raised by a ``deliver`` callback: the server refused the batch for good (a 4xx answer);
    it is moved to ``<path>.bad`` so it cannot block the values behind it."""


class SpoolUnusable(Exception):
    """The spool file or its directory cannot be read or written."""


def path_for(cache_dir: Path, run_id: str) -> Path:
    return cache_dir / "spool" / f"{run_id}.jsonl"


class _Replaced(Exception):
    """The lock file was removed (or replaced) between its open and its lock: lock the new one."""


#: Attempts at a lock whose file another holder removes in between (each is a fresh open).
_LOCK_TRIES = 8


class _Hold:
    """A held spool lock; :meth:`remove` unlinks its file while it is held (see :func:`_locked`)."""

    def __init__(self, lock_path: str, removable: bool) -> None:
        self.lock_path = lock_path
        self.removable = removable

    def remove(self) -> None:
        """Unlink the lock file, when every locker checks that it locked the file now at its
        path (so one that opened this file before the unlink locks the next one instead)."""
        if self.removable:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)


def _same_file(lock_path: str) -> Callable[[int], None]:
    """filelock's ``on_acquired`` check: the locked descriptor is the file at ``lock_path``."""

    def check(fd: int) -> None:
        held = os.fstat(fd)
        try:
            named = os.stat(lock_path)
        except FileNotFoundError:
            raise _Replaced from None
        if held.st_nlink == 0 or not os.path.samestat(held, named):
            raise _Replaced

    return check


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[_Hold]:
    """Hold ``<path>.lock`` (filelock's flock, released by the kernel if the holder dies).

    Every locker checks, once it holds the lock, that the file it locked is still the one at the
    path (filelock's ``on_acquired``, since 3.30), so a holder may remove the lock file
    (:meth:`_Hold.remove`) when its spool is gone. With an older filelock the check cannot be made
    and the file is kept, as filelock itself keeps it."""
    from filelock import FileLock, Timeout

    lock_path = str(path) + ".lock"
    deadline = time.monotonic() + timeout
    try:
        for _ in range(_LOCK_TRIES):
            check = _same_file(lock_path)
            wait = max(0.0, deadline - time.monotonic())
            lock = FileLock(lock_path, timeout=wait, on_acquired=check)
            try:
                lock.acquire()
            except _Replaced:
                continue
            break
        else:
            raise Timeout(lock_path)
    except Timeout:
        raise SpoolBusy(f"{path.name} is held by another process") from None
    except OSError as exc:
        raise SpoolUnusable(str(exc)) from exc
    try:
        yield _Hold(lock_path, removable=getattr(lock, "on_acquired", None) is check)
    finally:
        lock.release()


def remove_orphan_locks(directory: Path) -> int:
    """Remove the lock files in ``directory`` whose spool is gone (left by earlier versions, or
    by a process that stopped between its last replay and exit), each only while holding it.
    Returns how many were removed."""
    removed = 0
    for lock_path in directory.glob("*.jsonl.lock"):
        path = lock_path.with_name(lock_path.name.removesuffix(".lock"))
        if path.exists():
            continue
        try:
            with _locked(path, REPLAY_LOCK_TIMEOUT_S) as hold:
                if not path.exists() and hold.removable:
                    hold.remove()
                    removed += 1
        except (SpoolBusy, SpoolUnusable):
            continue
    return removed


def append(path: Path, batch: dict[str, Any]) -> bool:
    """Keep ``batch`` for later. Returns False (said once) when the spool cannot be used."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the owner's values only
        with _locked(path, APPEND_LOCK_TIMEOUT_S):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as handle:
                handle.write(json.dumps(batch) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            _maybe_compact(path)
        return True
    except SpoolBusy:
        warn_once(
            f"values that could not be delivered are not spooled: {path.name} stayed locked by "
            f"another process (`green-mlops sync`?) for {APPEND_LOCK_TIMEOUT_S:g} s"
        )
        return False
    except Exception as exc:
        warn_once(
            f"values that could not be delivered are not spooled: {path.parent} is unusable "
            f"({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}); "
            "set GREEN_MLOPS_CACHE_DIR to a writable directory"
        )
        return False


def replay(path: Path, deliver: Callable[[dict[str, Any]], None]) -> int:
    """Deliver the batches kept in ``path`` (oldest first); delete it when all went through.

    Returns the number of batches delivered. Raises the delivery error at the first failure,
    keeping what is undelivered; :class:`SpoolBusy` when another process holds the file;
    :class:`SpoolUnusable` when it cannot be read or rewritten.
    """
    try:
        if not path.exists():
            return 0
    except OSError as exc:
        raise SpoolUnusable(str(exc)) from exc
    with _locked(path, REPLAY_LOCK_TIMEOUT_S) as hold:
        batches = merge(_read(path))
        sent = 0
        for i, batch in enumerate(batches):
            try:
                deliver(batch)
            except Refused as exc:
                _quarantine(path, [json.dumps(batch)], f"refused by the server: {exc}")
                continue
            except Exception:
                _rewrite(path, batches[i:])
                raise
            sent += 1
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolUnusable(str(exc)) from exc
        hold.remove()  # all delivered: the lock file goes with its spool
        return sent


def pending(path: Path) -> tuple[str, list[str]] | None:
    """What ``path`` still holds, in words ("the report, 12 metric values, the end of the run
    (FINISHED)"), and the tracking URIs it goes to (as kept: the caller redacts them); None when
    it holds nothing. Reads without the lock (rewrites are atomic; a line being appended is
    skipped) and changes nothing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    metrics = tags = 0
    report = False
    ends: list[str] = []
    uris: dict[str, None] = {}
    for line in text.splitlines():
        try:
            batch = json.loads(line)
        except ValueError:
            continue
        if not isinstance(batch, dict):
            continue
        uris[str(batch.get("tracking_uri", ""))] = None
        if isinstance(batch.get("terminate"), dict):
            ends.append(str(batch["terminate"].get("status", "")))
            continue
        metrics += len(batch.get("metrics") or [])
        tags += len(batch.get("tags") or {})
        report = report or batch.get("report") is not None
    parts = [
        *(["the report (green/report.json and its views)"] if report else []),
        *([f"{metrics} metric value(s)"] if metrics else []),
        *([f"{tags} tag(s)"] if tags else []),
        *([f"the end of the run ({ends[-1]})"] if ends else []),
    ]
    return (", ".join(parts), [u for u in uris if u]) if parts else None


def merge(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batches of one run merged into as few as possible: metrics in order, a total's points
    of the same step kept once (the latest; a ``system/`` series keeps each timestamp), tags
    merged (the latest wins), the latest report; a termination stays separate, in order."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    points: dict[tuple[str, int, int], list[Any]] = {}
    for batch in batches:
        if batch.get("terminate") is not None:
            out.append(batch)
            current = None
            continue
        if current is None or current["tracking_uri"] != batch.get("tracking_uri"):
            current = {**batch, "metrics": [], "tags": {}, "report": None}
            points = {}
            out.append(current)
        for point in batch.get("metrics", []):
            name = str(point[0])
            key = (name, int(point[3]), int(point[2]) if name.startswith("system/") else 0)
            if key in points:
                points[key][:] = point
            else:
                points[key] = list(point)
                current["metrics"].append(points[key])
        current["tags"].update(batch.get("tags", {}))
        if batch.get("report") is not None:
            current["report"] = batch["report"]
        current["power_until"] = max(current.get("power_until", 0), batch.get("power_until", 0))
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    """The parsable batches of ``path``; the others go to ``<path>.bad``."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise SpoolUnusable(str(exc)) from exc
    batches: list[dict[str, Any]] = []
    bad: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            batch = json.loads(line)
            if not isinstance(batch, dict) or "run_id" not in batch:
                raise ValueError("not a batch")
        except ValueError:
            bad.append(line)
            continue
        batches.append(batch)
    if bad:
        _quarantine(path, bad, "unreadable")
        _rewrite(path, batches)
    return batches


def _quarantine(path: Path, lines: list[str], why: str) -> None:
    """Move ``lines`` of ``path`` to ``<path>.bad`` (kept for a person to look at)."""
    quarantine = path.with_name(path.name + ".bad")
    try:
        fd = os.open(quarantine, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write("\n".join(lines) + "\n")
        log.warning(
            "green-mlops: %d line(s) of %s (%s) moved to %s; the rest is delivered",
            len(lines),
            path.name,
            why,
            quarantine,
        )
    except OSError as exc:
        log.warning("green-mlops: %d line(s) of %s (%s) dropped (%s)", len(lines), path, why, exc)


def _rewrite(path: Path, batches: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``batches`` atomically (the caller holds the lock)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.writelines(json.dumps(batch) + "\n" for batch in batches)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise SpoolUnusable(str(exc)) from exc


def _maybe_compact(path: Path) -> None:
    count = _appends[path] = _appends.get(path, 0) + 1
    if count >= COMPACT_LINES:
        _appends[path] = 0
        _rewrite(path, merge(_read(path)))
