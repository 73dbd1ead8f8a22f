"""Models Genesis: each transformation does what it should, seeds reproduce pairs, crops come from a real
store, and a few steps of Genesis training lower the reconstruction loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, minimum_filter

from data_prep.config import PrepConfig
from data_prep.store import assemble_table, create_or_extend, write_record, write_subject
from stroke_tss.genesis import (
    GenesisCrops,
    bezier_intensity,
    flip_pair,
    in_paint,
    local_pixel_shuffle,
    make_pair,
    out_paint,
    scale_to_unit,
)
from stroke_tss.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 16, 40, 40)  # (C, z, y, x): windows up to 4x4x1, boxes of a few voxels


def _crop(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Smooth in-[0, 1] image with distinct values (so moved voxels can be traced)."""
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.standard_normal(shape), (0, 2, 2, 2)) * 6
    return scale_to_unit(smooth + 1e-3 * rng.standard_normal(shape))


def test_scale_to_unit_clips_and_maps_linearly():
    out = scale_to_unit(np.array([-5.0, -3.0, 0.0, 1.5, 9.0]), clip=(-3, 3))
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="clip"):
        scale_to_unit(np.zeros(2), clip=(1, 1))


def test_flip_is_mirrored_in_target_and_never_along_depth():
    crop = _crop()
    seen = set()
    for seed in range(20):
        x, y = flip_pair(crop, crop, np.random.default_rng(seed), prob=1.0)
        assert np.array_equal(x, y)
        match = [axes for axes in [(), (-1,), (-2,), (-1, -2)] if np.array_equal(y, np.flip(crop, axes))]
        assert match, "target is not a row/column flip of the crop"
        seen.add(match[0])
    assert {(-1,), (-2,)} <= seen  # both in-plane axes occur
    x, y = flip_pair(crop, crop, np.random.default_rng(0), prob=0.0)
    assert np.array_equal(x, crop)


def test_local_shuffle_only_moves_values_within_windows():
    crop = _crop()
    out = local_pixel_shuffle(crop, np.random.default_rng(1), prob=1.0)
    assert (out != crop).mean() > 0.3
    # Windows are at most (x, y, z) = (4, 4, 1) here: every voxel's new value comes from a voxel of the
    # original at most 3 columns/rows away in the same slice.
    found = np.zeros(crop.shape, bool)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            found |= out == np.roll(crop, (dy, dx), axis=(2, 3))
    assert found.all()
    # Overlapping windows read from the original, so the histogram is only approximately kept.
    assert np.abs(np.sort(out.ravel()) - np.sort(crop.ravel())).mean() < 0.01
    assert np.array_equal(local_pixel_shuffle(crop, np.random.default_rng(1), prob=0.0), crop)


def test_bezier_map_keeps_range_and_is_increasing_or_decreasing():
    ramp = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 1, 1, 101)
    kinds = set()
    for seed in range(12):
        out = bezier_intensity(ramp, np.random.default_rng(seed), prob=1.0)[0, 0, 0]
        assert out.dtype == np.float32 and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
        ends = (round(float(out[0]), 4), round(float(out[-1]), 4))
        assert ends in {(0.0, 1.0), (1.0, 0.0)}
        if ends == (0.0, 1.0):
            assert (np.diff(out) >= -1e-6).all()  # both coordinates sorted: a monotone map
        kinds.add(ends)
    assert len(kinds) == 2


def test_in_painting_fills_inner_boxes_with_noise():
    crop = _crop()
    out = in_paint(crop, np.random.default_rng(3))
    changed = out != crop
    assert changed.any()
    assert not changed[:, :, :3].any() and not changed[:, :, :, :3].any()  # boxes start 3 voxels in
    assert np.array_equal(out[~changed], crop[~changed])


def test_out_painting_keeps_an_inner_box_identical():
    crop = _crop()
    out = out_paint(crop, np.random.default_rng(4))
    kept = (out == crop)[0]
    assert 0.05 < kept.mean() < 0.9
    # The smallest box has sides side - 4 * side // 7: some such box must be kept whole.
    low = [s - 4 * s // 7 for s in SHAPE[1:]]
    assert minimum_filter(kept.astype(np.uint8), size=low).any()


def test_fixed_seeds_give_identical_pairs():
    crop = _crop()
    a = make_pair(crop, np.random.default_rng(7))
    b = make_pair(crop, np.random.default_rng(7))
    c = make_pair(crop, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.fixture(scope="module")
def genesis_store(tmp_path_factory):
    """A real store (data_prep's writer) of 3 subjects with smooth z-scored volumes inside a brain ellipsoid."""
    path = tmp_path_factory.mktemp("genesis") / "store.zarr"
    config = PrepConfig(shape=(48, 40, 32), qc_montage=False)
    sids = ["sub-a", "sub-b", "sub-c"]
    rows = create_or_extend(path, config=config, subject_ids=sids)
    z, y, x = np.mgrid[:32, :40, :48]
    brain = (((z - 16) / 13) ** 2 + ((y - 20) / 17) ** 2 + ((x - 24) / 21) ** 2) < 1
    for i, sid in enumerate(sids):
        rng = np.random.default_rng(i)
        volume = gaussian_filter(rng.standard_normal((3, 32, 40, 48)), (0, 2, 2, 2)) * 8 * brain
        write_subject(path, rows[sid], volume=volume, brain=brain, lesion=None)
        write_record(path, {"subject_id": sid, "index": rows[sid], "has_lesion_mask": False})
    assemble_table(path)
    return path


def test_genesis_crops_from_store_are_reproducible_pairs(genesis_store):
    ds = GenesisCrops(genesis_store, ["sub-a", "sub-c"], crop=(32, 24, 16), seed=3, crops_per_subject=2)
    assert len(ds) == 4
    x, y = ds[1]
    assert x.shape == y.shape == (3, 16, 24, 32) and x.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1 and y.std() > 0.01
    x2, y2 = GenesisCrops(genesis_store, ["sub-a", "sub-c"], crop=(32, 24, 16), seed=3, crops_per_subject=2)[1]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], y)
    one = GenesisCrops(genesis_store, ["sub-b"], crop=(32, 24, 16), seed=0, channels=["flair"])
    assert one[0][0].shape == (1, 16, 24, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        GenesisCrops(genesis_store, ["sub-a"], crop=(30, 24, 16), seed=0)
    with pytest.raises(ValueError, match="sub-zzz"):
        GenesisCrops(genesis_store, ["sub-zzz"], seed=0)


def test_few_genesis_steps_lower_reconstruction_loss(tiny_store):
    """A few steps on crops of the tiny phantom store, all four transforms at the official rates: the loss
    falls below that of the best constant output (the crops' mean), so the net learned structure, not a level."""
    from data_prep.store import open_store

    torch.manual_seed(0)
    ds = GenesisCrops(tiny_store, open_store(tiny_store).subject_ids[:4], crop=(16, 16, 16), seed=0,
                      crops_per_subject=2)
    x, y = (torch.stack(t) for t in zip(*(ds[i] for i in range(len(ds)))))
    constant = torch.nn.functional.mse_loss(torch.full_like(y, y.mean().item()), y).item()
    model = build_model("unet3d", in_channels=3, base_channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.85 * constant < 0.85 * np.mean(losses[:3]), (constant, losses)
