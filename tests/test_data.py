"""Task labels from the subjects table, the store dataset, augmentation and the resumable sampler.

`make_store` writes a small real Zarr store with the store's own writer primitives: a bright DWI blob in
the lesion hemisphere, so detection is learnable in a few steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.store import half
from stroke_tss.data import StoreDataset, augment
from stroke_tss.tasks import Sample, task_samples

SHAPE_XYZ = (64, 32, 8)  # hemispheres 32 x 32 in-plane: the smallest slicewise2d accepts


def make_store(path, *, num_subjects: int = 12, seed: int = 0, spill: bool = False):
    """A 4 mm store of `num_subjects` with lesion blobs on the stroke side; `spill` adds one lesion voxel, under
    the store's lesioned threshold, to the healthy right half of each left-sided subject (flags unchanged)."""
    from data_prep.config import PrepConfig
    from data_prep.store import assemble_table, create_or_extend, write_record, write_subject

    config = PrepConfig(shape=SHAPE_XYZ, spacing_mm=4.0)
    ids = [f"sub-{i:02d}" for i in range(num_subjects)]
    rows = create_or_extend(path, config=config, subject_ids=ids)
    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE_XYZ
    sides = ["left", "right", "none", "bilateral"]
    for i, sid in enumerate(ids):
        side = sides[i % 4]
        volume = rng.normal(0, 1, (3, nz, ny, nx)).astype(np.float32)
        lesion = np.zeros((nz, ny, nx), np.uint8)
        for s, xs in (("left", slice(8, 20)), ("right", slice(44, 56))):
            if side in (s, "bilateral"):
                lesion[2:6, 10:20, xs] = 1
        if spill and side == "left":
            lesion[3, 15, 50] = 1
        volume[0][lesion > 0] += 3.0
        write_subject(path, rows[sid], volume=volume, brain=np.ones_like(lesion), lesion=lesion)
        onset = [60, 200, 300, None][(i // 2) % 4]
        write_record(path, {"subject_id": sid, "index": rows[sid], "has_lesion_mask": True,
                            "lesion_left": side in ("left", "bilateral"), "lesion_right": side in ("right", "bilateral"),
                            "stroke_side": side, "onset_to_mri_min": onset, "site": "AB"[i % 2],
                            "mrs_90d": i % 6})
    assemble_table(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def test_dataset_reads_flipped_hemispheres_from_a_real_store(store):
    from data_prep.store import open_store

    samples, _ = task_samples(open_store(store).table, "lesion_present", ["sub-00", "sub-01"])
    ds = StoreDataset(store, samples, channels=["dwi", "flair"])
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["x"].shape == (2, 8, 32, 32)
    # the lesion blob (bright DWI) is where the label says, in both halves after the flip
    for item, s in zip(items, samples):
        blob = item["x"][0, 2:6, 10:20, 8:20].mean().item()
        assert (blob > 2) == bool(s.label), (s, blob)
    with pytest.raises(ValueError, match="channels \\['adc'\\] not in"):
        StoreDataset(store, samples, channels=["adc"])


def test_lesion_swap_trades_lesions_with_the_mirror_half_and_relabels(store):
    from data_prep.store import open_store

    table = open_store(store).table
    samples, _ = task_samples(table, "lesion_present", ["sub-00", "sub-01", "sub-02", "sub-03"])  # L, R, none, both
    plain = StoreDataset(store, samples)
    swapped = StoreDataset(store, samples, augment={"lesion_swap": 1.0})
    for i, s in enumerate(samples):
        other = next(o for o in samples if o.subject_id == s.subject_id and o.hemisphere != s.hemisphere)
        item = swapped[i]
        assert int(item["y"]) == other.label, (s, int(item["y"]))
        blob = item["x"][0, 2:6, 10:20, 8:20].mean().item()
        assert (blob > 2) == bool(other.label), (s, blob)  # the DWI lesion moved with the label
        # far from both lesions the hemisphere is its own tissue, not the mirror half's
        assert torch.equal(item["x"][:, :, 24:, 24:], plain[i]["x"][:, :, 24:, 24:]), s
        if s.side == "none":
            assert torch.equal(item["x"], plain[i]["x"]), s
    half = StoreDataset(store, samples, augment={"lesion_swap": 0.5}, seed=1)
    relabelled = []
    for epoch in range(8):
        half.set_epoch(epoch)
        relabelled += [int(half[i]["y"]) != s.label for i, s in enumerate(samples) if s.side in ("left", "right")]
    assert 0.25 < np.mean(relabelled) < 0.75, relabelled  # about half of the one-sided subjects' items
    mrs, _ = task_samples(table, "mrs_gt_2", ["sub-00"])
    with pytest.raises(ValueError, match="lesion_swap"):
        StoreDataset(store, mrs, augment={"lesion_swap": 0.5})


def test_lesion_transplant_carves_the_lesion_into_another_subjects_healthy_half(store):
    from data_prep.store import open_store

    st = open_store(store)
    samples, _ = task_samples(st.table, "tss_lt_4h5")
    moved = StoreDataset(store, samples, augment={"lesion_transplant": 1.0}, seed=2)
    one_sided = {s.subject_id for s in samples if s.side in ("left", "right")}
    for i, s in enumerate(samples):
        item = moved[i]
        assert int(item["y"]) == s.label, s  # the onset label travels with the lesion
        own = st.hemisphere(s.subject_id, s.hemisphere)
        core = np.zeros(own.shape[1:], bool)
        core[3:5, 12:18, 10:18] = True  # inside the lesion on the mirrored grid, away from the soft edge
        assert np.allclose(item["x"].numpy()[:, core], own[:, core], atol=1e-3), s
        # outside the lesion: the healthy half of some other one-sided subject, not this brain
        outside = item["x"].numpy()[:, :, 24:, 24:]
        donors = [sid for sid in one_sided - {s.subject_id} for side in ("left", "right")
                  if np.allclose(outside, st.hemisphere(sid, side)[:, :, 24:, 24:])
                  and st.table.set_index("subject_id").loc[sid, "stroke_side"] != side]
        assert len(donors) == 1, (s, donors)
    with pytest.raises(ValueError, match="lesion_transplant"):
        StoreDataset(store, task_samples(st.table, "mrs_gt_2")[0], augment={"lesion_transplant": 0.5})


def test_augmentation_is_seeded_per_item_and_epoch(store):
    from data_prep.store import open_store

    samples, _ = task_samples(open_store(store).table, "lesion_present", ["sub-00"])
    ds = StoreDataset(store, samples, augment={"gamma": (0.9, 1.1), "rotate_z_deg": 15, "noise_std": 0.1}, seed=3)
    first = ds[0]["x"]
    assert np.array_equal(first, ds[0]["x"])
    ds.set_epoch(1)
    assert not np.array_equal(first, ds[0]["x"])
    x = np.random.default_rng(0).normal(size=(1, 2, 8, 8)).astype(np.float32)
    assert np.allclose(augment(x, np.random.default_rng(0)), x)


def test_fold_samples_keep_both_hemispheres_of_a_subject_in_one_role(store):
    from collections import Counter

    from data_prep.store import open_store
    from stroke_tss.splits import fold_of, make_splits

    table = open_store(store).table
    splits = make_splits(list(table["subject_id"]), num_folds=3, seed=1)
    for k in range(3):
        roles = fold_of(splits, k)
        owner: dict[str, str] = {}
        for role in ("train", "val", "test"):
            samples, _ = task_samples(table, "lesion_present", roles[role])
            assert samples, (k, role)
            for s in samples:
                assert owner.setdefault(s.subject_id, role) == role, (k, s.subject_id)
            assert set(Counter(s.subject_id for s in samples).values()) == {2}, (k, role)
        assert set(owner) == set(table["subject_id"])


def test_segmentation_items_carry_the_hemisphere_mask_and_it_moves_with_the_lesion(store):
    """lesion_seg items hold the mask on the flipped hemisphere grid, under the bright DWI blob; a lesion swap
    gives the mirror half's mask with the mirror half's lesion, and a rotation turns mask and pixels alike."""
    from data_prep.store import open_store

    samples, _ = task_samples(open_store(store).table, "lesion_seg", ["sub-00", "sub-01", "sub-02", "sub-03"])
    assert all(s.mask for s in samples) and len(samples) == 8  # every hemisphere takes part
    plain = StoreDataset(store, samples)
    for i, s in enumerate(samples):
        item = plain[i]
        mask = item["mask"].numpy() > 0
        assert mask.any() == bool(s.label), s
        if s.label:  # the mask covers the blob: x in 8:20 on both halves once the right one is flipped
            assert mask[2:6, 10:20, 8:20].all() and mask.sum() == 4 * 10 * 12, s
            assert item["x"][0].numpy()[mask].mean() > 2 > item["x"][0].numpy()[~mask].mean(), s
    swapped = StoreDataset(store, samples, augment={"lesion_swap": 1.0})
    for i, s in enumerate(samples):
        item = swapped[i]
        mask = item["mask"].numpy() > 0
        assert mask.any() == bool(item["y"]), s
        if mask.any():
            assert item["x"][0].numpy()[mask].mean() > 2, s  # the mask follows the lesion that was pasted in
    turned = StoreDataset(store, samples[:1], augment={"rotate_z_deg": 40}, seed=5)
    item = turned[0]
    mask = item["mask"].numpy() > 0
    assert set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
    assert not mask[2:6, 10:20, 8:20].all()  # it turned ...
    assert item["x"][0].numpy()[mask].mean() > 2 > item["x"][0].numpy()[~mask].mean()  # ... with the lesion


def test_a_half_under_the_lesioned_threshold_has_nothing_to_segment(tmp_path):
    """One spilled voxel on a healthy half (under LESION_FLAG_MIN_ML, so labelled 0): its segmentation target is
    empty, read as it is or swapped onto the other half, so target and label agree."""
    from data_prep.store import open_store

    path = make_store(tmp_path / "spill.zarr", num_subjects=4, spill=True)
    store = open_store(path)
    assert half(store.lesion("sub-00"), "right").sum() == 1  # the voxel is in the store
    samples, _ = task_samples(store.table, "lesion_seg", ["sub-00"])
    for aug in (None, {"lesion_swap": 1.0}):
        ds = StoreDataset(store, samples, augment=aug)
        for i, s in enumerate(samples):
            item = ds[i]
            assert bool(item["mask"].sum() > 0) == bool(item["y"]), (s, aug)
    # the rule reads the mask, not the label: a lesion of 30 mL stays a target whatever a table says of its half
    told_healthy = Sample("sub-00", "left", label=0, side="none", mask=True)
    assert StoreDataset(store, [told_healthy])[0]["mask"].sum() == 4 * 10 * 12
