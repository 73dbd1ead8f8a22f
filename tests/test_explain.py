"""Grad-CAM (against MONAI's where both apply), attention maps, un-flipping, overlap score, NIfTI and PNG."""

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

from stroke_tss import explain
from stroke_tss.errors import UserError
from stroke_tss.models import build_model


def test_gradcam_matches_monai_on_a_3d_model():
    torch.manual_seed(0)
    model = build_model("attnvgg3d", in_channels=3, base_channels=4).eval()
    x = torch.randn(1, 3, 16, 24, 16)
    ours = explain._own_gradcam(model, dict(model.named_modules())["block3"], x)
    ours = explain._resize(ours, (16, 24, 16))[0]
    monai = explain.gradcam(model, x, layer="block3")  # the MONAI path
    assert monai.shape == (16, 24, 16)
    np.testing.assert_allclose(ours, monai, rtol=1e-4, atol=1e-6 * np.abs(monai).max())
    assert ours.max() > 0


def test_gradcam_and_attention_on_the_slicewise_model_cover_every_slice():
    torch.manual_seed(0)
    model = build_model("slicewise2d", num_slices=5, in_channels=3, base_channels=8)
    x = torch.randn(1, 3, 5, 40, 32)
    cam = explain.gradcam(model, x)
    att = explain.attention_map(model, x)
    assert cam.shape == att.shape == (5, 40, 32)
    assert (cam >= 0).all() and ((att >= 0) & (att <= 1)).all()
    with pytest.raises(ValueError, match="no layer 'backbone.nope'"):
        explain.gradcam(model, x, layer="backbone.nope")


def test_gradcam_on_a_genesis_level_with_tuple_output():
    model = build_model("encoder3d", in_channels=3, base_channels=4)
    cam = explain.gradcam(model, torch.randn(1, 3, 16, 16, 8), layer="down_tr256")
    assert cam.shape == (16, 16, 8) and np.isfinite(cam).all()


def test_to_full_grid_undoes_the_right_flip():
    full = np.random.default_rng(0).random((3, 4, 10))
    left, right = full[..., :5], full[..., 5:][..., ::-1]  # what store.hemisphere returns
    np.testing.assert_array_equal(explain.to_full_grid(left, right), full)


def test_overlap_score_ranks_a_lesion_focused_map_far_above_chance():
    rng = np.random.default_rng(0)
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[2:18, 2:18, 2:18] = 1
    lesion = np.zeros_like(brain)
    lesion[5:8, 5:8, 12:15] = 1
    heat = rng.random(brain.shape) + 2.0 * lesion
    score = explain.overlap_score(heat, lesion, brain)
    assert score["lesion_in_top"] == 1.0 and score["ratio"] == pytest.approx(1 / score["chance"])
    flat = explain.overlap_score(np.zeros(brain.shape), lesion, brain)
    assert flat["ratio"] < 2  # a flat map must not count as lesion-focused
    sides = explain.hemisphere_scores(heat, lesion, brain)
    assert list(sides) == ["right"]  # lesion at x 12-14 of 20: the high-x half


def test_nifti_on_the_store_grid_and_montage_load(tmp_path):
    heat = np.zeros((6, 7, 8), np.float32)
    heat[1, 2, 3] = 5.0  # z=1, y=2, x=3
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = explain.save_nifti(heat, affine, tmp_path / "m.nii.gz")
    img = nib.load(path)
    assert img.shape == (8, 7, 6) and np.allclose(img.affine, affine)
    assert img.get_fdata()[3, 2, 1] == 5.0
    lesion = np.zeros((6, 7, 8), np.uint8)
    lesion[1:3, 2:5, 2:5] = 1
    png = explain.save_montage(np.ones_like(heat), heat, lesion, tmp_path / "m.png")
    assert mpimg.imread(png).ndim == 3


@pytest.mark.integration
def test_gradcam_overlap_after_a_few_steps_on_a_real_store(tmp_path):
    """20 Adam steps of the 2D detector: Grad-CAM's top 5% holds >= 2x chance of most lesions (untrained: 1/16)."""
    from tests.eval_helpers import blob_store, train_phase

    store = blob_store(tmp_path / "store", num_subjects=16)
    model = train_phase(store, tmp_path / "run" / "v" / "fold-0" / "1_detect", task="lesion_present", steps=20)
    ratios = []
    for sid in store.subject_ids:
        heat = explain.subject_map(model, store, sid, method="gradcam")
        ratios += [s["ratio"] for s in explain.hemisphere_scores(heat, store.lesion(sid), store.brain(sid)).values()]
    hits = sum(r >= 2 for r in ratios)
    print(f"blob store: Grad-CAM overlap >= 2x chance on {hits} of {len(ratios)} lesion hemispheres")
    assert len(ratios) == 16
    assert hits >= 12, ratios
    result = explain.explain_subject(tmp_path / "run" / "v" / "fold-0" / "1_detect" / "weights.pt", store,
                                     "sub-00", out_dir=tmp_path / "x", method="attention")
    img = nib.load(result["nifti"])
    assert img.shape == (64, 40, 8) and np.allclose(img.affine, store.affine)
    assert mpimg.imread(result["png"]).ndim == 3 and result["overlap"]["chance"] == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("seg_head", [False, True])
def test_attention_map_of_a_phase_trained_without_gates_says_what_to_use_instead(seg_head):
    """The segmentation head's lesion map (2d_seg) is no attention map: without gates it is still the error."""
    model = build_model("slicewise2d", num_slices=5, in_channels=3, base_channels=8, attention=False,
                        seg_head=seg_head)
    with pytest.raises(UserError, match="ran without its attention gates.*--method gradcam"):
        explain.attention_map(model, torch.randn(1, 3, 5, 40, 32))


def test_attention_map_of_a_gated_seg_head_model_is_the_gates():
    torch.manual_seed(0)
    model = build_model("slicewise2d", num_slices=5, in_channels=3, base_channels=8, seg_head=True).eval()
    x = torch.randn(1, 3, 5, 40, 32)
    gates = model.forward_with_maps(x)[1]["attention"]
    expected = explain._resize(gates[0][:, None], (40, 32))
    np.testing.assert_allclose(explain.attention_map(model, x), expected, rtol=1e-6)
