"""The demo's gates on a run folder of made-up predictions over a generated store (each figure recomputed with
scikit-learn and the DeLong test from the predictions files), and the over-seed rules of `demo --gates`."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stroke_tss.cli import main as cli_main
from stroke_tss.report.ceiling import run_ceilings
from stroke_tss.report.collect import collect_predictions
from stroke_tss.runs.gates import Gate, combine_seeds, evaluate, format_seed_table
from stroke_tss.stats import delong_test
from tests.onset_store import fake_run, onset_store

ONSET = {"tss3h": "tss_lt_3h", "tss4h5": "tss_lt_4h5", "attention": "tss_lt_4h5"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    store = onset_store(root / "store.zarr", num_subjects=40, seed=4)
    fake_run(root / "run", store.path, num_folds=2,
             phases={"2d": {"lesion": "lesion_present", **ONSET}, "2d_scratch": ONSET})
    return root / "run", store


def _auc(test, variant, phase):
    g = test[(test["variant"] == variant) & (test["phase"] == phase)]
    return roc_auc_score(g["label"], g["probability"])


def test_gates_of_one_run_equal_their_figures_recomputed(run):
    run_dir, store = run
    ceilings = run_ceilings(run_dir)
    result = evaluate(run_dir, table=store.table, ceilings=ceilings, oracle={"tss_lt_4h5": 0.86})
    gates = {g["name"]: g for g in result["gates"]}
    test = collect_predictions([run_dir]).query("split == 'test'")

    detection = test[test["task"] == "lesion_present"]
    assert gates["detection"]["value"] == pytest.approx(_auc(test, "2d", "lesion"), abs=1e-4)
    assert gates["detection"]["passed"] == (gates["detection"]["value"] >= 0.90)
    volume = store.table.set_index("subject_id")
    ml = np.array([volume.at[s, f"lesion_{h}_ml"] for s, h in zip(detection["subject_id"], detection["hemisphere"])])
    large = detection[(detection["label"] == 0).to_numpy() | (ml >= 0.5)]
    assert 0 < large["label"].sum() < (detection["label"] == 1).sum()  # the 0.5 mL cut drops some small lesions
    assert gates["detection"]["figures"]["auc_lesions_ge_0.5ml"] == pytest.approx(
        roc_auc_score(large["label"], large["probability"]), abs=1e-4)

    best = max(_auc(test, v, p) for v in ("2d", "2d_scratch") for p in ("tss4h5", "attention"))
    top = ceilings["tss_lt_4h5"]["ceiling"]
    assert gates["onset"]["value"] == pytest.approx(best, abs=1e-4)
    assert gates["onset"]["target"] == pytest.approx(0.85 * top, abs=1e-4)
    assert gates["onset"]["passed"] == (best >= 0.85 * top)

    a, b = test[(test["phase"] == "tss4h5") & (test["variant"] == "2d")], test[
        (test["phase"] == "tss4h5") & (test["variant"] == "2d_scratch")]
    both = a.merge(b, on=["subject_id", "hemisphere", "label"])
    assert gates["transfer"]["value"] == pytest.approx(_auc(test, "2d", "tss4h5") - _auc(test, "2d_scratch", "tss4h5"),
                                                       abs=1e-4)
    p = delong_test(both["label"], both["probability_x"], both["probability_y"])["p_value"]
    assert gates["transfer"]["figures"]["delong_p"] == pytest.approx(p, abs=1e-4)
    assert f"DeLong p={p:.3f}" in gates["transfer"]["detail"]

    reported = result["reported"]
    assert set(reported["phase_3_to_4"]) == {"2d", "2d_scratch"} and reported["3d_minus_3d_scratch"] is None
    assert reported["latent_oracle"] == {"tss_lt_4h5": 0.86}


def test_onset_without_a_ceiling_misses_and_says_why(run):
    run_dir, store = run
    no = {"tss_lt_4h5": {"ceiling": None, "reason": "store X has no lesion masks"}}
    onset = evaluate(run_dir, table=store.table, ceilings=no, oracle={})["gates"][1]
    assert onset["name"] == "onset" and not onset["passed"] and onset["target"] is None
    assert onset["detail"] == "no ceiling: store X has no lesion masks"


def test_detection_takes_a_segmentation_phase_when_it_is_the_best_detector(run, tmp_path):
    """2d_seg's lesion phase (task lesion_seg, scored by its largest lesion probability) is labelled by lesion
    presence too: when it separates the halves better than 2d's lesion_present, the gate reports it."""
    _, store = run
    seg_run = tmp_path / "run"
    # fake_run's scores sharpen with a phase's place in its variant: 2d_seg's third phase beats 2d's first
    fake_run(seg_run, store.path, num_folds=2, phases={"2d": {"lesion": "lesion_present"},
                                                      "2d_seg": {"tss3h": "tss_lt_3h", "tss4h5": "tss_lt_4h5",
                                                                 "lesion": "lesion_seg"}})
    no = {"tss_lt_4h5": {"ceiling": None, "reason": "not asked"}}
    detection = evaluate(seg_run, table=store.table, ceilings=no, oracle={})["gates"][0]
    test = collect_predictions([seg_run]).query("split == 'test'")
    assert _auc(test, "2d_seg", "lesion") > _auc(test, "2d", "lesion")
    assert detection["figures"]["model"] == "2d_seg/lesion"
    assert detection["value"] == pytest.approx(_auc(test, "2d_seg", "lesion"), abs=1e-4)
    seg = test[(test["variant"] == "2d_seg") & (test["phase"] == "lesion")]
    volume = store.table.set_index("subject_id")
    ml = np.array([volume.at[s, f"lesion_{h}_ml"] for s, h in zip(seg["subject_id"], seg["hemisphere"])])
    large = seg[(seg["label"] == 0).to_numpy() | (ml >= 0.5)]
    assert detection["figures"]["auc_lesions_ge_0.5ml"] == pytest.approx(
        roc_auc_score(large["label"], large["probability"]), abs=1e-4)


def _seed(seed: int, *, detection: float, onset: tuple[float, float], transfer: float) -> dict:
    auc, top = onset
    gates = [Gate("detection", detection, 0.9, detection >= 0.9),
             Gate("onset", auc, 0.85 * top, auc >= 0.85 * top, figures={"auc": auc, "ceiling": top, "ratio": auc / top}),
             Gate("transfer", transfer, 0.05, transfer >= 0.05, figures={"delong_p": 0.3})]
    return {"seed": seed, "gates": [asdict(g) for g in gates]}


def test_over_seeds_onset_needs_the_mean_and_every_seed_transfer_the_mean():
    results = [_seed(0, detection=0.95, onset=(0.76, 0.80), transfer=0.10),
               _seed(1, detection=0.92, onset=(0.69, 0.80), transfer=0.02),
               _seed(2, detection=0.91, onset=(0.69, 0.80), transfer=0.04)]
    rows = {r["gate"]: r for r in combine_seeds(results)}
    # every seed >= 0.85 x ceiling, but the mean 0.7133 / 0.80 = 0.89 < 0.9
    assert rows["onset"]["passed"] == [True, True, True] and not rows["onset"]["overall_passed"]
    assert rows["onset"]["overall"] == pytest.approx(0.7133 / 0.80, abs=1e-3)
    # two seeds under +0.05, the mean 0.0533 above it
    assert rows["transfer"]["passed"] == [True, False, False] and rows["transfer"]["overall_passed"]
    assert rows["detection"]["overall_passed"] and rows["detection"]["overall"] == 0.91
    results[1] = _seed(1, detection=0.89, onset=(0.76, 0.80), transfer=0.02)
    rows = {r["gate"]: r for r in combine_seeds(results)}
    assert rows["onset"]["overall_passed"]  # mean 0.7367 / 0.80 = 0.92
    assert not rows["detection"]["overall_passed"]  # one seed under 0.90
    results[2] = _seed(2, detection=0.91, onset=(0.67, 0.80), transfer=0.04)
    rows = {r["gate"]: r for r in combine_seeds(results)}
    assert not rows["onset"]["overall_passed"]  # the mean 0.90 holds, but seed 2 reads 0.84 x its ceiling
    table = format_seed_table(combine_seeds(results))
    assert "0.890 MISS" in table and "seed 2" in table


def test_cli_demo_gates_reads_each_seeds_demo_json(tmp_path, capsys):
    outs = []
    for k, transfer in enumerate((0.08, 0.04)):
        out = tmp_path / f"seed{k}"
        out.mkdir()
        (out / "demo.json").write_text(json.dumps(_seed(k, detection=0.93, onset=(0.7, 0.8), transfer=transfer)))
        outs.append(str(out))
    assert cli_main(["demo", "--gates", *outs]) == 0
    printed = capsys.readouterr().out
    transfer = next(line for line in printed.splitlines() if line.startswith("transfer"))
    assert "0.080 p0.30 PASS" in transfer and "0.040 p0.30 MISS" in transfer and "0.060 PASS" in transfer
    assert cli_main(["demo", "--gates", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope' / 'demo.json'} does not exist" in capsys.readouterr().err
