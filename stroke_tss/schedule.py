"""The phase schedule of one fold, per variant: init, freezing, datasets and train_phase for each phase.

Variants are configs derived from the base (``variants: {name: overrides}``), so the paper's comparisons
(2D vs 3D, pretrained vs scratch) are configuration, not code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from stroke_tss.checkpoint import load_weights
from stroke_tss.config import Config, dump_config, merge, validate
from stroke_tss.data import StoreDataset, subject_strata, task_samples
from stroke_tss.splits import fold_of, make_splits, write_splits_once
from stroke_tss.train import train_phase

log = logging.getLogger(__name__)


def resolve_variant(cfg: Config, name: str) -> Config:
    """The base config with variant ``name``'s overrides merged in (validated)."""
    if name not in cfg.variants:
        raise ValueError(f"unknown variant {name!r}; the config defines {', '.join(cfg.variants)}")
    base = cfg.model_dump(mode="json")
    return validate(merge(base, cfg.variants[name]), schema=type(cfg), source=f"variant {name}")


def ensure_splits(cfg: Config) -> dict:
    """RUN/splits.json, written once from the store's subjects table; every fold and rank reads the same."""
    from data_prep.store import open_store

    path = Path(cfg.run.dir) / "splits.json"
    if path.exists():
        from stroke_tss.splits import read_splits

        return read_splits(path)
    table = open_store(cfg.data.store).table
    splits = make_splits(list(table["subject_id"]), kind=cfg.cv.kind, num_folds=cfg.cv.folds,
                         val_fraction=cfg.cv.val_fraction, seed=cfg.seed,
                         strata=subject_strata(table, cfg.cv.stratify),
                         sites=list(table["site"].astype(str)) if "site" in table else None)
    return write_splits_once(path, splits)


def build_phase_model(cfg: Config, *, init: str, phase_dirs: dict[str, Path], run_dir: Path) -> nn.Module:
    """The model of a phase, initialised as ``init`` says (random | earlier phase | genesis | weights file)."""
    from data_prep.store import open_store
    from stroke_tss.models import build_model
    from stroke_tss.models.external import load_encoder_weights, load_torchvision_resnet18

    options = dict(cfg.model.options)
    store = open_store(cfg.data.store)
    if cfg.model.name == "slicewise2d" and "num_slices" not in options:
        options["num_slices"] = int(store.attrs["shape_xyz"][2])
    if "in_channels" not in options:
        options["in_channels"] = len(cfg.data.channels)
    model = build_model(cfg.model.name, **options)
    if init == "random":
        return model
    if init in phase_dirs:
        model.load_state_dict(load_weights(phase_dirs[init] / "weights.pt")["state_dict"])
        return model
    source = run_dir / "genesis" / "weights.pt" if init == "genesis" else Path(init)
    if init == "genesis" and not source.is_file():
        raise ValueError(f"init: genesis needs {source}; run `stroke-tss pretrain CONFIG` first")
    if cfg.model.name == "slicewise2d":
        load_torchvision_resnet18(model, source)
    else:
        load_encoder_weights(model, source)
    return model


def run_fold(cfg: Config, *, fold: int, variants: list[str] | None = None) -> dict[str, dict]:
    """Run fold ``fold``'s phases for each variant (default: all) into RUN/<variant>/fold-<k>/<phase>/."""
    import torch.distributed as dist

    from stroke_tss.models import freeze, train_only

    run_dir = Path(cfg.run.dir)
    main = not dist.is_initialized() or dist.get_rank() == 0
    subjects = fold_of(ensure_splits(cfg), fold)
    results: dict[str, dict] = {}
    for name in variants or list(cfg.variants):
        vcfg = resolve_variant(cfg, name)
        fold_dir = run_dir / name / f"fold-{fold}"
        if main:
            dump_config(vcfg, fold_dir / "config.yaml")
        from data_prep.store import open_store

        table = open_store(vcfg.data.store).table
        phase_dirs: dict[str, Path] = {}
        for phase_name, phase in vcfg.phases.items():
            if phase.init not in ("random", "genesis") and phase.init not in phase_dirs and phase.init in vcfg.phases:
                raise ValueError(f"phase {phase_name}: init {phase.init!r} names a phase that does not run before it")
            torch.manual_seed(vcfg.seed)
            model = build_phase_model(vcfg, init=phase.init, phase_dirs=phase_dirs, run_dir=run_dir)
            if phase.train_only is not None:
                train_only(model, phase.train_only)
            else:
                freeze(model, phase.freeze)
            datasets = {}
            for split in ("train", "val", "test"):
                samples, skipped = task_samples(table, phase.task, subjects[split])
                if skipped:
                    log.info("%s/%s %s: %d subjects without a %s label skipped", name, phase_name, split, skipped,
                             phase.task)
                augment = vcfg.train.augment.model_dump(exclude_defaults=True) if split == "train" else None
                datasets[split] = StoreDataset(vcfg.data.store, samples, channels=vcfg.data.channels,
                                               intensity=vcfg.train.intensity, augment=augment, seed=vcfg.seed)
            if not len(datasets["train"]) or not len(datasets["val"]):
                raise ValueError(f"variant {name}, phase {phase_name}: fold {fold} has no {phase.task} samples in "
                                 "train or val; use more subjects or fewer folds")
            out = fold_dir / phase_name
            results[f"{name}/{phase_name}"] = train_phase(
                model, datasets, out, task=phase.task, train=vcfg.train, engine=vcfg.engine,
                optimizer=phase.optimizer, stopping=phase.stopping, seed=vcfg.seed)
            phase_dirs[phase_name] = out
    return results
