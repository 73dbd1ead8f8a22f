"""Models Genesis as a run-level stage: a unet3d restores transformed crops; RUN/genesis/weights.pt.

Once per run, not per fold: ``genesis.subjects: train`` uses fold 0's training subjects (never a test
subject of that fold), ``all`` every subject of the store. Resumes from RUN/genesis/ckpt like any phase.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from stroke_tss.checkpoint import rng_state, save_weights, set_rng_state
from stroke_tss.config import Config

log = logging.getLogger(__name__)


def pretrain_genesis(cfg: Config) -> Path:
    """Train the Genesis U-Net; returns RUN/genesis/weights.pt (skips when it exists)."""
    from data_prep.store import open_store
    from stroke_tss.data import ShardedSampler
    from stroke_tss.genesis import GenesisCrops
    from stroke_tss.models import build_model
    from stroke_tss.schedule import ensure_splits
    from stroke_tss.train import _engine

    out = Path(cfg.run.dir) / "genesis"
    if (out / "weights.pt").is_file():
        log.info("%s exists; Models Genesis already done for this run", out / "weights.pt")
        return out / "weights.pt"
    out.mkdir(parents=True, exist_ok=True)
    g = cfg.genesis
    subjects = (ensure_splits(cfg)["folds"][0]["train"] if g.subjects == "train"
                else list(open_store(cfg.data.store).subject_ids))
    channels = g.channels or list(cfg.data.channels)
    dataset = GenesisCrops(cfg.data.store, subjects, crop=g.crop, seed=cfg.seed, channels=channels,
                           crops_per_subject=g.crops_per_subject)
    torch.manual_seed(cfg.seed)
    model = build_model("unet3d", in_channels=len(channels), base_channels=g.base_channels)
    engine = _engine(model, g.optimizer, cfg.engine)
    sampler = ShardedSampler([0] * len(dataset), rank=engine.rank, world_size=engine.world_size, seed=cfg.seed)
    start = 0
    resumed = engine.load(out / "ckpt")
    if resumed is not None:
        start = resumed[0]["epoch"]
        set_rng_state(resumed[1]["rng"])
    mse = nn.MSELoss()
    for epoch in range(start, g.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=g.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        engine.train()
        total, n = 0.0, 0
        for x, y in loader:
            loss = mse(engine.model(engine.inputs(x)).float(), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            total, n = total + float(loss.detach()) * len(x), n + len(x)
        if engine.is_main:
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": epoch, "train_mse": total / max(1, n)}) + "\n")
        log.info("genesis epoch %d: mse %.5f", epoch, total / max(1, n))
        engine.save(out / "ckpt", tag=f"epoch-{epoch + 1:04d}", client_state={"epoch": epoch + 1},
                    rank_state={"rng": rng_state()}, keep=cfg.train.keep_checkpoints)
    if engine.is_main:
        save_weights(out / "weights.pt", engine.module, engine.state_dict(), subjects=len(subjects))
    engine.barrier()
    return out / "weights.pt"
