"""The distributed job this process belongs to, from its launcher's environment variables.

torchrun, Slurm ``srun``, OpenMPI ``mpirun`` and ``RANK``/``WORLD_SIZE`` launchers, read without
importing torch: run tags, which process measures a node (:attr:`Job.measures_node`), the
multi-node warning, and the process tree of all local ranks (:func:`local_group`). Both
integrations (the MLflow plugin, the Lightning callback) take these from here. See
docs/multi-node.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from green_mlops.log import warn_once

if TYPE_CHECKING:
    import psutil

__all__ = ["Job", "LocalGroup", "job_tags", "local_group", "set_gathered", "warn_scope"]

#: Environment variables that identify one job: a peer process must agree on all of them.
_KEY_VARS = (
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "OMPI_COMM_WORLD_SIZE",
)
#: How far up from this process to look for the process that holds all local ranks: itself
#: (a launcher that forks the other ranks), its parent (torchrun's agent, slurmstepd) or the
#: parent's parent (a shell between them).
_MAX_LEVELS = 3
_TASKS_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _tasks_on_node(spec: str, node: int | None) -> int | None:
    """Tasks on node ``node`` from Slurm's ``2(x3),1`` form (2 tasks on 3 nodes, then 1)."""
    if node is None:
        return None
    first = 0
    for part in spec.split(","):
        match = _TASKS_RE.match(part.strip())
        if match is None:
            return None
        tasks, repeat = int(match.group(1)), int(match.group(2) or 1)
        if node < first + repeat:
            return tasks
        first += repeat
    return None


@dataclass(frozen=True)
class Job:
    """Ranks and sizes of the job, each ``None`` where the launcher does not say."""

    launcher: str = ""  # "torchrun", "slurm", "mpirun", "env", or "" (no launcher)
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    local_world_size: int | None = None
    node_rank: int | None = None
    nodes: int | None = None
    run_id: str = ""  # TORCHELASTIC_RUN_ID
    slurm_job_id: str = ""
    key: tuple[str, ...] = ()  # values of _KEY_VARS, to recognise the job's other processes

    @classmethod
    def current(cls) -> Job:
        return cls.from_environ(os.environ)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Job:
        slurm_id = env.get("SLURM_JOB_ID", "")
        key = tuple(env.get(name, "") for name in _KEY_VARS)
        if "TORCHELASTIC_RUN_ID" in env:
            launcher, run_id = "torchrun", env["TORCHELASTIC_RUN_ID"]
            rank, local_rank = _int(env, "RANK"), _int(env, "LOCAL_RANK")
            world, local_world = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
            node_rank, nodes = _int(env, "GROUP_RANK"), _int(env, "GROUP_WORLD_SIZE")
        elif "SLURM_STEP_NUM_TASKS" in env:
            launcher, run_id = "slurm", ""
            rank, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
            world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
            node_rank = _int(env, "SLURM_NODEID")
            nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
            spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
            local_world = _tasks_on_node(spec, node_rank)
        elif "OMPI_COMM_WORLD_SIZE" in env:  # OpenMPI's mpirun: no node index of its own
            launcher, run_id = "mpirun", ""
            rank, local_rank = (
                _int(env, "OMPI_COMM_WORLD_RANK"),
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            )
            world = _int(env, "OMPI_COMM_WORLD_SIZE")
            local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
            node_rank = _int(env, "GROUP_RANK", "NODE_RANK")
            if node_rank is None and rank is not None and local_world:
                node_rank = rank // local_world  # mpirun's default placement: by slot
            nodes = None
        elif any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            launcher, run_id = "env", ""
            rank, local_rank = _int(env, "RANK"), _int(env, "LOCAL_RANK")
            world, local_world = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
            node_rank = _int(env, "GROUP_RANK", "NODE_RANK")
            nodes = _int(env, "GROUP_WORLD_SIZE")
        elif slurm_id:  # a batch script: the job's one process, ranks come with srun
            return cls(launcher="slurm", slurm_job_id=slurm_id, key=key)
        else:
            return cls()
        world = world or None  # 0 is no size
        if nodes is None and world is not None and local_world:
            nodes = world // local_world if world % local_world == 0 else None
        if local_world is None and nodes == 1:
            local_world = world
        return cls(
            launcher, rank, local_rank, world, local_world, node_rank, nodes, run_id, slurm_id, key
        )

    @property
    def multi_node(self) -> bool:
        return (self.nodes or 0) > 1 or (self.node_rank or 0) > 0

    @property
    def node(self) -> int:
        """This process's node index (0 where the launcher does not say)."""
        if self.node_rank is not None:
            return self.node_rank
        if self.rank is not None and self.local_world_size:
            return self.rank // self.local_world_size
        return 0

    @property
    def measures_node(self) -> bool:
        """Whether this process measures its node's shared devices (CPU, RAM, and the GPUs
        no rank claims): local rank 0, or the only process where the launcher says nothing."""
        return not self.local_rank

    def scope(self) -> str:
        """What a multi-node run does not measure, in words ("" on one node, or when the
        nodes' totals are gathered into the run: see :func:`set_gathered`)."""
        if not self.multi_node or _gathered:
            return ""
        node = "?" if self.node_rank is None else str(self.node_rank)
        if self.nodes is None:
            return f"node {node} of a multi-node job: the other nodes are not measured by this run"
        others = self.nodes - 1
        return (
            f"node {node} of {self.nodes}: the other {others} node{'s' if others > 1 else ''} "
            f"{'are' if others > 1 else 'is'} not measured by this run"
        )

    def warning(self) -> str:
        """The loud message for a multi-node job ("" on one node or when gathered)."""
        if not self.multi_node or _gathered:
            return ""
        size = f"{self.nodes}-node" if self.nodes else "multi-node"
        node = "?" if self.node_rank is None else str(self.node_rank)
        return (
            f"node {node} of a {size} {self.launcher} job: only this node is measured by this "
            "run (its CPU, RAM and GPUs); the other nodes' energy is not included, as "
            "aggregation across nodes is not implemented: measure and add each node's run"
        )

    def tags(self) -> dict[str, str]:
        """``green.launcher``, ``green.world_size``, ``green.nodes`` and ``green.job.*``."""
        if not self.launcher:
            return {}
        values = {
            "green.launcher": self.launcher,
            "green.world_size": self.world_size,
            "green.nodes": self.nodes,
            "green.job.launcher": self.launcher,
            "green.job.world_size": self.world_size,
            "green.job.nodes": self.nodes,
            "green.job.rank": self.rank,
            "green.job.local_rank": self.local_rank,
            "green.job.local_world_size": self.local_world_size,
            "green.job.node_rank": self.node_rank,
            "green.job.run_id": self.run_id,
            "green.job.slurm_id": self.slurm_job_id,
            "green.job.scope": self.scope(),
        }
        return {k: str(v) for k, v in values.items() if v is not None and v != ""}


#: Whether this process's runs gather every node's totals (set by the integration that does).
_gathered = False


def set_gathered(gathered: bool) -> None:
    """This process gathers (or no longer gathers) the other nodes' totals into its runs: the
    "only this node is measured" warning, note and ``green.job.scope`` are then not given."""
    global _gathered
    _gathered = gathered


def warn_scope(job: Job | None = None) -> None:
    """Warn once per process that a multi-node run measures this node only."""
    message = (job or Job.current()).warning()
    if message:
        warn_once(message)


def job_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Job tags to add to a run's ``tags``; a multi-node job's note is appended to its
    ``green.notes`` (and warned about once)."""
    job = Job.current()
    out = job.tags()
    message = job.warning()
    if message:
        warn_once(message)
        notes = tags.get("green.notes", "")
        out["green.notes"] = f"{notes}; job: {message}" if notes else f"job: {message}"
    return out


# --- the local ranks' processes, for share=process --------------------------------------------


@dataclass(frozen=True)
class LocalGroup:
    """The process tree measured for ``share=process``: ``root_pid`` and its descendants.

    ``ranks`` are the local ranks found in it (this one included), ``expected`` the local
    world size where known; ``missing`` the local ranks that are not in it (not counted).
    """

    root_pid: int
    ranks: tuple[int, ...] = ()
    expected: int | None = None
    launcher: str = ""

    @property
    def missing(self) -> tuple[int, ...]:
        if self.expected is None or not self.ranks:
            return ()
        return tuple(r for r in range(self.expected) if r not in self.ranks)

    def describe(self) -> str:
        """Whose CPU time (or memory) is counted, in words, for an estimate's basis."""
        if not self.ranks:
            return "this process tree"
        job = f"this {self.launcher} job"
        tree = f"process tree of pid {self.root_pid}"
        if self.missing:
            names = ", ".join(str(r) for r in self.missing)
            plural = "s" if len(self.missing) > 1 else ""
            verb = "are" if len(self.missing) > 1 else "is"
            return (
                f"the {tree} (local rank{'s' if len(self.ranks) > 1 else ''} "
                f"{', '.join(str(r) for r in self.ranks)}); local rank{plural} {names} of {job} "
                f"({self.expected} per node) {verb} NOT counted: not found in the process tree "
                "of this rank or of its parents"
            )
        if self.expected is None:
            return (
                f"the {tree}, holding the {len(self.ranks)} local ranks of {job} found on this "
                "node (the local world size is unknown: ranks outside it are not counted)"
            )
        return (
            f"all {len(self.ranks)} local ranks of {job} (the {tree}, their launcher or "
            "parent, and its descendants; every rank that measures counts all of them)"
        )


def _peer_rank(proc: psutil.Process, key: tuple[str, ...]) -> int | None:
    """The local rank of ``proc`` if it belongs to the job ``key``."""
    import psutil

    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    if tuple(env.get(name, "") for name in _KEY_VARS) != key:
        return None
    return _int(env, "LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def local_group(job: Job | None = None) -> LocalGroup:
    """The smallest process tree around this process that holds all its job's local ranks.

    Looks at this process, its parent and its grandparent, and keeps the lowest one whose tree
    holds the most local ranks of the job (processes whose environment, as they were started,
    has the same job variables and a ``LOCAL_RANK`` or ``SLURM_LOCALID``). Local ranks that are
    not found are named in :meth:`LocalGroup.describe` and warned about once.
    """
    job = job or Job.current()
    me = os.getpid()
    expected = job.local_world_size
    if job.local_rank is None or expected == 1 or (expected is None and (job.world_size or 1) <= 1):
        return LocalGroup(me)
    import psutil

    best = LocalGroup(me, (job.local_rank,), expected, job.launcher)
    try:
        proc: psutil.Process | None = psutil.Process(me)
        for _ in range(_MAX_LEVELS):
            if proc is None or proc.pid <= 1:
                break
            ranks = {job.local_rank}
            for peer in [proc, *proc.children(recursive=True)]:
                if peer.pid != me:
                    rank = _peer_rank(peer, job.key)
                    if rank is not None:
                        ranks.add(rank)
            if len(ranks) > len(best.ranks):
                best = LocalGroup(proc.pid, tuple(sorted(ranks)), expected, job.launcher)
            if expected is not None and not best.missing:
                break
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    if best.missing:
        warn_once(f"share=process counts {best.describe()}")
    return best
