"""The onset ceiling on a generated store: each part equals a computation that shares none of its code (the
hemispheres read flipped as the networks read them, AUC by counting pairs, the logistic regression on
features standardised by hand), the ceiling is the best part, and a store without masks gives none."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from sklearn.linear_model import LogisticRegression

from stroke_tss.report.ceiling import run_ceilings, task_ceiling
from stroke_tss.splits import make_splits
from stroke_tss.tasks import subject_strata
from tests.onset_store import fake_run, onset_store

CUTOFF = {"tss_lt_3h": 180.0, "tss_lt_4h5": 270.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return onset_store(tmp_path_factory.mktemp("ceiling") / "store.zarr", num_subjects=40, seed=5)


def pair_auc(y, score) -> float:
    pos, neg = score[y == 1], score[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def hemisphere_rows(store, subjects, task):
    """(features over all channels, labels) of the lesion halves with an onset and a non-empty mask."""
    table = store.table.set_index("subject_id")
    x, y = [], []
    for sid in subjects:
        row = table.loc[sid]
        if np.isnan(row["onset_to_mri_min"]):
            continue
        lesion = store.lesion(sid)
        half = lesion.shape[-1] // 2
        for side in ("left", "right"):
            mask = lesion[..., :half] if side == "left" else lesion[..., half:][..., ::-1]
            if not row[f"lesion_{side}"] or not mask.any():
                continue
            x.append(store.hemisphere(sid, side)[:, mask > 0].mean(axis=1))
            y.append(int(row["onset_to_mri_min"] < CUTOFF[task]))
    return np.array(x), np.array(y)


def by_hand(store, splits, task, inputs):
    x, y, probs = [], [], []
    for fold in splits["folds"]:
        x_train, y_train = hemisphere_rows(store, fold["train"] + fold["val"], task)
        x_test, y_test = hemisphere_rows(store, fold["test"], task)
        mean, std = x_train[:, inputs].mean(axis=0), x_train[:, inputs].std(axis=0)
        model = LogisticRegression().fit((x_train[:, inputs] - mean) / std, y_train)
        probs.append(model.predict_proba((x_test[:, inputs] - mean) / std)[:, 1])
        x.append(x_test)
        y.append(y_test)
    x, y = np.concatenate(x), np.concatenate(y)
    dwi, b0, flair = x.T
    return {"flair": pair_auc(y, -flair), "b0": pair_auc(y, -b0), "flair_b0": pair_auc(y, -(flair + b0)),
            "logistic": pair_auc(y, np.concatenate(probs))}, y


def test_ceiling_parts_equal_an_independent_computation_and_the_best_wins(store):
    splits = make_splits(store.subject_ids, num_folds=3, seed=1, strata=subject_strata(store.table, "tss_lt_4h5"))
    best = {}
    for task in ("tss_lt_4h5", "tss_lt_3h"):
        got = task_ceiling(store, splits, task)
        want, y = by_hand(store, splits, task, inputs=[0, 1, 2])
        assert got["parts"] == pytest.approx(want, abs=1e-9), task
        assert got["ceiling"] == max(want.values()) and got["parts"][got["best"]] == got["ceiling"]
        assert (got["n"], got["n_positive"]) == (y.size, y.sum())
        assert got["hemispheres_without_mask"] == 1  # sub-01's flagged left half has no mask voxel
        best[task] = got["best"]
    # on this store the fitted readout wins one task and a single unfitted mean the other: the ceiling is the
    # best part either way, never the fitted one by rule
    assert best == {"tss_lt_4h5": "logistic", "tss_lt_3h": "b0"}


def test_run_ceilings_use_the_runs_folds_and_input_channels(store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    splits = fake_run(run, store.path, num_folds=2, seed=5, channels=["dwi", "flair"],
                      phases={"2d": {"tss4h5": "tss_lt_4h5"}})
    got = run_ceilings(run)["tss_lt_4h5"]
    want, _ = by_hand(store, splits, "tss_lt_4h5", inputs=[0, 2])
    assert got["parts"] == pytest.approx(want, abs=1e-9)
    assert got["channels"] == ["dwi", "flair"]
    # a partly finished run: the ceiling scores the folds that have test predictions
    only = run_ceilings(run, folds=[1])["tss_lt_4h5"]
    assert only["n"] == hemisphere_rows(store, splits["folds"][1]["test"], "tss_lt_4h5")[1].size < got["n"]


def test_a_store_without_lesion_masks_has_no_ceiling(tmp_path):
    bare = onset_store(tmp_path / "bare.zarr", num_subjects=12, masks=False)
    run = tmp_path / "run"
    run.mkdir()
    fake_run(run, bare.path, num_folds=2, phases={"2d": {"tss4h5": "tss_lt_4h5"}})
    for task, entry in run_ceilings(run).items():
        assert entry == {"ceiling": None, "reason": f"store {bare.path} has no lesion masks"}, task


def test_a_damaged_store_or_unknown_channel_gives_no_ceiling_with_the_reason(tmp_path, caplog):
    """Summary, collect and report compute the ceiling after all the training: a missing chunk or a channel
    the store lacks must become None with the reason and a warning, never an exception that loses the run's
    tables."""
    from data_prep.store import chunk_files
    from stroke_tss.tasks import task_samples

    store = onset_store(tmp_path / "store.zarr", num_subjects=12)
    run = tmp_path / "run"
    run.mkdir()
    fake_run(run, store.path, num_folds=2, phases={"2d": {"tss4h5": "tss_lt_4h5"}}, channels=["dwi", "nope"])
    for task, entry in run_ceilings(run).items():
        assert entry["ceiling"] is None and "channels ['nope'] not in its channels" in entry["reason"], task
    assert "no tss_lt_4h5 ceiling: store" in caplog.text

    fake_run(run, store.path, num_folds=2, phases={}, channels=["dwi", "flair"])
    sid = task_samples(store.table, "tss_lt_4h5")[0][0].subject_id
    row = int(store.table.set_index("subject_id").at[sid, "index"])
    chunk_files(store.path, zarr.open_group(store.path, mode="r")["volumes"], row)[0].unlink()
    for task, entry in run_ceilings(run).items():
        assert entry["ceiling"] is None and "chunk file(s) missing" in entry["reason"], (task, entry)
        assert sid in entry["reason"]
