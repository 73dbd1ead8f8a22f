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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from torch import nn

from hpc.launch import launch_items
from stroke_tss.config import Config
from stroke_tss.config.training import AdaptSection, PhaseSection, StoppingSection
from stroke_tss.cv import RunTask
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.models import backbone_groups, freeze
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
        raise ValueError("no depth has a finite validation loss; lower the learning rate or check the data")
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
        raise ValueError(f"depth {depth} is outside 0..{len(depths) - 1} for {cfg.model.name}")
    freeze(model, depths[depth])
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
        raise ValueError(f"{path} does not exist: the depth search has not finished")
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
    freeze(model, depth_groups(model)[depth])
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


# --- standalone: `stroke-tss adapt`, the depths as one job array through the launch layer -------------------

@dataclass(frozen=True)
class DepthItem:
    depth: int | None
    """The depth to fine-tune; None: the full training at the chosen depth (after the table)."""


@dataclass(frozen=True)
class AdaptTarget:
    """What one adapt run trains: the variant's config, the phase (init = the source), its data and folder."""

    cfg: Config
    phase: PhaseSection
    build: ModelFactory
    datasets: dict[str, StoreDataset]
    out_dir: Path


def default_phase(cfg: Config) -> str:
    """The first phase with `freeze: auto`, else the last phase that is not `train_only`."""
    auto = [name for name, p in cfg.phases.items() if p.freeze == "auto"]
    free = [name for name, p in cfg.phases.items() if p.train_only is None]
    return (auto or free[-1:] or list(cfg.phases)[-1:])[0]


def adapt_target(cfg: Config, *, variant: str, fold: int, phase: str, source: str) -> AdaptTarget:
    """Resolve variant, phase and source (a phase of this run's fold, or a weights file) into an AdaptTarget."""
    from data_prep.store import open_store
    from stroke_tss.schedule import ensure_splits, phase_datasets, phase_model, resolve_variant
    from stroke_tss.splits import fold_of

    vcfg = resolve_variant(cfg, variant)
    if phase not in vcfg.phases:
        raise UserError(f"--phase {phase}: not a phase of the config ({', '.join(vcfg.phases)})")
    if vcfg.phases[phase].train_only is not None:
        raise UserError(f"--phase {phase} trains only {vcfg.phases[phase].train_only}; pick a phase without "
                        "train_only (its depth is what the search chooses)")
    run_dir = Path(cfg.run.dir)
    fold_dir = run_dir / variant / f"fold-{fold}"
    phase_dirs: dict[str, Path] = {}
    if source in vcfg.phases:
        phase_dirs[source] = fold_dir / source
        if not (fold_dir / source / "weights.pt").is_file():
            raise UserError(f"--source {source}: {fold_dir / source / 'weights.pt'} does not exist; train that "
                            "phase first (`stroke-tss train`) or give a weights file")
    elif not Path(source).is_file():
        raise UserError(f"--source {source}: neither a phase of the config ({', '.join(vcfg.phases)}) nor a "
                        "weights file")
    target = vcfg.phases[phase].model_copy(update={"init": str(source), "freeze": "auto"})
    try:
        subjects = fold_of(ensure_splits(vcfg), fold)
        datasets = phase_datasets(vcfg, target, subjects, table=open_store(vcfg.data.store).table,
                                  where=f"variant {variant}, phase {phase}, fold {fold}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    build = partial(phase_model, vcfg, target, phase_dirs=phase_dirs, run_dir=run_dir, frozen=[])
    return AdaptTarget(vcfg, target, build, datasets, fold_dir / phase)


class AdaptTask(RunTask):
    """One depth of the search, or the final training at the chosen depth (read from adapt/table.json)."""

    def __init__(self, config: dict, *, variant: str, fold: int, phase: str, source: str) -> None:
        super().__init__(config)
        self.target_args = {"variant": variant, "fold": fold, "phase": phase, "source": source}

    def work(self, cfg: Config, item: DepthItem, *, is_main: bool) -> dict:
        t = adapt_target(cfg, **self.target_args)
        if item.depth is None:
            depth = read_table(t.out_dir)["chosen_depth"]
            return train_at_depth(t.cfg, t.phase, depth=depth, build=t.build, datasets=t.datasets,
                                  out_dir=t.out_dir)
        return run_depth(t.cfg, t.phase, depth=item.depth, build=t.build, datasets=t.datasets, out_dir=t.out_dir)


def _launch(task: AdaptTask, items: list[DepthItem], names: list[str], cfg: Config) -> list:
    results = launch_items(task, items, config=cfg.launch, folder=Path(cfg.run.dir) / "jobs", names=names)
    failed = [r for r in results if not r.ok]
    if failed:
        raise UserError("; ".join(f"{r.name} failed: {r.error} (log: {r.log})" for r in failed))
    return results


def run_adapt(cfg: Config, *, source: str, phase: str | None = None, fold: int = 0,
              variant: str | None = None) -> tuple[list[dict], dict, Path]:
    """The standalone search: depths as one array, the table, then the phase at the chosen depth (one item).

    Returns the table rows, the phase's metrics and its folder RUN/<variant>/fold-<k>/<phase>/.
    """
    from stroke_tss.cv import prepare_run, select_variants

    variant = variant or select_variants(cfg, None)[0]
    select_variants(cfg, [variant])
    phase = phase or default_phase(cfg)
    prepare_run(cfg)
    t = adapt_target(cfg, variant=variant, fold=fold, phase=phase, source=source)  # fails here, not in a job
    groups = depth_groups(t.build())
    task = AdaptTask(cfg.model_dump(mode="json"), variant=variant, fold=fold, phase=phase, source=source)
    stem = f"{variant}-fold-{fold}-{phase}"
    _launch(task, [DepthItem(d) for d in range(len(groups))], [f"{stem}-depth-{d}" for d in range(len(groups))],
            cfg)
    rows = choose([depth_row(t.out_dir, d, groups[d], t.phase.adapt) for d in range(len(groups))])
    write_table(t.out_dir, rows, t.phase.adapt)
    [final] = _launch(task, [DepthItem(None)], [f"{stem}-final"], cfg)
    return rows, final.value, t.out_dir
