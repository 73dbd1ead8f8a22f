"""Report sections from the subjects table: readers' mismatch reads, Fleiss' kappa, logistic baselines.

Labels come from the table's clinical columns by the task registry's rules (stroke_tss.tasks); subjects
without the value are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.paths import subject_path
from stroke_tss import metrics, stats
from stroke_tss.tasks import ONSET_TASKS, TASKS, subject_labels

CLINICAL_TASKS = (*ONSET_TASKS, *(t for t in TASKS if TASKS[t].column and t not in ONSET_TASKS))
"""Tasks labelled from a clinical column, onset first (lesion presence has no clinical baseline here)."""

def reader_columns(table: pd.DataFrame) -> list[str]:
    return sorted(c for c in table.columns if c.startswith("reader_"))


def reader_section(table: pd.DataFrame, *, task: str = "tss_lt_4h5", num_resamples: int = 2000,
                   seed: int = 0) -> tuple[pd.DataFrame, float | None]:
    """Each reader's and the majority read's sens/spec/acc against `task`, and Fleiss' kappa between readers."""
    cols = reader_columns(table)
    if not cols:
        return pd.DataFrame(), None
    reads = table.set_index("subject_id")[cols].apply(pd.to_numeric, errors="coerce")
    perf = stats.reader_performance(subject_labels(table, task), reads, num_resamples=num_resamples, seed=seed)
    kappa = None
    if len(cols) >= 2 and reads.dropna().shape[0] > 0:
        kappa = stats.fleiss_kappa(stats.category_counts(reads.to_numpy()))
    return perf, kappa


def _offset(store, sid: str, channel: str) -> float:
    """mean/std of the raw channel in the brain (the store record's QC), so z-scores map back to raw ratios."""
    record = subject_path(Path(store.path) / "records", sid, ".json")
    qc = json.loads(record.read_text()).get("qc", {}) if record.is_file() else {}
    mean, std = qc.get(f"{channel}_mean"), qc.get(f"{channel}_std")
    return float(mean) / float(std) if mean is not None and std else 0.0


def lesion_features(store) -> pd.DataFrame:
    """Per subject with a lesion: lesion volume (mL, from the table) and lesion/contralateral FLAIR ratio."""
    table = store.table.set_index("subject_id")
    rows = []
    flair = store.channels.index("flair") if "flair" in store.channels else None
    voxel_ml = float(np.prod(np.broadcast_to(store.attrs["spacing_mm"], 3))) / 1000.0
    for sid in store.subject_ids:
        lesion = store.lesion(sid)
        if lesion is None or not lesion.any():
            continue
        # prep records the volume; stores written by other tools may not, and the mask on the grid says the same
        volume_ml = table.loc[sid].get("lesion_volume_ml")
        if volume_ml is None or pd.isna(volume_ml):
            volume_ml = float((lesion > 0).sum()) * voxel_ml
        row = {"subject_id": sid, "lesion_volume_ml": float(volume_ml)}
        if flair is not None:
            volume = store.volume(sid)[flair]
            row["flair_ratio"] = stats.lesion_flair_ratio(volume, lesion, store.brain(sid),
                                                          offset=_offset(store, sid, "flair"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("subject_id") if rows else pd.DataFrame()


def baseline_table(store, *, tasks=CLINICAL_TASKS, specificity: float = 0.9,
                   num_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold logistic regression on lesion volume and on the FLAIR ratio, per task (subject level)."""
    features = lesion_features(store)
    rows = []
    for task in tasks:
        labels = subject_labels(store.table, task)
        for feature in ("lesion_volume_ml", "flair_ratio"):
            if feature not in features.columns:
                continue
            data = pd.concat([features[feature], labels.rename("y")], axis=1, join="inner").dropna()
            data = data[np.isfinite(data[feature])]
            if data.empty or data["y"].value_counts().min() < 2 or data["y"].nunique() < 2:
                continue
            p = stats.logistic_baseline(data[[feature]], data["y"], seed=seed)
            y = data["y"].to_numpy()
            auc = metrics.binary_metrics(y, p, threshold=0.5)["auc"]
            ci = metrics.bootstrap_ci(y, p, data.index.astype(str), threshold=0.5,
                                      num_resamples=num_resamples, seed=seed)["auc"]
            sens, _ = metrics.sensitivity_at_specificity(y, p, specificity=specificity)
            rows.append({"task": task, "baseline": f"logistic({feature})", "n": len(y),
                         "n_positive": int(y.sum()), "auc": auc, "auc_lo": ci[0], "auc_hi": ci[1],
                         "specificity_target": specificity, "sensitivity_at_spec": sens})
    return pd.DataFrame(rows)
