"""The shared HTTP layer (green_mlops.http.HttpClient) against real HTTP servers on 127.0.0.1.

Retries, Retry-After (honoured and capped), timeouts, unreachable hosts, the memory/disk/TTL
cache, and that no secret ever shows up in logs, exception texts or reprs. urllib3's backoff
factor is shrunk for speed (``fast_backoff``); everything else is the production
configuration.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from requests.adapters import HTTPAdapter
from werkzeug import Request, Response

from green_mlops import http
from green_mlops.config import Settings
from green_mlops.http import HttpClient, HttpStatusError
from green_mlops.intensity import IntensityUnavailable
from green_mlops.location import Location
from green_mlops.plugins.electricitymaps import ElectricityMapsProvider

PRODUCTION_RETRY = http._retry
SECRET = "SECRET-TOKEN-123"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production Retry with a 10 ms backoff factor instead of 0.5 s (1 s, 2 s waits)."""
    monkeypatch.setattr(
        http, "_retry", lambda total: PRODUCTION_RETRY(total).new(backoff_factor=0.01)
    )


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"cache_dir": tmp_path / "cache", "http_timeout_s": 2.0}
    values.update(overrides)
    return Settings.load(environ={}, **values)


def sequence(*responses: Response) -> Callable[[Request], Response]:
    """A handler answering with ``responses`` in turn, the last one for every later request."""
    queue = list(responses)
    lock = threading.Lock()

    def handler(request: Request) -> Response:
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


def ok(data: Any) -> Response:
    return Response(json.dumps(data), status=200, content_type="application/json")


def host_of(server: HTTPServer) -> str:
    return f"{server.host}:{server.port}"


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def slow_server() -> Iterator[tuple[HTTPServer, threading.Event]]:
    """A threaded server on 127.0.0.1 whose handler answers only once released (<= 5 s)."""
    release = threading.Event()

    def handler(request: Request) -> Response:
        release.wait(5.0)
        return ok({"late": True})

    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.expect_request("/slow").respond_with_handler(handler)
    server.start()
    try:
        yield server, release
    finally:
        release.set()
        server.clear()
        server.stop()


# --- configuration ------------------------------------------------------------------------


def test_production_retry_configuration() -> None:
    retry = PRODUCTION_RETRY(3)
    assert retry.total == 3
    assert set(retry.status_forcelist) == {429, 500, 502, 503, 504}
    assert retry.allowed_methods == frozenset({"GET"})
    assert retry.respect_retry_after_header
    assert retry.retry_after_max == http.MAX_RETRY_AFTER_S == 10
    assert retry.backoff_factor == 0.5
    client = HttpClient(Settings.load(environ={}, http_timeout_s=9.0), "t")
    assert client.timeout == (3.0, 9.0)  # connect: a third, at most 3.05 s
    adapter = client.session.get_adapter("https://example.org")
    assert isinstance(adapter, HTTPAdapter) and adapter.max_retries.total == 3


# --- success, retries, statuses --------------------------------------------------------------


def test_get_json_sends_params_and_headers(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request(
        "/v3/x", query_string={"zone": "DE"}, headers={"auth-token": "abc"}
    ).respond_with_json({"value": 1})
    client = HttpClient(settings(tmp_path), "t")
    data = client.get_json(
        httpserver.url_for("/v3/x"), params={"zone": "DE"}, headers={"auth-token": "abc"}
    )
    assert data == {"value": 1}
    assert client.requests_sent == 1
    request = httpserver.log[0][0]
    assert request.headers["User-Agent"] == "green-mlops"


def test_retry_on_500_then_200(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/r").respond_with_handler(
        sequence(Response("boom", status=500), ok({"ok": True}))
    )
    client = HttpClient(settings(tmp_path), "t")
    assert client.get_json(httpserver.url_for("/r")) == {"ok": True}
    assert len(httpserver.log) == 2  # one retry on the wire
    assert client.requests_sent == 1  # one logical request


def test_persistent_500_raises_with_host_and_status(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/r").respond_with_data("down", status=500)
    client = HttpClient(settings(tmp_path), "prov")
    with pytest.raises(HttpStatusError) as info:
        client.get_json(httpserver.url_for("/r"))
    assert info.value.status == 500
    assert "HTTP 500" in str(info.value) and host_of(httpserver) in str(info.value)
    assert str(info.value).startswith("prov: ")
    assert len(httpserver.log) == 4  # first try + 3 retries


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(httpserver: HTTPServer, tmp_path: Path, status: int) -> None:
    httpserver.expect_request("/r").respond_with_data("no", status=status)
    client = HttpClient(settings(tmp_path), "t")
    with pytest.raises(HttpStatusError) as info:
        client.get_json(httpserver.url_for("/r"))
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    assert len(httpserver.log) == 1


def test_429_retry_after_is_honoured(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/r").respond_with_handler(
        sequence(Response("slow down", status=429, headers={"Retry-After": "1"}), ok([1]))
    )
    client = HttpClient(settings(tmp_path), "t")
    t0 = time.monotonic()
    assert client.get_json(httpserver.url_for("/r")) == [1]
    elapsed = time.monotonic() - t0
    assert len(httpserver.log) == 2
    assert 0.95 <= elapsed < 3.0


def test_retry_after_is_capped(
    httpserver: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider asking for an hour must not stall the run: the wait is capped (10 s in
    production, 1 s here so the test stays fast)."""
    monkeypatch.setattr(http, "MAX_RETRY_AFTER_S", 1)
    httpserver.expect_request("/r").respond_with_handler(
        sequence(Response("later", status=429, headers={"Retry-After": "3600"}), ok({"a": 1}))
    )
    client = HttpClient(settings(tmp_path), "t")
    t0 = time.monotonic()
    assert client.get_json(httpserver.url_for("/r")) == {"a": 1}
    assert 0.95 <= time.monotonic() - t0 < 3.0
    assert len(httpserver.log) == 2


def test_unparseable_retry_after_is_an_error_not_a_crash(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    httpserver.expect_request("/r").respond_with_response(
        Response("x", status=429, headers={"Retry-After": "soon"})
    )
    client = HttpClient(settings(tmp_path), "t")
    with pytest.raises(IntensityUnavailable) as info:
        client.get_json(httpserver.url_for("/r"))
    assert host_of(httpserver) in str(info.value)


def test_malformed_json(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/r").respond_with_data("{not json", content_type="application/json")
    client = HttpClient(settings(tmp_path), "t")
    with pytest.raises(IntensityUnavailable, match="malformed JSON") as info:
        client.get_json(httpserver.url_for("/r"))
    assert host_of(httpserver) in str(info.value)
    assert not (tmp_path / "cache" / "t").exists() or not list((tmp_path / "cache" / "t").iterdir())


def test_read_timeout_is_bounded(
    slow_server: tuple[HTTPServer, threading.Event], tmp_path: Path
) -> None:
    server, release = slow_server
    client = HttpClient(settings(tmp_path, http_timeout_s=0.5), "t")
    t0 = time.monotonic()
    with pytest.raises(IntensityUnavailable) as info:
        client.get_json(server.url_for("/slow"))
    elapsed = time.monotonic() - t0
    release.set()
    # a read timeout is retried once: 2 attempts x 0.5 s (+ backoff), not the handler's 5 s each
    assert 0.95 <= elapsed < 2.0
    assert "cannot reach" in str(info.value) and host_of(server) in str(info.value)


def test_unreachable_host(tmp_path: Path, closed_port: int) -> None:
    client = HttpClient(settings(tmp_path), "t")
    t0 = time.monotonic()
    with pytest.raises(IntensityUnavailable) as info:
        client.get_json(f"http://127.0.0.1:{closed_port}/x")
    assert time.monotonic() - t0 < 2.0
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert "cannot reach" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- cache ------------------------------------------------------------------------------------


def test_memory_cache_and_params_in_key(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_handler(
        lambda request: ok({"zone": request.args["zone"]})
    )
    client = HttpClient(settings(tmp_path), "t")
    url = httpserver.url_for("/c")
    assert client.get_json(url, params={"zone": "DE"}) == {"zone": "DE"}
    assert client.get_json(url, params={"zone": "DE"}) == {"zone": "DE"}
    assert client.get_json(url, params={"zone": "FR"}) == {"zone": "FR"}
    assert len(httpserver.log) == 2
    assert client.requests_sent == 2


def test_cache_is_not_keyed_by_credentials(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    client = HttpClient(settings(tmp_path), "t")
    url = httpserver.url_for("/c")
    client.get_json(url, headers={"auth-token": "first-token"}, auth=("u", "pw-one"))
    client.get_json(url, headers={"auth-token": "second-token"}, auth=("u", "pw-two"))
    assert len(httpserver.log) == 1
    stored = "".join(p.read_text() for p in (tmp_path / "cache" / "t").iterdir())
    assert "first-token" not in stored and "pw-one" not in stored


def test_disk_cache_serves_a_new_client(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_json({"v": [1, 2]})
    url = httpserver.url_for("/c")
    first = HttpClient(settings(tmp_path), "t")
    assert first.get_json(url, params={"zone": "DE"}) == {"v": [1, 2]}
    files = list((tmp_path / "cache" / "t").iterdir())
    assert [p.suffix for p in files] == [".json"]  # atomic write leaves no temporary file
    stored = json.loads(files[0].read_text())
    assert stored["data"] == {"v": [1, 2]} and stored["expires"] > time.time()
    fresh = HttpClient(settings(tmp_path), "t")  # a new process would start like this
    assert fresh.get_json(url, params={"zone": "DE"}) == {"v": [1, 2]}
    assert fresh.requests_sent == 0
    assert len(httpserver.log) == 1


def test_ttl_expiry(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    client = HttpClient(settings(tmp_path, cache_ttl_s=0.2), "t")
    url = httpserver.url_for("/c")
    client.get_json(url)
    client.get_json(url)
    assert len(httpserver.log) == 1
    time.sleep(0.3)
    client.get_json(url)
    assert len(httpserver.log) == 2
    HttpClient(settings(tmp_path, cache_ttl_s=0.2), "t").get_json(url)  # disk entry fresh again
    assert len(httpserver.log) == 2


def test_ttl_zero_and_cache_false_bypass(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    url = httpserver.url_for("/c")
    off = HttpClient(settings(tmp_path, cache_ttl_s=0), "t")
    off.get_json(url)
    off.get_json(url)
    assert len(httpserver.log) == 2
    assert not (tmp_path / "cache" / "t").exists()
    on = HttpClient(settings(tmp_path), "t")
    on.get_json(url, cache=False)
    on.get_json(url, cache=False)
    assert len(httpserver.log) == 4
    assert on.requests_sent == 2


def test_errors_are_not_cached(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_handler(
        sequence(Response("no", status=404), ok({"v": 1}))
    )
    client = HttpClient(settings(tmp_path), "t")
    url = httpserver.url_for("/c")
    with pytest.raises(HttpStatusError):
        client.get_json(url)
    assert client.get_json(url) == {"v": 1}
    assert len(httpserver.log) == 2


def test_unwritable_cache_dir_still_works(httpserver: HTTPServer, tmp_path: Path) -> None:
    """Tests run as root, so the cache dir is made unusable by being a FILE: mkdir fails."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    url = httpserver.url_for("/c")
    client = HttpClient(settings(tmp_path, cache_dir=blocker), "t")
    assert client.get_json(url) == {"v": 1}
    assert client.get_json(url) == {"v": 1}  # from memory
    assert len(httpserver.log) == 1
    assert blocker.read_text() == "x"
    other = HttpClient(settings(tmp_path, cache_dir=blocker), "t")
    assert other.get_json(url) == {"v": 1}  # nothing on disk: one more request, no error
    assert len(httpserver.log) == 2


def test_corrupt_disk_entry_is_a_miss(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    url = httpserver.url_for("/c")
    HttpClient(settings(tmp_path), "t").get_json(url)
    (entry,) = (tmp_path / "cache" / "t").iterdir()
    entry.write_text('{"expires": 1e12, "da')  # truncated by a crash
    assert HttpClient(settings(tmp_path), "t").get_json(url) == {"v": 1}
    assert len(httpserver.log) == 2


def test_disk_entry_without_data_is_a_miss(httpserver: HTTPServer, tmp_path: Path) -> None:
    """A valid JSON entry of another shape (older format, foreign file) is a miss, not a crash."""
    httpserver.expect_request("/c").respond_with_json({"v": 1})
    url = httpserver.url_for("/c")
    HttpClient(settings(tmp_path), "t").get_json(url)
    (entry,) = (tmp_path / "cache" / "t").iterdir()
    entry.write_text(json.dumps({"expires": time.time() + 3600}))
    assert HttpClient(settings(tmp_path), "t").get_json(url) == {"v": 1}


# --- secrets ------------------------------------------------------------------------------------


def test_token_appears_nowhere(
    httpserver: HTTPServer,
    tmp_path: Path,
    closed_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every failure path, with a configured token: logs (all levels, all loggers), exception
    texts and tracebacks, reprs of settings, provider and client, and the disk cache."""
    caplog.set_level(logging.DEBUG)
    conf = settings(
        tmp_path,
        electricitymaps_token=SECRET,
        electricitymaps_url=httpserver.url_for("/"),
        watttime_password=SECRET,
        http_timeout_s=0.5,
    )
    provider = ElectricityMapsProvider(conf)
    where = Location(raw="DE", zone="DE", country="DE")
    now = time.time()
    texts: list[str] = [repr(conf), str(conf), repr(provider), repr(provider.client)]
    texts.append(repr(vars(provider.client)))

    def attempt(call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])
        else:
            texts.append("succeeded")

    path = "/v3/carbon-intensity/history"
    sent: list[Request] = []
    for response in [
        Response("denied", status=401),
        Response("denied", status=403),
        Response("missing", status=404),
        Response("down", status=500),
        Response("busy", status=429, headers={"Retry-After": "0"}),
        Response("{bad json", status=200),
        ok({"zone": "DE", "history": [{"zone": "DE", "carbonIntensity": 100}]}),
    ]:
        httpserver.clear()
        httpserver.expect_request(path).respond_with_response(response)
        attempt(lambda: provider.series(where, now - 3600, now))
        sent.extend(request for request, _ in httpserver.log)
    client = HttpClient(conf, "raw")
    attempt(lambda: client.get_json(f"http://127.0.0.1:{closed_port}/x", auth=("user", SECRET)))
    attempt(
        lambda: client.get_json(f"http://127.0.0.1:{closed_port}/x", headers={"auth-token": SECRET})
    )
    texts.append(caplog.text)
    texts.extend(record.getMessage() for record in caplog.records)
    texts.extend(p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(texts) > 20
    assert "urllib3" in {record.name.split(".")[0] for record in caplog.records}  # it did log
    for text in texts:
        assert SECRET not in text
    # ...while the token did reach the server, in the header and nowhere else
    assert len(sent) >= 7 and all(request.headers.get("auth-token") == SECRET for request in sent)
    assert all(SECRET not in request.url for request in sent)


# --- the disk cache does not grow without bound ---------------------------------------------------


def test_expired_disk_entries_are_pruned_when_a_new_one_is_stored(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    import os

    directory = tmp_path / "cache" / "t"
    directory.mkdir(parents=True)
    now = time.time()
    expired = directory / ("a" * 32 + ".json")  # written 2 h ago with a 1 h TTL
    expired.write_text(json.dumps({"expires": now - 3600, "data": 1}))
    os.utime(expired, (now - 7200, now - 7200))
    ancient = directory / ("b" * 32 + ".json")  # older than the longest TTL: no need to read
    ancient.write_text("not even json")
    os.utime(ancient, (now - 8 * 86400, now - 8 * 86400))
    fresh = directory / ("c" * 32 + ".json")  # another run's entry, still valid
    fresh.write_text(json.dumps({"expires": now + 3600, "data": 2}))
    longer = directory / ("d" * 32 + ".json")  # old, but stored with a longer TTL: valid
    longer.write_text(json.dumps({"expires": now + 86400, "data": 3}))
    os.utime(longer, (now - 7200, now - 7200))
    crashed = directory / "tmp1234.tmp"  # a write interrupted by a crash, long ago
    crashed.write_text("{")
    os.utime(crashed, (now - 7200, now - 7200))
    writing = directory / "tmp5678.tmp"  # another process writing right now
    writing.write_text("{")

    httpserver.expect_request("/c").respond_with_json({"v": 1})
    client = HttpClient(settings(tmp_path), "t")
    client.get_json(httpserver.url_for("/c"))
    left = {p.name for p in directory.iterdir()}
    assert expired.name not in left and ancient.name not in left and crashed.name not in left
    assert {fresh.name, longer.name, writing.name} <= left
    assert len(left) == 4  # plus the new entry
