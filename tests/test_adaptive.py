"""Adaptive freezing depth: the score and its argmin, exact freezing per depth, `stroke-tss adapt` on a phantom
store (depths through the launch layer), and `freeze: auto` inside a phase of a training run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from stroke_tss.adaptive import choose_depth, depth_groups, depth_score
from stroke_tss.models import backbone_groups, build_model, freeze, param_groups

TINY = ["train.threads=1", "train.num_workers=0", "train.batch_size=2", "train.stopping.max_epochs=2",
        "phases.tss3h.adapt.epochs=2"]


def _cli(*args: str) -> int:
    from stroke_tss.cli import main

    return main(list(args))


def test_choose_depth_is_the_argmin_and_ties_go_to_the_shallower_depth():
    assert choose_depth([0.7, 0.4, 0.6, 0.5]) == 1
    assert choose_depth([0.7, 0.4, 0.6, 0.4, 0.4]) == 1  # equal scores: the fewest frozen groups
    assert choose_depth([math.nan, 0.9, math.inf, 0.8]) == 3  # a diverged depth never wins
    with pytest.raises(ValueError, match="no depth has a finite"):
        choose_depth([math.nan, math.nan])


def test_depth_score_weighs_the_first_epoch_and_the_mean():
    losses = [0.9, 0.6, 0.3]
    assert depth_score(losses, w1=1.0, w2=0.0) == pytest.approx(0.9)
    assert depth_score(losses, w1=0.0, w2=1.0) == pytest.approx(0.6)
    assert depth_score(losses, w1=0.25, w2=0.75) == pytest.approx(0.25 * 0.9 + 0.75 * 0.6)
    # a fast starter that plateaus loses to a slow starter that keeps improving when the mean weighs more
    fast, slow = [0.5, 0.5, 0.5], [0.7, 0.3, 0.2]
    assert choose_depth([depth_score(fast, w1=0.1, w2=0.9), depth_score(slow, w1=0.1, w2=0.9)]) == 1
    assert choose_depth([depth_score(fast, w1=0.9, w2=0.1), depth_score(slow, w1=0.9, w2=0.1)]) == 0


@pytest.mark.parametrize("name, options", [("slicewise2d", {"num_slices": 3, "base_channels": 4}),
                                           ("attnvgg3d", {"base_channels": 4})])
def test_each_depth_freezes_exactly_its_groups(name, options):
    model = build_model(name, **options)
    depths = depth_groups(model)
    backbone = backbone_groups(model)
    assert depths == [backbone[:d] for d in range(len(backbone) + 1)] and depths[0] == [] and len(depths) == 6
    for frozen in depths:
        freeze(model, frozen)
        for group, params in param_groups(model).items():
            assert all(p.requires_grad == (group not in frozen) for p in params), (frozen, group)


@pytest.fixture(scope="module")
def adapted(tiny_store, tmp_path_factory):
    """`stroke-tss adapt` on the tiny store from a saved slicewise2d, the depths pickled and run as local
    processes (as on Slurm: an array of depth items)."""
    from data_prep.store import open_store
    from stroke_tss.weights import save_weights

    tmp = tmp_path_factory.mktemp("adapt")
    num_slices = int(open_store(tiny_store).attrs["shape_xyz"][2])
    torch.manual_seed(3)
    source = build_model("slicewise2d", num_slices=num_slices, in_channels=3, base_channels=4)
    save_weights(tmp / "source.pt", source, source.state_dict(), task="lesion_present")
    run = tmp / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _cli("adapt", "configs/tiny.yaml", "--source", str(tmp / "source.pt"), "--phase", "tss3h",
                    "--variant", "2d", "--executor", "local", "launch.array_parallelism=2", f"data.store={tiny_store}",
                    f"run.dir={run}", *TINY)
    return code, run / "2d" / "fold-0" / "tss3h", source.state_dict(), printed.getvalue()


@pytest.mark.integration
def test_adapt_prints_the_table_and_trains_at_its_argmin(adapted):
    code, phase_dir, _, printed = adapted
    assert code == 0
    # each depth, then the training at the chosen one, was pickled and ran in a process of its own, and its
    # result came back the same way
    assert len(list((phase_dir.parents[2] / "jobs" / "submitit").glob("*_result.pkl"))) == 6 + 1
    table = json.loads((phase_dir / "adapt" / "table.json").read_text())
    rows = table["depths"]
    assert [r["depth"] for r in rows] == list(range(6))
    # the printed table: one row per depth, '*' on the chosen one only
    printed_rows = [line for line in printed.splitlines() if re.match(r"^[ *] +\d +\S", line)]
    assert [int(line.split()[-6]) for line in printed_rows] == list(range(6))
    assert [line.startswith("*") for line in printed_rows] == [r["chosen"] for r in rows]
    for r in rows:  # every reported score is f(theta) of that depth's own logged validation losses
        log = [json.loads(line) for line in (phase_dir / "adapt" / f"depth-{r['depth']}" / "log.jsonl").open()]
        losses = [rec["val_loss"] for rec in log]
        assert len(losses) == 2 and r["first_loss"] == pytest.approx(losses[0])
        assert r["score"] == pytest.approx(table["w1"] * losses[0] + table["w2"] * sum(losses) / 2)
        assert r["val_auc"] == log[-1]["val_auc"]
    scores = [r["score"] for r in rows]
    assert table["chosen_depth"] == scores.index(min(scores))
    assert [r["chosen"] for r in rows] == [r["depth"] == table["chosen_depth"] for r in rows]
    csv = pd.read_csv(phase_dir / "adapt" / "table.csv")
    assert list(csv["depth"]) == list(range(6)) and "val_auc" in csv
    # the phase itself was trained at the chosen depth and has test predictions
    assert (phase_dir / "weights.pt").is_file()
    assert set(pd.read_csv(phase_dir / "predictions.csv")["split"]) == {"val", "test"}
    # the search never looked at the test subjects
    for r in rows:
        assert set(pd.read_csv(phase_dir / "adapt" / f"depth-{r['depth']}" / "predictions.csv")["split"]) == {"val"}


@pytest.mark.integration
def test_each_searched_depth_kept_its_frozen_groups_at_the_source_weights(adapted):
    _, phase_dir, source, _ = adapted
    table = json.loads((phase_dir / "adapt" / "table.json").read_text())
    prefixes = build_model("slicewise2d", num_slices=3, base_channels=4).group_prefixes()

    def group_of(key: str) -> str:
        return next(g for g, pre in prefixes.items() if any(key.startswith(p + ".") or key == p for p in pre))

    for r in table["depths"]:
        trained = torch.load(phase_dir / "adapt" / f"depth-{r['depth']}" / "weights.pt", weights_only=True)
        state = trained["state_dict"]
        changed = {group_of(k) for k, v in state.items() if v.is_floating_point() and not torch.equal(v, source[k])}
        assert changed and not changed & set(r["frozen"]), (r["depth"], changed)
    final = torch.load(phase_dir / "weights.pt", weights_only=True)["state_dict"]
    chosen = next(r for r in table["depths"] if r["chosen"])
    assert all(torch.equal(final[k], source[k]) for k in final
               if group_of(k) in chosen["frozen"] and final[k].is_floating_point())


@pytest.mark.integration
def test_adapt_with_an_unknown_source_is_one_line_exit_2(tiny_store, tmp_path, capsys):
    code = _cli("adapt", "configs/tiny.yaml", "--source", "nowhere", "--executor", "debug",
                f"data.store={tiny_store}", f"run.dir={tmp_path / 'run'}", *TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--source nowhere" in err[0] and "weights file" in err[0]


@pytest.mark.integration
def test_freeze_auto_in_a_training_run_searches_in_process(tiny_store, tmp_path):
    run = tmp_path / "run"
    assert _cli("train", "configs/tiny.yaml", "--fold", "0", "--variant", "2d", f"data.store={tiny_store}",
                f"run.dir={run}", "phases.tss3h.freeze=auto", *TINY) == 0
    fold = run / "2d" / "fold-0"
    table = json.loads((fold / "tss3h" / "adapt" / "table.json").read_text())
    assert len(table["depths"]) == 6 and sum(r["chosen"] for r in table["depths"]) == 1
    # the search started from the lesion phase: the deepest depth kept its whole backbone
    lesion = torch.load(fold / "lesion" / "weights.pt", weights_only=True)["state_dict"]
    deepest = torch.load(fold / "tss3h" / "adapt" / "depth-5" / "weights.pt", weights_only=True)["state_dict"]
    backbone = [k for k, v in deepest.items() if k.startswith("backbone.") and v.is_floating_point()]
    assert backbone and all(torch.equal(lesion[k], deepest[k]) for k in backbone)
    assert not torch.equal(lesion["classifier.weight"], deepest["classifier.weight"])
    assert all((fold / p / "metrics.json").is_file() for p in ("tss4h5", "attention"))
    assert not Path(fold / "tss4h5" / "adapt").exists()
