"""A run created after the work it records (``start_time`` in the past: mlflow.sklearn's
parameter-search children) is not measured: it says so, and its parent keeps the energy."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import experiment, green_metrics, run_script

# mlflow.sklearn's shape (mlflow/sklearn/utils.py): the search runs, then each candidate's run
# is created with the parent's start_time, logged and terminated with an end time in the past
BACKDATED = """
    import json, time, mlflow
    from mlflow.tracking.client import MlflowClient
    mlflow.set_experiment("{exp}")
    client = MlflowClient()
    with mlflow.start_run() as parent:
        t = time.perf_counter()
        while time.perf_counter() - t < 2.0:  # the search: work before any child run exists
            pass
        end = int(time.time() * 1000)
        children = []
        for i in range(3):
            child = client.create_run(parent.info.experiment_id,
                                      start_time=parent.info.start_time,
                                      tags={{"mlflow.parentRunId": parent.info.run_id}})
            client.log_metric(child.info.run_id, "mean_test_score", 0.5 + i / 10)
            client.set_terminated(child.info.run_id, end_time=end)
            children.append(child.info.run_id)
        fresh = client.create_run(parent.info.experiment_id,
                                  start_time=int(time.time() * 1000),
                                  tags={{"mlflow.parentRunId": parent.info.run_id}})
        time.sleep(0.6)
        client.set_terminated(fresh.info.run_id)
    print(json.dumps({{"parent": parent.info.run_id, "children": children,
                       "fresh": fresh.info.run_id}}))
"""


def test_a_run_created_after_its_work_is_not_measured_and_says_so(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    out = run_script(
        BACKDATED.format(exp=experiment()), tmp_path, mlflow_server, GREEN_MLOPS_ENABLE="1"
    )
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    for child_id in out["children"]:
        child = client.get_run(child_id)
        # no number for the logging seconds, ranked as if it were the candidate's energy
        assert "green/energy_kwh" not in child.data.metrics
        assert "green.concurrent_runs" not in child.data.tags
        note = child.data.tags.get("green.not_reported", "")
        assert "created" in note and "start_time" in note and "not measured" in note, note
        assert child.data.tags.get("green.measured_span", "").startswith("none")
    # a run created with its own start time (a few ms old) is measured as ever
    fresh = green_metrics(client, out["fresh"])
    assert fresh["green/energy_kwh"] > 0 and fresh["green/duration_s"] >= 0.5
    assert "green.measured_span" not in client.get_run(out["fresh"]).data.tags
    # the search's energy stays in the parent: only the fresh child is left out of it
    parent = green_metrics(client, out["parent"])
    assert parent["green/duration_s"] >= 2.0
    left_out = parent["green/inclusive/energy_kwh"] - parent["green/energy_kwh"]
    assert abs(left_out - fresh["green/energy_kwh"]) <= 1e-3 * fresh["green/energy_kwh"] + 1e-12
