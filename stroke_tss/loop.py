"""The one training loop: every phase and Models Genesis pretraining run through `run_loop`.

What it guarantees to both: it resumes from the folder's latest checkpoint at the exact step (the saved state
holds the loop position, the caller's epoch-end state and, per rank, every RNG state, so on CPU a killed and
resumed run continues bit-identically; a checkpoint of another world size is refused, since its sampler
position and schedule length are counted in that world's steps); it polls the preemption flag at every step
boundary (`hpc.preempt.Poll`: the ranks agree one step later, without a stall) and saves before raising
`hpc.preempt.Preempted`; its DataLoader draws from its own seeded generator; it writes one log.jsonl
line per epoch (lines of epochs a resume redoes are dropped); and the learning-rate schedule is a function
of the global step alone. The loop never branches on the engine kind or on what is being trained: the
caller gives the loss of a batch and what happens at the end of an epoch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hpc import preempt
from hpc.checkpoint import Checkpoints, saved_world_size
from hpc.engine import Engine, build_engine
from hpc.sampler import ShardedSampler
from stroke_tss.config.training import EngineSection, OptimizerSection
from stroke_tss.errors import UserError
from stroke_tss.optim import build_optimizer

log = logging.getLogger(__name__)

Loss = Callable[[Engine, Any], tuple[torch.Tensor, int]]
"""(engine, batch) -> (loss to back-propagate, samples in the batch)."""


class EpochEnd(Protocol):
    """What a caller does after each epoch's steps; its state is saved with every checkpoint."""

    def __call__(self, epoch: int) -> tuple[dict, bool]:
        """Extra fields of the epoch's log record, and whether to stop after this epoch."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    batch_size: int
    num_workers: int
    max_epochs: int
    seed: int
    max_steps_per_epoch: int | None = None
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int | None = None
    keep_checkpoints: int = 2
    name: str | None = None
    """What the epoch lines and the progress bar call this training (default: the folder's name). Genesis of
    fold K trains in RUN/genesis/fold-K/: its folder name alone would read like a phase of the fold."""

    def label(self, out_dir: Path) -> str:
        return self.name or out_dir.name

    def steps_per_epoch(self, samples_per_rank: int) -> int:
        steps = math.ceil(samples_per_rank / self.batch_size)
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps


def make_engine(model: nn.Module, opt_cfg: OptimizerSection, engine_cfg: EngineSection) -> Engine:
    """The engine of the config (auto: DDP when started with several ranks) over the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, name=opt_cfg.name, lr=opt_cfg.lr, final_lr=opt_cfg.final_lr,
                                gamma=opt_cfg.gamma, weight_decay=opt_cfg.weight_decay, momentum=opt_cfg.momentum)
    kind = engine_cfg.kind
    if kind == "auto":
        kind = "ddp" if dist.is_initialized() and dist.get_world_size() > 1 else "local"
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    # Frozen groups leave parameters without gradients only when a phase freezes a whole branch; DDP must
    # then be told, or it waits for gradients that never come.
    unused = len(trainable) < sum(1 for _ in model.parameters())
    return build_engine(kind, model, optimizer, device=device, deepspeed_config=engine_cfg.deepspeed_config,
                        find_unused_parameters=unused)


def lr_schedule(opt_cfg: OptimizerSection, total_steps: int) -> Callable[[int], float] | None:
    """step -> learning-rate factor (None for a constant rate); a function of the step alone, so resumes agree."""
    if opt_cfg.schedule == "constant":
        return None
    low = opt_cfg.min_lr_factor

    def cosine(step: int) -> float:
        progress = min(step / max(total_steps - 1, 1), 1.0)
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine


def run_loop(eng: Engine, data: Dataset, sampler: ShardedSampler, *, out_dir: Path, settings: LoopSettings,
             loss: Loss, end_epoch: EpochEnd, opt_cfg: OptimizerSection) -> None:
    """Train until `end_epoch` says stop or `settings.max_epochs` is reached; resumable at any step."""
    ckpts = Checkpoints(out_dir / "ckpt", keep=settings.keep_checkpoints)
    loop = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "seen": 0}
    _check_world_size(ckpts, eng.world_size)
    saved = ckpts.load(eng)
    if saved is not None:
        loop = _loop_position(saved)
        end_epoch.load_state_dict(saved.get("stopper", {}))
        log.info("resumed %s at epoch %d, step %d", out_dir, loop["epoch"], loop["step_in_epoch"])
    if eng.is_main:
        _trim_log(out_dir / "log.jsonl", from_epoch=loop["epoch"])

    def save(tag: str) -> None:
        ckpts.save(eng, tag=tag, state={"loop": dict(loop), "stopper": end_epoch.state_dict()})

    lr_factor = lr_schedule(opt_cfg, settings.max_epochs * settings.steps_per_epoch(len(sampler)))
    # A bar redraws itself with carriage returns: on a terminal only, never into a Slurm .out file.
    show_bar = eng.is_main and log.isEnabledFor(logging.INFO) and sys.stderr.isatty()
    poll = preempt.Poll()
    stop = loop["epoch"] >= settings.max_epochs
    while not stop:
        epoch = loop["epoch"]
        sampler.set_epoch(epoch, start=loop["step_in_epoch"] * settings.batch_size)
        data.set_epoch(epoch)
        # The loader gets its own generator: creating an iterator would otherwise draw from the global
        # torch RNG, and a resumed run creates its iterator at a different point than an uninterrupted one.
        loader = DataLoader(data, batch_size=settings.batch_size, sampler=sampler, num_workers=settings.num_workers,
                            generator=torch.Generator().manual_seed(settings.seed * 1009 + epoch),
                            persistent_workers=False)
        eng.train()
        start = time.perf_counter()
        steps_cap = settings.max_steps_per_epoch or len(loader) + loop["step_in_epoch"]
        bar = tqdm(total=min(steps_cap, len(loader) + loop["step_in_epoch"]), initial=loop["step_in_epoch"],
                   desc=f"{settings.label(out_dir)} epoch {epoch}", disable=not show_bar, leave=False, dynamic_ncols=True)
        for batch in loader:
            if loop["step_in_epoch"] >= steps_cap:
                break
            value, count = loss(eng, batch)
            eng.backward(value)
            if lr_factor is not None:
                eng.scale_lr(lr_factor(loop["global_step"]))
            eng.step()
            loop["step_in_epoch"] += 1
            loop["global_step"] += 1
            loop["loss_sum"] += float(value.detach()) * count
            loop["seen"] += count
            bar.update(1)
            if settings.ckpt_every_steps and loop["global_step"] % settings.ckpt_every_steps == 0:
                save(f"step-{loop['global_step']:08d}")
            if poll():
                save(f"step-{loop['global_step']:08d}")
                bar.close()
                raise preempt.Preempted(f"preempted at epoch {epoch}, step {loop['step_in_epoch']}; "
                                        "checkpoint saved")
        bar.close()
        train_seconds = time.perf_counter() - start
        extra, stop = end_epoch(epoch)
        record = {"epoch": epoch, "steps": loop["global_step"], "train_loss": loop["loss_sum"] / max(1, loop["seen"]),
                  **extra, "train_seconds": round(train_seconds, 4), "seconds": round(time.perf_counter() - start, 3)}
        if eng.is_main:
            with open(out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        log.info("%s epoch %d: %s", settings.label(out_dir), epoch, {k: v for k, v in record.items() if k != "epoch"})
        stop = stop or epoch + 1 >= settings.max_epochs
        loop.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, seen=0)
        if stop or (epoch + 1) % settings.ckpt_every_epochs == 0:
            save(f"epoch-{epoch + 1:04d}")
    poll.close()
    eng.barrier()


def _check_world_size(ckpts: Checkpoints, world_size: int) -> None:
    """Refuse to resume a checkpoint saved by another number of ranks: each rank's place in the epoch and the
    length of the learning-rate schedule are counted in steps of the world that saved it."""
    tag = ckpts.latest()
    saved = saved_world_size(ckpts.folder, tag) if tag else None
    if saved is not None and saved != world_size:
        raise UserError(f"checkpoint {ckpts.folder / tag} was saved by {saved} rank(s) and this run has "
                        f"{world_size}: resume it with {saved} rank(s) (its sampler position and learning-rate "
                        "schedule are counted in their steps), or train into a new run.dir")


def _loop_position(saved: dict) -> dict:
    if "loop" in saved:
        return saved["loop"]
    # Genesis checkpoints written before it joined this loop saved only the next epoch, at epoch ends.
    return {"epoch": int(saved["epoch"]), "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "seen": 0}


def _trim_log(path: Path, *, from_epoch: int) -> None:
    """Drop log lines of epochs the loop is about to redo (a kill after the line, before the epoch's save)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_epoch(line) < from_epoch]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _logged_epoch(line: str) -> float:
    """Epoch of a log.jsonl line; a torn last line (killed mid-write) counts as never written."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
