"""Model comparison and reader statistics: fast DeLong, Fleiss' kappa, reader reads, logistic baselines.

Per-prediction metrics, Youden thresholds and bootstrap CIs live in `stroke_tss.metrics`; this module adds
what compares two scores, several readers, or a clinical baseline against the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stroke_tss.metrics import binary_metrics, bootstrap_ci


def _labels_scores(y, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"scores have {s.shape[1]} columns but there are {y.size} labels")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("DeLong needs both classes among the labels")
    return y, s


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their covariance (k, k) for k score rows on the same samples (Sun & Xu 2014).

    Midranks replace the O(m n) pairwise comparisons: with positives X and negatives Y, the structural
    components are V10 = (rank of X in X+Y - rank of X in X) / n and V01 = 1 - (rank of Y in X+Y - rank of Y
    in Y) / m, all k rows at once.
    """
    y, s = _labels_scores(y, scores)
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tz = sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    tx = sps.rankdata(pos, axis=1)
    ty = sps.rankdata(neg, axis=1)
    aucs = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y, p1, p2) -> dict[str, float]:
    """Two-sided DeLong test of AUC(p1) == AUC(p2) on the same samples; p = 1 when the scores coincide."""
    aucs, cov = delong_covariance(y, np.vstack([np.ravel(p1), np.ravel(p2)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(var)
        p = float(2 * sps.norm.sf(abs(z)))
    return {"auc_1": float(aucs[0]), "auc_2": float(aucs[1]), "difference": diff,
            "se": float(np.sqrt(max(var, 0.0))), "z": float(z), "p_value": p}


def category_counts(ratings) -> np.ndarray:
    """(subjects, raters) categorical ratings -> (subjects, categories) counts; rows with a missing read dropped."""
    r = pd.DataFrame(np.asarray(ratings, dtype=object)).dropna()
    if r.empty:
        raise ValueError("no subject has a read from every reader")
    codes, _ = pd.factorize(r.to_numpy().ravel())
    codes = codes.reshape(r.shape)
    return np.stack([(codes == c).sum(1) for c in range(codes.max() + 1)], axis=1)


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from a (subjects, categories) table of how many raters chose each category."""
    c = np.asarray(counts, dtype=np.float64)
    raters = c.sum(1)
    if c.ndim != 2 or raters.min() != raters.max() or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every subject")
    n = raters[0]
    agreement = ((c * c).sum(1) - n) / (n * (n - 1))
    share = c.sum(0) / c.sum()
    chance = float((share**2).sum())
    if chance == 1.0:
        return float("nan")  # every read in one category: kappa undefined
    return float((agreement.mean() - chance) / (1 - chance))


def majority_read(reads: pd.DataFrame) -> pd.Series:
    """Majority of binary reads per subject over the readers who read it; NaN on a tie or no read."""
    votes = reads.mean(axis=1, skipna=True)
    out = (votes > 0.5).astype(float)
    out[votes.isna() | (votes == 0.5)] = np.nan
    return out


def reader_performance(labels: pd.Series, reads: pd.DataFrame, *, num_resamples: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """Sensitivity, specificity, accuracy (with subject-bootstrap 95% CIs) of each reader and the majority.

    `labels` and `reads` share a subject index; a read of 1 means the reader calls the positive class (for
    the DWI-FLAIR mismatch: "mismatch present", i.e. predicts TSS < 4.5 h). Subjects without a label or a
    read are left out of that reader's row.
    """
    table = reads.copy()
    table["majority"] = majority_read(reads)
    rows = []
    for reader in table.columns:
        both = pd.concat([labels.rename("y"), table[reader].rename("r")], axis=1).dropna()
        if both.empty or both["y"].nunique() < 2:
            continue
        y, r = both["y"].to_numpy(), both["r"].to_numpy()
        m = binary_metrics(y, r, threshold=0.5)
        ci = bootstrap_ci(y, r, both.index.astype(str), threshold=0.5, num_resamples=num_resamples, seed=seed)
        row = {"reader": reader, "n": m["n"], "n_positive": m["n_positive"]}
        for k in ("sensitivity", "specificity", "accuracy"):
            row.update({k: m[k], f"{k}_lo": ci[k][0], f"{k}_hi": ci[k][1]})
        rows.append(row)
    return pd.DataFrame(rows)


def lesion_flair_ratio(flair: np.ndarray, lesion: np.ndarray, brain: np.ndarray, *,
                       offset: float = 0.0) -> float:
    """Mean FLAIR in the lesion over the mean in its mirror image across the midline (x = last axis).

    The mirror region excludes lesion voxels and voxels outside the brain. `offset` is added to both means
    first: for a z-scored volume, mean/std of the raw intensities puts the ratio back on the raw scale.
    """
    lesion = lesion > 0
    mirror = lesion[..., ::-1] & ~lesion & (brain > 0)
    if not lesion.any() or not mirror.any():
        return float("nan")
    return float((flair[lesion].mean() + offset) / (flair[mirror].mean() + offset))


def logistic_baseline(features: pd.DataFrame, labels, *, num_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of a standardised logistic regression on `features` (stratified k-fold)."""

    y = np.asarray(labels).astype(int)
    x = np.asarray(features, dtype=np.float64).reshape(len(y), -1)
    if not np.isfinite(x).all():
        raise ValueError("baseline features hold NaN or inf; drop those subjects first")
    folds = min(num_folds, int(np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise ValueError("a logistic baseline needs at least 2 subjects of each class")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
