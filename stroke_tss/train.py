"""One phase of training: validation on gathered predictions, early stopping, and the phase's outputs.

The loop itself is `stroke_tss.loop.run_loop` (step-level resume, preemption, seeded loaders); a phase adds
validation and early stopping at every epoch end, and at the end predicts val and test with the best or the
last weights. Outputs per phase: weights.pt, metrics.json, predictions.csv, log.jsonl, ckpt/.

What a phase optimises and scores follows its task's `target` (stroke_tss.tasks): a label is BCE on the
model's logit, and the sample's probability is the logit's sigmoid; a mask adds BCE + soft Dice between the
model's lesion map and the mask max-pooled onto the map's grid (a cell is lesion if any voxel in it is, so a
lesion smaller than a cell still counts), the sample's probability is its largest predicted lesion
probability, and validation logs the Dice of the thresholded map (val_dice).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hpc.checkpoint import load_file, save_file
from hpc.engine import Engine
from hpc.sampler import ShardedSampler
from stroke_tss.config.training import EngineSection, OptimizerSection, StoppingSection, TrainSection
from stroke_tss.data import StoreDataset
from stroke_tss.early_stop import EarlyStopping
from stroke_tss.errors import UserError
from stroke_tss.loop import LoopSettings, make_engine, run_loop
from stroke_tss.metrics import binary_metrics, phase_metrics
from stroke_tss.tasks import Task, get_task
from stroke_tss.weights import save_weights

log = logging.getLogger(__name__)


def phase_done(out_dir: Path) -> bool:
    return (out_dir / "weights.pt").is_file() and (out_dir / "metrics.json").is_file()


def lesion_target(mask: torch.Tensor, grid: torch.Size) -> torch.Tensor:
    """(B, S, Y, X) 0/1 mask -> (B, S, h, w) on a feature grid: 1 where any voxel of a cell is lesion."""
    return F.adaptive_max_pool2d(mask.float(), tuple(grid))


def _lesion_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B,), lesion logits (B, S, h, w)) of a model with a segmentation head (or its DDP wrapper)."""
    return model(x, with_lesion=True)


def check_task_model(model: nn.Module, task: str, monitor: str) -> None:
    """A segmentation task needs a model that draws a lesion map, and val_dice a segmentation task."""
    is_mask = get_task(task).target == "mask"
    if is_mask and not getattr(model, "init_args", {}).get("seg_head"):
        raise UserError(f"task {task} trains a lesion map, but model {getattr(model, 'model_name', model)!r} has "
                        "none; use slicewise2d with model.options.seg_head: true")
    if monitor == "val_dice" and not is_mask:
        raise UserError(f"stopping.monitor val_dice: task {task} draws no lesion map; use val_loss or val_auc")


def predict(engine: Engine, dataset: StoreDataset, *, batch_size: int, num_workers: int = 0,
            task: str = "lesion_present", dice: list | None = None) -> pd.DataFrame:
    """Probabilities for every sample of ``dataset``, gathered from all ranks and deduplicated; a mask task
    scores the largest lesion probability and, given a list ``dice``, appends the Dice of the thresholded
    lesion maps over all samples (None when neither maps nor masks mark a cell)."""
    mask_task = get_task(task).target == "mask"
    sampler = ShardedSampler(dataset.labels, rank=engine.rank, world_size=engine.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    model = engine.module
    was_training = model.training
    model.eval()
    index, prob, overlap = [], [], []
    with torch.no_grad():
        for batch in loader:
            x = engine.inputs(batch["x"])
            logits = _lesion_map(model, x)[1].float() if mask_task else model(x)
            if mask_task:
                overlap += _overlaps(logits.cpu(), batch["mask"])
                logits = logits.amax((1, 2, 3))
            index += batch["index"].tolist()
            prob += torch.sigmoid(logits.float()).cpu().tolist()
    model.train(was_training)
    per_index = {i: rest for part in engine.gather((index, prob, overlap or [()] * len(index)))
                 for i, *rest in zip(*part)}  # padding repeats drop out
    if dice is not None and mask_task:
        inter, total = np.sum([o for _, o in per_index.values()], axis=0)
        dice.append(float(2 * inter / total) if total else None)
    rows = [(s.subject_id, s.hemisphere, s.label, per_index[i][0]) for i, s in enumerate(dataset.samples)]
    return pd.DataFrame(rows, columns=["subject_id", "hemisphere", "label", "probability"])


def _overlaps(logits: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, float]]:
    """Per sample (|map & target|, |map| + |target|) of the lesion map thresholded at 0.5 probability."""
    hit = (logits > 0).double()
    target = lesion_target(mask, logits.shape[2:]).double()
    return list(zip((hit * target).sum((1, 2, 3)).tolist(), (hit.sum((1, 2, 3)) + target.sum((1, 2, 3))).tolist()))


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
                 best_path: Path, task: str = "lesion_present"):
        self.eng, self.val, self.monitor, self.train, self.best_path = eng, val, stop_cfg.monitor, train, best_path
        self.task = task
        self.stopper = EarlyStopping(patience=stop_cfg.patience, min_epochs=stop_cfg.min_epochs,
                                     max_epochs=stop_cfg.max_epochs, min_delta=stop_cfg.min_delta,
                                     mode="min" if stop_cfg.monitor == "val_loss" else "max")

    def __call__(self, epoch: int) -> tuple[dict, bool]:
        dice: list = []
        frame = predict(self.eng, self.val, batch_size=self.train.eval_batch_size, num_workers=self.train.num_workers,
                        task=self.task, dice=dice)
        summary = {**_val_summary(frame), **({"val_dice": dice[0]} if dice else {})}
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
    check_task_model(model, task, (stopping or train.stopping).monitor)
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
    validation = Validation(eng, datasets["val"], stop_cfg, train=train, best_path=out_dir / "ckpt" / "best-weights.pt",
                            task=task)
    run_loop(eng, train_ds, sampler, out_dir=out_dir, settings=settings, loss=task_loss(get_task(task)),
             end_epoch=validation, opt_cfg=opt_cfg)
    return _finish(eng, datasets, out_dir, task=task, train=train, restore_best=stop_cfg.restore_best)


_BCE = nn.BCEWithLogitsLoss()


def _bce_loss(eng: Engine, batch: dict) -> tuple[torch.Tensor, int]:
    y = batch["y"].to(eng.device)
    return _BCE(eng.model(eng.inputs(batch["x"])).float(), y), len(y)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch (nnU-Net's batch Dice): hemispheres without a lesion add their false
    positives to the denominator instead of scoring an undefined Dice of their own."""
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of lesion logits against a 0/1 target on the same grid: BCE alone rewards calling
    every cell healthy when lesions cover a few percent of them; the Dice term does not."""
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


def _mask_loss(eng: Engine, batch: dict) -> tuple[torch.Tensor, int]:
    """Segmentation of the lesion map plus BCE of the logit on lesion presence (a detection head for free)."""
    y = batch["y"].to(eng.device)
    logits, lesion = _lesion_map(eng.model, eng.inputs(batch["x"]))
    target = lesion_target(batch["mask"].to(eng.device), lesion.shape[2:])
    return segmentation_loss(lesion.float(), target) + _BCE(logits.float(), y), len(y)


def task_loss(spec: Task):
    """The loss of a batch for the task's target: see the module docstring."""
    return _mask_loss if spec.target == "mask" else _bce_loss


def _finish(eng: Engine, datasets: dict[str, StoreDataset], out_dir: Path, *, task: str, train: TrainSection,
            restore_best: bool) -> dict:
    best = out_dir / "ckpt" / "best-weights.pt"
    if restore_best and best.exists():
        eng.module.load_state_dict(load_file(best, map_location=eng.device,
                                             fix=f"delete {out_dir} to train this phase again"))
    frames = []
    for split in ("val", "test"):
        if split in datasets and len(datasets[split]):
            frame = predict(eng, datasets[split], batch_size=train.eval_batch_size, num_workers=train.num_workers,
                            task=task)
            frames.append(frame.assign(task=task, split=split))
    pred = pd.concat(frames, ignore_index=True)[["subject_id", "hemisphere", "task", "label", "probability", "split"]]
    metrics = phase_metrics(pred)
    if eng.is_main:
        pred.to_csv(out_dir / "predictions.csv", index=False)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        save_weights(out_dir / "weights.pt", eng.module, eng.state_dict(), task=task)  # last: marks the phase done
    eng.barrier()
    return metrics
