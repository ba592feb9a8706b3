"""SIGTERM (torchrun and Slurm stop workers so) under GREEN_MLOPS_ENABLE=1: the measured runs
get their last values and end KILLED, then the process dies of SIGTERM as by default. A handler
the user installed is never replaced. Real subprocesses against a real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import experiment, green_metrics, run_script

WORKER = """
    import json, time, mlflow
    mlflow.set_experiment("{exp}")
    with mlflow.start_run() as parent:
        with mlflow.start_run(nested=True) as child:
            print(json.dumps({{"parent": parent.info.run_id, "child": child.info.run_id}}),
                  flush=True)
            t = time.perf_counter()
            while True:  # a training loop, stopped from outside
                time.sleep(0.05)
"""


def test_sigterm_ends_the_measured_runs_killed_with_their_last_seconds(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(exp=experiment())))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "GREEN_MLOPS_ENABLE": "1",
        "GREEN_MLOPS_LOCATION": "DE",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
        "GREEN_MLOPS_LOG_INTERVAL_S": "60",  # nothing periodic: only the end sends values
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == -signal.SIGTERM  # re-delivered with the default behaviour
    client = MlflowClient(mlflow_server.url)
    for key in ("child", "parent"):
        run = client.get_run(ids[key])
        assert run.info.status == "KILLED", key
        assert run.data.tags.get("green.run_status") == "KILLED", key
        metrics = green_metrics(client, ids[key])
        assert metrics["green/energy_kwh"] > 0 and metrics["green/duration_s"] >= 2.0, key
    parent = green_metrics(client, ids["parent"])
    assert parent["green/inclusive/energy_kwh"] > parent["green/energy_kwh"]  # child left out


def test_a_handler_the_user_installed_is_kept(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    code = f"""
        import json, signal, threading, mlflow
        def mine(signum, frame):
            pass
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run():
            default = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, mine)
        with mlflow.start_run():
            kept = signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        runs = []
        t = threading.Thread(target=lambda: runs.append(mlflow.start_run().info.run_id))
        t.start(); t.join()
        in_thread = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        print(json.dumps({{"chained": default is not signal.SIG_DFL, "kept": kept,
                           "in_thread_left_alone": in_thread}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["chained"] and out["kept"] and out["in_thread_left_alone"], out
