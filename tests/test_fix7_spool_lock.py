"""The spool's lock file goes with its spool: `green-mlops sync` leaves no `<run>.jsonl.lock`
behind, and removing it never lets two processes hold one spool (no batch is lost)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from mlflow.tracking.client import MlflowClient

from green_mlops.integrations.mlflow import spool
from tests.mlflow_server import MlflowServer
from tests.test_mlflow import _spool_batch, experiment


def _sync(cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "green_mlops", "sync"],
        env={**env, "GREEN_MLOPS_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sync_leaves_no_lock_file_behind(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    path = spool.path_for(tmp_path / "cache", run_id)
    assert spool.append(path, _spool_batch(run_id, mlflow_server.url, 0.5, 1))  # as training does
    assert Path(f"{path}.lock").exists()  # the appender's (filelock keeps it on release)
    # a lock left by an earlier version for a spool that is gone
    orphan = path.with_name("0123abcd.jsonl.lock")
    orphan.touch()
    out = _sync(tmp_path / "cache")
    assert out.returncode == 0, out.stdout + out.stderr
    assert client.get_run(run_id).data.metrics["green/energy_kwh"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no .jsonl, no .lock


def test_a_held_spool_keeps_its_lock_and_the_next_sync_removes_both(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from filelock import FileLock

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(experiment())).info.run_id
    path = spool.path_for(tmp_path / "cache", run_id)
    assert spool.append(path, _spool_batch(run_id, mlflow_server.url, 0.5, 1))
    with FileLock(f"{path}.lock"):  # the training process, appending
        held = _sync(tmp_path / "cache")
        assert held.returncode == 1 and path.exists() and Path(f"{path}.lock").exists()
    free = _sync(tmp_path / "cache")
    assert free.returncode == 0, free.stdout + free.stderr
    assert not path.exists() and not Path(f"{path}.lock").exists()


APPENDER = """
    import sys
    from pathlib import Path
    from green_mlops.integrations.mlflow import spool
    path = Path(sys.argv[1])
    for step in range(int(sys.argv[2])):
        batch = {"run_id": "r", "tracking_uri": "u", "metrics": [["m", 1.0, 0, step]]}
        assert spool.append(path, batch)
    print("done")
"""


def test_removing_the_lock_file_never_loses_a_concurrent_append(tmp_path: Path) -> None:
    """A process appending while another replays and removes the lock file: every batch is
    delivered once (the remover holds the lock; a process that opened the removed file locks
    the new one instead)."""
    path = tmp_path / "spool" / "r.jsonl"
    path.parent.mkdir()
    script = tmp_path / "appender.py"
    script.write_text(textwrap.dedent(APPENDER))
    steps = 300
    appender = subprocess.Popen(
        [sys.executable, str(script), str(path), str(steps)],
        stdout=subprocess.PIPE,
        text=True,
    )
    delivered: list[int] = []

    def deliver(batch: dict[str, Any]) -> None:
        delivered.extend(int(point[3]) for point in batch["metrics"])

    removed = 0
    while appender.poll() is None:
        try:
            spool.replay(path, deliver)
        except spool.SpoolBusy:
            continue
        removed += not Path(f"{path}.lock").exists()
    assert appender.wait(timeout=120) == 0
    spool.replay(path, deliver)
    assert sorted(delivered) == list(range(steps))
    assert removed > 0  # the race was exercised
    assert not path.exists() and not Path(f"{path}.lock").exists()
