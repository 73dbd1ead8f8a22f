"""Subject-level splits: property tests (hypothesis) and the write-once splits file."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stroke_tss.splits import fold_of, make_splits, read_splits, write_splits_once

cohorts = st.integers(min_value=6, max_value=60).flatmap(
    lambda n: st.tuples(st.just([f"sub-{i:03d}" for i in range(n)]),
                        st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n),
                        st.lists(st.sampled_from(["A", "B", "C"]), min_size=n, max_size=n),
                        st.integers(2, 5), st.integers(0, 2**31)))


@settings(max_examples=60, deadline=None)
@given(cohorts)
def test_kfold_tests_every_subject_exactly_once_and_never_mixes_roles(cohort):
    ids, labels, _, k, seed = cohort
    splits = make_splits(ids, strata=labels, num_folds=k, seed=seed)
    tested = Counter(s for f in splits["folds"] for s in f["test"])
    assert set(tested) == set(ids) and set(tested.values()) == {1}
    for f in splits["folds"]:
        # Splits are lists of subjects, so a subject's two hemispheres can only travel together.
        roles = [set(f["train"]), set(f["val"]), set(f["test"])]
        assert sum(len(r) for r in roles) == len(ids) == len(set().union(*roles))
        assert f["val"]
    sizes = [len(f["test"]) for f in splits["folds"]]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(cohorts)
def test_kfold_is_stratified_and_seeded(cohort):
    ids, labels, _, k, seed = cohort
    splits = make_splits(ids, strata=labels, num_folds=k, seed=seed)
    assert splits == make_splits(ids, strata=labels, num_folds=k, seed=seed)
    label_of = dict(zip(ids, labels))
    positives = [sum(label_of[s] for s in f["test"]) for f in splits["folds"]]
    assert max(positives) - min(positives) <= 1


@settings(max_examples=40, deadline=None)
@given(cohorts)
def test_leave_one_site_out_tests_each_site_alone(cohort):
    ids, labels, sites, _, seed = cohort
    if len(set(sites)) < 2:
        with pytest.raises(ValueError, match="two sites"):
            make_splits(ids, kind="loso", strata=labels, sites=sites, seed=seed)
        return
    splits = make_splits(ids, kind="loso", strata=labels, sites=sites, seed=seed)
    site_of = dict(zip(ids, sites))
    assert [f["site"] for f in splits["folds"]] == sorted(set(sites))
    for f in splits["folds"]:
        assert {site_of[s] for s in f["test"]} == {f["site"]}
        assert f["site"] not in {site_of[s] for s in f["train"] + f["val"]}
    assert sorted(s for f in splits["folds"] for s in f["test"]) == sorted(ids)


def test_holdout_is_64_16_20_per_stratum():
    ids = [f"s{i}" for i in range(100)]
    labels = [i % 2 for i in range(100)]
    (fold,) = make_splits(ids, kind="holdout", strata=labels, seed=3)["folds"]
    assert (len(fold["train"]), len(fold["val"]), len(fold["test"])) == (64, 16, 20)
    assert sum(int(s[1:]) % 2 for s in fold["test"]) == 10


def test_splits_file_is_written_once_and_reused(tmp_path):
    path = tmp_path / "run" / "splits.json"
    first = write_splits_once(path, make_splits([f"s{i}" for i in range(10)], num_folds=2, seed=1))
    second = write_splits_once(path, make_splits([f"s{i}" for i in range(10)], num_folds=2, seed=2))
    assert first == second == read_splits(path) == json.loads(path.read_text())
    assert list(tmp_path.joinpath("run").iterdir()) == [path]


def test_split_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="between 2 and the number of subjects"):
        make_splits(["a", "b"], num_folds=3)
    with pytest.raises(ValueError, match="repeat"):
        make_splits(["a", "a", "b"], num_folds=2)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        fold_of(make_splits(["a", "b", "c", "d"], num_folds=2), 2)
    bad = tmp_path / "splits.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_splits(bad)
