"""The job identity from the launcher's environment, and a real ``torchrun`` launch of two ranks
measured with ``GREEN_MLOPS_SHARE=process``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from green_mlops import job
from green_mlops.config import Settings
from green_mlops.job import Job, job_tags, local_group
from green_mlops.plugins.cpu_estimate import build_meter
from green_mlops.plugins.ram_estimate import RamEstimateMeter

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"

# --- the environment of each launcher -----------------------------------------------------------

TORCHRUN_NODE1 = {  # what torchrun's agent sets (local_elastic_agent.py), 2 nodes x 4 ranks
    "RANK": "5",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "WORLD_SIZE": "8",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "job-42",
    "SLURM_JOB_ID": "991",
}


def test_torchrun_environment() -> None:
    j = Job.from_environ(TORCHRUN_NODE1)
    assert (j.launcher, j.rank, j.local_rank, j.world_size, j.local_world_size) == (
        "torchrun", 5, 1, 8, 4,
    )  # fmt: skip
    assert (j.node_rank, j.nodes, j.run_id, j.slurm_job_id) == (1, 2, "job-42", "991")
    assert j.multi_node
    assert j.tags() == {
        "green.launcher": "torchrun",
        "green.world_size": "8",
        "green.nodes": "2",
        "green.job.launcher": "torchrun",
        "green.job.world_size": "8",
        "green.job.nodes": "2",
        "green.job.rank": "5",
        "green.job.local_rank": "1",
        "green.job.local_world_size": "4",
        "green.job.node_rank": "1",
        "green.job.run_id": "job-42",
        "green.job.slurm_id": "991",
        "green.job.scope": "node 1 of 2: the other 1 node is not measured by this run",
    }


def test_openmpi_environment_and_the_node_leader() -> None:
    env = {  # mpirun -np 8 --npernode 4 (2 nodes): OpenMPI's own variables only
        "OMPI_COMM_WORLD_RANK": "6",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    j = Job.from_environ(env)
    assert (j.launcher, j.rank, j.local_rank, j.world_size, j.local_world_size) == (
        "mpirun", 6, 2, 8, 4,
    )  # fmt: skip
    assert (j.node_rank, j.nodes, j.node, j.measures_node) == (1, 2, 1, False)
    assert j.tags()["green.job.launcher"] == "mpirun"
    leader = Job.from_environ(
        {**env, "OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    )
    assert (leader.node, leader.measures_node) == (1, True)
    assert Job().measures_node and Job().node == 0  # a single process measures its machine


def test_a_gathering_run_does_not_say_only_this_node_is_measured() -> None:
    j = Job.from_environ(TORCHRUN_NODE1)
    try:
        job.set_gathered(True)
        assert j.warning() == "" and "green.job.scope" not in j.tags()
    finally:
        job.set_gathered(False)
    assert "only this node is measured" in j.warning()


def test_srun_environment_and_tasks_per_node() -> None:
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
    }
    j = Job.from_environ(env)
    assert (j.launcher, j.rank, j.local_rank, j.world_size, j.local_world_size) == (
        "slurm", 3, 0, 5, 1,
    )  # fmt: skip
    assert (j.node_rank, j.nodes, j.slurm_job_id) == (2, 3, "77")
    assert Job.from_environ({**env, "SLURM_NODEID": "1"}).local_world_size == 2


def test_no_launcher_and_a_batch_script_are_not_distributed() -> None:
    assert Job.from_environ({}) == Job()
    assert Job.from_environ({}).tags() == {}
    batch = Job.from_environ({"SLURM_JOB_ID": "5", "SLURM_NNODES": "4"})  # sbatch, no srun
    assert not batch.multi_node and batch.world_size is None
    assert batch.tags() == {
        "green.launcher": "slurm",
        "green.job.launcher": "slurm",
        "green.job.slurm_id": "5",
    }


def test_malformed_values_are_unknown_not_errors() -> None:
    j = Job.from_environ({"RANK": "x", "WORLD_SIZE": "-2", "LOCAL_RANK": "0", "MASTER_PORT": "1"})
    assert (j.launcher, j.rank, j.world_size, j.local_rank) == ("env", None, None, 0)
    single = Job.from_environ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert (single.nodes, single.multi_node) == (1, False)


def test_multi_node_is_said_once_loudly_and_in_the_notes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key, value in TORCHRUN_NODE1.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.WARNING, logger="green_mlops")
    tags = job_tags({"green.notes": "cpu_estimate: TDP 100 W"})
    tags = job_tags({"green.notes": "cpu_estimate: TDP 100 W"})
    assert tags["green.nodes"] == "2"
    note = tags["green.notes"]
    assert note.startswith("cpu_estimate: TDP 100 W; job: node 1 of a 2-node torchrun job")
    assert "only this node is measured by this run" in note
    warnings = [r.getMessage() for r in caplog.records if "2-node torchrun job" in r.getMessage()]
    assert len(warnings) == 1
    assert job_tags({})["green.notes"].startswith("job: node 1 of a 2-node")


# --- process share: the other local ranks ---------------------------------------------------------


def test_local_ranks_that_cannot_be_found_are_named_in_the_basis(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # This process says it is local rank 0 of 2, but no local rank 1 runs near it.
    env = {k: v for k, v in TORCHRUN_NODE1.items() if k != "SLURM_JOB_ID"}
    env.update(RANK="0", LOCAL_RANK="0", GROUP_RANK="0", LOCAL_WORLD_SIZE="2", WORLD_SIZE="2")
    env.update(GROUP_WORLD_SIZE="1", TORCHELASTIC_RUN_ID=f"absent-{os.getpid()}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.WARNING, logger="green_mlops")
    group = local_group()
    assert (group.root_pid, group.ranks, group.missing) == (os.getpid(), (0,), (1,))
    cpu = build_meter(Settings.load(environ={}, share="process", cpu_tdp_w=100.0))
    assert "local rank 1 of this torchrun job (2 per node) is NOT counted" in cpu.basis
    ram = RamEstimateMeter(0.3725, share="process")
    assert "local rank 1 of this torchrun job (2 per node) is NOT counted" in ram.basis
    assert any("local rank 1" in r.getMessage() for r in caplog.records)


def test_a_single_process_counts_its_own_tree() -> None:
    group = local_group(Job())
    assert (group.root_pid, group.ranks, group.missing) == (os.getpid(), (), ())
    assert job.LocalGroup(os.getpid()).describe() == "this process tree"


RANK_SCRIPT = """
import json, os, sys, time
from pathlib import Path

import psutil

from green_mlops.session import Measurement

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])


def wait(name):
    deadline = time.monotonic() + 120
    while not (out / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"rank {rank}: no {name}")
        time.sleep(0.02)


m = Measurement(share="process", cpu_tdp_w=100.0, sample_interval_s=0.1).start()
(out / f"started{rank}").touch()
if rank == 1:  # the only rank that works, while rank 0 measures
    wait("started0")
    begin = time.process_time()
    while time.process_time() - begin < 0.6:
        pass
    (out / "burned1").write_text(str(time.process_time() - begin))
    wait("stopped0")
else:
    wait("burned1")
result = m.stop()
if rank == 0:
    (out / "stopped0").touch()
agent = psutil.Process(os.getppid()).cpu_times()
(out / f"rank{rank}.json").write_text(json.dumps({
    "metrics": result.metrics,
    "tags": result.tags,
    "cpu_s": time.process_time(),
    "agent_cpu_s": agent.user + agent.system,
}))
"""


def test_torchrun_rank_0_counts_rank_1_cpu_time_in_process_share(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GREEN_MLOPS_RAPL_ROOT": str(tmp_path / "no-rapl"),  # the CPU estimate, on any machine
        "GREEN_MLOPS_INTENSITY_PROVIDERS": "static",
        "GREEN_MLOPS_LOCATION": "DE",
    }
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    burned = float((tmp_path / "burned1").read_text())
    per_cpu_s = 100.0 / (os.cpu_count() or 1)  # joules per CPU second in process share
    counted = ranks[0]["metrics"]["green/energy/cpu_kwh"] * 3.6e6
    # Rank 0 idled: what it counts is rank 1's work, within all CPU the job's processes used.
    assert counted >= 0.9 * burned * per_cpu_s
    used = ranks[0]["cpu_s"] + ranks[1]["cpu_s"] + ranks[0]["agent_cpu_s"]
    assert counted <= 1.1 * used * per_cpu_s
    for rank, result in enumerate(ranks):
        tags = result["tags"]
        assert tags["green.launcher"] == "torchrun"
        assert (tags["green.world_size"], tags["green.nodes"]) == ("2", "1")
        assert (tags["green.job.rank"], tags["green.job.local_rank"]) == (str(rank), str(rank))
        assert "green.job.scope" not in tags  # one node: nothing left out
        assert "all 2 local ranks of this torchrun job" in tags["green.notes"]
        assert "NOT counted" not in tags["green.notes"]


NODE_SCRIPT = """
import json, os, sys
from pathlib import Path

from green_mlops.session import Measurement

m = Measurement(share="process", cpu_tdp_w=100.0).start()
first = m.result()
result = m.stop()
out = Path(sys.argv[1]) / f"node{os.environ['GROUP_RANK']}.json"
out.write_text(json.dumps({"live": first.tags, "final": result.tags}))
"""


def test_a_two_node_torchrun_job_says_once_that_only_this_node_is_measured(
    tmp_path: Path,
) -> None:
    from tests.mlflow_server import free_port

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(NODE_SCRIPT))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GREEN_MLOPS_RAPL_ROOT": str(tmp_path / "no-rapl"),
        "GREEN_MLOPS_INTENSITY_PROVIDERS": "static",
        "GREEN_MLOPS_LOCATION": "DE",
    }
    port = free_port()
    agents = [  # two "nodes" on this machine: two agents of one static rendezvous
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(script),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    errors = [agent.communicate(timeout=300)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors
    for node, stderr in enumerate(errors):
        tags = json.loads((tmp_path / f"node{node}.json").read_text())
        for result in (tags["live"], tags["final"]):
            assert (result["green.nodes"], result["green.world_size"]) == ("2", "2")
            assert result["green.job.node_rank"] == str(node)
            assert result["green.job.scope"] == (
                f"node {node} of 2: the other 1 node is not measured by this run"
            )
            assert f"job: node {node} of a 2-node torchrun job" in result["green.notes"]
        assert stderr.count(f"node {node} of a 2-node torchrun job: only this node") == 1
