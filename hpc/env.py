"""Who am I in this job? The process environment of torchrun, Slurm or a lone process, as one `DistEnv`.

Pure functions over a mapping (os.environ by default) so they can be tested on recorded environments.
Precedence: torchrun's RANK/LOCAL_RANK/WORLD_SIZE win over SLURM_PROCID, because `srun ... torchrun` starts
one Slurm task per node and torchrun forks the ranks below it; the Slurm variables then describe nodes.
A world that cannot exist is refused: the batch step of an allocation of several tasks (SLURM_NTASKS > 1, no
SLURM_STEP_ID) is one process, whatever SLURM_NTASKS says, and its peers would never come.
`init_distributed` exports the torchrun variables it derived, as DeepSpeed and other libraries read them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

DEFAULT_PORT_BASE = 20000
PORT_SPAN = 20000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_joined = False  # whether this process ever joined a process group (see `finish_process`)


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """One process's place in a (possibly single-process) distributed job."""

    rank: int = 0
    """Global rank."""
    local_rank: int = 0
    """Rank on this node (the GPU index under one task per GPU)."""
    world_size: int = 1
    """Number of ranks in the job."""
    node_rank: int = 0
    """Index of this node among the job's nodes."""
    num_nodes: int = 1
    """Number of nodes in the job."""
    master_addr: str = "127.0.0.1"
    """Host of rank 0 (the rendezvous store)."""
    master_port: int = 29500
    """TCP port of the rendezvous store."""
    launcher: str = "single"
    """How the ranks were started: single, torchrun, slurm or srun+torchrun."""
    job_id: str | None = None
    """Slurm job id (array jobs: ARRAYJOBID_TASKID) when under Slurm."""
    nodes: tuple[str, ...] = field(default_factory=tuple)
    """Host names of the job's nodes, expanded from SLURM_JOB_NODELIST."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Parse the launcher's variables; raises ValueError naming the inconsistent ones."""
        env = os.environ if environ is None else environ
        in_slurm = "SLURM_JOB_ID" in env and "SLURM_PROCID" in env
        torchrun = "RANK" in env and "WORLD_SIZE" in env
        # Under torchrun the Slurm variables describe nodes (or the batch step that started torchrun).
        slurm = _slurm_fields(env, ranks=not torchrun) if in_slurm else None
        if torchrun:
            rank = _int(env, "RANK")
            world = _int(env, "WORLD_SIZE")
            local = _int(env, "LOCAL_RANK", default=0)
            _check_rank(rank, world, "RANK", "WORLD_SIZE")
            launcher = "srun+torchrun" if slurm else "torchrun"
            node_rank = _int(env, "GROUP_RANK", default=slurm["node_rank"] if slurm else 0)
            num_nodes = slurm["num_nodes"] if slurm else max(1, world // max(1, _int(env, "LOCAL_WORLD_SIZE", default=world)))
            return cls(
                rank=rank,
                local_rank=local,
                world_size=world,
                node_rank=node_rank,
                num_nodes=num_nodes,
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(env, "MASTER_PORT", default=29500),
                launcher=launcher,
                job_id=slurm["job_id"] if slurm else None,
                nodes=slurm["nodes"] if slurm else (),
            )
        if slurm:
            return cls(launcher="slurm", **slurm)
        return cls()


def _slurm_fields(env: Mapping[str, str], *, ranks: bool) -> dict:
    rank = _int(env, "SLURM_PROCID")
    # A step's own task count (srun --ntasks=1 inside a 16-task allocation is one rank).
    world_key = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    world = _int(env, world_key, default=1)
    _check_rank(rank, world, "SLURM_PROCID", world_key)
    if ranks and world > 1 and not env.get("SLURM_STEP_ID"):
        raise ValueError(
            f"this process is the batch step of Slurm job {env['SLURM_JOB_ID']} (SLURM_NTASKS={world}, no "
            "SLURM_STEP_ID): it is one process, and the other ranks would never join; start the ranks with "
            "srun (see slurm/*.sbatch), or run one process with `srun --ntasks=1 ...`")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    nodes = tuple(expand_nodelist(nodelist))
    num_nodes = _int(env, "SLURM_JOB_NUM_NODES", default=_int(env, "SLURM_NNODES", default=len(nodes)))
    if num_nodes != len(nodes):
        raise ValueError(
            f"SLURM_JOB_NUM_NODES={num_nodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(nodes)} hosts"
        )
    node_rank = _int(env, "SLURM_NODEID", default=0)
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside 0..{num_nodes - 1} (SLURM_JOB_NUM_NODES)")
    job_id = env["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return dict(
        rank=rank,
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        world_size=world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR", nodes[0]),
        master_port=_int(env, "MASTER_PORT", default=port_for_job(env["SLURM_JOB_ID"])),
        job_id=job_id,
        nodes=nodes,
    )


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from the job id, so two jobs sharing a node do not collide."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} holds no digits to derive MASTER_PORT from; set MASTER_PORT")
    return DEFAULT_PORT_BASE + int(digits) % PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'dgx[01-04,07],gpu-a7' -> dgx01..dgx04, dgx07, gpu-a7."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        if not part:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} has an empty host entry")
        hosts.extend(_expand_one(part, nodelist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM_JOB_NODELIST={text!r} has an unmatched ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"SLURM_JOB_NODELIST={text!r} has an unmatched '['")
    parts.append(text[start:])
    return parts


def _expand_one(part: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", part)
    if match is None:
        return [part]
    head, tail = part[: match.start()], part[match.end() :]
    names = []
    for item in match.group(1).split(","):
        r = _RANGE.match(item.strip())
        if r is None:
            raise ValueError(f"SLURM_JOB_NODELIST={whole!r}: cannot read the range {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"SLURM_JOB_NODELIST={whole!r}: range {item!r} runs backwards")
        width = len(lo)
        names += [f"{head}{n:0{width}d}" for n in range(int(lo), int(hi) + 1)]
    # a host may carry a second bracket group (rack[1-2]-node[1-3]); expand recursively
    return [h for name in names for h in _expand_one(name + tail, whole)]


def _int(env: Mapping[str, str], key: str, *, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"{key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None


def _check_rank(rank: int, world: int, rank_key: str, world_key: str) -> None:
    if world < 1:
        raise ValueError(f"{world_key}={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"{rank_key}={rank} is outside 0..{world - 1} ({world_key}={world})")


def init_distributed(env: DistEnv | None = None, *, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group the environment describes: NCCL with CUDA, gloo otherwise.

    Does nothing for a single process or when a group already exists. The timeout bounds how long a
    rank waits for a dead peer before raising, instead of hanging the job.
    """
    import torch
    import torch.distributed as dist

    env = env or DistEnv.from_environ()
    if env.launcher == "slurm":  # torchrun set them already; a lone process needs none (and its children inherit)
        export_environ(env)
    if not env.distributed or dist.is_initialized():
        return env
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=dt.timedelta(seconds=timeout_s),
    )
    global _joined
    _joined = True
    return env


def export_environ(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from `env`.

    Under srun only the Slurm variables exist, and DeepSpeed asserts LOCAL_RANK (and reads the others), as
    do torch's env:// rendezvous and user code; submitit's TorchDistributedEnvironment sets the same.
    """
    environ = os.environ if environ is None else environ
    local_world = env.world_size // env.num_nodes if env.world_size % env.num_nodes == 0 else env.world_size
    environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                   LOCAL_WORLD_SIZE=environ.get("LOCAL_WORLD_SIZE") or str(local_world),
                   MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_process(code: int) -> int:
    """End a process that joined a process group with `code`, skipping the interpreter's teardown.

    A gloo rank whose work is done can still abort while the interpreter is torn down ("terminate called
    without an active exception": a communication thread destroyed while joinable), turning a finished job
    into exit -6; seen rarely with DeepSpeed ranks under torchrun even after a barrier and
    `destroy_process_group`. So after leaving the group and flushing logs and stdio, such a process exits
    at once with its own code. A process that never joined a group just gets `code` back.
    """
    if not _joined:
        return code
    destroy_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
