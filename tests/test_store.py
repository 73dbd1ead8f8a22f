"""The store's reader API (what datasets, scripts and users rely on) and its layout guarantees, on the
session's tiny phantom store."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from data_prep.build import prep
from data_prep.config import PrepConfig
from data_prep.store import (
    StoreError,
    assemble_table,
    create_or_extend,
    half,
    open_store,
    write_record,
    write_subject,
)
from tests.fixtures.data import TINY, TINY_PREP, tiny_prep_config


def test_subjects_table_and_attrs_follow_the_manifest(tiny_store: Path, tiny_cohort: Path) -> None:
    s = open_store(tiny_store)
    manifest = pd.read_csv(tiny_cohort, dtype={"subject_id": str})
    assert s.subject_ids == list(manifest["subject_id"])
    assert len(s.subject_ids) == TINY["num_subjects"]
    assert set(manifest.columns) - {"b0"} <= set(s.table.columns)  # b0 comes through as a path column too
    assert s.channels == ["dwi", "b0", "flair"]
    attrs = s.attrs
    assert attrs["prep_config"] == tiny_prep_config().model_dump(mode="json")
    assert attrs["reference_histogram"]["subject_id"] == s.subject_ids[0]
    assert attrs["package_versions"]["zarr"] and attrs["package_versions"]["SimpleITK"]
    merged = s.table.merge(manifest, on="subject_id", suffixes=("", "_manifest"))
    np.testing.assert_array_equal(merged["mrs_90d"], merged["mrs_90d_manifest"])


def test_volume_hemispheres_and_masks(tiny_store: Path) -> None:
    s = open_store(tiny_store)
    nx, ny, nz = TINY_PREP["shape"]
    sid = s.subject_ids[0]
    vol = s.volume(sid)
    assert vol.dtype == np.float32 and vol.shape == (3, nz, ny, nx)
    left, right = s.hemisphere(sid, "left"), s.hemisphere(sid, "right")
    assert left.shape == right.shape == (3, nz, ny, nx // 2)
    np.testing.assert_array_equal(left, vol[..., : nx // 2])
    np.testing.assert_array_equal(right, vol[..., nx // 2:][..., ::-1])  # mirrored onto the left
    brain, lesion = s.brain(sid), s.lesion(sid)
    # one cut for every reader: `half` of a whole array is what the store reads, mirrored or in grid order
    for side, grid_order in (("left", vol[..., : nx // 2]), ("right", vol[..., nx // 2:])):
        np.testing.assert_array_equal(half(vol, side), s.hemisphere(sid, side))
        np.testing.assert_array_equal(half(vol, side, mirrored=False), grid_order)
    assert half(lesion, "left").sum() + half(lesion, "right").sum() == lesion.sum()
    assert brain.dtype == lesion.dtype == np.uint8 and brain.shape == lesion.shape == (nz, ny, nx)
    assert np.all(vol[:, brain == 0] == 0)  # skull-stripped: nothing outside the brain
    inside = vol[:, brain > 0]
    q1, median, q3 = np.percentile(inside, (25, 50, 75), axis=1)  # robust z-scores; matching keeps the quartiles
    assert np.all(np.abs(median) < 0.01) and np.all(np.abs(q3 - q1 - 1.349) < 0.01)
    with pytest.raises(ValueError, match="side"):
        s.hemisphere(sid, "middle")
    with pytest.raises(KeyError, match="sub-999"):
        s.volume("sub-999")


def test_affine_puts_the_midline_between_the_halves_and_lesions_on_their_side(tiny_store: Path) -> None:
    s = open_store(tiny_store)
    nx = TINY_PREP["shape"][0]
    aff = s.affine
    assert aff.shape == (4, 4)
    x_last_left = (aff @ [nx // 2 - 1, 0, 0, 1])[0]
    x_first_right = (aff @ [nx // 2, 0, 0, 1])[0]
    assert x_last_left == pytest.approx(-x_first_right) and x_last_left < 0
    checked = 0
    for sid, side in zip(s.table["subject_id"], s.table["stroke_side"]):
        if side not in ("left", "right"):
            continue
        z, y, x = np.nonzero(s.lesion(sid))
        centroid_x = (aff @ [x.mean(), y.mean(), z.mean(), 1])[0]
        assert (centroid_x < 0) == (side == "left"), (sid, side, centroid_x)  # RAS: left is x < 0
        row = s.table.set_index("subject_id").loc[sid]
        assert bool(row[f"lesion_{side}"])
        checked += 1
    assert checked >= 2


def test_lesion_is_none_when_the_manifest_had_no_mask(tmp_path: Path) -> None:
    config = PrepConfig(shape=(16, 16, 8), spacing_mm=4.0)
    rows = create_or_extend(tmp_path / "s.zarr", config=config, subject_ids=["a", "b"])
    brain = np.ones((8, 16, 16), np.uint8)
    for sid, lesion in (("a", None), ("b", brain)):
        write_subject(tmp_path / "s.zarr", rows[sid], volume=np.zeros((3, 8, 16, 16), np.float32), brain=brain,
                      lesion=lesion)
        write_record(tmp_path / "s.zarr", {"subject_id": sid, "index": rows[sid], "has_lesion_mask": lesion is not None})
    assemble_table(tmp_path / "s.zarr")
    s = open_store(tmp_path / "s.zarr")
    assert s.lesion("a") is None
    np.testing.assert_array_equal(s.lesion("b"), brain)


class _Halves:
    """Map-style dataset of (subject, side) hemispheres; module level so spawn can pickle it."""

    def __init__(self, store, items):
        self.store, self.items = store, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.store.hemisphere(*self.items[i])


def test_pickles_as_a_path_and_reads_in_dataloader_workers(tiny_store: Path) -> None:
    import torch
    s = open_store(tiny_store)
    s.volume(s.subject_ids[0])  # an open handle must not travel into the pickle
    assert len(pickle.dumps(s)) < 500
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(clone.volume(s.subject_ids[1]), s.volume(s.subject_ids[1]))
    items = [(sid, side) for sid in s.subject_ids[:3] for side in ("left", "right")]
    for context in ("fork", "spawn"):
        loader = torch.utils.data.DataLoader(_Halves(s, items), batch_size=None, num_workers=2,
                                             multiprocessing_context=context)
        for (sid, side), got in zip(items, loader):
            np.testing.assert_array_equal(got.numpy(), s.hemisphere(sid, side))


@pytest.mark.parametrize("chunk_zyx", [None, (8, 16, 10), (7, 7, 7)])
def test_no_chunk_or_shard_spans_two_subjects(tmp_path: Path, chunk_zyx) -> None:
    config = PrepConfig(shape=(40, 48, 40), spacing_mm=4.0, chunk_zyx=chunk_zyx)
    create_or_extend(tmp_path / "s.zarr", config=config, subject_ids=["a", "b", "c"])
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for name in ("volumes", "brain", "lesion"):
        arr = group[name]
        # one shard (or plain chunk) per subject along axis 0: Dask workers never write the same file
        outer = arr.shards or arr.chunks
        assert outer[0] == 1, (name, outer)
        assert arr.shape[0] == 3
    if chunk_zyx is None:  # default: a hemisphere of all channels is one chunk
        assert group["volumes"].chunks == (1, 3, 40, 48, 20)


def test_refuses_another_config_and_foreign_paths(tiny_store: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    other = tiny_prep_config().model_copy(update={"zscore": False})
    with pytest.raises(StoreError, match="another preprocessing config") as info:
        prep(tiny_cohort, tiny_store, config=other, progress=False)
    assert str(tiny_store) in str(info.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a stroke-tss store"):
        prep(tiny_cohort, tmp_path / "notes", config=tiny_prep_config(), progress=False)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match="not a stroke-tss store"):
        open_store(tmp_path / "notes")


def test_rerun_on_a_complete_store_changes_nothing(tiny_store: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    before = open_store(copy).volume("sub-003")
    result = prep(tiny_cohort, copy, config=tiny_prep_config(), progress=False)  # starts no cluster: all done
    assert result.skipped == result.done == open_store(tiny_store).subject_ids and not result.failed
    np.testing.assert_array_equal(open_store(copy).volume("sub-003"), before)
