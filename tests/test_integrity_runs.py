"""Run folders as damaged input: `stroke-tss verify RUN` names what is damaged by phase and what to re-run, and
its advice repairs it (`verify STORE` hands a store to data_prep's verify_store); verbs that write into a run folder refuse one of another config, or a config the store
cannot serve, before they write anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from stroke_tss.cli import main
from tests.test_data import make_store
from tests.test_integrity_checkpoints import flip

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.options.base_channels=4", "train.num_workers=0", "train.threads=1", "train.batch_size=2",
         "train.stopping.max_epochs=1", "train.stopping.min_epochs=1", "cv.folds=2"]
GENESIS = ["genesis.base_channels=4", "genesis.epochs=1", "genesis.crop=[16,16,8]", "genesis.crops_per_subject=1",
           "genesis.batch_size=4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("integrity") / "store.zarr", num_subjects=16)


def _train(store: Path, run: Path, *extra: str) -> int:
    return main(["train", str(REPO / "configs/tss2d.yaml"), "--fold", "0", "--variant", "2d", f"data.store={store}",
                 f"run.dir={run}", *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    """Fold 0 of the 2d variant, four phases of one epoch each; tests damage copies of it."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    assert _train(store, run) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _verify(capsys, path: Path) -> tuple[int, list[str]]:
    code = main(["verify", str(path)])
    return code, capsys.readouterr().out.splitlines()


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_an_intact_run_verifies_clean(trained, capsys):
    code, out = _verify(capsys, trained)
    assert code == 0, out
    assert not [line for line in out if line.startswith("damaged")]
    assert "intact" in out[-1] and "4 phases finished and verified" in out[-1] and "4 checkpoints verified" in out[-1]


def test_flipped_weights_are_named_by_phase_and_the_advice_repairs_them(run, store, capsys):
    phase = run / "2d/fold-0/tss3h"
    flip(phase / "weights.pt")
    code, out = _verify(capsys, run)
    assert code == 1
    [line] = [line for line in out if line.startswith("damaged")]
    assert str(phase) in line and "weights.pt" in line and "digest" in line
    advice = line.split("re-run `")[1].split("`")[0]
    assert advice == f"stroke-tss train {run}/config.yaml --fold 0 --variant 2d run.dir={run}"
    # follow it: delete the file, run the command; the phase rebuilds its outputs from its last checkpoint
    (phase / "weights.pt").unlink()
    assert main(advice.split()[1:]) == 0
    assert _verify(capsys, run)[0] == 0


@pytest.fixture(scope="module")
def pretrained(store, tmp_path_factory) -> Path:
    """Models Genesis of fold 0 alone (tss3d's genesis.subjects: fold): fold 1's is not started."""
    run = tmp_path_factory.mktemp("integrity") / "genesis-run"
    assert main(["pretrain", str(REPO / "configs/tss3d.yaml"), "--fold", "0", f"data.store={store}",
                 f"run.dir={run}", *SMALL, *GENESIS]) == 0
    return run


def test_each_folds_genesis_is_verified_and_the_advice_repairs_it(pretrained, tmp_path, capsys):
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    code, out = _verify(capsys, run)
    assert code == 0, out
    # fold 0's pretraining; RUN/genesis/ itself is none (fold 1's, like every phase, is not started yet)
    assert "1 phases finished and verified" in out[-1] and "not finished" not in out[-1], out[-1]
    weights = run / "genesis/fold-0/weights.pt"
    flip(weights)
    code, out = _verify(capsys, run)
    assert code == 1
    [line] = [line for line in out if line.startswith("damaged")]
    assert f"{run / 'genesis/fold-0'}:" in line and "weights.pt" in line and "digest" in line
    advice = line.split("re-run `")[1].split("`")[0]
    assert advice == f"stroke-tss pretrain {run}/config.yaml --fold 0 run.dir={run}"
    weights.unlink()
    assert main(advice.split()[1:]) == 0
    assert _verify(capsys, run)[0] == 0
    assert not (run / "genesis/fold-1").exists(), "the advice pretrains the damaged fold alone"


def test_the_second_folds_genesis_logs_as_such_and_is_verified_too(pretrained, tmp_path, capsys):
    run = Path(shutil.copytree(pretrained, tmp_path / "run"))
    assert main(["pretrain", f"{run}/config.yaml", "--fold", "1", f"run.dir={run}"]) == 0
    # the epoch lines name the pretraining: "fold-1 epoch 0" alone reads like a phase of fold 1
    assert "INFO stroke_tss.loop: genesis/fold-1 epoch 0: {" in capsys.readouterr().err
    code, out = _verify(capsys, run)
    assert code == 0 and "2 phases finished and verified" in out[-1], out


def test_a_damaged_checkpoint_tag_is_named(run, capsys):
    [tag] = (run / "2d/fold-0/lesion/ckpt").glob("epoch-*")
    flip(tag / "state.pt")
    code, out = _verify(capsys, run)
    assert code == 1
    [line] = [line for line in out if line.startswith("damaged")]
    assert f"checkpoint {tag}" in line and "state.pt does not match the digest" in line


def test_broken_metrics_and_predictions_of_other_subjects_are_named(run, capsys):
    (run / "2d/fold-0/lesion/metrics.json").write_text("{not json")
    pred = run / "2d/fold-0/tss4h5/predictions.csv"
    pd.read_csv(pred).assign(subject_id="sub-99").to_csv(pred, index=False)
    code, out = _verify(capsys, run)
    damaged = [line for line in out if line.startswith("damaged")]
    assert code == 1 and len(damaged) == 2
    assert any("fold-0/lesion" in line and "metrics.json is not valid JSON" in line for line in damaged)
    assert any("fold-0/tss4h5" in line and "sub-99" in line for line in damaged)


def test_splits_of_another_config_are_named(run, capsys):
    splits = json.loads((run / "splits.json").read_text())
    (run / "splits.json").write_text(json.dumps({**splits, "seed": 12345}))
    code, out = _verify(capsys, run)
    assert code == 1 and any("disagrees with config.yaml" in line and "seed 12345" in line for line in out)


def test_verify_of_a_store_names_the_damaged_subject(tmp_path, capsys):
    store = Path(make_store(tmp_path / "store.zarr", num_subjects=4))
    code, out = _verify(capsys, store)
    assert code == 0 and out[-1].endswith("intact; 4 subjects in its table")
    (store / "records" / "sub-01.json").write_text("{not json")
    code, out = _verify(capsys, store)
    assert code == 1 and [line for line in out if line.startswith("damaged: subject sub-01:")]


def test_verify_of_something_else_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "neither a store" in capsys.readouterr().err


def test_train_refuses_a_folder_of_another_config_before_writing(run, store, capsys):
    before = _files(run)
    assert _train(store, run, "train.batch_size=4") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made by another config" in err and "train.batch_size" in err
    assert _files(run) == before


def test_pretrain_refuses_a_folder_of_another_config_before_writing(run, store, capsys):
    before = _files(run)
    code = main(["pretrain", str(REPO / "configs/tss3d.yaml"), f"data.store={store}", f"run.dir={run}", *SMALL])
    assert code == 2 and "made by another config" in capsys.readouterr().err
    assert _files(run) == before


def test_splits_of_another_seed_are_refused_without_a_config_yaml(run, store, capsys):
    (run / "config.yaml").unlink()
    assert _train(store, run, "seed=5") == 2
    assert "holds splits of another config" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()


@pytest.mark.parametrize("verb", ["train", "pretrain", "cv"])
def test_a_channel_the_store_lacks_writes_nothing(store, tmp_path, capsys, verb):
    run = tmp_path / "run"
    config = REPO / ("configs/tss3d.yaml" if verb == "pretrain" else "configs/tss2d.yaml")
    args = [verb, str(config), f"data.store={store}", f"run.dir={run}", *SMALL, "data.channels=[dwi,adc]"]
    args += ["--fold", "0"] if verb == "train" else ["--executor", "debug"] if verb == "cv" else []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adc not in store" in err and "data.channels" in err
    assert not run.exists()  # so the corrected config is not refused afterwards
