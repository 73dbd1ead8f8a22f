"""One phase of training: validation on gathered predictions, early stopping, and the phase's outputs.

The loop itself is `stroke_tss.loop.run_loop` (step-level resume, preemption, seeded loaders); a phase adds
validation and early stopping at every epoch end, and at the end predicts val and test with the best or the
last weights. Outputs per phase: weights.pt, metrics.json, predictions.csv, log.jsonl, ckpt/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from hpc.checkpoint import load_file, save_file
from hpc.engine import Engine
from hpc.sampler import ShardedSampler
from stroke_tss.config.training import EngineSection, OptimizerSection, StoppingSection, TrainSection
from stroke_tss.data import StoreDataset
from stroke_tss.early_stop import EarlyStopping
from stroke_tss.loop import LoopSettings, make_engine, run_loop
from stroke_tss.metrics import binary_metrics, phase_metrics
from stroke_tss.weights import save_weights

log = logging.getLogger(__name__)


def phase_done(out_dir: Path) -> bool:
    return (out_dir / "weights.pt").is_file() and (out_dir / "metrics.json").is_file()


def predict(engine: Engine, dataset: StoreDataset, *, batch_size: int, num_workers: int = 0) -> pd.DataFrame:
    """Probabilities for every sample of ``dataset``, gathered from all ranks and deduplicated."""
    sampler = ShardedSampler(dataset.labels, rank=engine.rank, world_size=engine.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    model = engine.module
    was_training = model.training
    model.eval()
    index, prob = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(engine.inputs(batch["x"]))
            index += batch["index"].tolist()
            prob += torch.sigmoid(logits.float()).cpu().tolist()
    model.train(was_training)
    pairs = {i: p for part in engine.gather((index, prob)) for i, p in zip(*part)}  # padding repeats drop out
    rows = [(s.subject_id, s.hemisphere, s.label, pairs[i]) for i, s in enumerate(dataset.samples)]
    return pd.DataFrame(rows, columns=["subject_id", "hemisphere", "label", "probability"])


def _bce(frame: pd.DataFrame) -> float:
    p = np.clip(frame["probability"].to_numpy(), 1e-7, 1 - 1e-7)
    y = frame["label"].to_numpy()
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _val_summary(frame: pd.DataFrame) -> dict:
    auc = binary_metrics(frame["label"], frame["probability"], threshold=0.5)["auc"] if len(frame) else None
    return {"val_loss": _bce(frame) if len(frame) else None, "val_auc": auc}


class Validation:
    """A phase's epoch end: predict the validation split, track the best epoch, keep its weights, stop early."""

    def __init__(self, eng: Engine, val: StoreDataset, stop_cfg: StoppingSection, *, train: TrainSection,
                 best_path: Path):
        self.eng, self.val, self.monitor, self.train, self.best_path = eng, val, stop_cfg.monitor, train, best_path
        self.stopper = EarlyStopping(patience=stop_cfg.patience, min_epochs=stop_cfg.min_epochs,
                                     max_epochs=stop_cfg.max_epochs, min_delta=stop_cfg.min_delta,
                                     mode="min" if stop_cfg.monitor == "val_loss" else "max")

    def __call__(self, epoch: int) -> tuple[dict, bool]:
        frame = predict(self.eng, self.val, batch_size=self.train.eval_batch_size, num_workers=self.train.num_workers)
        summary = _val_summary(frame)
        if self.stopper.update(summary[self.monitor], epoch) and self.eng.is_main:
            save_file(self.eng.state_dict(), self.best_path)
        return {**summary, "best_epoch": self.stopper.best_epoch}, self.stopper.should_stop(epoch)

    def state_dict(self) -> dict:
        return self.stopper.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stopper.load_state_dict(state)


def train_phase(model: nn.Module, datasets: dict[str, StoreDataset], out_dir: str | Path, *, task: str,
                train: TrainSection, engine: EngineSection, optimizer: OptimizerSection | None = None,
                stopping: StoppingSection | None = None, seed: int = 0) -> dict:
    """Train ``model`` on datasets["train"], stop on datasets["val"], predict val and test; returns metrics."""
    out_dir = Path(out_dir)
    if phase_done(out_dir):
        log.info("phase %s already finished; skipping", out_dir)
        return json.loads((out_dir / "metrics.json").read_text())
    (out_dir / "ckpt").mkdir(parents=True, exist_ok=True)
    opt_cfg, stop_cfg = optimizer or train.optimizer, stopping or train.stopping
    eng = make_engine(model, opt_cfg, engine)
    train_ds = datasets["train"]
    sampler = ShardedSampler(train_ds.oversample_classes(train.oversample_by), rank=eng.rank,
                             world_size=eng.world_size, oversample=train.oversample, seed=seed)
    settings = LoopSettings(batch_size=train.batch_size, num_workers=train.num_workers,
                            max_epochs=stop_cfg.max_epochs, seed=seed, max_steps_per_epoch=train.max_steps_per_epoch,
                            ckpt_every_epochs=train.ckpt_every_epochs, ckpt_every_steps=train.ckpt_every_steps,
                            keep_checkpoints=train.keep_checkpoints)
    validation = Validation(eng, datasets["val"], stop_cfg, train=train, best_path=out_dir / "ckpt" / "best-weights.pt")
    run_loop(eng, train_ds, sampler, out_dir=out_dir, settings=settings, loss=_bce_loss, end_epoch=validation,
             opt_cfg=opt_cfg)
    return _finish(eng, datasets, out_dir, task=task, train=train, restore_best=stop_cfg.restore_best)


_BCE = nn.BCEWithLogitsLoss()


def _bce_loss(eng: Engine, batch: dict) -> tuple[torch.Tensor, int]:
    y = batch["y"].to(eng.device)
    return _BCE(eng.model(eng.inputs(batch["x"])).float(), y), len(y)


def _finish(eng: Engine, datasets: dict[str, StoreDataset], out_dir: Path, *, task: str, train: TrainSection,
            restore_best: bool) -> dict:
    best = out_dir / "ckpt" / "best-weights.pt"
    if restore_best and best.exists():
        eng.module.load_state_dict(load_file(best, map_location=eng.device,
                                             fix=f"delete {out_dir} to train this phase again"))
    frames = []
    for split in ("val", "test"):
        if split in datasets and len(datasets[split]):
            frame = predict(eng, datasets[split], batch_size=train.eval_batch_size, num_workers=train.num_workers)
            frames.append(frame.assign(task=task, split=split))
    pred = pd.concat(frames, ignore_index=True)[["subject_id", "hemisphere", "task", "label", "probability", "split"]]
    metrics = phase_metrics(pred)
    if eng.is_main:
        pred.to_csv(out_dir / "predictions.csv", index=False)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        save_weights(out_dir / "weights.pt", eng.module, eng.state_dict(), task=task)  # last: marks the phase done
    eng.barrier()
    return metrics
