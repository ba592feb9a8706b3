"""HTTP for intensity providers: one session, explicit timeouts, urllib3 retries, a TTL cache.

Cache keys never contain credentials; failures become ``IntensityUnavailable`` naming the host
and status, never a secret. See docs/carbon-accounting.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from green_mlops.intensity import IntensityUnavailable
from green_mlops.units import DAY, HOUR

if TYPE_CHECKING:
    from green_mlops.config import Settings

__all__ = ["HttpClient"]

RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_RETRY_AFTER_S = 10
#: No entry lives longer than this (the largest GREEN_MLOPS_CACHE_TTL_S): older ones are gone.
MAX_TTL_S = 7 * DAY
#: A temporary file older than this is a write a crash interrupted.
STALE_TMP_S = HOUR

_pruned: set[Path] = set()
_pruned_lock = threading.Lock()


def _retry(total: int) -> Retry:
    options: dict[str, Any] = {
        "total": total,
        # a refused connection or a read timeout is retried once: more would outlast a run's end
        "connect": 1,
        "read": 1,
        "backoff_factor": 0.5,
        "status_forcelist": RETRY_STATUSES,
        "allowed_methods": frozenset({"GET"}),
        "respect_retry_after_header": True,
        "raise_on_status": False,
    }
    try:
        return Retry(**options, retry_after_max=MAX_RETRY_AFTER_S)
    except TypeError:  # urllib3 < 2.6 has no cap; retries stay bounded by total
        return Retry(**options)


class HttpClient:
    """JSON over HTTP for one provider, with retries and a TTL cache. Thread-safe."""

    def __init__(self, settings: Settings, provider: str, *, retries: int = 3) -> None:
        self.provider = provider
        self.timeout = (min(3.05, settings.http_timeout_s / 3), settings.http_timeout_s)
        self.ttl_s = settings.cache_ttl_s
        self.cache_dir = settings.cache_dir / provider
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "green-mlops"
        adapter = HTTPAdapter(max_retries=_retry(retries))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._memory: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        #: Requests that went to the network (cache misses), for tests and benchmarks.
        self.requests_sent = 0

    def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        cache: bool = True,
        vary: str = "",
    ) -> Any:
        """GET ``url`` and decode JSON, from the cache when fresh. Raises IntensityUnavailable.

        ``vary`` is folded into the cache key but not sent: pass the current hour for an
        endpoint whose URL does not change while its answer does (``/latest``).
        """
        key = self._key(url, params, vary)
        if cache and self.ttl_s > 0:
            hit = self._cached(key)
            if hit is not None:
                return hit[1]
        host = urlsplit(url).netloc
        try:
            with self._lock:
                self.requests_sent += 1
            response = self.session.get(
                url, params=params, headers=headers, auth=auth, timeout=self.timeout
            )
        except requests.exceptions.InvalidHeader:
            raise IntensityUnavailable(
                f"{self.provider}: {host} answered with an invalid header (e.g. Retry-After)"
            ) from None
        except requests.RequestException as exc:
            raise IntensityUnavailable(
                f"{self.provider}: cannot reach {host} ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise HttpStatusError(self.provider, host, response.status_code, response.reason)
        try:
            data = response.json()
        except ValueError:
            raise IntensityUnavailable(f"{self.provider}: malformed JSON from {host}") from None
        if cache and self.ttl_s > 0:
            self._store(key, data)
        return data

    def close(self) -> None:
        self.session.close()

    # -- cache -----------------------------------------------------------------------------

    @staticmethod
    def _key(url: str, params: Mapping[str, str] | None, vary: str = "") -> str:
        text = url + "?" + "&".join(f"{k}={v}" for k, v in sorted((params or {}).items()))
        text += "#" + vary
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _cached(self, key: str) -> tuple[float, Any] | None:
        now = time.time()
        with self._lock:
            hit = self._memory.get(key)
        if hit is not None and hit[0] > now:
            return hit
        path = self.cache_dir / f"{key}.json"
        try:
            stored = json.loads(path.read_text())
            entry = (float(stored["expires"]), stored["data"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if entry[0] <= now:
            return None
        with self._lock:
            self._memory[key] = entry
        return entry

    def _store(self, key: str, data: Any) -> None:
        entry = (time.time() + self.ttl_s, data)
        with self._lock:
            self._memory[key] = entry
        try:  # atomic write: concurrent runs on one machine share the cache
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump({"expires": entry[0], "data": data}, handle)
            Path(tmp).replace(self.cache_dir / f"{key}.json")
        except OSError:
            return  # a read-only or full disk only costs a repeated request
        self._prune()

    def _prune(self) -> None:
        """Delete expired entries and crash leftovers, once per process and directory (when the
        first new entry is stored, in the fetch thread). Reads only files old enough to have
        expired; a file older than the longest TTL goes unread."""
        with _pruned_lock:
            if self.cache_dir in _pruned:
                return
            _pruned.add(self.cache_dir)
        now = time.time()
        try:
            paths = list(self.cache_dir.iterdir())
        except OSError:
            return
        for path in paths:
            try:
                age = now - path.stat().st_mtime
                if path.suffix == ".tmp":
                    expired = age > STALE_TMP_S
                elif path.suffix != ".json" or age <= min(self.ttl_s, MAX_TTL_S):
                    continue
                elif age > MAX_TTL_S:
                    expired = True
                else:
                    try:
                        expired = float(json.loads(path.read_text())["expires"]) <= now
                    except (ValueError, KeyError, TypeError):
                        expired = True  # unreadable: a miss for everyone, never useful
                if expired:
                    path.unlink()
            except OSError:
                continue  # gone already (another process pruned it), or not ours to delete


class HttpStatusError(IntensityUnavailable):
    """A non-200 answer; ``status`` lets providers react (WattTime re-logs in on 401)."""

    def __init__(self, provider: str, host: str, status: int, reason: str | None) -> None:
        super().__init__(f"{provider}: HTTP {status} {reason or ''} from {host}".rstrip())
        self.status = status
