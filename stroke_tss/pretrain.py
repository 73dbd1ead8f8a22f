"""Models Genesis pretraining of a unet3d on given subjects: restore transformed crops; OUT/weights.pt.

It runs through the same loop as the phases (stroke_tss.loop): step-level resume from OUT/ckpt, preemption
at any step, seeded loaders, one log.jsonl line per epoch. Which subjects a run pretrains on, and where, is
the run level's choice (stroke_tss.runs.pretrain).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from data_prep.store import Store
from hpc.engine import Engine
from hpc.sampler import ShardedSampler
from stroke_tss.config.training import EngineSection, GenesisSection, TrainSection
from stroke_tss.genesis import GenesisCrops
from stroke_tss.loop import LoopSettings, make_engine, run_loop
from stroke_tss.models import build_model
from stroke_tss.weights import save_weights

log = logging.getLogger(__name__)


class _FixedEpochs:
    """Genesis has no validation split: every epoch runs, nothing to carry between them."""

    def __call__(self, epoch: int) -> tuple[dict, bool]:
        return {}, False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_MSE = nn.MSELoss()


def _mse_loss(eng: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    return _MSE(eng.model(eng.inputs(x)).float(), y.to(eng.device)), len(x)


def pretrain_genesis(store: Store, subjects: Sequence[str], out: Path, *, genesis: GenesisSection,
                     channels: Sequence[str], train: TrainSection, engine: EngineSection, seed: int) -> Path:
    """Train the Genesis U-Net on crops of `subjects`; returns out/weights.pt (skips when it exists)."""
    out = Path(out)
    if (out / "weights.pt").is_file():
        log.info("%s exists; Models Genesis already done", out / "weights.pt")
        return out / "weights.pt"
    out.mkdir(parents=True, exist_ok=True)
    channels = list(genesis.channels or channels)
    dataset = GenesisCrops(store, subjects, crop=genesis.crop, seed=seed, channels=channels,
                           crops_per_subject=genesis.crops_per_subject)
    torch.manual_seed(seed)
    model = build_model("unet3d", in_channels=len(channels), base_channels=genesis.base_channels)
    eng = make_engine(model, genesis.optimizer, engine)
    sampler = ShardedSampler([0] * len(dataset), rank=eng.rank, world_size=eng.world_size, seed=seed)
    settings = LoopSettings(batch_size=genesis.batch_size, num_workers=train.num_workers, max_epochs=genesis.epochs,
                            seed=seed, ckpt_every_steps=train.ckpt_every_steps,
                            keep_checkpoints=train.keep_checkpoints)
    run_loop(eng, dataset, sampler, out_dir=out, settings=settings, loss=_mse_loss, end_epoch=_FixedEpochs(),
             opt_cfg=genesis.optimizer)
    if eng.is_main:
        save_weights(out / "weights.pt", eng.module, eng.state_dict(), subjects=len(subjects))
    eng.barrier()
    return out / "weights.pt"
