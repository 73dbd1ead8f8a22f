"""predict and explain on a run folder the trainer wrote (tests/fixtures/runs.py: two folds of the four-phase
schedule on two of the store's three channels), from a store and from a manifest prepped like the training
store; the detector's pick on a blob store where a few steps learn it; the ISLES'22 case."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from data_prep.store import open_store
from stroke_tss.cli import main as cli_main
from stroke_tss.errors import UserError
from stroke_tss.predict import find_phases, predict_store
from tests.eval_helpers import blob_store, train_phase
from tests.fixtures.runs import PHASES

pytestmark = pytest.mark.integration  # trains small phases (~20 s on 2 shared cores)


def _phase_dir(trained_run, fold: int, phase: str):
    return trained_run.run / "2d" / f"fold-{fold}" / phase


def test_predict_on_a_trained_run_gives_the_trainers_own_probabilities(trained_run):
    """Each fold's detector scores its val and test hemispheres exactly as the trainer did (same inputs: the
    fold's two channels, read and flipped alike); onset comes from the schedule's last phase (attention, not
    the alphabetically last tss4h5) at its validation threshold."""
    store = open_store(trained_run.store)
    for fold in (0, 1):
        table = predict_store(trained_run.run, store, fold=fold).set_index("subject_id")
        assert list(table.index) == store.subject_ids and (table["num_folds"] == 1).all()
        lesion = pd.read_csv(_phase_dir(trained_run, fold, "lesion") / "predictions.csv")
        assert len(lesion) >= 4
        for row in lesion.itertuples():
            assert table.loc[row.subject_id, f"lesion_{row.hemisphere}"] == pytest.approx(row.probability, abs=1e-5)
        assert set(table["phases"]) == {"attention;lesion;tss3h"}
        metrics = json.loads((_phase_dir(trained_run, fold, "attention") / "metrics.json").read_text())
        assert table["threshold_tss_lt_4h5"].tolist() == pytest.approx([metrics["val"]["threshold"]] * len(table))
        onset = pd.read_csv(_phase_dir(trained_run, fold, "attention") / "predictions.csv")
        onset = onset.set_index(["subject_id", "hemisphere"])["probability"]
        for sid, row in table.iterrows():
            if (sid, row["hemisphere"]) in onset.index:
                assert row["p_tss_lt_4h5"] == pytest.approx(onset[(sid, row["hemisphere"])], abs=1e-5)
    both = predict_store(trained_run.run, store)
    one = [predict_store(trained_run.run, store, fold=k) for k in (0, 1)]
    assert (both["num_folds"] == 2).all()
    for col in ("lesion_left", "lesion_right"):  # the fold ensemble averages the folds' probabilities
        assert both[col].to_numpy() == pytest.approx((one[0][col] + one[1][col]).to_numpy() / 2, abs=1e-6)


def test_predict_cli_writes_the_table_of_the_subjects_asked_for(trained_run, tmp_path):
    out = tmp_path / "p.csv"
    assert cli_main(["predict", str(trained_run.run), str(trained_run.store), "--fold", "1", "--out", str(out),
                     "--subjects", "sub-003", "sub-001"]) == 0
    table = pd.read_csv(out)
    want = predict_store(trained_run.run, open_store(trained_run.store), fold=1, subjects=["sub-003", "sub-001"])
    assert list(table["subject_id"]) == ["sub-003", "sub-001"]
    pd.testing.assert_frame_equal(table, want, check_dtype=False)


def test_predict_from_a_manifest_preps_like_the_training_store(trained_run, tiny_cohort, tmp_path):
    """A manifest of new subjects is preprocessed with the training store's grid, config and reference
    histogram: a training subject handed in again as raw NIfTI scores as it does from the store."""
    table = pd.read_csv(tiny_cohort, dtype=str, keep_default_na=False).iloc[[1]]
    for col in ("dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask"):
        table[col] = [str(tiny_cohort.parent / v) for v in table[col]]
    manifest = tmp_path / "new.csv"
    table.to_csv(manifest, index=False)
    out = tmp_path / "pred.csv"
    assert cli_main(["predict", str(trained_run.run), str(manifest), "--fold", "0", "--out", str(out),
                     "--workers", "1"]) == 0
    got = pd.read_csv(out)
    (sid,) = table["subject_id"]
    want = predict_store(trained_run.run, open_store(trained_run.store), fold=0, subjects=[sid])
    assert got["subject_id"].tolist() == [sid]
    for col in ("lesion_left", "lesion_right", "p_tss_lt_3h", "p_tss_lt_4h5"):
        assert got[col].item() == pytest.approx(want[col].item(), abs=1e-5), col


def test_explain_defaults_to_the_schedules_last_phase_on_the_runs_store(trained_run, tmp_path, capsys):
    store = open_store(trained_run.store)
    assert cli_main(["explain", str(trained_run.run), "sub-002", "--fold", "1", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == str(_phase_dir(trained_run, 1, "attention") / "weights.pt")
    img = nib.load(result["nifti"])
    assert img.shape == tuple(store.attrs["shape_xyz"]) and np.allclose(img.affine, store.affine)
    assert np.isfinite(img.get_fdata()).all() and (tmp_path / "sub-002_gradcam.png").is_file()
    assert set(result["hemispheres"]) == {store.table.set_index("subject_id").loc["sub-002", "stroke_side"]}
    assert cli_main(["explain", str(trained_run.run), "sub-002", "--phase", "lesion", "--method", "attention",
                     "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["weights"].endswith("2d/fold-0/lesion/weights.pt")


def test_predict_and_explain_errors_say_what_to_do(trained_run, tmp_path, capsys):
    run, store = trained_run.run, trained_run.store
    with pytest.raises(UserError, match=r"no trained variant 'nope'; trained: 2d$"):
        find_phases(run, variant="nope")
    with pytest.raises(UserError, match="train the run first"):
        find_phases(tmp_path)
    assert cli_main(["predict", str(run), str(store), "--subjects", "sub-001", "sub-99"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stroke-tss predict: error: subject(s) sub-99 not in {store}; it holds 8 subjects"]
    assert cli_main(["explain", str(run), "sub-001", "--phase", "9_nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stroke-tss explain: error: {run}: no trained phase '9_nope' in fold 0; trained: {', '.join(PHASES)}"]
    assert cli_main(["explain", str(run), "sub-99"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("stroke-tss explain: error: subject 'sub-99' is not in store ")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """RUN/attn2d/fold-{0,1}/{1_detect,3_tss4h5}/ on a 8-subject blob store, where 10 steps learn detection."""
    root = tmp_path_factory.mktemp("predict")
    store = blob_store(root / "store", num_subjects=8)
    run = root / "run"
    for fold in (0, 1):
        train_phase(store, run / "attn2d" / f"fold-{fold}" / "1_detect", task="lesion_present", steps=10, seed=fold)
        train_phase(store, run / "attn2d" / f"fold-{fold}" / "3_tss4h5", task="tss_lt_4h5", steps=2, seed=fold,
                    threshold=0.4 + 0.2 * fold)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"store": str(root / "store")}}))
    return run, store


def test_predict_fold_ensemble_picks_the_lesion_side(trained):
    run, store = trained
    table = predict_store(run, store)
    assert len(table) == 8 and (table["num_folds"] == 2).all()
    for col in ("lesion_left", "lesion_right", "p_tss_lt_4h5"):
        assert table[col].between(0, 1).all()
    assert table["threshold_tss_lt_4h5"].tolist() == pytest.approx([0.5] * 8)  # mean of the folds' 0.4 and 0.6
    assert (table["tss_lt_4h5"] == (table["p_tss_lt_4h5"] >= 0.5)).all()
    truth = store.table.set_index("subject_id")["stroke_side"]
    picked = table.set_index("subject_id")["hemisphere"]
    assert (picked == truth.loc[picked.index]).mean() >= 0.75  # the detector finds the lesion side


def test_phantom_trained_run_on_the_isles_case(isles, tiny_store, tmp_path, capsys):
    """The real ISLES'22 case, scanned and prepped like the phantom training store, through predict and explain."""
    from data_prep.store import open_store
    from stroke_tss import explain

    train = open_store(tiny_store)
    run = tmp_path / "run"
    phases = {"1_detect": ("lesion_present", 30), "2_tss3h": ("tss_lt_3h", 3), "3_tss4h5": ("tss_lt_4h5", 3)}
    for name, (task, steps) in phases.items():
        train_phase(train, run / "phantom" / "fold-0" / name, task=task, steps=steps)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"store": str(tiny_store)}}))

    # (This test once also required the detector's Grad-CAM to point at the lesions of its own 8-subject store on
    # most lesion hemispheres. Since prep normalises without the lesion mask, a detector of 30-120 steps there
    # localises on 0-4 of 9 (seeds 0, 1): too few subjects to learn where lesions are. Grad-CAM's localisation
    # is checked where a detector learns: the demo test, on held-out subjects.)

    manifest = tmp_path / "isles.csv"
    assert cli_main(["scan", str(isles), "-o", str(manifest)]) == 0
    out = tmp_path / "isles_pred.csv"
    assert cli_main(["predict", str(run), str(manifest), "--out", str(out), "--workers", "1"]) == 0
    table = pd.read_csv(out)
    assert table["subject_id"].tolist() == ["sub-strokecase0009"]
    for col in ("lesion_left", "lesion_right", "p_tss_lt_3h", "p_tss_lt_4h5"):
        assert table[col].between(0, 1).all(), col
    row = table.iloc[0]
    assert row["hemisphere"] == ("left" if row["lesion_left"] >= row["lesion_right"] else "right")
    # prepped like the training store: same grid, same reference histogram
    [prepped] = (run / "predict").iterdir()
    new = open_store(prepped)
    assert new.attrs["shape_xyz"] == train.attrs["shape_xyz"] and np.allclose(new.affine, train.affine)
    assert new.attrs["reference_histogram"] == train.attrs["reference_histogram"]
    result = explain.explain_subject(run / "phantom" / "fold-0" / "1_detect" / "weights.pt", new,
                                     "sub-strokecase0009", out_dir=tmp_path / "x")
    assert nib.load(result["nifti"]).shape == tuple(train.attrs["shape_xyz"])
    # the real case is reported, not asserted: a detector trained 30 steps on 9 phantom subjects is not
    # expected to find a real lesion (it has picked the wrong side, with Grad-CAM off the lesion)
    capsys.readouterr()
    with capsys.disabled():
        print(f"\nISLES case (lesion LEFT): detector picks {row['hemisphere']} (left {row['lesion_left']:.3f}, "
              f"right {row['lesion_right']:.3f}), p(TSS<4.5h) {row['p_tss_lt_4h5']:.3f}, "
              f"p(TSS<3h) {row['p_tss_lt_3h']:.3f}, Grad-CAM lesion overlap {result['overlap']['ratio']:.1f}x chance")


def test_predict_refuses_unmasked_subjects_for_a_store_normalised_with_lesion_masks(tiny_cohort, tmp_path):
    """A store built with the old `normal_tissue` normalisation took its statistics from each subject's lesion
    mask: a new subject without one would be normalised unlike the training data, so predict says so (naming
    the subjects and the fix) before anything is written, instead of scoring it."""
    from data_prep.config import PrepConfig
    from data_prep.store import create_or_extend
    from stroke_tss.predict import prep_like_training
    from tests.test_normalisation import OLD_STORE_CONFIG

    store = tmp_path / "old.zarr"
    create_or_extend(store, config=PrepConfig.model_validate(OLD_STORE_CONFIG), subject_ids=[])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"store": str(store)}}))
    table = pd.read_csv(tiny_cohort).drop(columns=["lesion_mask"]).head(2)
    for column in ("dwi", "b0", "flair", "adc", "brain_mask"):
        table[column] = [str(tiny_cohort.parent / p) for p in table[column]]
    manifest = tmp_path / "new.csv"
    table.to_csv(manifest, index=False)
    with pytest.raises(UserError, match=r"lesion mask.*sub-001.*normalize_on: robust"):
        prep_like_training(run, manifest)
    assert not (run / "predict").exists()


@pytest.fixture(scope="module")
def seg_store(tmp_path_factory):
    """tests.test_data's store: sides cycle left, right, none, bilateral over 16 subjects."""
    from tests.test_data import make_store

    return open_store(make_store(tmp_path_factory.mktemp("segpredict") / "store.zarr", num_subjects=16))


def test_predict_picks_the_side_with_a_segmentation_phase_as_the_trainer_scores_it(seg_store, tmp_path):
    """A run whose only detection phase segments (2d_seg's lesion phase, task lesion_seg): predict takes it as
    the detector and scores each hemisphere by its largest lesion probability, exactly the probability the
    trainer wrote to predictions.csv (so metrics.json's threshold applies to it)."""
    from stroke_tss.config.training import EngineSection, OptimizerSection, StoppingSection, TrainSection
    from stroke_tss.data import StoreDataset
    from stroke_tss.models import build_model
    from stroke_tss.tasks import task_samples
    from stroke_tss.train import train_phase as train_one

    ids = seg_store.subject_ids
    parts = {"train": ids[:10], "val": ids[10:13], "test": ids[13:]}
    datasets = {k: StoreDataset(seg_store, task_samples(seg_store.table, "lesion_seg", v)[0]) for k, v in parts.items()}
    torch.manual_seed(0)
    model = build_model("slicewise2d", num_slices=8, base_channels=4, seg_head=True, pool="lesion", attention=False)
    out = tmp_path / "run" / "2d_seg" / "fold-0" / "lesion"
    train_one(model, datasets, out, task="lesion_seg", engine=EngineSection(kind="local"),
              train=TrainSection(batch_size=4, eval_batch_size=8, threads=1),
              optimizer=OptimizerSection(name="adam", lr=1e-2),
              stopping=StoppingSection(max_epochs=1, min_epochs=1, patience=1, restore_best=False))
    table = predict_store(tmp_path / "run", seg_store).set_index("subject_id")
    assert (table["side_from"] == "detector lesion").all() and set(table["phases"]) == {"lesion"}
    written = pd.read_csv(out / "predictions.csv")
    assert len(written) == 12
    for row in written.itertuples():
        assert table.loc[row.subject_id, f"lesion_{row.hemisphere}"] == pytest.approx(row.probability, abs=1e-5)


def test_predict_without_a_detector_reads_the_stores_side_and_refuses_an_unknown_one(seg_store, tmp_path):
    """A run with onset phases only (2d_scratch): the hemisphere is the store's stroke_side, said in
    side_from; a subject whose side is none or bilateral is one error naming it, never a guess of left."""
    run = tmp_path / "run"
    train_phase(seg_store, run / "2d_scratch" / "fold-0" / "tss4h5", task="tss_lt_4h5", steps=1)
    table = predict_store(run, seg_store, subjects=["sub-00", "sub-01", "sub-05"])
    assert table["hemisphere"].tolist() == ["left", "right", "right"]
    assert (table["side_from"] == "stroke_side").all() and "lesion_left" not in table
    with pytest.raises(UserError, match=r"no detection phase \(lesion_present or lesion_seg\).*2 subject\(s\) "
                                        r"have no stroke_side left or right \(sub-02: none, sub-03: bilateral\)"):
        predict_store(run, seg_store, subjects=["sub-00", "sub-02", "sub-03"])
