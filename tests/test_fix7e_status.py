"""The outcome tag README lists, ``green.run_status``, on the MLflow plugin's path: a failed
Lightning fit (MLFlowLogger + EnergyMonitor, GREEN_MLOPS_ENABLE=1) is tagged FAILED with its
totals, as plain MLflow runs are (tests/test_mlflow.py) and SIGTERM'd ones KILLED
(tests/test_fix7e_sigterm.py)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import experiment, green_metrics, run_script


def test_a_failed_lightning_fit_under_the_plugin_is_tagged_failed(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    code = f"""
        import json, torch, lightning as L
        from lightning.pytorch.loggers import MLFlowLogger
        from torch.utils.data import DataLoader, TensorDataset
        from green_mlops.integrations.lightning import EnergyMonitor

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(8, 1)
            def training_step(self, batch, i):
                if self.current_epoch == 1 and i == 2:
                    raise RuntimeError("NaN loss, aborting")
                return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.randn(256, 8), torch.randn(256, 1)), batch_size=32)
        logger = MLFlowLogger(experiment_name="{experiment()}")
        try:
            L.Trainer(max_epochs=3, logger=logger, callbacks=[EnergyMonitor()],
                      enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False).fit(M(), data)
        except RuntimeError:
            pass
        print(json.dumps({{"run_id": logger.run_id}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["green.run_status"] == "FAILED"
    assert green_metrics(client, out["run_id"])["green/energy_kwh"] > 0


def test_a_resumed_run_never_keeps_its_last_segments_outcome(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A run ended and then resumed (``start_run(run_id=...)``, revived or from another process)
    runs again: its ``green.run_status`` must not say the last segment's FINISHED meanwhile
    (a segment killed with -9 would keep that claim for good)."""
    code = f"""
        import json, time, mlflow
        from mlflow.tracking.client import MlflowClient
        mlflow.set_experiment("{experiment()}")
        client = MlflowClient()
        with mlflow.start_run() as run:
            time.sleep(0.3)
        seen = {{}}
        for how in ("revived", "resumed"):
            if how == "resumed":  # another run in between: the first is no longer lingering
                with mlflow.start_run():
                    time.sleep(0.1)
            with mlflow.start_run(run_id=run.info.run_id):
                time.sleep(1.5)  # periodic sends (0.5 s) meanwhile
                seen[how] = client.get_run(run.info.run_id).data.tags.get("green.run_status")
        final = client.get_run(run.info.run_id).data.tags.get("green.run_status")
        print(json.dumps({{"seen": seen, "final": final}}))
    """
    out = run_script(code, tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1")
    assert out["_returncode"] == 0, out["_stderr"]
    assert out["seen"] == {"revived": "RUNNING", "resumed": "RUNNING"}, out
    assert out["final"] == "FINISHED"
