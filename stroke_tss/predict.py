"""Apply trained phases to a store's subjects: detector picks the lesion hemisphere, TSS phases score it.

The detector is the run's last phase of a detection task (lesion_present, or lesion_seg, scored by its largest
lesion probability as the trainer scores it); a run without one (2d_scratch) reads the side from the store's
stroke_side, and the output's `side_from` column says which it was.

A model is read from RUN/<variant>/fold-<k>/<phase>/weights.pt ({"model", "init_args", "state_dict"}),
its task from the phase's predictions.csv and its decision threshold from metrics.json (the validation
split's Youden threshold). Without --fold the folds form an ensemble: probabilities and thresholds are
averaged over folds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from data_prep.build import prep
from data_prep.cohort import read_manifest
from data_prep.config import PrepConfig
from data_prep.store import create_or_extend, open_store, set_reference_histogram
from stroke_tss.config.loader import read_yaml
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.models import build_model
from stroke_tss.report.collect import store_path
from stroke_tss.tasks import ONSET_TASKS, SIDES, Sample, detection_tasks, get_task
from stroke_tss.weights import load_weights


@dataclass(frozen=True)
class Phase:
    """One trained phase of one fold: where it is, what it predicts, the threshold it decides at."""

    path: Path
    variant: str
    fold: int
    phase: str
    task: str
    threshold: float
    channels: tuple[str, ...] | None = None
    """Input channels the phase trained on (None: all the store's)."""
    intensity: str = "zscore"
    """Input scaling the phase trained with (train.intensity)."""


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from weights.pt (weights only; no pickled code runs) and put it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no weights file; train this phase first or pick another --phase/--fold")
    blob = load_weights(path)
    missing = [k for k in ("model", "init_args") if k not in blob]
    if missing:
        raise UserError(f"{path}: field(s) {', '.join(missing)} missing; not a stroke-tss weights.pt")
    model = build_model(blob["model"], **blob["init_args"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def fold_config(phase_path: Path) -> dict:
    """The resolved variant config the fold trained with (RUN/<variant>/fold-<k>/config.yaml), {} if absent."""
    path = Path(phase_path).parent / "config.yaml"
    return (read_yaml(path) or {}) if path.is_file() else {}


def _phase_task(path: Path) -> str | None:
    blob = load_weights(path / "weights.pt")
    if blob.get("task"):
        return str(blob["task"])  # the trainer records it next to the weights
    pred = path / "predictions.csv"
    if pred.is_file():
        tasks = pd.read_csv(pred, usecols=["task"], nrows=1000)["task"].unique()
        if len(tasks):
            return str(tasks[0])
    meta = path / "metrics.json"
    return json.loads(meta.read_text()).get("task") if meta.is_file() else None


def _threshold(path: Path) -> float:
    meta = path / "metrics.json"
    if not meta.is_file():
        return 0.5
    val = json.loads(meta.read_text()).get("val") or {}
    return float(val.get("threshold", 0.5))


def find_phases(run: str | Path, *, variant: str | None = None, fold: int | None = None) -> list[Phase]:
    """Every trained phase (weights.pt present) of one variant; `variant` may be omitted when there is one."""
    run = Path(run)
    variants = sorted(p.parent.parent.parent.name for p in run.glob("*/fold-*/*/weights.pt"))
    variants = list(dict.fromkeys(variants))
    if not variants:
        raise UserError(f"{run}: no <variant>/fold-<k>/<phase>/weights.pt; train the run first")
    if variant is None:
        if len(variants) > 1:
            raise UserError(f"{run} holds variants {', '.join(variants)}; pick one with --variant")
        variant = variants[0]
    if variant not in variants:
        raise UserError(f"{run}: no trained variant {variant!r}; trained: {', '.join(variants)}")
    phases = []
    for weights in sorted((run / variant).glob("fold-*/*/weights.pt")):
        k = int(weights.parent.parent.name.split("-", 1)[1])
        if fold is not None and k != fold:
            continue
        task = _phase_task(weights.parent)
        if task is None:
            continue
        cfg = fold_config(weights.parent)
        channels = (cfg.get("data") or {}).get("channels")
        phases.append(Phase(weights.parent, variant, k, weights.parent.name, task, _threshold(weights.parent),
                            channels=tuple(channels) if channels else None,
                            intensity=(cfg.get("train") or {}).get("intensity", "zscore")))
    if not phases:
        raise UserError(f"{run}/{variant}: no trained phase with a known task for fold {fold}")
    return phases


def pick_phase(phases: list[Phase], *, task: str | Collection[str], phase: str | None = None) -> list[Phase]:
    """The folds of the phase predicting `task` (or one of several): the named phase, else the last such phase
    in schedule order (the fine-tuned one)."""
    tasks = {task} if isinstance(task, str) else set(task)
    matching = [p for p in phases if p.task in tasks and (phase is None or p.phase == phase)]
    if not matching:
        return []
    chosen = phase or phase_order(matching)[-1]
    return [p for p in matching if p.phase == chosen]


def phase_order(phases: list[Phase]) -> list[str]:
    """Phase names in schedule order (the fold config's `phases`), else alphabetical."""
    names = {p.phase for p in phases}
    order = list(fold_config(phases[0].path).get("phases") or {}) if phases else []
    return [n for n in order if n in names] + sorted(names - set(order))


def hemisphere_input(store, sid: str, side: str, *, channels=None, intensity: str = "zscore") -> torch.Tensor:
    """(1, C, Z, Y, X/2): one hemisphere read exactly as the training dataset reads it (no augmentation)."""
    dataset = StoreDataset(store, [Sample(sid, side, 0)], channels=channels, intensity=intensity)
    return dataset[0]["x"][None]


@torch.no_grad()
def _score(model: nn.Module, x: torch.Tensor, *, mask: bool) -> float:
    """One hemisphere's probability as the trainer wrote it to predictions.csv: the logit's sigmoid, or for a
    segmentation task the largest lesion probability of its map (stroke_tss.train.predict)."""
    logit = model(x, with_lesion=True)[1].float().amax() if mask else model(x)
    return torch.sigmoid(logit.float()).item()


def _probabilities(models: list[nn.Module], x: torch.Tensor, *, task: str) -> float:
    mask = get_task(task).target == "mask"
    return float(np.mean([_score(m, x, mask=mask) for m in models]))


def predict_store(run: str | Path, store, *, variant: str | None = None, fold: int | None = None,
                  subjects: list[str] | None = None) -> pd.DataFrame:
    """Per subject: detector's per-hemisphere probability and pick (or the store's stroke_side without a
    detector; `side_from` says which), TSS probabilities and decisions."""
    phases = find_phases(run, variant=variant, fold=fold)
    detect = pick_phase(phases, task=detection_tasks())
    tss = {t: pick_phase(phases, task=t) for t in ONSET_TASKS}
    tss = {t: p for t, p in tss.items() if p}
    if not tss and not detect:
        raise UserError(f"{run}: no phase predicts {' or '.join(detection_tasks())} or {', '.join(ONSET_TASKS)}")
    subjects = list(subjects or store.subject_ids)
    known = {} if detect else _known_sides(store, subjects, run=run)
    groups = {"detect": detect, **tss}
    models = {key: [load_model(p.path / "weights.pt") for p in ps] for key, ps in groups.items() if ps}
    rows = []
    for sid in subjects:
        def x(key, side, sid=sid):
            spec = groups[key][0]  # the folds of one phase share task, channels and scaling
            return hemisphere_input(store, sid, side, channels=spec.channels, intensity=spec.intensity)

        row: dict = {"subject_id": sid}
        if detect:
            scores = {side: _probabilities(models["detect"], x("detect", side), task=detect[0].task)
                      for side in SIDES}
            row.update({f"lesion_{side}": scores[side] for side in SIDES})
            side, row["side_from"] = max(SIDES, key=scores.get), f"detector {detect[0].phase}"
        else:
            side, row["side_from"] = known[sid], "stroke_side"
        row["hemisphere"] = side
        for task, ps in tss.items():
            p = _probabilities(models[task], x(task, side), task=task)
            threshold = float(np.mean([ph.threshold for ph in ps]))
            row.update({f"p_{task}": p, f"{task}": int(p >= threshold), f"threshold_{task}": threshold})
        row["phases"] = ";".join(sorted({f"{p.phase}" for ps in (detect, *tss.values()) for p in ps}))
        row["num_folds"] = len(detect or next(iter(tss.values())))
        rows.append(row)
    return pd.DataFrame(rows)


def _known_sides(store, subjects: list[str], *, run) -> dict[str, str]:
    """Each subject's lesion side from the store's stroke_side, for a run without a detection phase; one
    error naming the subjects whose side is not left or right (no guessing: onset is read on that half)."""
    table = store.table.set_index("subject_id")
    column = table["stroke_side"] if "stroke_side" in table.columns else pd.Series(dtype=object)
    sides = {sid: str(column.get(sid)) for sid in subjects}
    unknown = [sid for sid, side in sides.items() if side not in SIDES]
    if unknown:
        raise UserError(f"{run}: no detection phase ({' or '.join(detection_tasks())}) to find the lesion "
                        f"hemisphere, and {len(unknown)} subject(s) have no stroke_side left or right "
                        f"({', '.join(f'{s}: {sides[s]}' for s in unknown[:5])}); give stroke_side in the "
                        "manifest, leave them out with --subjects, or predict with a variant that has one")
    return sides


def _check_normalisable(trained: Path, config: PrepConfig, rows, manifest: Path) -> None:
    """A store normalised on normal tissue took its statistics from each subject's lesion mask: a new subject
    without one would be normalised differently from the training data, so it is refused, not scored."""
    if config.normalize_on != "normal_tissue":
        return
    unmasked = [r.subject_id for r in rows if "lesion_mask" not in r.series]
    if unmasked:
        raise UserError(f"{trained} was normalised with each subject's lesion mask (prep normalize_on: "
                        f"normal_tissue), but {len(unmasked)} subject(s) of {manifest} have no lesion_mask "
                        f"({', '.join(unmasked[:3])}): give their masks, or rebuild the training store with "
                        "normalize_on: robust (the default, no mask needed) and retrain")


def prep_like_training(run: str | Path, manifest: str | Path, *, workers: int = 2) -> tuple[Path, dict[str, str]]:
    """Preprocess new subjects into RUN/predict/<manifest>-<hash>/ with the training store's grid, config and
    reference histogram (seeded into the new store before `prep`, which then reuses it).

    Returns the store and the subjects that failed (id or manifest line -> one line); the others are in it."""
    trained = store_path([run])
    if trained is None:
        raise UserError(f"{run}/config.yaml names no data.store; cannot preprocess like the training data")
    attrs = open_store(trained).attrs
    config = PrepConfig.model_validate(attrs["prep_config"])
    manifest = Path(manifest)
    cohort = read_manifest(manifest, channels=config.channels)  # a bad file raises before anything is written
    if not cohort.rows:
        raise UserError(f"{manifest}: no subject passed validation: {'; '.join(cohort.errors[:3])}")
    _check_normalisable(trained, config, cohort.rows, manifest)
    digest = hashlib.sha1(manifest.read_bytes() + config.config_hash().encode()).hexdigest()[:10]
    out = Path(run) / "predict" / f"{manifest.stem}-{digest}"
    if not (out / "zarr.json").exists():
        create_or_extend(out, config=config, subject_ids=[])
        if attrs.get("reference_histogram"):
            set_reference_histogram(out, attrs["reference_histogram"])
    result = prep(cohort, out, config=config, workers=workers)
    return out, result.failed
