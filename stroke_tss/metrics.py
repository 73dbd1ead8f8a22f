"""Binary classification metrics, Youden thresholds, subject-level scores and subject bootstrap CIs.

Everything is computed on weighted samples so the bootstrap is one vectorised pass: a resample of subjects
is a row of per-subject counts, and each prediction carries its subject's count as its weight.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stroke_tss.tasks import get_task

METRICS = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "ap", "brier")
_CHUNK = 500  # resamples per vectorised block: bounds memory at ~_CHUNK x unique scores floats


def _arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, p


def _curve_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC-AUC and average precision for each row of weights ``w`` (B, n); NaN when undefined."""
    values, inverse = np.unique(p, return_inverse=True)
    k = values.size
    pos = np.zeros((w.shape[0], k))
    neg = np.zeros((w.shape[0], k))
    np.add.at(pos.T, inverse[y == 1], w[:, y == 1].T)
    np.add.at(neg.T, inverse[y == 0], w[:, y == 0].T)
    total_pos, total_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # AUC: each positive beats the negatives strictly below it and ties with half of those level with it.
        neg_below = np.cumsum(neg, axis=1) - neg
        auc = (pos * (neg_below + 0.5 * neg)).sum(1) / (total_pos * total_neg)
        # AP (scikit-learn's step definition): thresholds from the highest score down.
        tp = np.cumsum(pos[:, ::-1], axis=1)
        fp = np.cumsum(neg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos[:, ::-1] / total_pos[:, None] * precision).sum(1)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    ap[total_pos == 0] = np.nan
    return auc, ap


def _threshold_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    pred = p >= threshold
    tp = w @ (pred & (y == 1))
    fp = w @ (pred & (y == 0))
    fn = w @ (~pred & (y == 1))
    tn = w @ (~pred & (y == 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "brier": (w @ (p - y) ** 2) / w.sum(1),
        }


def _weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    auc, ap = _curve_metrics(y, p, w)
    return {"auc": auc, "ap": ap, **_threshold_metrics(y, p, w, threshold)}


def _nan_to_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def binary_metrics(y, p, *, threshold: float) -> dict[str, float | int | None]:
    """auc, sensitivity, specificity, accuracy, ppv, npv, f1, ap, brier at ``threshold`` (p >= t is positive)."""
    y, p = _arrays(y, p)
    out = {k: _nan_to_none(v[0]) for k, v in _weighted(y, p, np.ones((1, y.size)), threshold).items()}
    return {**{k: out[k] for k in METRICS}, "threshold": float(threshold), "n": int(y.size),
            "n_positive": int(y.sum())}


def youden_threshold(y, p) -> float:
    """The score maximising sensitivity + specificity - 1 (ties: the highest such score)."""
    y, p = _arrays(y, p)
    if y.min() == y.max():
        raise ValueError("Youden's J needs both classes in the validation predictions")
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    last = np.r_[ps[1:] != ps[:-1], True]  # the last index of each run of equal scores
    tpr = np.cumsum(ys)[last] / ys.sum()
    fpr = np.cumsum(1 - ys)[last] / (1 - ys).sum()
    return float(ps[last][int(np.argmax(tpr - fpr))])


def sensitivity_at_specificity(y, p, *, specificity: float) -> tuple[float, float]:
    """Best sensitivity among thresholds reaching ``specificity``; returns (sensitivity, threshold)."""
    y, p = _arrays(y, p)
    best = (0.0, float(np.inf))
    for t in np.unique(p)[::-1]:
        pred = p >= t
        spec = ((~pred) & (y == 0)).sum() / max(1, (y == 0).sum())
        if spec >= specificity:
            best = (float((pred & (y == 1)).sum() / max(1, (y == 1).sum())), float(t))
    return best


def subject_scores(pred: pd.DataFrame, *, how: str = "mean") -> pd.DataFrame:
    """One row per (subject, split, task): label = max over hemispheres, probability = mean or max."""
    if how not in ("mean", "max"):
        raise ValueError(f"subject aggregation must be 'mean' or 'max', not {how!r}")
    keys = [c for c in ("subject_id", "split", "task", "fold") if c in pred.columns]
    return pred.groupby(keys, sort=False).agg(label=("label", "max"), probability=("probability", how)).reset_index()


def bootstrap_ci(y, p, subjects, *, threshold: float, num_resamples: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float | None, float | None]]:
    """Percentile CIs of every metric, resampling subjects (all their rows together) with replacement."""
    y, p = _arrays(y, p)
    codes, _ = pd.factorize(pd.Series(np.asarray(subjects)))
    num_subjects = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for start in range(0, num_resamples, _CHUNK):
        b = min(_CHUNK, num_resamples - start)
        counts = rng.multinomial(num_subjects, np.full(num_subjects, 1.0 / num_subjects), size=b)
        for k, v in _weighted(y, p, counts[:, codes].astype(np.float64), threshold).items():
            samples[k].append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for k, parts in samples.items():
        v = np.concatenate(parts)
        v = v[~np.isnan(v)]
        out[k] = (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v.size else (None, None)
    return out


def split_metrics(pred: pd.DataFrame, *, val_split: str = "val") -> dict[str, dict]:
    """Metrics per split of one fold's predictions, at the Youden threshold chosen on ``val_split``."""
    val = pred[pred["split"] == val_split]
    if val.empty:
        raise ValueError(f"no predictions in split {val_split!r} to choose the threshold on")
    threshold = youden_threshold(val["label"], val["probability"]) if val["label"].nunique() == 2 else 0.5
    return {str(name): binary_metrics(g["label"], g["probability"], threshold=threshold)
            for name, g in pred.groupby("split", sort=False)}


def phase_metrics(pred: pd.DataFrame) -> dict[str, dict]:
    """A phase's metrics.json: hemisphere-level metrics per split, and under "subject" the same per split on
    subject scores (lesion_present: does the subject have a lesion, max over hemispheres; onset tasks: mean
    over the subject's lesion hemispheres), each level with its own validation threshold."""
    tasks = set(pred["task"])
    how = get_task(tasks.pop()).subject_score if len(tasks) == 1 else "mean"
    return {**split_metrics(pred), "subject": split_metrics(subject_scores(pred, how=how))}


def pooled_metrics(folds: list[pd.DataFrame], *, test_split: str = "test", val_split: str = "val",
                   num_resamples: int = 10_000, seed: int = 0) -> dict:
    """Pooled out-of-fold test metrics: each fold's test rows binarised at that fold's validation threshold.

    Returns the metrics, their subject-bootstrap CIs and the per-fold thresholds.
    """
    ys, ps, decisions, subjects, thresholds = [], [], [], [], []
    for k, fold in enumerate(folds):
        val, test = fold[fold["split"] == val_split], fold[fold["split"] == test_split]
        if val["label"].nunique() < 2:
            raise ValueError(f"fold {k}: validation predictions hold one class only; no Youden threshold")
        t = youden_threshold(val["label"], val["probability"])
        thresholds.append(t)
        ys.append(test["label"].to_numpy())
        ps.append(test["probability"].to_numpy())
        # Binarise per fold, then pool the decisions as scores in {0, 1} at threshold 0.5.
        decisions.append((test["probability"].to_numpy() >= t).astype(np.float64))
        subjects.append(test["subject_id"].astype(str).to_numpy())
    y, p, d, s = (np.concatenate(a) for a in (ys, ps, decisions, subjects))
    ranked = binary_metrics(y, p, threshold=0.5)
    decided = binary_metrics(y, d, threshold=0.5)
    cis_rank = bootstrap_ci(y, p, s, threshold=0.5, num_resamples=num_resamples, seed=seed)
    cis_dec = bootstrap_ci(y, d, s, threshold=0.5, num_resamples=num_resamples, seed=seed)
    metrics = {k: (ranked[k] if k in ("auc", "ap", "brier") else decided[k]) for k in METRICS}
    cis = {k: (cis_rank[k] if k in ("auc", "ap", "brier") else cis_dec[k]) for k in METRICS}
    return {"metrics": {**metrics, "n": int(y.size), "n_positive": int(y.sum())}, "ci95": cis,
            "thresholds": thresholds}
