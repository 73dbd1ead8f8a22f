"""DeLong against a subject bootstrap and scikit-learn, Fleiss' kappa against Fleiss/Wikipedia, readers, baselines."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from stroke_tss import stats

# Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories; kappa = 0.210.
WIKI = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def _correlated_scores(n=300, seed=0, gap=0.4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)  # correlates the two models, as two variants on the same subjects are
    p1 = y * 1.0 + shared + 0.8 * rng.normal(size=n)
    p2 = y * (1.0 - gap) + shared + 0.8 * rng.normal(size=n)
    return y, p1, np.round(p2, 1)  # rounding puts ties in, which the midranks must handle


def _auc_rows(y, p):
    """Mann-Whitney AUC of each row (the bootstrap's resamples), ties counted half."""
    ranks = rankdata(p, axis=1)
    m = y.sum(1)
    return ((ranks * y).sum(1) - m * (m + 1) / 2) / (m * (y.shape[1] - m))


def test_delong_aucs_equal_sklearn_and_variance_matches_bootstrap():
    y, p1, p2 = _correlated_scores()
    res = stats.delong_test(y, p1, p2)
    assert res["auc_1"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert res["auc_2"] == pytest.approx(roc_auc_score(y, p2), abs=1e-12)
    idx = np.random.default_rng(1).integers(0, y.size, (2000, y.size))
    diffs = _auc_rows(y[idx], p1[idx]) - _auc_rows(y[idx], p2[idx])
    se_boot = np.std(diffs, ddof=1)
    assert res["se"] == pytest.approx(se_boot, rel=0.15)
    p_boot = 2 * (1 - norm.cdf(abs(res["difference"]) / se_boot))
    assert res["p_value"] == pytest.approx(p_boot, abs=0.03)
    assert res["p_value"] < 0.05  # the gap is real


def test_delong_identical_scores_give_p_one_and_the_null_rejects_at_its_level():
    y, p1, _ = _correlated_scores(seed=3)
    assert stats.delong_test(y, p1, p1)["p_value"] == 1.0
    # Two equally good models: the test must reject about 5% of the time at alpha 0.05, no more.
    rejections = [stats.delong_test(*_correlated_scores(n=120, seed=s, gap=0.0))["p_value"] < 0.05
                  for s in range(400)]
    assert 0.02 <= np.mean(rejections) <= 0.09


def test_delong_rejects_single_class():
    with pytest.raises(ValueError, match="both classes"):
        stats.delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_fleiss_kappa_wikipedia_example():
    assert stats.fleiss_kappa(WIKI) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_from_ratings_perfect_and_unequal_raters():
    ratings = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert stats.fleiss_kappa(stats.category_counts(ratings)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number"):
        stats.fleiss_kappa([[2, 1], [1, 1]])


def test_category_counts_drops_subjects_with_a_missing_read():
    counts = stats.category_counts([[1, 0, 1], [0, np.nan, 0], [0, 0, 0]])
    assert counts.shape == (2, 2) and (counts.sum(1) == 3).all()


def test_reader_performance_matches_sklearn_and_majority():
    rng = np.random.default_rng(0)
    y = pd.Series(rng.integers(0, 2, 60), index=[f"s{i}" for i in range(60)])
    reads = pd.DataFrame({f"reader_{k}": np.where(rng.random(60) < 0.8, y, 1 - y) for k in (1, 2, 3)},
                         index=y.index).astype(float)
    table = stats.reader_performance(y, reads, num_resamples=200).set_index("reader")
    assert list(table.index) == ["reader_1", "reader_2", "reader_3", "majority"]
    for reader in ("reader_1", "majority"):
        r = reads[reader] if reader != "majority" else (reads.sum(1) >= 2).astype(float)
        assert table.loc[reader, "sensitivity"] == pytest.approx(recall_score(y, r))
        assert table.loc[reader, "specificity"] == pytest.approx(recall_score(1 - y, 1 - r))
        assert table.loc[reader, "accuracy"] == pytest.approx(accuracy_score(y, r))
        assert table.loc[reader, "accuracy_lo"] <= table.loc[reader, "accuracy"] <= table.loc[reader, "accuracy_hi"]


def test_majority_read_tie_is_missing():
    reads = pd.DataFrame({"a": [1.0, 1.0, np.nan], "b": [0.0, 1.0, np.nan]})
    assert stats.majority_read(reads).tolist()[:2] == [pytest.approx(np.nan, nan_ok=True), 1.0]


def test_lesion_flair_ratio_on_a_bright_lesion():
    flair = np.ones((4, 6, 8), np.float32)
    lesion = np.zeros((4, 6, 8), np.uint8)
    lesion[1:3, 2:4, 1:3] = 1
    flair[lesion > 0] = 1.5
    brain = np.ones_like(lesion)
    assert stats.lesion_flair_ratio(flair, lesion, brain) == pytest.approx(1.5)
    assert np.isnan(stats.lesion_flair_ratio(flair, np.zeros_like(lesion), brain))


def test_logistic_baseline_learns_a_volume_threshold_out_of_fold():
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 100, 80)
    y = (volume + rng.normal(0, 10, 80) < 50).astype(int)  # small lesions are early, as in the phantom
    p = stats.logistic_baseline(pd.DataFrame({"volume_ml": volume}), y, seed=0)
    assert p.shape == (80,) and ((0 <= p) & (p <= 1)).all()
    assert roc_auc_score(y, p) > 0.85
    with pytest.raises(ValueError, match="2 subjects of each class"):
        stats.logistic_baseline(pd.DataFrame({"v": [1.0, 2.0, 3.0]}), [0, 0, 1])
