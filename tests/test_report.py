"""The report on synthesised run folders: its numbers equal scikit-learn's on the predictions files."""

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score, roc_curve

from stroke_tss.cli import main as cli_main
from stroke_tss.errors import UserError
from stroke_tss.report import collect_predictions, delong_table, table2, write_report

VARIANTS = {"attn_pretrained": 1.5, "random_init": 0.5}  # signal strength: the first should win
PHASES = {"detect": "lesion_present", "tss4h5": "tss_lt_4h5"}
NUM_FOLDS, PER_FOLD = 3, 24


def _write_run(run, seed=0):
    """RUN/<variant>/fold-<k>/<phase>/{predictions.csv,log.jsonl}, shared subjects and splits per fold."""
    rng = np.random.default_rng(seed)
    subjects = [f"sub-{i:03d}" for i in range(NUM_FOLDS * PER_FOLD)]
    truth = {(s, h, t): int(rng.random() < 0.5) for s in subjects for h in ("left", "right") for t in PHASES.values()}
    for variant, strength in VARIANTS.items():
        for k in range(NUM_FOLDS):
            test = subjects[k * PER_FOLD:(k + 1) * PER_FOLD]
            rest = [s for s in subjects if s not in test]
            val = rest[:PER_FOLD]
            for phase, task in PHASES.items():
                rows = []
                for split, ids in (("val", val), ("test", test)):
                    for s in ids:
                        for h in ("left", "right"):
                            y = truth[(s, h, task)]
                            z = strength * (2 * y - 1) + rng.normal()
                            rows.append({"subject_id": s, "hemisphere": h, "task": task, "label": y,
                                         "probability": 1 / (1 + np.exp(-z)), "split": split})
                d = run / variant / f"fold-{k}" / phase
                d.mkdir(parents=True)
                pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
                with open(d / "log.jsonl", "w") as f:
                    for epoch in range(4):
                        f.write(json.dumps({"epoch": epoch, "train_loss": 1 / (epoch + 1),
                                            "val_auc": 0.5 + 0.1 * epoch}) + "\n")
    return run


@pytest.fixture
def run(tmp_path):
    return _write_run(tmp_path / "run-a")


def _sklearn_row(test_and_val: pd.DataFrame):
    """Pooled test metrics at each fold's Youden threshold, recomputed with scikit-learn only."""
    ys, ds, ps = [], [], []
    for _, f in test_and_val.groupby("fold"):
        val, test = f[f["split"] == "val"], f[f["split"] == "test"]
        fpr, tpr, thr = roc_curve(val["label"], val["probability"], drop_intermediate=False)
        t = thr[np.argmax(tpr - fpr)]
        ys.append(test["label"].to_numpy())
        ps.append(test["probability"].to_numpy())
        ds.append((test["probability"].to_numpy() >= t).astype(int))
    y, p, d = map(np.concatenate, (ys, ps, ds))
    return {"auc": roc_auc_score(y, p), "sensitivity": recall_score(y, d),
            "specificity": recall_score(1 - y, 1 - d), "accuracy": accuracy_score(y, d), "n": y.size}


def test_table2_equals_sklearn_at_hemisphere_and_subject_level(run):
    pred = collect_predictions([run])
    assert set(pred["fold"]) == {0, 1, 2} and set(pred["phase"]) == set(PHASES)
    for level in ("hemisphere", "subject"):
        table = table2(pred, level=level, num_resamples=200).set_index(["variant", "phase"])
        assert len(table) == len(VARIANTS) * len(PHASES)
        for (variant, phase), row in table.iterrows():
            g = pred[(pred["variant"] == variant) & (pred["phase"] == phase)]
            if level == "subject":
                how = "max" if PHASES[phase] == "lesion_present" else "mean"
                g = g.groupby(["subject_id", "split", "fold"], as_index=False).agg(
                    label=("label", "max"), probability=("probability", how))
            expected = _sklearn_row(g)
            assert row["n"] == expected["n"]
            for key in ("auc", "sensitivity", "specificity", "accuracy"):
                assert row[key] == pytest.approx(expected[key], abs=1e-12), (level, variant, phase, key)
                assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"]
        assert table.loc[("attn_pretrained", "tss4h5"), "auc"] > table.loc[("random_init", "tss4h5"), "auc"]


def test_delong_table_finds_the_stronger_variant(run):
    dl = delong_table(collect_predictions([run]))
    row = dl[dl["phase"] == "tss4h5"].iloc[0]
    assert row["n"] == NUM_FOLDS * PER_FOLD * 2 and row["p_value"] < 0.05


def test_write_report_markdown_csv_and_pngs_load(run, tmp_path):
    md = write_report([run], out_dir=tmp_path / "out", num_resamples=200)
    text = md.read_text()
    csv = pd.read_csv(md.parent / "report.csv")
    assert set(csv["level"]) == {"hemisphere", "subject"} and len(csv) == 8
    auc = csv[(csv["level"] == "hemisphere") & (csv["variant"] == "attn_pretrained") & (csv["phase"] == "tss4h5")]
    assert f"{auc['auc'].iloc[0]:.3f}" in text
    pngs = sorted(p.name for p in md.parent.glob("*.png"))
    assert pngs == ["learning_detect.png", "learning_tss4h5.png", "reliability_lesion_present.png",
                    "reliability_tss_lt_4h5.png", "roc_lesion_present.png", "roc_tss_lt_4h5.png"]
    for name in pngs:
        assert name in text
        assert mpimg.imread(md.parent / name).shape[2] in (3, 4)


def test_cli_report_two_runs(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a", seed=0), _write_run(tmp_path / "b", seed=1)
    assert cli_main(["report", str(a), str(b), "--resamples", "100"]) == 0
    text = (a / "report.md").read_text()
    assert "a/attn_pretrained" in text and "b/random_init" in text


def test_bad_predictions_name_file_subject_and_field(run):
    path = run / "random_init" / "fold-1" / "detect" / "predictions.csv"
    df = pd.read_csv(path)
    df.loc[3, "probability"] = 1.7
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"fold-1/detect/predictions.csv: subject sub-\d+: field probability"):
        collect_predictions([run])
    with pytest.raises(UserError, match="does not exist"):
        collect_predictions([run / "nope"])


def test_report_readers_kappa_and_baselines_from_the_store(run, tmp_path):
    from stroke_tss.report import clinical
    from stroke_tss.stats import category_counts, fleiss_kappa
    from tests.eval_helpers import blob_store

    store = blob_store(tmp_path / "store", num_subjects=24)
    perf, kappa = clinical.reader_section(store.table, num_resamples=100)
    table = store.table.set_index("subject_id")
    y = (table["onset_to_mri_min"] < 270).astype(int)
    r1 = table["reader_1"]
    row = perf.set_index("reader").loc["reader_1"]
    assert row["sensitivity"] == pytest.approx(recall_score(y, r1)) == 1.0  # reader_1 reads exactly < 270 min
    assert kappa == pytest.approx(fleiss_kappa(category_counts(table[["reader_1", "reader_2", "reader_3"]])))
    base = clinical.baseline_table(store, num_resamples=100).set_index(["task", "baseline"])
    # FLAIR brightens with onset in this store, volume does not: the FLAIR-ratio baseline must rank better.
    assert base.loc[("tss_lt_4h5", "logistic(flair_ratio)"), "auc"] > 0.8
    assert base.loc[("tss_lt_4h5", "logistic(flair_ratio)"), "auc"] > base.loc[("tss_lt_4h5", "logistic(lesion_volume_ml)"), "auc"]
    md = write_report([run], store=store.path, num_resamples=100).read_text()
    assert "Fleiss' kappa between readers" in md and "logistic(flair_ratio)" in md


@pytest.mark.integration
def test_report_on_a_trained_run_sets_2d_beside_2d_scratch(tmp_path):
    """The demo's comparison on a run folder the trainer wrote: both variants, two folds, every phase."""
    from stroke_tss.report.markdown import in_schedule_order
    from stroke_tss.stats import delong_test
    from tests.test_data import make_store

    store, run = make_store(tmp_path / "store.zarr", num_subjects=16), tmp_path / "run"
    for fold in (0, 1):
        assert cli_main(["train", "configs/tss2d.yaml", "--fold", str(fold), f"data.store={store}", f"run.dir={run}",
                         "model.options.base_channels=4", "train.num_workers=0", "train.threads=1", "cv.folds=2",
                         "train.stopping.max_epochs=1", "train.stopping.min_epochs=1"]) == 0
    assert cli_main(["report", str(run), "--resamples", "100"]) == 0
    text = (run / "report.md").read_text()
    pred = collect_predictions([run])
    test = pred[(pred["phase"] == "tss4h5") & (pred["split"] == "test")]
    keys = ["subject_id", "hemisphere"]  # bilateral strokes put both halves of a subject in the TSS tasks
    wide = test.pivot_table(index=keys, columns="variant", values="probability")
    y = test.drop_duplicates(keys).set_index(keys).loc[wide.index, "label"]
    expected = delong_test(y, wide["2d"], wide["2d_scratch"])
    row = f"| tss4h5 | tss_lt_4h5 | 2d | 2d_scratch | {len(wide)} | {expected['auc_1']:.4g} | " \
          f"{expected['auc_2']:.4g} | {expected['p_value']:.4g} |"
    assert row in text, text
    csv = pd.read_csv(run / "report.csv")
    for variant in ("2d", "2d_scratch"):
        g = test[test["variant"] == variant]
        auc = csv.query("level == 'hemisphere' and variant == @variant and phase == 'tss4h5'")["auc"].item()
        assert auc == pytest.approx(roc_auc_score(g["label"], g["probability"]), abs=1e-12)
    # phases in the schedule's order (lesion -> tss3h -> tss4h5 -> attention), not alphabetical
    shown = in_schedule_order(csv[csv["level"] == "hemisphere"], ["lesion", "tss3h", "tss4h5", "attention"])
    assert list(csv[csv["level"] == "hemisphere"]["phase"]) == list(shown["phase"])
    assert list(shown["phase"][:4]) == ["lesion", "tss3h", "tss4h5", "attention"]
    for phase in ("lesion", "tss3h", "tss4h5", "attention"):
        assert mpimg.imread(run / f"learning_{phase}.png").ndim == 3


def test_summary_and_report_carry_the_ceiling_phase_3_to_4_and_genesis_provenance(tmp_path):
    """summary.json's run-level keys (beside the variant/phase rows every reader iterates) and the report's
    sections: the ceiling equals the ceiling module's on the run's folds, phase 3 -> 4 is attention minus
    tss4h5 by scikit-learn, a variant without the attention phase has no difference, Genesis says what it saw."""
    from stroke_tss.report.ceiling import run_ceilings
    from stroke_tss.runs.summary import format_summary, read_summary, rows, write_summary
    from tests.onset_store import fake_run, onset_store

    store = onset_store(tmp_path / "store.zarr", num_subjects=32, seed=2)
    run = tmp_path / "run"
    run.mkdir()
    onset = {"tss4h5": "tss_lt_4h5", "attention": "tss_lt_4h5"}
    fake_run(run, store.path, phases={"2d": {"lesion": "lesion_present", **onset}, "2d_scratch": {"tss4h5": "tss_lt_4h5"}})
    for k in (0, 1, 2):
        (run / "genesis" / f"fold-{k}").mkdir(parents=True)
        (run / "genesis" / f"fold-{k}" / "subjects.json").write_text(json.dumps(
            {"mode": "fold", "fold": k, "subjects": ["sub-00"], "test_subjects_seen": 0}))
    write_summary(run, num_resamples=50)
    summary = read_summary(run)
    assert set(rows(summary)) == {"2d/lesion", "2d/tss4h5", "2d/attention", "2d_scratch/tss4h5"}
    assert summary["ceiling"] == json.loads(json.dumps(run_ceilings(run)))
    ceiling = summary["ceiling"]["tss_lt_4h5"]["ceiling"]
    assert 0.5 < ceiling <= 1

    pred = collect_predictions([run])
    test = pred[(pred["split"] == "test") & (pred["variant"] == "2d")]
    auc = {p: roc_auc_score(g["label"], g["probability"]) for p, g in test.groupby("phase") if p in onset}
    assert set(summary["phase_3_to_4"]) == {"2d"}  # 2d_scratch has no attention phase
    assert summary["phase_3_to_4"]["2d"]["difference"] == pytest.approx(auc["attention"] - auc["tss4h5"], abs=1e-12)
    terminal = format_summary(summary)
    assert f"ceiling tss_lt_4h5: {ceiling:.3f}" in terminal and "phase 3 -> 4 2d: " in terminal

    text = write_report([run], num_resamples=50).read_text()
    parts = summary["ceiling"]["tss_lt_4h5"]["parts"]
    assert f"| tss_lt_4h5 | {parts['flair']:.3f} | {parts['b0']:.3f} | {parts['flair_b0']:.3f} | " \
           f"{parts['logistic']:.3f} | {ceiling:.3f}" in text
    assert f"| 2d | {auc['tss4h5']:.3f} | {auc['attention']:.3f} | {auc['attention'] - auc['tss4h5']:+.3f} |" in text
    assert "Models Genesis: per fold, on each fold's non-test subjects (3 pretraining(s)); test subjects seen: 0" in text


def test_report_without_store_or_genesis_says_so(run, tmp_path):
    text = write_report([run], out_dir=tmp_path / "out", num_resamples=50).read_text()
    assert "tss_lt_4h5: no ceiling (" in text and "names no data.store" in text
    assert "Models Genesis" not in text
    (run / "genesis").mkdir()
    (run / "genesis" / "subjects.json").write_text(json.dumps({"mode": "all", "subjects": ["sub-000"],
                                                               "test_subjects_seen": 72}))
    text = write_report([run], out_dir=tmp_path / "out", num_resamples=50).read_text()
    assert ("Models Genesis: once, on every subject of the store (test images unlabelled) (1 pretraining(s)); "
            "test subjects seen: 72") in text


def test_the_run_folders_own_folders_are_no_variant(run):
    """RUN/genesis/fold-<k>/ckpt/ has the shape of a phase folder; the readers of a run must not take it for one."""
    from stroke_tss.report.collect import phase_dirs

    (run / "genesis" / "fold-0" / "ckpt").mkdir(parents=True)
    (run / "jobs" / "fold-0" / "x").mkdir(parents=True)
    (run / "explain" / "fold-0" / "sub-000").mkdir(parents=True)
    found = {(d.variant, d.phase) for d in phase_dirs([run])}
    assert found == {(v, p) for v in VARIANTS for p in PHASES}
