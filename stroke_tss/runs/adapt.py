"""`stroke-tss adapt`: the freezing-depth search of one phase as job arrays through the launch layer.

The depths run as one array (each a short resumable phase under adapt/depth-<theta>/), the table picks the
depth (stroke_tss.adaptive, the pure search), then one more item trains the phase at the chosen depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from data_prep.store import open_store
from hpc.launch import launch_items
from stroke_tss.adaptive import (
    ModelFactory,
    choose,
    depth_groups,
    depth_row,
    read_table,
    run_depth,
    train_at_depth,
    write_table,
)
from stroke_tss.config import Config
from stroke_tss.config.training import PhaseSection
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.runs.folder import RunTask, prepare_run, select_variants
from stroke_tss.schedule import phase_datasets, phase_model, resolve_variant
from stroke_tss.splits import ensure_splits, fold_of


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
    store = open_store(vcfg.data.store)
    subjects = fold_of(ensure_splits(vcfg, store.table), fold)
    datasets = phase_datasets(vcfg, target, subjects, store, where=f"variant {variant}, phase {phase}, fold {fold}")
    build = partial(phase_model, vcfg, target, store, phase_dirs=phase_dirs, run_dir=run_dir, fold=fold, frozen=[])
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
