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

from tests.mlflow_server import MlflowServer

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
    assert artifacts == {"green/report.json", "green/report.html", "green/power.png"}
    report = client.download_artifacts(out["run_id"], "green/report.json", str(tmp_path))
    data = json.loads(Path(report).read_text())
    assert data["schema"] == "green-mlops/report/v2" and data["final"] is True
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
        '"run_id": run.info.run_id, '
        '"loaded": "green_mlops.integrations.mlflow.plugin" in sys.modules}}',
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
        # importing it raises ImportError
        sys.modules["green_mlops.integrations.mlflow.plugin"] = None
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
        "import sys; import green_mlops.integrations.mlflow.autoload as m; "
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
        # carbon too, also for the run MLflow's atexit handler ends at interpreter exit
        assert green_metrics(client, out[name]).get("green/co2e_g", 0) > 0, name
        assert "footprint failed" not in run.data.tags.get("green.problems", ""), name
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


def test_disable_during_a_run_keeps_its_energy_and_claims_no_status(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """disable() ends the measurement of a run still going on: its energy so far is sent, but
    the run's outcome is not known then (it fails later here), so none is claimed for it."""
    code = f"""
        import json, time, mlflow
        from green_mlops.integrations import mlflow as gm
        gm.autolog(log_interval_s=0.5)
        mlflow.set_experiment("{experiment()}")
        run = mlflow.start_run()
        time.sleep(0.3)
        gm.disable()
        mlflow.log_metric("loss", 1.0)
        mlflow.end_run(status="FAILED")
        print(json.dumps({{"run_id": run.info.run_id}}))
    """
    out = run_script(code, tmp_path, mlflow_server)
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.metrics["green/energy_kwh"] > 0
    assert "green.run_status" not in run.data.tags


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
    try:
        server.start()
        _server_down_mid_run(server, tmp_path)
    finally:
        server.stop()


def _server_down_mid_run(server: MlflowServer, tmp_path: Path) -> None:
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
    try:
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["done"] is True
    assert "kept in" in stderr  # it said so, once for the outage (not at every send)
    assert stderr.count("could not send green metrics") == 1, stderr
    assert "takes green metrics of run" in stderr  # and that it is back
    assert not spool.exists()  # everything replayed
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    # the outage is in the run's provenance, not only on stderr
    delivery = run.data.tags["green.delivery"]
    assert delivery.startswith("the tracking server did not take green values from 20")
    assert " to 20" in delivery and "sent when it answered again" in delivery
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
    from tests.mlflow_server import free_port

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


# --- issue 10 -----------------------------------------------------------------------------

ADDITIVE = ("green/energy_kwh", "green/co2e_g")


def test_overlapping_nested_runs_subtract_their_union(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Children alive at the same time (threads, as sklearn's autologging flushes its child
    runs): the parent leaves out the union of their time, not the sum; they are tagged."""
    code = f"""
        import json, threading, time, mlflow
        mlflow.set_experiment("{experiment()}")
        ids = []
        with mlflow.start_run() as parent:
            time.sleep(0.6)
            def child():
                with mlflow.start_run(nested=True, parent_run_id=parent.info.run_id) as r:
                    ids.append(r.info.run_id)
                    time.sleep(1.0)
            threads = [threading.Thread(target=child) for _ in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        print(json.dumps({{"parent": parent.info.run_id, "children": ids}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    parent = green_metrics(client, out["parent"])
    children = [green_metrics(client, c) for c in out["children"]]
    for key in ADDITIVE:
        exclusive, inclusive = parent[key], parent[key.replace("green/", "green/inclusive/")]
        left_out = inclusive - exclusive
        assert 0 < exclusive < inclusive, key
        # the union of the children's time: less than their sum, as long as one of them
        assert max(c[key] for c in children) * 0.8 < left_out < sum(c[key] for c in children)
    for child in out["children"]:
        assert client.get_run(child).data.tags.get("green.concurrent_runs") == "4"
    assert "green.concurrent_runs" not in client.get_run(out["parent"]).data.tags


def test_sklearn_grid_search_children_are_not_billed_the_logging_seconds(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """mlflow.sklearn creates the candidates' runs after the search, with the parent's
    start_time: what green-mlops could measure of them is their logging, not the candidate. They
    are not measured (tagged why), and the search's energy stays in the parent."""
    code = f"""
        import json, time, mlflow
        from sklearn.datasets import make_classification
        from sklearn.model_selection import GridSearchCV
        from sklearn.tree import DecisionTreeClassifier
        mlflow.set_experiment("{experiment()}")
        mlflow.sklearn.autolog(log_models=False, log_datasets=False, max_tuning_runs=None)
        X, y = make_classification(400, 8, random_state=0)
        search = GridSearchCV(DecisionTreeClassifier(random_state=0),
                              {{"max_depth": list(range(1, 13)), "min_samples_leaf": [1, 5]}},
                              cv=2, n_jobs=1)
        with mlflow.start_run() as parent:
            time.sleep(1.2)  # data loading: the children are created > 1 s after its start
            search.fit(X, y)
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
            filter_string=f"tags.mlflow.parentRunId = '{{parent.info.run_id}}'")
        print(json.dumps({{"parent": parent.info.run_id,
                           "children": [r.info.run_id for r in runs]}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert len(out["children"]) == 24
    client = MlflowClient(mlflow_server.url)
    parent = green_metrics(client, out["parent"])
    for key in ADDITIVE:
        assert parent[key] > 0, key
        assert parent.get(key.replace("green/", "green/inclusive/"), parent[key]) == parent[key]
    for child in out["children"]:
        run = client.get_run(child)
        assert green_metrics(client, child) == {}
        assert "mlflow.sklearn" in run.data.tags["green.not_reported"]
        assert "green.concurrent_runs" not in run.data.tags


def test_resumed_nested_runs_keep_their_parent(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """Optuna's MLflowCallback pattern: each trial's run is created, ended, then resumed with
    ``start_run(run_id=..., nested=True)`` to log the trial's results."""
    code = f"""
        import json, time, mlflow
        mlflow.set_experiment("{experiment()}")
        children = []
        with mlflow.start_run() as parent:
            for trial in range(4):
                with mlflow.start_run(nested=True) as child:
                    time.sleep(0.3)
                children.append(child.info.run_id)
                with mlflow.start_run(run_id=child.info.run_id, nested=True):
                    mlflow.log_metric("value", trial)
                    time.sleep(0.1)
            time.sleep(0.2)
        print(json.dumps({{"parent": parent.info.run_id, "children": children}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    parent = green_metrics(client, out["parent"])
    children = [green_metrics(client, c) for c in out["children"]]
    for run_id in [out["parent"], *out["children"]]:
        assert "green.concurrent_runs" not in client.get_run(run_id).data.tags, run_id
    for key in ADDITIVE:
        assert parent[key.replace("green/", "green/inclusive/")] == pytest.approx(
            parent[key] + sum(c[key] for c in children), rel=1e-9
        ), key
    for child in children:  # both segments of each trial (and the time between them)
        assert 0.4 <= child["green/duration_s"] < parent["green/duration_s"] / 4


def test_lightning_stages_after_fit_are_measured(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """MLFlowLogger terminates the run at the end of fit, then ``trainer.test()`` logs to it
    and terminates it again: the test stage is measured and the shown totals are cumulative."""
    code = f"""
        import json, time, torch, lightning as L
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow import MlflowClient
        from torch.utils.data import DataLoader, TensorDataset

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(8, 1)
            def training_step(self, batch, _):
                return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            def test_step(self, batch, _):
                time.sleep(0.1)
                self.log("test_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.randn(256, 8), torch.randn(256, 1)), batch_size=16)
        logger = MLFlowLogger(experiment_name="{experiment()}")
        trainer = L.Trainer(max_epochs=1, logger=logger, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(M(), data)
        after_fit = MlflowClient().get_run(logger.run_id).data.metrics
        trainer.test(trainer.lightning_module, data, verbose=False)
        print(json.dumps({{"run_id": logger.run_id, "after_fit": after_fit}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and "test_loss" in run.data.metrics
    shown, fit = run.data.metrics, out["after_fit"]
    # 16 test batches of >= 0.1 s
    assert shown["green/duration_s"] >= fit["green/duration_s"] + 1.6
    for key in (*GREEN_TOTALS, "green/energy_uncertainty_kwh"):
        assert shown[key] > fit[key], key
        history = client.get_metric_history(out["run_id"], key)
        latest = max(history, key=lambda m: (m.step, m.timestamp))
        assert latest.value == shown[key] == max(m.value for m in history), key


def test_server_down_at_the_end_with_default_retries(tmp_path: Path) -> None:
    """MLflow's default retries (7, ~4 min per request) must not hold up ``end_run``; the values
    and the termination are kept and ``green-mlops sync`` delivers them."""
    server = MlflowServer(tmp_path / "srv")
    server.root.mkdir()
    down = tmp_path / "server_is_down"
    code = f"""
        import json, os, time, mlflow
        mlflow.set_experiment("down-at-end")
        run = mlflow.start_run()
        print(json.dumps({{"run_id": run.info.run_id}}), flush=True)
        while not os.path.exists({str(down)!r}):
            time.sleep(0.1)
        time.sleep(1.0)  # periodic sends fail meanwhile
        t0 = time.monotonic()
        mlflow.end_run()
        print(json.dumps({{"run_id": run.info.run_id, "end_run_s": time.monotonic() - t0}}))
    """
    script = tmp_path / "down_at_end.py"
    script.write_text(textwrap.dedent(code))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))},
        "MLFLOW_TRACKING_URI": server.url,
        "GREEN_MLOPS_ENABLE": "1",
        "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
        "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    try:
        server.start()
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            run_id = json.loads(proc.stdout.readline())["run_id"]
            time.sleep(1.0)
            server.stop()
            down.write_text("1")
            stdout, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, stderr
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["end_run_s"] < 15  # documented bound: ~10 s
        spool = tmp_path / "cache" / "spool" / f"{run_id}.jsonl"
        assert spool.exists()
        server.start()
        proc2 = subprocess.run(
            [sys.executable, "-m", "green_mlops", "sync"],
            env={**env, "GREEN_MLOPS_ENABLE": "0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc2.returncode == 0, proc2.stdout + proc2.stderr
        assert not spool.exists()
        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["green.run_status"] == "FINISHED"
        report = json.loads(
            Path(client.download_artifacts(run_id, "green/report.json", str(tmp_path))).read_text()
        )
        assert report["final"] is True
        for key in GREEN_TOTALS:
            assert run.data.metrics[key] == pytest.approx(report["metrics"][key]), key
    finally:
        server.stop()


def _spool_batch(run_id: str, url: str, value: float, step: int) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "tracking_uri": url,
        "tags": {},
        "metrics": [["green/energy_kwh", value, 1_700_000_000_000 + step, step]],
        "report": None,
        "power_until": 0,
    }


def test_a_torn_spool_line_is_quarantined_and_the_rest_delivered(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    spool = tmp_path / "cache" / "spool" / f"{run_id}.jsonl"
    spool.parent.mkdir(parents=True)
    torn = json.dumps(_spool_batch(run_id, mlflow_server.url, 0.2, 2))[:40]
    spool.write_text(
        json.dumps(_spool_batch(run_id, mlflow_server.url, 0.1, 1))
        + "\n"
        + torn  # a write cut short (killed, disk full), then more appends after it
        + "\n"
        + json.dumps(_spool_batch(run_id, mlflow_server.url, 0.3, 3))
        + "\n"
    )
    env = {**os.environ, "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "green_mlops", "sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not spool.exists()
    history = client.get_metric_history(run_id, "green/energy_kwh")
    assert sorted(m.value for m in history) == [0.1, 0.3]
    bad = list(spool.parent.glob("*.bad"))
    assert [p.read_text().strip() for p in bad] == [torn]


def test_the_spool_is_locked_across_processes(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """While another process holds a run's spool (the training process appending or replaying
    it), ``green-mlops sync`` leaves that run alone instead of sending or rewriting under it."""
    from filelock import FileLock

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    spool = tmp_path / "cache" / "spool" / f"{run_id}.jsonl"
    spool.parent.mkdir(parents=True)
    spool.write_text(json.dumps(_spool_batch(run_id, mlflow_server.url, 0.5, 1)) + "\n")
    env = {**os.environ, "GREEN_MLOPS_CACHE_DIR": str(tmp_path / "cache")}
    sync = [sys.executable, "-m", "green_mlops", "sync"]
    with FileLock(str(spool) + ".lock"):
        held = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120)
        assert held.returncode == 1 and spool.exists()
        assert "green/energy_kwh" not in client.get_run(run_id).data.metrics
    free = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stdout + free.stderr
    assert client.get_run(run_id).data.metrics["green/energy_kwh"] == 0.5


def test_an_unusable_cache_dir_never_stops_delivery(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    broken = tmp_path / ("x" * 300)  # ENAMETOOLONG on stat, like EACCES
    out = run_script(
        SIMPLE.format(exp=experiment()),
        tmp_path,
        mlflow_server,
        GREEN_MLOPS_ENABLE="1",
        GREEN_MLOPS_CACHE_DIR=str(broken),
    )
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    metrics = green_metrics(client, out["run_id"])
    for key in GREEN_TOTALS:
        assert metrics[key] > 0, key
    assert len(client.get_metric_history(out["run_id"], "green/energy_kwh")) >= 2


def test_an_unusable_spool_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from green_mlops.integrations.mlflow import spool as mlflow_spool

    broken = tmp_path / ("x" * 300) / "spool"
    with caplog.at_level("WARNING", logger="green_mlops"):
        for i in range(3):
            path = broken / f"run{i}.jsonl"
            assert mlflow_spool.append(path, _spool_batch(f"run{i}", "http://x", 1.0, i)) is False
    said = [r for r in caplog.records if "not spooled" in r.getMessage()]
    assert len(said) == 1


def test_drawing_the_power_chart_keeps_the_users_matplotlib_backend(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, sys, time, matplotlib, mlflow
        matplotlib.use("svg")  # e.g. a notebook's inline backend
        from green_mlops.integrations.mlflow import flush
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run() as run:
            time.sleep(1.2)
        flush()
        print(json.dumps({{"run_id": run.info.run_id, "backend": matplotlib.get_backend(),
                           "pyplot": "matplotlib.pyplot" in sys.modules}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["backend"] == "svg" and out["pyplot"] is False
    client = MlflowClient(mlflow_server.url)
    assert "green/power.png" in {a.path for a in client.list_artifacts(out["run_id"], "green")}


def test_long_runs_send_their_totals_at_a_rate_that_follows_the_runs_age() -> None:
    """A simulated 30-day run at the default 10 s interval (a clock we control): the totals
    (19 keys) are due every interval while the run is young, then every 0.5 % of its age."""
    from green_mlops.integrations.mlflow.plugin import TOTALS_AGE_FRACTION, totals_due

    interval, last, sends, worst = 10.0, None, 0, 0.0
    for i in range(1, 30 * 8640 + 1):
        age = i * interval
        if totals_due(last, age, interval):
            if last is not None:
                rate = max(interval, TOTALS_AGE_FRACTION * age)
                worst = max(worst, (age - last) - rate)
            last, sends = age, sends + 1
        elif i <= 200:
            raise AssertionError(f"totals not sent at {age} s")
    assert 1000 < sends < 2000  # not 259,200: 19 x sends points instead of 4.9 million
    assert worst <= interval  # never staler than the rate, to the next interval


def test_a_long_spool_is_compacted_and_replayed_in_few_requests(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from green_mlops.integrations.mlflow import spool as mlflow_spool

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    path = mlflow_spool.path_for(tmp_path, run_id)
    n = mlflow_spool.COMPACT_LINES * 2 + 10
    for i in range(n):  # two intervals per second: two totals at each step
        batch = _spool_batch(run_id, mlflow_server.url, float(i), i // 2)
        batch["metrics"].append(["system/green/power_w", 100.0 + i, 1_700_000_000_000 + i, i // 2])
        assert mlflow_spool.append(path, batch)
    lines = path.read_text().splitlines()
    assert len(lines) < 20  # compacted as it grew
    from green_mlops.integrations.mlflow import replay_spool

    assert replay_spool(path) == 1  # one merged batch (in 2 log_batch requests of <= 1000)
    totals = client.get_metric_history(run_id, "green/energy_kwh")
    assert sorted(m.value for m in totals) == [float(i) for i in range(1, n, 2)]  # latest per step
    assert len(client.get_metric_history(run_id, "system/green/power_w")) == n  # every point


def test_the_last_runs_report_lands_when_the_script_exits_right_after(tmp_path: Path) -> None:
    # The report and chart upload in the background; the interpreter exits at once after the
    # last run (an Optuna sweep's last trial). Python's exit-time finalizers delete temporary
    # directories still in use, so an upload through MLflow's temp files lost the report.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_script(
        """
        import json, time, mlflow
        mlflow.set_experiment("sweep")
        ids = []
        for i in range(3):
            with mlflow.start_run() as run:
                time.sleep(0.3)
            ids.append(run.info.run_id)
        print(json.dumps({"run_ids": ids}))
        """,
        tmp_path,
        None,
        GREEN_MLOPS_ENABLE="1",
        MLFLOW_TRACKING_URI=store,
    )
    assert out["_returncode"] == 0, out["_stderr"]
    assert "could not send" not in out["_stderr"], out["_stderr"]
    client = MlflowClient(store)
    for run_id in out["run_ids"]:
        artifacts = {a.path for a in client.list_artifacts(run_id, "green")}
        assert artifacts == {"green/report.json", "green/report.html", "green/power.png"}, run_id


def test_a_post_hoc_write_never_keeps_a_finished_run_measured(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # A sweep that tags each run after it ended (selection, review): the tag must not put the
    # finished run back into measurement, or each later run's energy is billed to it too.
    out = run_script(
        f"""
        import json, time, mlflow
        from mlflow.tracking import MlflowClient
        from green_mlops.integrations.mlflow import tracked_runs
        mlflow.set_experiment("{experiment()}")
        ids = []
        for i in range(3):
            with mlflow.start_run() as run:
                time.sleep(1.0)
            MlflowClient().set_tag(run.info.run_id, "selected", "no")
            mlflow.log_metric("score", i, run_id=run.info.run_id)
            ids.append(run.info.run_id)
        print(json.dumps({{"run_ids": ids, "tracked": tracked_runs()}}))
        """,
        tmp_path,
        mlflow_server,
        GREEN_MLOPS_ENABLE="1",
    )
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["tracked"] == []
    client = MlflowClient(mlflow_server.url)
    for run_id in out["run_ids"]:
        run = client.get_run(run_id)
        assert "green.concurrent_runs" not in run.data.tags
        assert run.data.metrics["green/duration_s"] == pytest.approx(1.0, abs=0.5)


def test_credentials_in_the_tracking_uri_are_never_logged_and_the_spool_is_private(
    tmp_path: Path,
) -> None:
    from green_mlops.integrations.mlflow import spool as mlflow_spool
    from green_mlops.integrations.mlflow.writer import shown_uri as _shown

    assert (
        _shown("https://alice:s3cr3t@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    )
    assert _shown("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    shown = _shown("https://h.example/mlflow?api_key=k3y&Token=t0k&sig=s1g&workspace=team")
    assert shown == "https://h.example/mlflow?api_key=***&Token=***&sig=***&workspace=team"
    shown = _shown("postgresql://u:pw@db/mlflow?sslpassword=p4ss&sslmode=require")
    assert shown == "postgresql://***@db/mlflow?sslpassword=***&sslmode=require"
    # the spool keeps the URI to deliver later: readable by its owner only
    path = mlflow_spool.path_for(tmp_path / "cache", "run1")
    assert mlflow_spool.append(path, {"run_id": "run1", "tracking_uri": "https://a:b@h"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_batch_the_server_refuses_for_good_never_blocks_the_values_behind_it(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from green_mlops.integrations.mlflow import replay_spool
    from green_mlops.integrations.mlflow import spool as mlflow_spool

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    path = mlflow_spool.path_for(tmp_path / "cache", run_id)

    def batch(key: str, value: float) -> dict[str, Any]:
        now = int(time.time() * 1000)
        return {
            "run_id": run_id,
            "tracking_uri": mlflow_server.url,
            "tags": {},
            "metrics": [[key, value, now, 0]],
            "report": None,
        }

    refused = batch("green/bad?key", 1.0)  # an invalid metric name: 400 INVALID_PARAMETER_VALUE
    assert mlflow_spool.append(path, refused)
    assert replay_spool(path) == 0  # before: raised at every replay, and every send replays
    assert not path.exists()
    assert "green/bad?key" in path.with_name(path.name + ".bad").read_text()
    assert mlflow_spool.append(path, batch("green/ok", 2.0))
    assert replay_spool(path) == 1
    assert client.get_run(run_id).data.metrics.get("green/ok") == 2.0


# --- issue 11: the package, the writer, MLflow missing, mlflow-skinny ------------------------


def test_without_mlflow_autolog_does_nothing_and_says_how_to_install_it_once() -> None:
    code = """
        import json, os, sys, warnings
        sys.modules["mlflow"] = None  # MLflow not installed: importing it raises ImportError
        from green_mlops.integrations.mlflow import autolog, autolog_from_env, tracked_runs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            autolog()
            autolog(log_interval_s=1)
            os.environ["GREEN_MLOPS_ENABLE"] = "1"
            autolog_from_env()
        print(json.dumps({"said": [[w.category.__name__, str(w.message)] for w in caught],
                          "tracked": tracked_runs()}))
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tracked"] == []
    assert len(out["said"]) == 1, out["said"]
    category, message = out["said"][0]
    assert category == "GreenMlopsWarning"
    assert "MLflow is not installed" in message and 'pip install "green-mlops[mlflow]"' in message


def test_importing_the_package_loads_neither_mlflow_nor_the_engine() -> None:
    code = (
        "import sys; import green_mlops.integrations.mlflow as m; "
        "print(sorted(k for k in sys.modules if k.startswith('mlflow') or k in "
        "('green_mlops.session', 'green_mlops.tracker', 'green_mlops.integrations.mlflow.plugin')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_the_plugin_uses_only_what_mlflow_skinny_ships(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """``green-mlops[mlflow]`` installs ``mlflow-skinny``: every MLflow module a tracked run
    loads (the plugin's imports, MLflow's own) must be one of its files."""
    from importlib.metadata import files

    skinny = {str(f) for f in files("mlflow-skinny") or [] if str(f).endswith(".py")}
    assert "mlflow/tracking/client.py" in skinny
    code = SIMPLE.replace("print(json.dumps({{", "import sys\n    print(json.dumps({{").replace(
        '"run_id": run.info.run_id}}',
        '"run_id": run.info.run_id, "modules": {{k: getattr(m, "__file__", None) '
        'for k, m in list(sys.modules.items()) if k.split(".")[0] in ("mlflow", "sqlalchemy")}}}}',
    )
    out = run_script(code.format(exp=experiment()), tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert green_metrics(MlflowClient(mlflow_server.url), out["run_id"])["green/energy_kwh"] > 0
    loaded = {name: path for name, path in out["modules"].items() if path}
    assert "mlflow.store.tracking.rest_store" in loaded  # the plugin's own requests
    outside = sorted(
        name
        for name, path in loaded.items()
        if not any(path.endswith("/" + f) for f in skinny) or name.startswith("sqlalchemy")
    )
    assert outside == []


def test_the_writer_batches_at_mlflows_limits_with_one_step_convention(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """``RunWriter``: 2,500 metrics and 250 tags in one flush (MLflow takes 1,000 and 100 per
    request); totals at whole seconds of the run, series at the caller's step, power at whole
    seconds since the run's start; unchanged tags are not sent again."""
    from green_mlops.config import Settings
    from green_mlops.integrations.mlflow.writer import RunWriter

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    writer = RunWriter(mlflow_server.url, run_id, Settings.load(cache_dir=tmp_path / "cache"))
    started = time.time() - 100
    writer.totals({"green/energy_kwh": 0.25, "green/duration_s": 42.9}, seconds=42.9)
    writer.series({f"green/epoch/k{i}": float(i) for i in range(2500)}, step=7)
    writer.power([(started + 10.5, 100.0), (started + 20.2, 110.0)], started_at=started)
    writer.tags({f"green.t{i}": str(i) for i in range(250)})
    assert writer.flush() == "sent"
    run = client.get_run(run_id)
    assert len([k for k in run.data.tags if k.startswith("green.t")]) == 250
    assert len([k for k in run.data.metrics if k.startswith("green/epoch/k")]) == 2500
    assert [m.step for m in client.get_metric_history(run_id, "green/energy_kwh")] == [42]
    assert [m.step for m in client.get_metric_history(run_id, "green/epoch/k2499")] == [7]
    power = client.get_metric_history(run_id, "system/green/power_w")
    assert sorted((m.step, m.value) for m in power) == [(10, 100.0), (20, 110.0)]
    # the same points and tags again: nothing new to send
    writer.power([(started + 20.2, 110.0)], started_at=started)
    writer.tags({"green.t1": "1"})
    assert writer.flush() == "idle"
    assert not writer.spool_path.exists()


def test_energy_monitor_writes_mlflow_through_the_writer_with_the_seconds_steps(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """The Lightning callback alone (no plugin), fit then test into one ``MLFlowLogger`` run:
    the power series at whole seconds since the run's measurement began (continuing into the
    test stage), as the plugin logs it, not at the point's index; report and chart together."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from green_mlops.integrations.lightning import EnergyMonitor

    class Slow(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            time.sleep(0.4)
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def test_step(self, batch: Any, _: int) -> None:
            time.sleep(0.4)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(96, 8), torch.randn(96, 1)), batch_size=8)
    logger = MLFlowLogger(experiment_name=experiment(), tracking_uri=mlflow_server.url)
    settings = {"location": "DE", "log_interval_s": 0.5, "sample_interval_s": 0.1}
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[EnergyMonitor(settings={**settings, "cache_dir": str(tmp_path / "cache")})],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = Slow()
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)  # 12 more batches of 0.4 s

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(logger.run_id)
    seconds = run.data.metrics["green/duration_s"]
    power = sorted(
        client.get_metric_history(logger.run_id, "system/green/power_w"), key=lambda m: m.timestamp
    )
    assert len(power) > seconds + 2  # several points per second: an index would outrun seconds
    steps = [m.step for m in power]
    assert steps == sorted(steps) and steps[-1] <= int(seconds) + 1, steps
    assert steps[-1] >= int(seconds) - 1, steps  # the test stage continues the fit's seconds
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "green")}
    assert artifacts == {"green/report.json", "green/report.html", "green/power.png"}


def test_a_loop_under_the_plugin_gets_its_forecast_logged_to_its_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # an MLflow-only loop with a known step budget asks for the forecast as it goes
    code = f"""
        import json, time, warnings, mlflow
        from green_mlops.integrations import mlflow as gm
        mlflow.set_experiment("{experiment()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outside = gm.forecast(0.5)  # no active run: None, said once
        said = [str(w.message) for w in caught]
        try:
            gm.forecast(0)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        found = []
        with mlflow.start_run() as run:
            for step in range(1, 41):
                x = sum(i * i for i in range(20000))  # a steady step
                time.sleep(0.02)
                if step % 4 == 0:
                    f = gm.forecast(step / 40, step=step)
                    if f is not None:
                        found.append([step, f.energy_j, f.low_j, f.high_j, f.co2e_g])
        print(json.dumps({{"run_id": run.info.run_id, "outside": outside, "said": said,
                           "refused": refused, "found": found}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["outside"] is None
    assert any("no active MLflow run is not measured" in s for s in out["said"]), out["said"]
    assert "forecast(progress=0) is not valid" in out["refused"]
    found = out["found"]
    assert len(found) >= 5  # from the steady state on, at every 4th step
    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(out["run_id"], "green/forecast/energy_kwh")
    assert sorted(m.step for m in history) == [f[0] for f in found]  # at the loop's steps
    for m, (_, energy_j, low_j, high_j, co2e_g) in zip(
        sorted(history, key=lambda m: m.step), found, strict=True
    ):
        assert m.value == pytest.approx(energy_j / 3.6e6)
        assert low_j <= energy_j <= high_j and co2e_g > 0
    final = green_metrics(client, out["run_id"])["green/energy_kwh"]
    assert found[-1][1] / 3.6e6 == pytest.approx(final, rel=0.2)  # at 100 %: what it used
