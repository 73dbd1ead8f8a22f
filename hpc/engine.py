"""Training engines behind one small interface: one process, DDP, or DeepSpeed.

The training loop only calls ``forward`` (via ``engine.model``), ``backward``, ``step``, ``barrier`` and
``gather``, and checkpoints through ``hpc.checkpoint.Checkpoints``, which leaves only the on-disk format of
model and optimizer to the engine (``save_states`` / ``load_states``); it never branches on the engine kind.
Nothing here knows about strokes: an engine wraps any ``nn.Module`` and optimizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpc.checkpoint import safe_load
from hpc.errors import CheckpointError

log = logging.getLogger(__name__)

ENGINE_KINDS = ("local", "ddp", "deepspeed")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _scale_groups(groups: list[dict], factor: float) -> None:
    for group in groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


class Engine:
    """Single-process engine; the base of the others."""

    kind = "local"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        self.optimizer = optimizer

    # -- topology ---------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return dist.get_rank() if _dist_on() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if _dist_on() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- training ---------------------------------------------------------------------------------------
    input_dtype: torch.dtype | None = None  # set where the engine runs the model in bf16/fp16

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch onto the engine's device, in the dtype its model computes in."""
        x = x.to(self.device, non_blocking=True)
        return x.to(self.input_dtype) if self.input_dtype is not None and x.is_floating_point() else x

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Optimizer step, then clear gradients."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def scale_lr(self, factor: float) -> None:
        """Set every parameter group's learning rate to `factor` times the rate it was built with."""
        _scale_groups(self.optimizer.param_groups, factor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Engine-neutral weights of the unwrapped model (full, on CPU)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # -- collectives ------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if _dist_on():
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not _dist_on():
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_max(self, value: float) -> float:
        if not _dist_on():
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    # -- checkpoint format (hpc.checkpoint.Checkpoints owns tags, markers, RNG states and pruning) --------
    def save_states(self, path: Path, state: dict) -> None:
        """Write model, optimizer and the caller's ``state`` into the tag folder ``path`` (every rank calls it)."""
        if self.is_main:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "client": state}, path / "state.pt")

    def load_states(self, path: Path) -> dict:
        """Restore model and optimizer from the tag folder ``path``; returns the ``state`` saved with them."""
        state = safe_load(path / "state.pt", map_location=self.device, fix=_TAG_FIX.format(path=path))
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client"]


LocalEngine = Engine

_TAG_FIX = "delete {path} to resume from the checkpoint before it"


class DDPEngine(Engine):
    """torch DistributedDataParallel; needs an initialised process group."""

    kind = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device | None = None,
                 find_unused_parameters: bool = False):
        if not _dist_on():
            raise ValueError("the ddp engine needs torch.distributed initialised (run under torchrun or srun)")
        super().__init__(model, optimizer, device=device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            # Batch statistics over all ranks' samples (a few volumes per GPU); same parameter tensors, so the
            # optimizer built on them stays valid. Gloo has no SyncBatchNorm: CPU ranks keep their BatchNorm.
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.model = nn.parallel.DistributedDataParallel(
            self.module, device_ids=ids, find_unused_parameters=find_unused_parameters)


class DeepSpeedEngine(Engine):
    """DeepSpeed (ZeRO 0-2) with a client optimizer; checkpoints in DeepSpeed's own sharded format."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, config: dict | str | Path,
                 device: torch.device | None = None):
        import deepspeed  # heavy import: only when this engine is chosen

        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
        config = dict(config)
        # The loop feeds exactly one micro-batch per step; the global batch is the loader's business.
        config.setdefault("train_micro_batch_size_per_gpu", 1)
        config.setdefault("gradient_accumulation_steps", 1)
        config.pop("train_batch_size", None)
        if config.get("checkpoint", {}).get("load_universal"):
            # DeepSpeed reads universal checkpoints with its own torch.load(weights_only=False), past the
            # safe loader below: a crafted file would run its code.
            raise CheckpointError("DeepSpeed config: checkpoint.load_universal is not supported (it unpickles "
                             "checkpoint files unchecked); remove it and resume from this run's checkpoints")
        if device is None or device.type != "cuda":
            # bf16/fp16 and CUDA-only optimizers make no sense on the CPU accelerator.
            config.pop("bf16", None)
            config.pop("fp16", None)
        # DeepSpeed casts the parameters, not the inputs: the loop's batches must come in the same dtype.
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if config.get(key, {}).get("enabled", False):
                self.input_dtype = dtype
        self.device = device or torch.device("cpu")
        self.module = model.to(self.device)
        self.optimizer = optimizer
        self.model, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=config, dist_init_required=not _dist_on())
        self.module = self.model.module
        self.model.checkpoint_engine = _SafeLoads(self.model.checkpoint_engine)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        self.model.step()  # steps the optimizer at accumulation boundaries and clears gradients

    def scale_lr(self, factor: float) -> None:
        super().scale_lr(factor)
        _scale_groups(self.ds_optimizer.param_groups, factor)  # ZeRO's wrapper may hold its own group dicts

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def save_states(self, path: Path, state: dict) -> None:
        self.model.save_checkpoint(str(path.parent), tag=path.name, client_state={"client": state},
                                   save_latest=False)

    def load_states(self, path: Path) -> dict:
        _, client = self.model.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")
        return client["client"]


def _deepspeed_pickled_types() -> list[type]:
    """The classes DeepSpeed pickles into ZeRO 0-2 checkpoints besides tensors and plain containers: the
    loss scaler, the ZeRO stage and the parameter slice addresses of the optimizer states
    (stage_1_and_2.state_dict, bf16_optimizer.state_dict). All are plain data: rebuilding them runs no code
    beyond setting attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _SafeLoads:
    """DeepSpeed's checkpoint engine with every read through `hpc.checkpoint.safe_load`.

    DeepSpeed reads model states, optimizer states and ZeRO shards through its checkpoint engine, whose torch
    engine calls ``torch.load(weights_only=False)``: a crafted file would run whatever it pickles. Writes and
    everything else go to the engine DeepSpeed built."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._allow = _deepspeed_pickled_types()

    def load(self, path: str, map_location: Any = None) -> Any:
        tag = Path(path).parent
        return safe_load(path, map_location=map_location, allow=self._allow, fix=_TAG_FIX.format(path=tag))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def build_engine(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device | None = None, deepspeed_config: dict | str | Path | None = None,
                 find_unused_parameters: bool = False) -> Engine:
    """Engine by name: ``local``, ``ddp`` or ``deepspeed`` (which needs ``deepspeed_config``)."""
    if kind == "local":
        return Engine(model, optimizer, device=device)
    if kind == "ddp":
        return DDPEngine(model, optimizer, device=device, find_unused_parameters=find_unused_parameters)
    if kind == "deepspeed":
        if deepspeed_config is None:
            raise ValueError("engine 'deepspeed' needs a DeepSpeed JSON config (engine.deepspeed_config)")
        return DeepSpeedEngine(model, optimizer, config=deepspeed_config, device=device)
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
