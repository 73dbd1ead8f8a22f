"""Intra-domain transfer from lesion segmentation (beyond the paper): the lesion_seg task's loss and score,
the segmentation phase learning on a small real store, and the onset head's lesion-weighted pooling."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from stroke_tss.config.training import EngineSection, OptimizerSection, StoppingSection, TrainSection
from stroke_tss.errors import UserError
from stroke_tss.models import build_model
from stroke_tss.tasks import task_samples
from stroke_tss.train import lesion_target, soft_dice_loss, train_phase
from tests.test_data import make_store


def test_the_target_marks_every_cell_a_lesion_voxel_touches():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 5, 6] = 1  # one voxel, in cell (1, 1) of a 2x2 grid (4x4 voxels a cell)
    target = lesion_target(mask, torch.Size([2, 2]))
    assert target.tolist() == [[[[0.0, 0.0], [0.0, 1.0]]]]


def test_soft_dice_is_computed_over_the_whole_batch_by_hand():
    """Probabilities 0.5 everywhere (logit 0) on 2 samples of 4 cells, target 1 on 2 cells of the first:
    intersection 0.5 * 2 = 1, sums 4 + 2 = 6, so with smooth 1 the loss is 1 - (2 + 1) / (6 + 1) = 4/7."""
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0] = 1
    assert soft_dice_loss(logits, target).item() == pytest.approx(4 / 7)
    certain = torch.where(target > 0, 30.0, -30.0)  # a perfect map: loss 0
    assert soft_dice_loss(certain, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("seg") / "store.zarr", num_subjects=16)


def _datasets(store):
    from data_prep.store import open_store
    from stroke_tss.data import StoreDataset

    st = open_store(store)
    ids = list(st.table["subject_id"])
    parts = {"train": ids[:10], "val": ids[10:13], "test": ids[13:]}
    return {k: StoreDataset(st, task_samples(st.table, "lesion_seg", v)[0], channels=["dwi", "b0", "flair"],
                            augment={"noise_std": 0.1} if k == "train" else None) for k, v in parts.items()}


def test_the_segmentation_phase_learns_the_masks_on_a_small_store(store, tmp_path):
    """From random init, 12 epochs on 20 hemispheres: the loss falls, the validation Dice of the thresholded
    map rises well above a chance map's, and predictions.csv scores lesion presence (max lesion probability).
    (At base_channels 4 or lr 3e-3 this size can sit for many epochs with the lesion cells at the head's bias,
    probability 0.5: its hidden ReLUs off there. 0.976 here.)"""
    torch.manual_seed(0)
    model = build_model("slicewise2d", num_slices=8, base_channels=8, seg_head=True, pool="lesion", attention=False)
    out = tmp_path / "lesion"
    train_phase(model, _datasets(store), out, task="lesion_seg", engine=EngineSection(kind="local"),
                train=TrainSection(batch_size=4, eval_batch_size=8, threads=1),
                optimizer=OptimizerSection(name="adam", lr=1e-2, schedule="cosine"),
                stopping=StoppingSection(max_epochs=12, min_epochs=12, patience=12, monitor="val_dice",
                                         restore_best=False))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.6 * log[0]["train_loss"], log
    # a blob covers 4 of 8 slices, 3x3 of 8x8 cells: a map that marks every cell scores Dice ~0.07
    assert log[-1]["val_dice"] > 0.5, [r["val_dice"] for r in log]
    pred = pd.read_csv(out / "predictions.csv")
    assert set(pred.task) == {"lesion_seg"} and pred.probability.between(0, 1).all()
    test = pred[pred.split == "test"]
    assert test[test.label == 1].probability.min() > test[test.label == 0].probability.max(), test


def test_a_segmentation_phase_needs_a_model_with_a_seg_head(store, tmp_path):
    model = build_model("slicewise2d", num_slices=8, base_channels=4)
    with pytest.raises(UserError, match="lesion_seg trains a lesion map.*seg_head: true"):
        train_phase(model, _datasets(store), tmp_path / "x", task="lesion_seg", engine=EngineSection(kind="local"),
                    train=TrainSection())
    with pytest.raises(UserError, match="pool: lesion .* seg_head: true"):
        build_model("slicewise2d", num_slices=8, base_channels=4, pool="lesion")


def test_lesion_pooling_reads_the_features_under_the_predicted_lesion():
    """With the seg head's map forced to one lesion cell (a forward hook replaces its output), the onset logit is
    the classifier applied to exactly that cell's features: stage 1 there, and the stage-4 and gated cells that
    cover it; the other slices and cells do not count."""
    torch.manual_seed(0)
    model = build_model("slicewise2d", num_slices=3, base_channels=4, seg_head=True, pool="lesion").eval()
    x = torch.randn(1, 3, 3, 64, 64)
    forced = torch.full((3, 1, 16, 16), -30.0)  # stage 1 of a 64x64 slice: 16x16 cells
    forced[1, 0, 3, 12] = 30.0  # slice 1, cell (3, 12): inside stage 4's cell (0, 1) (2x2) and stage 3's (0, 3) (4x4)
    model.seg_head.register_forward_hook(lambda module, args, output: forced)
    with torch.no_grad():
        logit = model(x)
        stages = model.stages(x.transpose(1, 2).flatten(0, 1))
        gated, _ = model.gate(stages[2], stages[3])
        features = torch.cat([gated[1, :, 0, 3], stages[3][1, :, 0, 1], stages[0][1, :, 3, 12]])
        expected = model.classifier(features)
    assert logit.item() == pytest.approx(expected.item(), abs=1e-4)
    # and the map the head predicts is the one forward pools by
    assert torch.equal(model.forward_with_maps(x)[1]["lesion"], forced.view(1, 3, 16, 16))


def test_lesion_pooling_holds_the_slice_weights_fixed():
    """Under pool: lesion the slices are combined by their share of the predicted lesion, so the learned slice
    weights take no part: freeze keeps them out of the optimiser (and out of DDP's wait for gradients)."""
    from stroke_tss.models import freeze

    model = build_model("slicewise2d", num_slices=3, base_channels=4, seg_head=True, pool="lesion")
    freeze(model, ["seg_head"])
    assert not model.slice_weights.requires_grad and not any(p.requires_grad for p in model.seg_head.parameters())
    assert model.classifier.weight.requires_grad


@pytest.mark.integration
def test_the_2d_seg_variant_runs_through_the_cli_and_holds_the_seg_head(store, tmp_path):
    """configs/demo.yaml's 2d_seg: the lesion phase segments (predictions.csv scores lesion presence), the onset
    phases pool by lesion with the head held as segmentation left it, and every weights.pt rebuilds."""
    from stroke_tss.cli import main
    from stroke_tss.models import build_model

    run = tmp_path / "run"
    assert main(["train", "configs/demo.yaml", "--fold", "0", "--variant", "2d_seg", f"data.store={store}",
                 f"run.dir={run}", "model.options.base_channels=4", "cv.folds=2", "train.batch_size=4",
                 "phases.lesion.stopping.max_epochs=2", "phases.lesion.stopping.min_epochs=2",
                 "train.stopping.max_epochs=1", "train.stopping.min_epochs=1"]) == 0
    fold = run / "2d_seg" / "fold-0"
    assert set(pd.read_csv(fold / "lesion" / "predictions.csv").task) == {"lesion_seg"}
    assert "val_dice" in (fold / "lesion" / "log.jsonl").read_text()
    weights = {p: torch.load(fold / p / "weights.pt", weights_only=True) for p in ("lesion", "tss3h", "tss4h5")}
    for blob in weights.values():
        assert blob["init_args"]["pool"] == "lesion" and blob["init_args"]["seg_head"]
        build_model(blob["model"], **blob["init_args"]).load_state_dict(blob["state_dict"])
    head = [k for k in weights["lesion"]["state_dict"] if k.startswith("seg_head.")]
    assert head and all(torch.equal(weights["lesion"]["state_dict"][k], weights["tss4h5"]["state_dict"][k])
                        for k in head)
    assert not torch.equal(weights["lesion"]["state_dict"]["classifier.weight"],
                           weights["tss3h"]["state_dict"]["classifier.weight"])
