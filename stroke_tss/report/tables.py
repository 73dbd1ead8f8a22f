"""Table 2 (variant x phase x task; sens/spec/acc/AUC with subject-bootstrap CIs), DeLong, sens at fixed spec.

Hemisphere level scores every predicted hemisphere; subject level takes, per subject, the max over its
hemispheres for `lesion_present` (a subject has a stroke if either half has one) and the mean otherwise
(the task registry's `subject_score`).
Thresholds are Youden's J on each fold's validation split; test rows of all folds are pooled before scoring.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from stroke_tss import metrics
from stroke_tss.stats import delong_test
from stroke_tss.tasks import get_task

GROUP = ["run", "variant", "phase", "task"]
SHOWN = ("sensitivity", "specificity", "accuracy", "auc", "ppv", "npv", "brier")
LEVELS = ("hemisphere", "subject")


def at_level(pred: pd.DataFrame, level: str) -> pd.DataFrame:
    """Predictions at hemisphere level (as written) or one row per subject, split, task, fold."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    if level == "hemisphere":
        return pred
    parts = []
    for keys, g in pred.groupby(["run", "variant", "phase", "task"], sort=False):
        s = metrics.subject_scores(g[["subject_id", "split", "task", "fold", "label", "probability"]],
                                   how=get_task(keys[3]).subject_score)
        parts.append(s.assign(run=keys[0], variant=keys[1], phase=keys[2], hemisphere="both"))
    return pd.concat(parts, ignore_index=True)


def _group_row(g: pd.DataFrame, *, num_resamples: int, seed: int) -> dict:
    folds = [f for _, f in g.groupby("fold", sort=True)]
    try:
        pooled = metrics.pooled_metrics(folds, num_resamples=num_resamples, seed=seed)
        values, ci, note = pooled["metrics"], pooled["ci95"], ""
        threshold = ";".join(f"{t:.3g}" for t in pooled["thresholds"])
    except ValueError as exc:
        # No two-class validation split (e.g. a hold-out without val): rank metrics stay valid, the
        # threshold falls back to 0.5 and the note says so.
        test = g[g["split"] == "test"]
        if test.empty:
            return {}
        values = metrics.binary_metrics(test["label"], test["probability"], threshold=0.5)
        ci = metrics.bootstrap_ci(test["label"], test["probability"], test["subject_id"].astype(str),
                                  threshold=0.5, num_resamples=num_resamples, seed=seed)
        note, threshold = f"threshold 0.5: {exc}", "0.5"
    row = {"n": values["n"], "n_positive": values["n_positive"], "num_folds": len(folds)}
    for k in SHOWN:
        row.update({k: values[k], f"{k}_lo": ci[k][0], f"{k}_hi": ci[k][1]})
    return {**row, "thresholds": threshold, "note": note}


def table2(pred: pd.DataFrame, *, level: str = "hemisphere", num_resamples: int = 2000,
           seed: int = 0) -> pd.DataFrame:
    """One row per run x variant x phase x task: pooled out-of-fold test metrics with 95% CIs."""
    scored = at_level(pred, level)
    rows = []
    for keys, g in scored.groupby(GROUP, sort=False):
        row = _group_row(g, num_resamples=num_resamples, seed=seed)
        if row:
            rows.append({**dict(zip(GROUP, keys)), "level": level, **row})
    return pd.DataFrame(rows)


def pooled_test(pred: pd.DataFrame) -> pd.DataFrame:
    """Test rows of every fold; a subject tested twice (repeated splits) keeps its first fold's row."""
    test = pred[pred["split"] == "test"]
    return test.drop_duplicates([*GROUP, "subject_id", "hemisphere"])


def delong_table(pred: pd.DataFrame, *, level: str = "hemisphere") -> pd.DataFrame:
    """DeLong test between every two models (run/variant) on the same phase, task and test samples."""
    test = pooled_test(at_level(pred, level))
    # run names only tell models apart when several runs are compared
    test = test.assign(model=test["variant"] if test["run"].nunique() == 1 else test["run"] + "/" + test["variant"])
    rows = []
    for (phase, task), g in test.groupby(["phase", "task"], sort=False):
        wide = g.pivot_table(index=["subject_id", "hemisphere"], columns="model", values="probability")
        labels = g.drop_duplicates(["subject_id", "hemisphere"]).set_index(["subject_id", "hemisphere"])["label"]
        for a, b in itertools.combinations(wide.columns, 2):
            both = wide[[a, b]].dropna()
            y = labels.loc[both.index].to_numpy()
            if both.empty or np.unique(y).size < 2:
                continue
            res = delong_test(y, both[a].to_numpy(), both[b].to_numpy())
            rows.append({"phase": phase, "task": task, "level": level, "model_a": a, "model_b": b,
                         "n": len(both), **res})
    return pd.DataFrame(rows)


def sensitivity_at_specificity_table(pred: pd.DataFrame, *, specificity: float = 0.9,
                                     level: str = "hemisphere") -> pd.DataFrame:
    """Each model's best pooled-test sensitivity among thresholds with at least `specificity`."""
    rows = []
    for keys, g in pooled_test(at_level(pred, level)).groupby(GROUP, sort=False):
        if g["label"].nunique() < 2:
            continue
        sens, threshold = metrics.sensitivity_at_specificity(g["label"], g["probability"], specificity=specificity)
        rows.append({**dict(zip(GROUP, keys)), "level": level, "specificity_target": specificity,
                     "sensitivity": sens, "threshold": threshold})
    return pd.DataFrame(rows)


PHASE_3, PHASE_4 = "tss4h5", "attention"
"""The paper's phase 3 (TSS < 4.5 h from the < 3 h weights) and phase 4 (the soft attention fine-tuned)."""


def phase_3_to_4(hemi: pd.DataFrame, *, task: str = "tss_lt_4h5") -> dict[str, dict]:
    """Per variant that has both phases on `task` (a Table 2 frame, hemisphere level): phase 4's AUC minus
    phase 3's, the gain the paper reports for refining the attention. Variants lacking a phase are left out."""
    if hemi.empty:
        return {}
    rows = hemi[(hemi["task"] == task) & hemi["phase"].isin((PHASE_3, PHASE_4))]
    keys = ["run", "variant"] if rows["run"].nunique() > 1 else ["variant"]
    out = {}
    for key, g in rows.groupby(keys, sort=False):
        auc = g.set_index("phase")["auc"]
        if {PHASE_3, PHASE_4} <= set(auc.index) and auc.notna().all():
            out["/".join(map(str, key))] = {
                "task": task, "phase_3": PHASE_3, "phase_4": PHASE_4, "phase_3_auc": float(auc[PHASE_3]),
                "phase_4_auc": float(auc[PHASE_4]), "difference": float(auc[PHASE_4] - auc[PHASE_3])}
    return out
