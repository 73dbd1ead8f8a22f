"""The phase schedule of one fold, per variant: init, freezing, datasets and train_phase for each phase.

Variants are configs derived from the base (``variants: {name: overrides}``), so the paper's comparisons
(2D vs 3D, pretrained vs scratch) are configuration, not code.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_prep.store import Store, open_store
from hpc.checkpoint import safe_load
from stroke_tss.adaptive import adapt_phase
from stroke_tss.config import Config, dump_config, merge, validate
from stroke_tss.config.training import PhaseSection
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.models import build_model, freeze, reinit, train_only
from stroke_tss.models.external import load_encoder_weights, load_torchvision_resnet18
from stroke_tss.models.gates import attention_on, has_gates, open_gates, set_attention
from stroke_tss.pretrain import genesis_dir
from stroke_tss.splits import ensure_splits, fold_of
from stroke_tss.tasks import LABEL_AUGMENTATIONS, get_task, task_samples
from stroke_tss.train import train_phase
from stroke_tss.weights import check_weights, fit_weights, load_weights

log = logging.getLogger(__name__)


def resolve_variant(cfg: Config, name: str) -> Config:
    """The base config with variant ``name``'s overrides merged in (validated)."""
    if name not in cfg.variants:
        raise UserError(f"unknown variant {name!r}; the config defines {', '.join(cfg.variants)}")
    base = cfg.model_dump(mode="json")
    return validate(merge(base, cfg.variants[name]), schema=type(cfg), source=f"variant {name}")


def build_phase_model(cfg: Config, store: Store, *, init: str, phase_dirs: dict[str, Path], run_dir: Path,
                      fold: int) -> nn.Module:
    """The model of a phase of fold ``fold``, initialised as ``init`` says (random | earlier phase | genesis |
    weights file); `genesis` is the fold's own pretraining under ``genesis.subjects: fold``, else the run's."""
    options = dict(cfg.model.options)
    if cfg.model.name == "slicewise2d" and "num_slices" not in options:
        options["num_slices"] = int(store.attrs["shape_xyz"][2])
    if "in_channels" not in options:
        options["in_channels"] = len(cfg.data.channels)
    model = build_model(cfg.model.name, **options)
    if init == "random":
        return model
    if init in phase_dirs:
        source = phase_dirs[init] / "weights.pt"
        blob = load_weights(source)
        fit_weights(model, blob["state_dict"], source=source, made_for=blob.get("model"))
        return model
    source = _genesis_weights(cfg, run_dir, fold) if init == "genesis" else Path(init)
    own = _own_weights(source, cfg.model.name)
    if own is not None:  # a phase of this package, e.g. `adapt --source RUN/.../weights.pt`
        fit_weights(model, own, source=source)
        return model
    if cfg.model.name == "slicewise2d":
        load_torchvision_resnet18(model, source)
    else:
        load_encoder_weights(model, source)
    return model


def _genesis_weights(cfg: Config, run_dir: Path, fold: int) -> Path:
    per_fold = cfg.genesis.subjects == "fold"
    source = genesis_dir(run_dir, subjects=cfg.genesis.subjects, fold=fold) / "weights.pt"
    if not source.is_file():
        how = f"stroke-tss pretrain CONFIG --fold {fold}" if per_fold else "stroke-tss pretrain CONFIG"
        mine = f" (fold {fold}'s own pretraining)" if per_fold else ""
        raise UserError(f"init: genesis needs {source}{mine}; run `{how}` first")
    return source


def _own_weights(path: Path, model_name: str) -> dict | None:
    """The state dict of a stroke-tss weights.pt of the same model (digest checked); None for any other file."""
    if not path.is_file():
        return None
    data = safe_load(path, map_location="cpu", fix="replace the file or re-run the phase that wrote it")
    if isinstance(data, dict) and data.get("model") == model_name and "state_dict" in data:
        return check_weights(data, path)["state_dict"]
    return None


def phase_model(cfg: Config, phase: PhaseSection, store: Store, *, phase_dirs: dict[str, Path], run_dir: Path,
                fold: int, frozen: list[str] | None = None, where: str | None = None) -> nn.Module:
    """The phase's model, initialised and seeded, its attention gates on or off (`phase.attention`), with
    `frozen` (default: the phase's own groups) held fixed. `where` names the phase in errors (run_fold: the
    variant and the phase; default: the phase's name in `cfg.phases`)."""
    torch.manual_seed(cfg.seed)
    model = build_phase_model(cfg, store, init=phase.init, phase_dirs=phase_dirs, run_dir=run_dir, fold=fold)
    reinit(model, phase.reinit)
    where = f"{where or _phase_name(cfg, phase)} (init {phase.init})"
    gates_on = attention_on(cfg.model.options, phase.attention)
    set_attention(model, gates_on, where=where)
    earlier = cfg.phases.get(phase.init)
    opens = gates_on and has_gates(model) and earlier is not None and not attention_on(cfg.model.options,
                                                                                         earlier.attention)
    if opens:  # the gates join now: their head weights start at zero (models/gates.py says why)
        open_gates(model)
    # a segmentation head learns only from a mask task's loss (onset's lesion pooling reads its map detached):
    # held fixed elsewhere, so no optimiser or DDP bucket waits for a gradient that never comes
    held = get_task(phase.task).idle_groups
    if phase.train_only is not None:
        train_only(model, [g for g in phase.train_only if g not in held])
    else:
        freeze(model, [*(phase.freeze if frozen is None else frozen), *held])
    if opens and not model.classifier.weight.requires_grad:
        raise UserError(f"{where}: turns the attention gates on after phase {phase.init} ran without them, but "
                        "holds the head fixed, so the gates could never learn; add head to its train_only")
    return model


def _phase_name(cfg: Config, phase: PhaseSection) -> str:
    names = [name for name, p in cfg.phases.items() if p == phase]
    return f"phase {names[0]}" if len(names) == 1 else f"the {phase.task} phase"


def phase_datasets(cfg: Config, phase: PhaseSection, subjects: dict[str, list[str]], store: Store, *,
                   where: str) -> dict[str, StoreDataset]:
    """train/val/test datasets of the phase's task over one fold's subjects (train ones augmented)."""
    kept = get_task(phase.task).augmentations
    datasets = {}
    for split in ("train", "val", "test"):
        samples, skipped = task_samples(store.table, phase.task, subjects[split])
        if skipped:
            log.info("%s %s: %d subjects without a %s label skipped", where, split, skipped, phase.task)
        augment = None
        if split == "train":
            augment = cfg.train.augment.model_dump(exclude_defaults=True)
            for name in LABEL_AUGMENTATIONS - kept:  # they would make this task's labels untrue
                augment.pop(name, None)
        datasets[split] = StoreDataset(store, samples, channels=cfg.data.channels, intensity=cfg.train.intensity,
                                       augment=augment, seed=cfg.seed)
    if not len(datasets["train"]) or not len(datasets["val"]):
        raise UserError(f"{where}: no {phase.task} samples in train or val; use more subjects or fewer folds")
    return datasets


def run_fold(cfg: Config, *, fold: int, variants: list[str] | None = None) -> dict[str, dict]:
    """Run fold ``fold``'s phases for each variant (default: all) into RUN/<variant>/fold-<k>/<phase>/."""
    run_dir = Path(cfg.run.dir)
    main = not dist.is_initialized() or dist.get_rank() == 0
    store = open_store(cfg.data.store)  # once per fold: the datasets share it (it pickles as its path)
    subjects = fold_of(ensure_splits(cfg, store.table), fold)
    results: dict[str, dict] = {}
    for name in variants or list(cfg.variants):
        vcfg = resolve_variant(cfg, name)
        fold_dir = run_dir / name / f"fold-{fold}"
        if main:
            dump_config(vcfg, fold_dir / "config.yaml")
        phase_dirs: dict[str, Path] = {}
        for phase_name, phase in vcfg.phases.items():
            if phase.init not in ("random", "genesis") and phase.init not in phase_dirs and phase.init in vcfg.phases:
                raise UserError(f"phase {phase_name}: init {phase.init!r} names a phase that does not run before it")
            where = f"variant {name}, phase {phase_name}"
            datasets = phase_datasets(vcfg, phase, subjects, store, where=f"{where}, fold {fold}")
            out = fold_dir / phase_name
            if phase.freeze == "auto":
                build = partial(phase_model, vcfg, phase, store, phase_dirs=dict(phase_dirs), run_dir=run_dir,
                                fold=fold, frozen=[], where=where)
                results[f"{name}/{phase_name}"] = adapt_phase(vcfg, phase, build=build, datasets=datasets,
                                                              out_dir=out, is_main=main)
            else:
                model = phase_model(vcfg, phase, store, phase_dirs=phase_dirs, run_dir=run_dir, fold=fold,
                                    where=where)
                results[f"{name}/{phase_name}"] = train_phase(
                    model, datasets, out, task=phase.task, train=vcfg.train, engine=vcfg.engine,
                    optimizer=phase.optimizer, stopping=phase.stopping, seed=vcfg.seed)
            phase_dirs[phase_name] = out
    return results
