"""GREEN_MLOPS_ENABLE=1 against a real MLflow tracking server, with user-style scripts run as
real subprocesses. No mocked MLflow client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking.client import MlflowClient

from tests.conftest import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
GREEN_TOTALS = ("green/energy_kwh", "green/energy/cpu_kwh", "green/co2e_g", "green/duration_s")


def run_script(
    code: str, tmp_path: Path, server: MlflowServer | None, timeout: float = 180, **env: str
) -> dict[str, Any]:
    """Run ``code`` as a user script; it prints one JSON line last. Returns it (+ stderr)."""
    script = tmp_path / f"script_{uuid.uuid4().hex[:8]}.py"
    script.write_text(textwrap.dedent(code))
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
        "GREEN_MLOPS_LOCATION": "DE",
        "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
        "PYTHONUNBUFFERED": "1",
        **({"MLFLOW_TRACKING_URI": server.url} if server else {}),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    result["_returncode"] = proc.returncode
    result["_stderr"] = proc.stderr
    result["_stdout"] = proc.stdout
    return result


def experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def green_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    return {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("green")}


SIMPLE = """
    import json, time, mlflow
    mlflow.set_experiment("{exp}")
    with mlflow.start_run() as run:
        for i in range(4):
            mlflow.log_metric("loss", 1 / (i + 1), step=i)
            time.sleep(0.4)
    print(json.dumps({{"run_id": run.info.run_id}}))
"""


def test_every_run_gets_green_metrics_tags_and_artifacts(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    out = run_script(
        SIMPLE.format(exp=experiment()), tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1"
    )
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    metrics = green_metrics(client, out["run_id"])
    for key in GREEN_TOTALS:
        assert metrics[key] > 0, key
    assert metrics["green/duration_s"] == pytest.approx(1.6, abs=1.0)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["green.location"].startswith("DE") and tags["green.run_status"] == "FINISHED"
    assert tags["green.measured"] in ("true", "false") and "green.meters" in tags
    assert "static" in tags["green.intensity.source"]
    # a time series, not just a total: several periodic sends of the totals and power
    history = client.get_metric_history(out["run_id"], "green/energy_kwh")
    assert len(history) >= 2 and history[-1].value == pytest.approx(metrics["green/energy_kwh"])
    assert len(client.get_metric_history(out["run_id"], "system/green/power_w")) >= 2
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "green")}
    assert artifacts == {"green/report.json", "green/power.png"}
    report = client.download_artifacts(out["run_id"], "green/report.json", str(tmp_path))
    data = json.loads(Path(report).read_text())
    assert data["schema"] == "green-mlops/report/v1" and data["final"] is True
    assert data["metrics"]["green/energy_kwh"] == pytest.approx(metrics["green/energy_kwh"])
    # usable in searches
    found = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`green.location` LIKE 'DE%'"
    )
    assert [r.info.run_id for r in found] == [out["run_id"]]


def test_without_the_variable_nothing_happens_and_import_is_unchanged(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = SIMPLE.replace("print(json.dumps({{", "import sys\n    print(json.dumps({{").replace(
        '"run_id": run.info.run_id}}',
        '"run_id": run.info.run_id, "loaded": "green_mlops.integrations.mlflow" in sys.modules}}',
    )
    out = run_script(code.format(exp=experiment()), tmp_path, mlflow_server)
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["loaded"] is False
    assert green_metrics(MlflowClient(mlflow_server.url), out["run_id"]) == {}


def test_bad_configuration_fails_before_the_run_is_created(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    exp = experiment()
    code = f"""
        import json, mlflow
        mlflow.set_experiment("{exp}")
        try:
            mlflow.start_run()
            print(json.dumps({{"error": None}}))
        except Exception as exc:
            print(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"}}))
    """
    out = run_script(
        code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1", GREEN_MLOPS_SAMPLE_INTERVAL_S="-1"
    )
    assert out["error"].startswith("ConfigError: GREEN_MLOPS_SAMPLE_INTERVAL_S='-1'")
    client = MlflowClient(mlflow_server.url)
    assert client.search_runs([client.get_experiment_by_name(exp).experiment_id]) == []


def test_a_broken_integration_never_breaks_import_mlflow(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = """
        import sys
        sys.modules["green_mlops.integrations.mlflow"] = None  # importing it raises ImportError
        import json, mlflow
        with mlflow.start_run() as run:
            pass
        print(json.dumps({"run_id": run.info.run_id}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert "MLflow integration failed to load" in out["_stderr"]


def test_autoload_module_is_light_and_safe() -> None:
    code = (
        "import sys; import green_mlops.integrations.mlflow_autoload as m; "
        "m.GreenMlopsAutoload(); print(sorted(k for k in sys.modules if k.startswith('mlflow')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GREEN_MLOPS_ENABLE": "1"},
    )
    assert proc.stdout.strip() == "[]"


def test_client_api_threads_failures_and_exit_paths(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    exp = experiment()
    code = f"""
        import json, threading, time, mlflow
        from mlflow import MlflowClient
        mlflow.set_experiment("{exp}")
        exp_id = mlflow.get_experiment_by_name("{exp}").experiment_id
        ids = {{}}
        client = MlflowClient()
        run = client.create_run(exp_id, run_name="client")
        time.sleep(0.3)
        client.set_terminated(run.info.run_id)
        ids["client"] = run.info.run_id

        def worker(i):
            with mlflow.start_run(run_name=f"thread-{{i}}") as r:
                ids[f"thread-{{i}}"] = r.info.run_id
                time.sleep(0.6)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]

        try:
            with mlflow.start_run(run_name="failed") as r:
                ids["failed"] = r.info.run_id
                time.sleep(0.2)
                raise ValueError("boom")
        except ValueError:
            pass
        r = mlflow.start_run(run_name="atexit")  # never ended: MLflow's atexit ends it
        ids["atexit"] = r.info.run_id
        time.sleep(0.2)
        print(json.dumps(ids))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    statuses = {}
    for name in ("client", "thread-0", "thread-1", "thread-2", "failed", "atexit"):
        run = client.get_run(out[name])
        statuses[name] = run.info.status
        assert green_metrics(client, out[name]).get("green/energy_kwh", 0) > 0, name
        assert run.data.tags["green.run_status"] == run.info.status, name
    assert statuses["failed"] == "FAILED" and statuses["atexit"] == "FINISHED"
    concurrent = client.get_run(out["thread-0"]).data.tags.get("green.concurrent_runs")
    assert concurrent is not None and int(concurrent) >= 2


def test_keyboard_interrupt_still_writes_totals(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, time, mlflow
        mlflow.set_experiment("{experiment()}")
        try:
            with mlflow.start_run() as run:
                print(json.dumps({{"run_id": run.info.run_id}}), flush=True)
                time.sleep(0.3)
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    assert run.info.status in ("FAILED", "KILLED")  # MLflow's choice for an exception
    assert green_metrics(client, out["run_id"])["green/energy_kwh"] > 0


def test_nested_runs_never_double_count(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    code = f"""
        import json, time, mlflow
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run() as parent:
            time.sleep(0.3)
            with mlflow.start_run(nested=True) as child:
                time.sleep(0.6)
        print(json.dumps({{"parent": parent.info.run_id, "child": child.info.run_id}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    client = MlflowClient(mlflow_server.url)
    parent, child = green_metrics(client, out["parent"]), green_metrics(client, out["child"])
    assert parent["green/inclusive/energy_kwh"] == pytest.approx(
        parent["green/energy_kwh"] + child["green/energy_kwh"], rel=1e-9
    )
    assert parent["green/inclusive/co2e_g"] == pytest.approx(
        parent["green/co2e_g"] + child["green/co2e_g"], rel=1e-9
    )
    assert parent["green/phase/nested_runs_kwh"] > 0


def test_resumed_run_continues_its_totals(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    exp = experiment()
    first = run_script(SIMPLE.format(exp=exp), tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    client = MlflowClient(mlflow_server.url)
    before = green_metrics(client, first["run_id"])
    code = f"""
        import json, time, mlflow
        with mlflow.start_run(run_id="{first["run_id"]}") as run:
            time.sleep(0.8)
        print(json.dumps({{"run_id": run.info.run_id}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    after = green_metrics(client, first["run_id"])
    assert after["green/energy_kwh"] > before["green/energy_kwh"]
    assert after["green/duration_s"] == pytest.approx(before["green/duration_s"] + 0.8, abs=0.6)


def test_explicit_autolog_and_disable_from_code(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, time, mlflow
        from mlflow import MlflowClient
        from green_mlops.integrations import mlflow as gm
        original = MlflowClient.create_run
        gm.autolog(log_interval_s=0.5)
        gm.autolog()  # idempotent: wrapped once
        wrapped_once = getattr(MlflowClient.create_run, "__wrapped__", None) is original
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run() as a:
            time.sleep(0.2)
        gm.disable()
        restored = MlflowClient.create_run is original
        with mlflow.start_run() as b:
            pass
        print(json.dumps({{"a": a.info.run_id, "b": b.info.run_id, "once": wrapped_once,
                           "restored": restored}}))
    """
    out = run_script(code, tmp_path, mlflow_server)
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["once"] and out["restored"]
    client = MlflowClient(mlflow_server.url)
    assert green_metrics(client, out["a"])["green/energy_kwh"] > 0
    assert green_metrics(client, out["b"]) == {}


def test_deleted_run_mid_run_does_not_harm_training(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, time, mlflow
        from mlflow import MlflowClient
        mlflow.set_experiment("{experiment()}")
        run = mlflow.start_run()
        time.sleep(0.7)
        MlflowClient().delete_run(run.info.run_id)
        time.sleep(1.2)
        steps = 3
        try:
            mlflow.end_run()  # MLflow itself refuses to end a deleted run
        except Exception:
            pass
        print(json.dumps({{"run_id": run.info.run_id, "steps": steps}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["steps"] == 3, out["_stderr"]  # training ran to the end
    assert "can no longer be written" in out["_stderr"]
    assert not (tmp_path / "cache" / "spool" / f"{out['run_id']}.jsonl").exists()


def test_lightning_mlflow_logger_runs_are_tracked(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, torch, lightning as L
        from lightning.pytorch.loggers import MLFlowLogger
        from torch.utils.data import DataLoader, TensorDataset

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(8, 1)
            def training_step(self, batch, _):
                return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.randn(256, 8), torch.randn(256, 1)), batch_size=32)
        logger = MLFlowLogger(experiment_name="{experiment()}")
        L.Trainer(max_epochs=2, logger=logger, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False).fit(M(), data)
        print(json.dumps({{"run_id": logger.run_id}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    assert green_metrics(client, out["run_id"])["green/energy_kwh"] > 0
    assert client.get_run(out["run_id"]).info.status == "FINISHED"


def test_server_down_mid_run_loses_nothing(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "srv")
    server.root.mkdir()
    server.start()
    flag = tmp_path / "server_is_back"
    code = f"""
        import json, os, time, mlflow
        mlflow.set_experiment("down")
        with mlflow.start_run() as run:
            print(json.dumps({{"run_id": run.info.run_id}}), flush=True)
            t0 = time.time()
            while not os.path.exists({str(flag)!r}) and time.time() - t0 < 60:
                time.sleep(0.1)   # training goes on while the server is down
            time.sleep(1.5)       # and a little after it is back
        print(json.dumps({{"run_id": run.info.run_id, "done": True}}))
    """
    script = tmp_path / "down.py"
    script.write_text(textwrap.dedent(code))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "MLFLOW_TRACKING_URI": server.url,
        "GREEN_MLOPS_ENABLE": "1",
        "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    run_id = json.loads(proc.stdout.readline())["run_id"]
    time.sleep(1.2)  # a couple of periodic sends land
    server.stop()
    time.sleep(2.5)  # sends fail: spooled
    spool = tmp_path / "cache" / "spool" / f"{run_id}.jsonl"
    assert spool.exists() and spool.read_text().strip()
    server.start()
    flag.write_text("1")
    stdout, stderr = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["done"] is True
        assert "kept in" in stderr  # it said so
        assert not spool.exists()  # everything replayed
        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "green/energy_kwh")
        # one value per interval over the whole run, including those sent while it was down
        assert len(history) >= 8
        report = json.loads(
            Path(client.download_artifacts(run_id, "green/report.json", str(tmp_path))).read_text()
        )
        power = client.get_metric_history(run_id, "system/green/power_w")
        assert len(power) == len(report["energy"]["timeline"]) - 1
        assert run.data.metrics["green/energy_kwh"] == pytest.approx(
            report["metrics"]["green/energy_kwh"]
        )
    finally:
        server.stop()


def test_sync_command_replays_a_spool(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment(experiment())
    run_id = client.create_run(exp_id).info.run_id
    spool = tmp_path / "cache" / "spool" / f"{run_id}.jsonl"
    spool.parent.mkdir(parents=True)
    batch = {
        "run_id": run_id,
        "tracking_uri": mlflow_server.url,
        "tags": {"green.x": "1"},
        "metrics": [["green/energy_kwh", 0.5, 1_700_000_000_000, 3]],
        "report": None,
        "power_until": 0,
    }
    spool.write_text(json.dumps(batch) + "\n")
    env = {**os.environ, "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "green_mlops", "sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 batch" in proc.stdout
    assert not spool.exists()
    assert client.get_run(run_id).data.metrics["green/energy_kwh"] == 0.5


def test_tokens_appear_nowhere_in_a_tracked_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Tokens configured (and failing against a closed port): not in logs, tags, params,
    metrics, artifacts, reprs or exception texts."""
    from tests.conftest import free_port

    token, password = "EM-SECRET-TOKEN-4242", "WT-SECRET-PASSWORD-4242"
    closed = f"http://127.0.0.1:{free_port()}"
    code = f"""
        import json, logging, time, mlflow
        logging.basicConfig(level=logging.DEBUG)
        from green_mlops.config import Settings
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run() as run:
            time.sleep(0.6)
        s = Settings.load()
        print(repr(s), str(s.electricitymaps_token), repr(s.watttime_password))  # must be masked
        try:
            Settings.load(electricitymaps_token=s.electricitymaps_token, share="bad")
        except Exception as exc:
            print("error:", exc)
        print(json.dumps({{"run_id": run.info.run_id}}))
    """
    out = run_script(
        code,
        tmp_path,
        mlflow_server,
        GREEN_MLOPS_ENABLE="1",
        GREEN_MLOPS_ELECTRICITYMAPS_TOKEN=token,
        GREEN_MLOPS_ELECTRICITYMAPS_URL=closed,
        GREEN_MLOPS_WATTTIME_USERNAME="user",
        GREEN_MLOPS_WATTTIME_PASSWORD=password,
        GREEN_MLOPS_WATTTIME_URL=closed,
        GREEN_MLOPS_WATTTIME_REGION="CAISO_NORTH",
        GREEN_MLOPS_HTTP_TIMEOUT_S="0.5",
    )
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    fallbacks = run.data.tags["green.intensity.fallbacks"]
    assert "electricitymaps" in fallbacks and "watttime" in fallbacks  # they were tried
    seen = [
        out["_stderr"],
        out["_stdout"],
        json.dumps(run.data.tags),
        json.dumps(run.data.params),
        json.dumps(run.data.metrics),
    ]
    for artifact in ("green/report.json",):
        seen.append(
            Path(client.download_artifacts(out["run_id"], artifact, str(tmp_path))).read_text()
        )
    for spool in (tmp_path / "cache").rglob("*"):
        if spool.is_file():
            seen.append(spool.read_bytes().decode(errors="replace"))
    text = "\n".join(seen)
    assert token not in text and password not in text
    assert "Secret('***')" in out["_stdout"] and "error:" in out["_stdout"]
