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

from collections.abc import Iterator  # noqa: E402

from tests.mlflow_server import MlflowServer  # noqa: E402


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
