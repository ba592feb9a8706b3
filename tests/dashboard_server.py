"""``mlflow server --app-name green-mlops`` (or ``green-mlops-auth``) on 127.0.0.1, as a user
starts it: for the dashboard's tests and benchmark. Same interface as
:class:`tests.mlflow_server.MlflowServer` (``url``, ``start``, ``stop``); the server's working
directory is ``root`` (where it looks for ``green-mlops.toml``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.mlflow_server import MlflowServer

__all__ = ["DashboardServer"]


class DashboardServer(MlflowServer):
    def __init__(
        self, root: Path, app: str = "green-mlops", env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(root)
        self.app = app
        self.env = dict(env or {})

    def start(self, timeout: float = 90.0) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--app-name", self.app]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **self.env,
        }
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                return  # it answers (health may need a login on some setups)
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()}")
