"""Shared test parts.

`ClockMeter` is a real meter of a known quantity: energy = watts x elapsed monotonic time, read
at the moment the engine samples it. It lets the engine's attribution be checked against exact
expectations, with real threads and real clocks, independently of this machine's hardware.
"""

from __future__ import annotations

import threading
import time

import pytest

from green_mlops.meters import Component, Device, DeviceError, Meter, Method, Readings


class ClockMeter(Meter):
    max_interval_s = 0.05

    def __init__(
        self,
        watts: float = 100.0,
        *,
        name: str = "clock",
        component: Component = Component.CPU,
        method: Method = Method.COUNTER,
        device: str = "cpu:clock",
    ) -> None:
        super().__init__([Device(device, component, method, 0.02, label="test clock")])
        self.name = name
        self.watts = watts
        self.fail: str | None = None  # set to a reason to make reads fail
        self.raise_exc: Exception | None = None
        self.samples = 0
        self.closed = False
        self.threads: set[str] = set()
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()

    def sample(self, now: float) -> Readings:
        self.samples += 1
        self.threads.add(threading.current_thread().name)
        if self.raise_exc is not None:
            raise self.raise_exc
        if self.fail is not None:
            return {self.devices[0].id: DeviceError(self.fail)}
        return {self.devices[0].id: self.watts * (now - self._t0)}

    def close(self) -> None:
        self.closed = True


class ManualClock:
    """A monotonic clock that moves only when the test says so (thread-safe under the GIL)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock_meter() -> ClockMeter:
    return ClockMeter()


# --- a real MLflow tracking server on 127.0.0.1 ------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``uvicorn mlflow.server.fastapi_app:app`` with a sqlite store and proxied artifacts, in its
    own process group; can be stopped and started again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            "_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{self.root / 'mlflow.db'}",
            "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
            "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true",
            "_MLFLOW_SERVER_ARTIFACT_DESTINATION": str(self.root / "artifacts"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "mlflow.server.fastapi_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"MLflow server exited: {(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("MLflow server did not start")
        self.warm_up(max(1.0, deadline - time.monotonic()))

    def warm_up(self, timeout: float) -> None:
        """One real API call: the first one (store initialisation, imports) can take seconds
        on a loaded machine, after ``/health`` already answers."""
        request = urllib.request.Request(
            self.url + "/api/2.0/mlflow/experiments/search",
            data=b'{"max_results": 1}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if r.status != 200:
                raise RuntimeError(f"MLflow server answered {r.status} to its first API call")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
