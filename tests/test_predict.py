"""predict on a real store with phases trained a few steps: probabilities in [0, 1], the detector's pick."""

import pandas as pd
import pytest
import yaml

from stroke_tss.cli import main as cli_main
from stroke_tss.errors import UserError
from stroke_tss.predict import find_phases, predict_store
from tests.eval_helpers import blob_store, train_phase

pytestmark = pytest.mark.integration  # trains four small phases (~20 s on 2 shared cores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """RUN/attn2d/fold-{0,1}/{1_detect,3_tss4h5}/ on a 8-subject blob store."""
    root = tmp_path_factory.mktemp("predict")
    store = blob_store(root / "store", num_subjects=8)
    run = root / "run"
    for fold in (0, 1):
        train_phase(store, run / "attn2d" / f"fold-{fold}" / "1_detect", task="lesion_present", steps=10, seed=fold)
        train_phase(store, run / "attn2d" / f"fold-{fold}" / "3_tss4h5", task="tss_lt_4h5", steps=2, seed=fold,
                    threshold=0.4 + 0.2 * fold)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"store": str(root / "store")}}))
    return run, store


def test_predict_fold_ensemble(trained):
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


def test_predict_cli_one_fold_to_csv(trained, tmp_path):
    run, store = trained
    out = tmp_path / "p.csv"
    assert cli_main(["predict", str(run), str(store.path), "--fold", "1", "--out", str(out),
                     "--subjects", "sub-00", "sub-03"]) == 0
    table = pd.read_csv(out)
    assert list(table["subject_id"]) == ["sub-00", "sub-03"] and (table["num_folds"] == 1).all()
    assert table["threshold_tss_lt_4h5"].tolist() == pytest.approx([0.6] * 2)


def test_predict_errors_say_what_to_do(trained, tmp_path):
    run, store = trained
    with pytest.raises(UserError, match="no trained variant 'nope'"):
        find_phases(run, variant="nope")
    with pytest.raises(UserError, match="train the run first"):
        find_phases(tmp_path)
    assert cli_main(["predict", str(run), str(store.path), "--subjects", "sub-99"]) == 2


def test_explain_cli_writes_nifti_png_and_scores(trained, tmp_path, capsys):
    import json

    import nibabel as nib

    run, store = trained
    assert cli_main(["explain", str(run), "sub-01", "--phase", "1_detect", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert nib.load(result["nifti"]).shape == (64, 40, 8)
    assert (tmp_path / "sub-01_gradcam.png").is_file()
    assert set(result["hemispheres"]) == {store.table.set_index("subject_id").loc["sub-01", "stroke_side"]}
    assert cli_main(["explain", str(run), "sub-01", "--phase", "9_nope"]) == 2
