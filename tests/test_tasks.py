"""The task registry: labels, which samples take part, subject scores, augmentations and names come from it."""

from __future__ import annotations

import typing

import pandas as pd
import pytest

from stroke_tss.config.training import PhaseSection, TrainSection
from stroke_tss.errors import UserError
from stroke_tss.schedule import phase_datasets
from stroke_tss.tasks import LABEL_AUGMENTATIONS, TASKS, get_task, subject_labels, task_samples
from tests.test_data import make_store

TABLE = pd.DataFrame({
    "subject_id": ["a", "b", "c", "d", "e"],
    "lesion_left": [True, False, None, False, True],
    "lesion_right": [False, False, None, True, True],
    "stroke_side": ["left", "none", "right", "right", "bilateral"],
    "onset_to_mri_min": [100, 50, 250, None, 200],
    "mrs_90d": [1, None, 4, 3, 0],
})


def test_task_labels_follow_the_subjects_table():
    lesion, skipped = task_samples(TABLE, "lesion_present")
    assert skipped == 0 and len(lesion) == 10
    # c has no mask flags: stroke_side decides
    assert {(s.subject_id, s.hemisphere): s.label for s in lesion}[("c", "right")] == 1
    tss, skipped = task_samples(TABLE, "tss_lt_3h")
    # b has no lesion half, d no known onset: both skipped; e contributes both halves
    assert skipped == 2
    assert [(s.subject_id, s.hemisphere, s.label) for s in tss] == [
        ("a", "left", 1), ("c", "right", 0), ("e", "left", 0), ("e", "right", 0)]
    assert [s.label for s in task_samples(TABLE, "tss_lt_4h5")[0]] == [1, 1, 1, 1]
    mrs, skipped = task_samples(TABLE, "mrs_gt_2")
    assert skipped == 1 and [(s.hemisphere, s.label) for s in mrs] == [("both", 0), ("both", 1), ("both", 1), ("both", 0)]


def test_segmentation_takes_every_hemisphere_of_subjects_with_a_lesion_mask():
    """lesion_seg: both halves of each subject whose store row has a lesion mask, labelled by lesion presence
    (the max-probability score is judged against it) and asking the dataset for the mask; no mask: skipped."""
    table = TABLE.assign(has_lesion_mask=[True, True, False, True, True])
    seg, skipped = task_samples(table, "lesion_seg")
    assert skipped == 1 and all(s.mask for s in seg)
    assert [(s.subject_id, s.hemisphere, s.label) for s in seg] == [
        ("a", "left", 1), ("a", "right", 0), ("b", "left", 0), ("b", "right", 0), ("d", "left", 0),
        ("d", "right", 1), ("e", "left", 1), ("e", "right", 1)]
    assert not any(s.mask for s in task_samples(table, "lesion_present")[0])


def test_task_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'tss_lt_6h'"):
        task_samples(TABLE, "tss_lt_6h")
    with pytest.raises(ValueError, match=r"\['zz'\] are in the splits"):
        task_samples(TABLE, "lesion_present", ["a", "zz"])


def test_clinical_labels_agree_with_the_samples_of_every_task():
    for name, task in TASKS.items():
        if task.column is None:
            continue
        labels = subject_labels(TABLE, name)
        per_subject = {s.subject_id: s.label for s in task_samples(TABLE, name)[0]}
        assert {sid: int(labels[sid]) for sid in per_subject} == per_subject, name


def test_the_config_accepts_exactly_the_registered_tasks():
    assert set(typing.get_args(PhaseSection.model_fields["task"].annotation)) == set(TASKS)
    with pytest.raises(UserError, match="unknown task 'tss_lt_6h'; choose one of lesion_present"):
        get_task("tss_lt_6h")


def test_a_phase_trains_with_only_the_augmentations_its_labels_survive(tmp_path):
    from data_prep.store import open_store
    from stroke_tss.config import Config

    store = open_store(make_store(tmp_path / "s.zarr"))
    ids = list(store.subject_ids)
    subjects = {"train": ids[:6], "val": ids[6:9], "test": ids[9:]}
    cfg = Config(data={"store": store.path}, run={"dir": tmp_path / "run"},
                 train=TrainSection(augment={"lesion_swap": 0.5, "lesion_transplant": 0.5, "noise_std": 0.1}))
    for name in ("lesion_present", "lesion_seg", "tss_lt_4h5"):
        datasets = phase_datasets(cfg, PhaseSection(task=name), subjects, store, where="test")
        kept = {k for k in LABEL_AUGMENTATIONS if getattr(datasets["train"], k)}
        assert kept == set(get_task(name).augmentations), name
        assert datasets["train"].augment == {"noise_std": 0.1}
        assert not datasets["val"].augment and not datasets["val"].lesion_swap


def test_subject_scores_follow_the_registry():
    from stroke_tss.metrics import phase_metrics

    pred = pd.DataFrame({"subject_id": ["a", "a", "b", "b"] * 2, "hemisphere": ["left", "right"] * 4,
                         "label": [1, 0, 0, 0] * 2, "probability": [0.9, 0.1, 0.3, 0.2] * 2,
                         "split": ["val"] * 4 + ["test"] * 4})
    lesion = phase_metrics(pred.assign(task="lesion_present"))["subject"]["test"]
    onset = phase_metrics(pred.assign(task="tss_lt_4h5"))["subject"]["test"]
    # a: max 0.9 vs mean 0.5 against b: max 0.3 vs mean 0.25; both rank a first, but the brier scores differ
    assert lesion["brier"] == pytest.approx(((0.9 - 1) ** 2 + 0.3 ** 2) / 2)
    assert onset["brier"] == pytest.approx(((0.5 - 1) ** 2 + 0.25 ** 2) / 2)


def test_only_a_mask_task_trains_the_segmentation_head():
    assert get_task("lesion_seg").idle_groups == []
    for name in ("lesion_present", "tss_lt_3h", "tss_lt_4h5", "mrs_gt_2"):
        assert get_task(name).idle_groups == ["seg_head"], name
