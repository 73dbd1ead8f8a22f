"""The 90-day outcome configuration: leave-one-site-out folds, oversampling by outcome x lesion side, the
ensemble as the mean of its members, and a small cv run of configs/outcome3d.yaml with its report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hpc.sampler import ShardedSampler
from stroke_tss.config import load_config
from stroke_tss.data import StoreDataset
from stroke_tss.errors import UserError
from stroke_tss.runs.ensemble import mean_predictions
from stroke_tss.tasks import task_samples

SMALL = ["train.stopping.max_epochs=1", "train.max_steps_per_epoch=2", "train.num_workers=0", "train.threads=1",
         "train.batch_size=2"]


def _cli(*args: str) -> int:
    from stroke_tss.cli import main

    return main(list(args))


def _table(store):
    from data_prep.store import open_store

    return open_store(store).table


def test_leave_one_site_out_never_puts_a_site_in_train_and_test(tiny_store, tmp_path):
    from stroke_tss.splits import ensure_splits

    cfg = load_config("configs/outcome3d.yaml", [f"data.store={tiny_store}", f"run.dir={tmp_path}"])
    splits = ensure_splits(cfg, _table(tiny_store))
    table = _table(tiny_store)
    site_of = dict(zip(table["subject_id"], table["site"].astype(str)))
    sites = sorted(set(site_of.values()))
    assert len(sites) >= 2 and len(splits["folds"]) == len(sites)
    tested = []
    for fold in splits["folds"]:
        test_sites = {site_of[s] for s in fold["test"]}
        seen_sites = {site_of[s] for s in fold["train"] + fold["val"]}
        assert len(test_sites) == 1 and not test_sites & seen_sites
        tested += fold["test"]
    assert sorted(tested) == sorted(site_of)  # pooled out-of-site predictions cover every subject once


def test_oversampling_balances_outcome_by_lesion_side(tiny_store):
    samples, _ = task_samples(_table(tiny_store), "mrs_gt_2")
    ds = StoreDataset(tiny_store, samples, channels=["dwi"])
    classes = ds.oversample_classes("label_and_side")
    pairs = {(s.label, s.side) for s in samples}
    assert len(np.unique(classes)) == len(pairs) > 2  # outcome x side, not outcome alone
    drawn = classes[list(ShardedSampler(classes, oversample=True, seed=1))]
    counts = np.bincount(drawn)
    assert counts.min() == counts.max() == np.bincount(classes).max()
    assert (ds.oversample_classes("label") == ds.labels).all()


def _member(seed: int, order: list[int]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(f"sub-{i}", "both", "mrs_gt_2", i % 2, rng.uniform(), "val" if i < 3 else "test") for i in range(6)]
    frame = pd.DataFrame(rows, columns=["subject_id", "hemisphere", "task", "label", "probability", "split"])
    return frame.iloc[order].reset_index(drop=True)


def test_ensemble_probability_is_the_members_mean_per_sample_in_any_row_order():
    a, b = _member(1, [0, 1, 2, 3, 4, 5]), _member(2, [5, 3, 1, 0, 2, 4])
    mean = mean_predictions({"a": a, "b": b}).set_index("subject_id")
    expected = (a.set_index("subject_id")["probability"] + b.set_index("subject_id")["probability"]) / 2
    assert np.allclose(mean["probability"], expected.loc[mean.index])
    assert (mean["label"] == a.set_index("subject_id")["label"].loc[mean.index]).all()
    with pytest.raises(UserError, match="other samples"):
        mean_predictions({"a": a, "b": b.iloc[1:]})


def test_an_ensemble_skips_a_phase_whose_members_predict_different_tasks(tmp_path, caplog):
    """2d's and 2d_seg's lesion phases share the name but not the task (lesion_present, lesion_seg on the
    masked subjects only): the ensemble leaves that phase out, says so, and still averages the shared ones."""
    import logging

    from stroke_tss.runs.ensemble import write_ensemble

    def write(variant: str, phase: str, frame: pd.DataFrame) -> None:
        folder = tmp_path / variant / "fold-0" / phase
        folder.mkdir(parents=True)
        frame.assign(hemisphere="left").to_csv(folder / "predictions.csv", index=False)

    write("2d", "lesion", _member(1, list(range(6))).assign(task="lesion_present"))
    write("2d_seg", "lesion", _member(2, list(range(1, 6))).assign(task="lesion_seg"))
    write("2d", "tss4h5", _member(3, list(range(6))).assign(task="tss_lt_4h5"))
    write("2d_seg", "tss4h5", _member(4, list(range(6))).assign(task="tss_lt_4h5"))
    with caplog.at_level(logging.INFO, logger="stroke_tss.runs.ensemble"):
        written = write_ensemble(tmp_path, "both", ["2d", "2d_seg"])
    assert written == [tmp_path / "both" / "fold-0" / "tss4h5"]
    assert ("ensemble both: fold-0/lesion skipped: its members predict different tasks "
            "(2d: lesion_present; 2d_seg: lesion_seg)") in caplog.text


@pytest.mark.integration
def test_outcome_cv_writes_the_ensemble_and_the_report_shows_it_with_the_baseline(tiny_store, tmp_path):
    run = tmp_path / "run"
    # local processes: each fold's items are pickled and run in another process, as on Slurm
    assert _cli("cv", "configs/outcome3d.yaml", f"data.store={tiny_store}", f"run.dir={run}", "--executor", "local",
                "launch.array_parallelism=2",
                "--variant", "light0", "--variant", "light4", "ensembles.ensemble=[light0, light4]", *SMALL) == 0
    folds = json.loads((run / "splits.json").read_text())["folds"]
    # every (variant, fold) item was pickled and ran in a process of its own
    assert len(list((run / "jobs" / "submitit").glob("*_result.pkl"))) == 2 * len(folds)
    for k in range(len(folds)):
        members = [pd.read_csv(run / v / f"fold-{k}" / "outcome" / "predictions.csv") for v in ("light0", "light4")]
        ensemble = pd.read_csv(run / "ensemble" / f"fold-{k}" / "outcome" / "predictions.csv")
        key = ["subject_id", "split"]
        joined = ensemble.merge(members[0], on=key, suffixes=("", "_a")).merge(members[1], on=key, suffixes=("", "_b"))
        assert len(joined) == len(ensemble) == len(members[0])
        assert np.allclose(joined["probability"], (joined["probability_a"] + joined["probability_b"]) / 2)
        assert set(ensemble.query("split == 'test'")["subject_id"]) == set(folds[k]["test"])
    summary = json.loads((run / "summary.json").read_text())
    entry = summary["ensemble/outcome"]
    assert entry["num_folds"] == len(folds) and entry["subject"]["n"] == sum(len(f["test"]) for f in folds)
    assert len(entry["subject"]["ci95"]["auc"]) == 2
    assert _cli("report", str(run), "--resamples", "200") == 0
    report = (run / "report.md").read_text()
    table2 = report.split("## Table 2 — subject level")[1].split("##")[0]
    assert "| ensemble | outcome | mrs_gt_2 |" in table2
    baselines = report.split("## Baselines")[1]
    assert "| mrs_gt_2 | logistic(lesion_volume_ml) |" in baselines
