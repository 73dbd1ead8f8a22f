"""The onset ceiling: what a reader with a perfect segmentation gets from the images of a run's test hemispheres.

For each onset task, on the run's own folds and the task's own hemispheres (lesion halves with a known onset),
every hemisphere is reduced to the mean of each store channel over its TRUE lesion (the store's mask cut at
the midline, left = low x, as `Store.hemisphere` cuts the volume). Four readouts, pooled over the folds' test
hemispheres:

    flair       score = -mean FLAIR (FLAIR brightens with time, so lower = earlier); nothing fitted
    b0          the same for b0 (or t2)
    flair_b0    the same for the sum of the two
    logistic    a standardised logistic regression on the means of the input channels, fitted on each fold's
                non-test hemispheres (train and validation: it chooses nothing on validation) and scored
                on that fold's test hemispheres

The ceiling is the best of the four, each part reported beside it: with some 65 training subjects a fitted
readout can score below one unfitted feature, and the ceiling must not be the weaker. The intensities are the
store's normalised channels, as the 2D networks read them (a variant with `train.intensity: unit`, such as the
3D one, reads each hemisphere rescaled to [0, 1]). A store without lesion masks has no ceiling: the result says
why instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_prep.store import Store, StoreError, half, open_store
from stroke_tss import metrics
from stroke_tss.errors import UserError
from stroke_tss.report.collect import run_config, store_path
from stroke_tss.splits import read_splits
from stroke_tss.tasks import ONSET_TASKS, task_samples

PARTS = ("flair", "b0", "flair_b0", "logistic")
B0_NAMES = ("b0", "t2")

log = logging.getLogger(__name__)


def no_ceiling(reason: str) -> dict:
    return {"ceiling": None, "reason": reason}


def lesion_means(store: Store, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """Mean of every store channel over the true lesion of each (subject, side); halves without lesion voxels
    (or subjects without a mask) are left out."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for sid in dict.fromkeys(sid for sid, _ in keys):
        lesion = store.lesion(sid)
        if lesion is None:
            continue
        volume = store.volume(sid)
        for side in {s for k, s in keys if k == sid}:
            mask = half(lesion, side, mirrored=False) > 0
            if mask.any():
                out[(sid, side)] = half(volume, side, mirrored=False)[:, mask].mean(axis=1).astype(np.float64)
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    return metrics.binary_metrics(y, score, threshold=0.5)["auc"] if np.unique(y).size == 2 else None


def _logistic_oof(fold_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Pooled test (labels, probabilities) of one logistic regression per fold; None if a fold cannot fit."""
    ys, ps = [], []
    for x_train, y_train, x_test, y_test in fold_rows:
        if np.unique(y_train).size < 2:
            return None
        model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x_train, y_train)
        ys.append(y_test)
        ps.append(model.predict_proba(x_test)[:, 1] if len(y_test) else np.empty(0))
    return np.concatenate(ys), np.concatenate(ps)


def task_ceiling(store: Store, splits: dict, task: str, *, channels: Sequence[str] | None = None,
                 folds: Sequence[int] | None = None) -> dict:
    """The ceiling of `task` on `splits` (the folds listed, default all): its parts, the best, and counts."""
    names = store.channels
    channels = list(channels or names)
    if "has_lesion_mask" not in store.table or not store.table["has_lesion_mask"].astype(bool).any():
        return no_ceiling(f"store {store.path} has no lesion masks")
    unknown = [c for c in channels if c not in names]
    if unknown:
        raise UserError(f"store {store.path}: channels {unknown} not in its channels {names}; fix data.channels")
    folds = list(range(len(splits["folds"]))) if folds is None else list(folds)
    if not folds:
        return no_ceiling("no fold has test predictions yet")
    fold_samples = {}
    for k in folds:
        fold = splits["folds"][k]
        fold_samples[k] = {part: task_samples(store.table, task, fold[part])[0] if part == "test"
                           else task_samples(store.table, task, [*fold["train"], *fold.get("val", [])])[0]
                           for part in ("train", "test")}
    keys = [(s.subject_id, s.hemisphere) for k in folds for part in fold_samples[k].values() for s in part]
    means = lesion_means(store, keys)
    columns = {"flair": [names.index("flair")] if "flair" in names else None,
               "b0": next(([names.index(c)] for c in B0_NAMES if c in names), None)}
    columns["flair_b0"] = columns["flair"] + columns["b0"] if columns["flair"] and columns["b0"] else None
    inputs = [names.index(c) for c in channels]

    def rows(samples):
        kept = [s for s in samples if (s.subject_id, s.hemisphere) in means]
        x = np.array([means[(s.subject_id, s.hemisphere)] for s in kept]).reshape(len(kept), len(names))
        return kept, x, np.array([s.label for s in kept], dtype=int)

    seen, tests, per_fold = set(), [], []
    for k in folds:
        _, x_train, y_train = rows(fold_samples[k]["train"])
        kept, x_test, y_test = rows(fold_samples[k]["test"])
        first = np.array([(s.subject_id, s.hemisphere) not in seen for s in kept], dtype=bool)  # a repeated test hemisphere counts once
        seen.update((s.subject_id, s.hemisphere) for s in kept)
        tests.append((x_test[first], y_test[first]))
        per_fold.append((x_train[:, inputs], y_train, x_test[first][:, inputs], y_test[first]))
    x = np.concatenate([t[0] for t in tests])
    y = np.concatenate([t[1] for t in tests])
    num_wanted = len({(s.subject_id, s.hemisphere) for k in folds for s in fold_samples[k]["test"]})
    if np.unique(y).size < 2:
        return no_ceiling(f"{len(y)} test hemispheres with a lesion mask hold fewer than two {task} classes")
    parts = {p: (_auc(y, -x[:, c].sum(axis=1)) if c else None) for p, c in columns.items()}
    oof = _logistic_oof(per_fold)
    parts["logistic"] = _auc(*oof) if oof is not None else None
    scored = {p: v for p, v in parts.items() if v is not None}
    best = max(scored, key=scored.get) if scored else None
    return {"ceiling": scored.get(best), "best": best, "parts": parts, "n": int(len(y)),
            "n_positive": int(y.sum()), "folds": folds, "channels": channels,
            "hemispheres_without_mask": num_wanted - int(len(y))}


def run_ceilings(run_dir: str | Path, *, folds: Sequence[int] | None = None, store: str | Path | None = None,
                 tasks: Sequence[str] = ONSET_TASKS) -> dict[str, dict]:
    """The ceiling of each onset task on a run folder's store (`store`, else config.yaml's data.store), input
    channels (data.channels) and splits (splits.json); a missing piece gives each task None with the reason.

    Never raises for the store's or the run's contents: summary, collect and report call it after all the
    training, and a ceiling that cannot be computed must not cost them the networks' results."""
    run_dir = Path(run_dir)
    path = Path(store) if store is not None else store_path([run_dir])
    if path is None:
        return {t: no_ceiling(f"{run_dir / 'config.yaml'} names no data.store") for t in tasks}
    if not (run_dir / "splits.json").is_file():
        return {t: no_ceiling(f"{run_dir / 'splits.json'} does not exist (no fold has started)") for t in tasks}
    try:
        opened = open_store(path)
        opened.table  # noqa: B018  (a damaged table is refused here, once)
    except StoreError as exc:
        return {t: no_ceiling(f"store unreadable: {exc}") for t in tasks}
    splits = read_splits(run_dir / "splits.json")
    channels = (run_config(run_dir).get("data") or {}).get("channels")
    return {t: _guarded_ceiling(opened, splits, t, channels=channels, folds=folds) for t in tasks}


def _guarded_ceiling(store: Store, splits: dict, task: str, **options) -> dict:
    """task_ceiling, with a damaged chunk, a split subject missing from the store or an unknown channel turned
    into None and the reason (logged as a warning)."""
    try:
        return task_ceiling(store, splits, task, **options)
    except (StoreError, UserError) as exc:
        log.warning("no %s ceiling: %s", task, exc)
        return no_ceiling(str(exc))


def format_ceiling(entry: dict) -> str:
    """One line: the ceiling and each part, or why there is none."""
    if entry.get("ceiling") is None:
        return f"none ({entry.get('reason', 'no part could be scored')})"
    return f"{entry['ceiling']:.3f} ({entry['best']}; {format_parts(entry)}; n {entry['n']}, {entry['n_positive']} early)"


def format_parts(entry: dict) -> str:
    """Each part of a ceiling with its AUC ("-" where it could not be scored)."""
    return ", ".join(f"{p} {'-' if v is None else f'{v:.3f}'}" for p, v in entry["parts"].items())
