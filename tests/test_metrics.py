"""Metrics against scikit-learn, Youden thresholds, subject-level scores and the subject bootstrap."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from stroke_tss.metrics import (
    binary_metrics,
    bootstrap_ci,
    phase_metrics,
    pooled_metrics,
    sensitivity_at_specificity,
    split_metrics,
    subject_scores,
    youden_threshold,
)


def _data(n=60, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1)
    return y, (np.round(p, 1) if ties else p)


@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_match_scikit_learn(ties):
    y, p = _data(ties=ties)
    t = 0.5
    m = binary_metrics(y, p, threshold=t)
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert (m["n"], m["n_positive"]) == (len(y), int(y.sum()))


@pytest.mark.parametrize("ties", [False, True])
def test_youden_threshold_maximises_j_on_the_roc_curve(ties):
    y, p = _data(seed=3, ties=ties)
    fpr, tpr, thr = skm.roc_curve(y, p)
    best = (tpr - fpr).max()
    t = youden_threshold(y, p)
    m = binary_metrics(y, p, threshold=t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(best)
    assert t in set(thr[1:])


def test_one_class_metrics_are_none_not_errors():
    m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], threshold=0.5)
    assert m["auc"] is None and m["specificity"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1], [0.1, 0.2])


def test_sensitivity_at_fixed_specificity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.6, 0.7, 0.9])
    sens, t = sensitivity_at_specificity(y, p, specificity=0.75)
    assert (sens, t) == (1.0, 0.4)
    sens, t = sensitivity_at_specificity(y, p, specificity=1.0)
    assert (sens, t) == (0.25, 0.9)


def test_subject_scores_pool_hemispheres():
    df = pd.DataFrame({"subject_id": ["a", "a", "b"], "hemisphere": ["left", "right", "left"],
                       "split": "test", "task": "t", "label": [0, 1, 0], "probability": [0.2, 0.8, 0.4]})
    s = subject_scores(df).set_index("subject_id")
    assert s.loc["a", "label"] == 1 and s.loc["a", "probability"] == pytest.approx(0.5)
    assert subject_scores(df, how="max").set_index("subject_id").loc["a", "probability"] == 0.8


@pytest.mark.parametrize("task, how", [("lesion_present", "max"), ("tss_lt_4h5", "mean")])
def test_phase_metrics_hold_subject_level_metrics_per_split(task, how):
    rng = np.random.default_rng(3)
    rows = []
    for split, n in (("val", 30), ("test", 40)):
        for k in range(n):
            y = int(rng.integers(0, 2))
            for side in ("left", "right"):
                rows.append((f"{split}-{k}", side, task, y * (side == "left" or how == "mean"),
                             float(np.clip(0.3 * y + rng.normal(0.4, 0.2), 0, 1)), split))
    pred = pd.DataFrame(rows, columns=["subject_id", "hemisphere", "task", "label", "probability", "split"])
    got = phase_metrics(pred)
    assert got["test"]["n"] == 80 and got["subject"]["test"]["n"] == 40
    test = pred[pred["split"] == "test"].groupby("subject_id").agg(label=("label", "max"), p=("probability", how))
    assert got["subject"]["test"]["auc"] == pytest.approx(skm.roc_auc_score(test["label"], test["p"]))
    val = pred[pred["split"] == "val"].groupby("subject_id").agg(label=("label", "max"), p=("probability", how))
    assert got["subject"]["val"]["threshold"] == youden_threshold(val["label"], val["p"])


def test_bootstrap_resamples_subjects_and_covers_the_estimate():
    y, p = _data(n=80, seed=5)
    subjects = np.repeat(np.arange(40), 2)  # two hemispheres per subject
    ci = bootstrap_ci(y, p, subjects, threshold=0.5, num_resamples=2000, seed=1)
    point = binary_metrics(y, p, threshold=0.5)
    for k in ("auc", "sensitivity", "specificity", "ap", "brier"):
        lo, hi = ci[k]
        assert lo < point[k] < hi, k
    # Reference: a plain loop over resampled subjects gives the same AUC interval (same generator draws).
    rng = np.random.default_rng(1)
    aucs = []
    for _ in range(2000):
        counts = rng.multinomial(40, np.full(40, 1 / 40))
        w = counts[subjects]
        keep = w > 0
        yy, pp = np.repeat(y[keep], w[keep]), np.repeat(p[keep], w[keep])
        if 0 < yy.sum() < yy.size:
            aucs.append(skm.roc_auc_score(yy, pp))
    assert ci["auc"] == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])))


def _fold(seed):
    y, p = _data(n=40, seed=seed)
    split = np.where(np.arange(40) < 20, "val", "test")
    return pd.DataFrame({"subject_id": [f"s{seed}-{i // 2}" for i in range(40)], "split": split,
                         "label": y, "probability": p})


def test_split_metrics_apply_the_validation_threshold_to_test():
    fold = _fold(1)
    out = split_metrics(fold)
    val = fold[fold.split == "val"]
    t = youden_threshold(val.label, val.probability)
    assert out["val"]["threshold"] == out["test"]["threshold"] == t
    test = fold[fold.split == "test"]
    assert out["test"]["auc"] == pytest.approx(skm.roc_auc_score(test.label, test.probability))


def test_pooled_out_of_fold_uses_each_folds_own_threshold():
    folds = [_fold(s) for s in (1, 2, 3)]
    out = pooled_metrics(folds, num_resamples=200)
    test = pd.concat([f[f.split == "test"] for f in folds])
    assert out["metrics"]["auc"] == pytest.approx(skm.roc_auc_score(test.label, test.probability))
    decided = np.concatenate([
        (f[f.split == "test"].probability >= t).astype(int) for f, t in zip(folds, out["thresholds"])])
    assert out["metrics"]["sensitivity"] == pytest.approx(skm.recall_score(test.label, decided))
    assert out["metrics"]["n"] == len(test) and len(out["thresholds"]) == 3
