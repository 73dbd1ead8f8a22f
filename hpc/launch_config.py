"""`LaunchConfig`: where and how work items run (config section `launch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class LaunchConfig(BaseModel):
    """Executor and resources of one work item; Slurm-only fields are ignored by `local` and `debug`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    executor: Literal["slurm", "local", "debug"] = "local"
    """slurm: one job array; local: one process per item on this machine; debug: in this process, in turn."""
    partition: str | None = None
    """Slurm partition (None: the cluster's default)."""
    account: str | None = None
    """Slurm account to charge (None: the user's default)."""
    time_min: int = Field(60, ge=1)
    """Time limit of one item, in minutes."""
    cpus_per_task: int = Field(1, ge=1)
    """CPUs per task; also OMP_NUM_THREADS of the item unless the caller set it."""
    gpus_per_node: int = Field(0, ge=0)
    """GPUs per node."""
    tasks_per_node: int = Field(1, ge=1)
    """Tasks (ranks) per node; > 1 makes each item a torch.distributed job."""
    nodes: int = Field(1, ge=1)
    """Nodes per item (Slurm only)."""
    array_parallelism: int = Field(16, ge=1)
    """How many items run at once."""
    mem_gb: float | None = Field(None, gt=0)
    """Memory per node in GB (None: the partition's default)."""
    signal: Literal["USR1", "USR2"] = "USR2"
    """Preemption/timeout signal. USR2 by default because NCCL may take USR1."""
    signal_delay_s: int = Field(120, ge=0)
    """Seconds before the time limit at which Slurm sends `signal` (time to save and requeue)."""
    max_num_timeout: int = Field(3, ge=0)
    """How many times an item that hit its time limit is requeued before it counts as failed."""
    folder: Path | None = None
    """Folder of submitit's pickles and logs (None: <output folder>/submitit)."""
    slurm_extra: dict[str, str | int | bool] = Field(default_factory=dict)
    """Further sbatch options without the dashes, e.g. {qos: high, constraint: a100}."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before each item (module load ..., source venv/bin/activate)."""

    @field_validator("tasks_per_node", "nodes")
    @classmethod
    def _one_process_off_slurm(cls, value: int, info: ValidationInfo) -> int:
        # submitit's local executor starts tasks_per_node copies that never form a process group (each is a
        # world of one) and all write the item's folder; nodes mean nothing on this machine.
        executor = info.data.get("executor", "local")
        if value > 1 and executor != "slurm":
            raise ValueError(f"launch.executor={executor} runs each item as one process, so {info.field_name}="
                             f"{value} would start unconnected copies writing one folder; set "
                             f"launch.{info.field_name}=1, or use launch.executor=slurm")
        return value
