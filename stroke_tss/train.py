"""One phase of training: the loop, validation on gathered predictions, early stopping, checkpoints, outputs.

The loop never branches on the engine kind. It always resumes from the phase's latest checkpoint; a save
stores the loop position (epoch, step in epoch), the early-stopping state and every RNG state, so on CPU a
killed and resumed run continues bit-identically. Outputs per phase: weights.pt, metrics.json,
predictions.csv, log.jsonl, ckpt/.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from hpc import preempt
from hpc.engine import Engine, build_engine
from stroke_tss.checkpoint import rng_state, save_weights, set_rng_state
from stroke_tss.config.training import EngineSection, OptimizerSection, StoppingSection, TrainSection
from stroke_tss.data import ShardedSampler, StoreDataset
from stroke_tss.early_stop import EarlyStopping
from stroke_tss.metrics import phase_metrics
from stroke_tss.optim import build_optimizer

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the launcher requeues on this status


class Preempted(preempt.Preempted):
    """Raised after the loop saved on a preemption request; the verb exits with PREEMPTED_EXIT."""


def phase_done(out_dir: Path) -> bool:
    return (out_dir / "weights.pt").is_file() and (out_dir / "metrics.json").is_file()


def _engine(model: nn.Module, opt_cfg: OptimizerSection, engine_cfg: EngineSection) -> Engine:
    import torch.distributed as dist

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
    from stroke_tss.metrics import binary_metrics

    auc = binary_metrics(frame["label"], frame["probability"], threshold=0.5)["auc"] if len(frame) else None
    return {"val_loss": _bce(frame) if len(frame) else None, "val_auc": auc}


def train_phase(model: nn.Module, datasets: dict[str, StoreDataset], out_dir: str | Path, *, task: str,
                train: TrainSection, engine: EngineSection, optimizer: OptimizerSection | None = None,
                stopping: StoppingSection | None = None, seed: int = 0) -> dict:
    """Train ``model`` on datasets["train"], stop on datasets["val"], predict val and test; returns metrics."""
    out_dir = Path(out_dir)
    if phase_done(out_dir):
        log.info("phase %s already finished; skipping", out_dir)
        return json.loads((out_dir / "metrics.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    opt_cfg, stop_cfg = optimizer or train.optimizer, stopping or train.stopping
    eng = _engine(model, opt_cfg, engine)
    ckpt_dir = out_dir / "ckpt"
    ckpt_dir.mkdir(exist_ok=True)
    train_ds = datasets["train"]
    sampler = ShardedSampler(train_ds.oversample_classes(train.oversample_by), rank=eng.rank, world_size=eng.world_size,
                             oversample=train.oversample, seed=seed)
    stopper = EarlyStopping(patience=stop_cfg.patience, min_epochs=stop_cfg.min_epochs,
                            max_epochs=stop_cfg.max_epochs, min_delta=stop_cfg.min_delta,
                            mode="min" if stop_cfg.monitor == "val_loss" else "max")
    loop = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "seen": 0}
    resumed = eng.load(ckpt_dir)
    if resumed is not None:
        client, rank_state = resumed
        loop, _ = client["loop"], stopper.load_state_dict(client["stopper"])
        set_rng_state(rank_state["rng"])
        log.info("resumed %s at epoch %d, step %d", out_dir, loop["epoch"], loop["step_in_epoch"])
    if eng.is_main:
        _trim_log(out_dir / "log.jsonl", from_epoch=loop["epoch"])

    def save(tag: str) -> None:
        eng.save(ckpt_dir, tag=tag, client_state={"loop": dict(loop), "stopper": stopper.state_dict()},
                 rank_state={"rng": rng_state()}, keep=train.keep_checkpoints)

    bce = nn.BCEWithLogitsLoss()
    lr_factor = _lr_schedule(opt_cfg, stop_cfg.max_epochs * _steps_per_epoch(len(sampler), train))
    show_bar = eng.is_main and log.isEnabledFor(logging.INFO)
    stop = loop["epoch"] >= stop_cfg.max_epochs
    while not stop:
        epoch = loop["epoch"]
        sampler.set_epoch(epoch, start=loop["step_in_epoch"] * train.batch_size)
        train_ds.set_epoch(epoch)
        # The loader gets its own generator: creating an iterator would otherwise draw from the global
        # torch RNG, and a resumed run creates its iterator at a different point than an uninterrupted one.
        loader = DataLoader(train_ds, batch_size=train.batch_size, sampler=sampler, num_workers=train.num_workers,
                            generator=torch.Generator().manual_seed(seed * 1009 + epoch),
                            persistent_workers=False)
        eng.train()
        start = time.perf_counter()
        steps_cap = train.max_steps_per_epoch or len(loader) + loop["step_in_epoch"]
        bar = _progress(total=min(steps_cap, len(loader) + loop["step_in_epoch"]), initial=loop["step_in_epoch"],
                        desc=f"{out_dir.name} epoch {epoch}", enabled=show_bar)
        for batch in loader:
            if loop["step_in_epoch"] >= steps_cap:
                break
            y = batch["y"].to(eng.device)
            loss = bce(eng.model(eng.inputs(batch["x"])).float(), y)
            eng.backward(loss)
            if lr_factor is not None:
                eng.scale_lr(lr_factor(loop["global_step"]))
            eng.step()
            loop["step_in_epoch"] += 1
            loop["global_step"] += 1
            loop["loss_sum"] += float(loss.detach()) * len(y)
            loop["seen"] += len(y)
            bar.update(1)
            if train.ckpt_every_steps and loop["global_step"] % train.ckpt_every_steps == 0:
                save(f"step-{loop['global_step']:08d}")
            if preempt.requested():
                save(f"step-{loop['global_step']:08d}")
                bar.close()
                raise Preempted(f"preempted at epoch {epoch}, step {loop['step_in_epoch']}; checkpoint saved")
        bar.close()
        train_seconds = time.perf_counter() - start
        val = predict(eng, datasets["val"], batch_size=train.eval_batch_size, num_workers=train.num_workers)
        summary = _val_summary(val)
        improved = stopper.update(summary[stop_cfg.monitor], epoch)
        if improved and eng.is_main:
            torch.save(eng.state_dict(), ckpt_dir / "best-weights.pt")
        record = {"epoch": epoch, "steps": loop["global_step"], "train_loss": loop["loss_sum"] / max(1, loop["seen"]),
                  **summary, "best_epoch": stopper.best_epoch, "train_seconds": round(train_seconds, 4),
                  "seconds": round(time.perf_counter() - start, 3)}
        if eng.is_main:
            with open(out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        log.info("%s epoch %d: %s", out_dir.name, epoch, {k: v for k, v in record.items() if k != "epoch"})
        stop = stopper.should_stop(epoch)
        loop.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, seen=0)
        if stop or (epoch + 1) % train.ckpt_every_epochs == 0:
            save(f"epoch-{epoch + 1:04d}")
    eng.barrier()
    return _finish(eng, datasets, out_dir, task=task, train=train, restore_best=stop_cfg.restore_best)


def _steps_per_epoch(samples_per_rank: int, train: TrainSection) -> int:
    steps = math.ceil(samples_per_rank / train.batch_size)
    return min(steps, train.max_steps_per_epoch) if train.max_steps_per_epoch else steps


def _lr_schedule(opt_cfg: OptimizerSection, total_steps: int):
    """step -> learning-rate factor (None for a constant rate); a function of the step alone, so resumes agree."""
    if opt_cfg.schedule == "constant":
        return None
    low = opt_cfg.min_lr_factor

    def cosine(step: int) -> float:
        progress = min(step / max(total_steps - 1, 1), 1.0)
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine


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


def _finish(eng: Engine, datasets: dict[str, StoreDataset], out_dir: Path, *, task: str, train: TrainSection,
            restore_best: bool) -> dict:
    best = out_dir / "ckpt" / "best-weights.pt"
    if restore_best and best.exists():
        eng.module.load_state_dict(torch.load(best, map_location=eng.device, weights_only=True))
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


def _progress(*, total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
