"""At exit, what could not be delivered is said once: what, where it is kept, and that
`green-mlops sync` delivers it; never the tracking URI's credentials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import run_script

SLOW_AT_EXIT = """
    import atexit, json, os, signal, threading, time, mlflow
    from green_mlops.integrations.mlflow import writer
    writer.UPLOAD_WAIT_S = writer.EXIT_REPLAY_S = 1.0  # short waits; the server stays silent
    send_report, exiting = writer._log_report, threading.Event()

    def at_exit():  # runs before the plugin's exit handler (last registered, first run)
        os.kill({pid}, signal.SIGSTOP)  # the server stops answering as the script exits
        exiting.set()

    def report_at_exit(*args):  # the report upload starts late: at exit
        exiting.wait(60)
        return send_report(*args)

    writer._log_report = report_at_exit
    mlflow.set_experiment("slow")
    with mlflow.start_run() as run:
        time.sleep(0.3)
    atexit.register(at_exit)
    print(json.dumps({{"run_id": run.info.run_id}}))
"""


def test_a_report_not_delivered_at_exit_is_said_with_where_and_how(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    assert server.proc is not None
    secret_uri = server.url.replace("http://", "http://alice:s3cret-token@")
    try:
        out = run_script(
            SLOW_AT_EXIT.format(pid=server.proc.pid),
            tmp_path,
            None,
            timeout=240,
            GREEN_MLOPS_ENABLE="1",
            MLFLOW_TRACKING_URI=secret_uri,
        )
        os.kill(server.proc.pid, signal.SIGCONT)
        assert out["_returncode"] == 0, out["_stderr"]
        run_id = out["run_id"]
        said = [line for line in out["_stderr"].splitlines() if "green-mlops sync" in line]
        pending = [line for line in said if "not delivered" in line]
        assert len(pending) == 1, out["_stderr"]
        assert run_id in pending[0] and "the report" in pending[0]
        assert str(tmp_path / "cache" / "spool") in pending[0]
        assert "s3cret" not in out["_stderr"]
        client = MlflowClient(server.url)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not client.list_artifacts(run_id, "green")  # pending indeed
        env = {k: v for k, v in os.environ.items() if not k.startswith("GREEN_MLOPS_")}
        sync = subprocess.run(
            [sys.executable, "-m", "green_mlops", "sync"],
            env={**env, "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
        names = {a.path for a in client.list_artifacts(run_id, "green")}
        assert "green/report.json" in names
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
