"""Adaptive freezing depth (Jung & Whangbo): fine-tune briefly at every depth, train fully at the argmin.

Depth theta freezes the first theta backbone groups of the model (theta = 0: none, 1: stem, 2: stem + block1,
...). Every depth starts from the same transferred weights and is fine-tuned for `adapt.epochs` epochs; its
score is f(theta) = w1 * L(first epoch) + w2 * mean(L over the epochs), L the validation BCE. The smallest
score wins; among equal scores the shallower depth wins (fewer frozen groups: no assumption about what
transfers without evidence for it). Test subjects never enter the search.

Layout inside the phase folder:  adapt/depth-<theta>/ (a short phase each: train and val only),
adapt/table.json and table.csv (every depth, its losses, score and validation AUC, the choice); the phase
itself, trained at the chosen depth, is the phase folder as usual.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from torch import nn

from stroke_tss.config import Config
from stroke_tss.config.training import AdaptSection, PhaseSection, StoppingSection
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.models import backbone_groups, freeze
from stroke_tss.tasks import get_task
from stroke_tss.train import train_phase

log = logging.getLogger(__name__)

ModelFactory = Callable[[], nn.Module]  # the transferred model, nothing frozen, seeded the same every call


def depth_groups(model: nn.Module) -> list[list[str]]:
    """The frozen groups of every depth, shallowest first: [], [stem], [stem, block1], ..."""
    groups = backbone_groups(model)
    return [groups[:depth] for depth in range(len(groups) + 1)]


def depth_score(losses: Sequence[float], *, w1: float, w2: float) -> float:
    """f(theta) = w1 * first loss + w2 * mean loss; NaN when a loss is not finite."""
    if not losses:
        raise ValueError("a depth needs at least one epoch of validation losses to be scored")
    if not all(math.isfinite(x) for x in losses):
        return math.nan
    return w1 * losses[0] + w2 * sum(losses) / len(losses)


def choose_depth(scores: Sequence[float]) -> int:
    """Index of the smallest finite score; the shallowest of equal ones."""
    finite = [(score, depth) for depth, score in enumerate(scores) if math.isfinite(score)]
    if not finite:
        raise UserError("no depth has a finite validation loss; lower the learning rate or check the data")
    return min(finite)[1]


def depth_dir(out_dir: Path, depth: int) -> Path:
    return Path(out_dir) / "adapt" / f"depth-{depth}"


def _search_stopping(adapt: AdaptSection) -> StoppingSection:
    # exactly `epochs` epochs at every depth: early stopping would make the means incomparable
    return StoppingSection(max_epochs=adapt.epochs, min_epochs=adapt.epochs, patience=adapt.epochs)


def _epoch_records(path: Path) -> list[dict]:
    """log.jsonl, one record per epoch (train_phase drops the lines of epochs a resume redoes)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def depth_row(out_dir: Path, depth: int, frozen: list[str], adapt: AdaptSection) -> dict:
    """One row of the table from a finished depth's log."""
    records = _epoch_records(depth_dir(out_dir, depth) / "log.jsonl")
    losses = [math.nan if r["val_loss"] is None else float(r["val_loss"]) for r in records]
    return {"depth": depth, "frozen": frozen, "epochs": len(losses),
            "first_loss": losses[0] if losses else math.nan,
            "mean_loss": sum(losses) / len(losses) if losses else math.nan,
            "score": depth_score(losses, w1=adapt.w1, w2=adapt.w2), "val_auc": records[-1].get("val_auc")}


def run_depth(cfg: Config, phase: PhaseSection, *, depth: int, build: ModelFactory,
              datasets: dict[str, StoreDataset], out_dir: Path) -> dict:
    """Fine-tune at `depth` for `phase.adapt.epochs` epochs (resumable) and return its table row."""
    model = build()
    depths = depth_groups(model)
    if not 0 <= depth < len(depths):
        raise UserError(f"depth {depth} is outside 0..{len(depths) - 1} for {cfg.model.name}")
    freeze(model, [*depths[depth], *get_task(phase.task).idle_groups])
    train_phase(model, {"train": datasets["train"], "val": datasets["val"]}, depth_dir(out_dir, depth),
                task=phase.task, train=cfg.train, engine=cfg.engine, optimizer=phase.optimizer,
                stopping=_search_stopping(phase.adapt), seed=cfg.seed)
    return depth_row(out_dir, depth, depths[depth], phase.adapt)


def choose(rows: list[dict]) -> list[dict]:
    """The rows (in depth order) with `chosen` set on the argmin of their scores."""
    rows = sorted(rows, key=lambda r: r["depth"])
    best = choose_depth([r["score"] for r in rows])
    return [{**r, "chosen": i == best} for i, r in enumerate(rows)]


def chosen_depth(rows: list[dict]) -> int:
    return next(r["depth"] for r in rows if r["chosen"])


def write_table(out_dir: Path, rows: list[dict], adapt: AdaptSection) -> Path:
    """adapt/table.json (weights, rows, choice) and adapt/table.csv next to the depth folders."""
    folder = Path(out_dir) / "adapt"
    folder.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path = folder / "table.json"
    path.write_text(json.dumps({"w1": adapt.w1, "w2": adapt.w2, "epochs": adapt.epochs,
                                "chosen_depth": chosen_depth(rows), "depths": clean}, indent=1))
    frame = pd.DataFrame(clean).assign(frozen=lambda f: f["frozen"].map(lambda g: "+".join(g) or "-"))
    frame.to_csv(folder / "table.csv", index=False)
    return path


def read_table(out_dir: Path) -> dict:
    path = Path(out_dir) / "adapt" / "table.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: the depth search has not finished")
    return json.loads(path.read_text())


def format_table(rows: list[dict]) -> str:
    """The depth table for the terminal; '*' marks the chosen depth."""
    lines = [f"  {'depth':>5} {'frozen':<36} {'L(first)':>9} {'mean L':>8} {'f(theta)':>9} {'val AUC':>8}"]
    for r in rows:
        auc = "-" if r["val_auc"] is None else f"{r['val_auc']:.3f}"
        lines.append(f"{'*' if r['chosen'] else ' '} {r['depth']:>5} {'+'.join(r['frozen']) or '-':<36} "
                     f"{r['first_loss']:>9.4f} {r['mean_loss']:>8.4f} {r['score']:>9.4f} {auc:>8}")
    return "\n".join(lines)


def train_at_depth(cfg: Config, phase: PhaseSection, *, depth: int, build: ModelFactory,
                   datasets: dict[str, StoreDataset], out_dir: Path) -> dict:
    """Full training of the phase (its own stopping) with `depth`'s groups frozen; returns its metrics."""
    model = build()
    freeze(model, [*depth_groups(model)[depth], *get_task(phase.task).idle_groups])
    return train_phase(model, datasets, out_dir, task=phase.task, train=cfg.train, engine=cfg.engine,
                       optimizer=phase.optimizer, stopping=phase.stopping, seed=cfg.seed)


def adapt_phase(cfg: Config, phase: PhaseSection, *, build: ModelFactory, datasets: dict[str, StoreDataset],
                out_dir: Path, is_main: bool = True) -> dict:
    """`freeze: auto` in process: every depth in turn, the table, then the phase at the chosen depth."""
    num_depths = len(depth_groups(build()))
    rows = choose([run_depth(cfg, phase, depth=d, build=build, datasets=datasets, out_dir=out_dir)
                   for d in range(num_depths)])
    if is_main:
        write_table(out_dir, rows, phase.adapt)
    log.info("%s: freezing depth search\n%s", out_dir, format_table(rows))
    return train_at_depth(cfg, phase, depth=chosen_depth(rows), build=build, datasets=datasets, out_dir=out_dir)
