"""Lightning DDP over two torchrun "nodes" on this machine (gloo, CPU): EnergyMonitor sums the
nodes through the strategy's collective, each node's CPU counted once at its own known power
(ClockMeter), and logs the per-node breakdown as the MLflow plugin does (green/node/<n>/...)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import free_port
from tests.test_energy_monitor import totals

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
WATTS = {0: 50.0, 1: 80.0}

SCRIPT = """
import os, sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, {root!r})
from tests.conftest import ClockMeter
from tests.test_energy_monitor import Classifier, loader, SETTINGS
from green_mlops.integrations.lightning import EnergyMonitor

watts = {watts!r}[int(os.environ["GROUP_RANK"])]
monitor = EnergyMonitor(settings=SETTINGS, meters=lambda: [ClockMeter(watts)])
trainer = pl.Trainer(
    max_epochs=1, accelerator="cpu", devices=1, num_nodes=2, strategy="ddp",
    callbacks=[monitor], logger=pl.loggers.CSVLogger(sys.argv[1], name="csv", version=0),
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
)
trainer.fit(Classifier(), loader(), loader(1))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_lightning_ddp_on_two_nodes_counts_each_node_once_with_a_breakdown(
    tmp_path: Path,
) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT.format(root=str(ROOT), watts=WATTS))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launch = ["--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    agents = [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes=2",
                f"--node-rank={node}",
                *launch,
                str(script),
                str(tmp_path),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    errors = [agent.communicate(timeout=300)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [e[-3000:] for e in errors]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", encoding="utf-8") as fh:
        got = totals([{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh)])
    seconds = got["green/duration_s"]
    for node, watts in WATTS.items():
        joules = got[f"green/node/{node}/energy/cpu_kwh"] * 3.6e6
        assert joules == pytest.approx(watts * seconds, rel=0.15), node
    cpu = got["green/energy/cpu_kwh"]
    assert cpu == pytest.approx(
        got["green/node/0/energy/cpu_kwh"] + got["green/node/1/energy/cpu_kwh"]
    )
    assert cpu * 3.6e6 == pytest.approx(130.0 * seconds, rel=0.15)
    assert got["green/node/0/energy_kwh"] + got["green/node/1/energy_kwh"] == pytest.approx(
        got["green/energy_kwh"]
    )
