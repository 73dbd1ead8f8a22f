"""Models Genesis pretraining of a unet3d on given subjects: restore transformed crops; OUT/weights.pt.

It runs through the same loop as the phases (stroke_tss.loop): step-level resume from OUT/ckpt, preemption
at any step, seeded loaders, one log.jsonl line per epoch. Which subjects a run pretrains on is the run
level's choice (stroke_tss.runs.pretrain); where the weights of a fold live (`genesis_dir`) is said here,
because the phases that start from them (stroke_tss.schedule) read them.
"""

from __future__ import annotations

import json
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


def genesis_dir(run_dir: str | Path, *, subjects: str, fold: int | None) -> Path:
    """RUN/genesis/fold-<k>/ when every fold pretrains on its own subjects (`genesis.subjects: fold`), else
    RUN/genesis/ (one pretraining shared by the folds)."""
    if subjects != "fold":
        return Path(run_dir) / "genesis"
    assert fold is not None, "per-fold Genesis needs the fold"
    return Path(run_dir) / "genesis" / f"fold-{fold}"


def write_subjects_record(path: Path, record: dict) -> None:
    """OUT/subjects.json: which subjects the pretraining saw and how many test subjects among them."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


_MSE = nn.MSELoss()


def _mse_loss(eng: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    return _MSE(eng.model(eng.inputs(x)).float(), y.to(eng.device)), len(x)


def pretrain_genesis(store: Store, subjects: Sequence[str], out: Path, *, genesis: GenesisSection,
                     channels: Sequence[str], train: TrainSection, engine: EngineSection, seed: int,
                     record: dict | None = None, name: str = "genesis") -> Path:
    """Train the Genesis U-Net on crops of `subjects`; returns out/weights.pt (skips when it exists).

    `record` (the run level's account of the subjects) goes to out/subjects.json just before weights.pt, so a
    finished pretraining always says what it saw. `name` is how its epoch lines name it.
    """
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
                            keep_checkpoints=train.keep_checkpoints, name=name)
    run_loop(eng, dataset, sampler, out_dir=out, settings=settings, loss=_mse_loss, end_epoch=_FixedEpochs(),
             opt_cfg=genesis.optimizer)
    if eng.is_main:
        if record is not None:
            write_subjects_record(out / "subjects.json", record)
        save_weights(out / "weights.pt", eng.module, eng.state_dict(), subjects=len(subjects))
    eng.barrier()
    return out / "weights.pt"
