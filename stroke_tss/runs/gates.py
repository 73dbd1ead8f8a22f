"""The demo's gates: what the networks read from the images, measured against what the images carry.

On pooled out-of-fold test hemispheres of one run (one seed):

    detection   the best lesion_present AUC >= 0.90 (any task labelled by lesion presence counts); the AUC on lesions of 0.5 mL or more (against lesion-free
                halves) beside it, since lesions of a few voxels cap detection on a 4 mm grid
    onset       the best tss_lt_4h5 AUC >= 0.85 x the ceiling (stroke_tss.report.ceiling: the best true-lesion
                readout on the same folds)
    transfer    2d minus 2d_scratch on tss_lt_4h5 (each one's tss4h5 phase) >= +0.05, paired DeLong p beside it

Over seeds (`combine_seeds`): detection on every seed; onset >= 0.9 x ceiling on the mean over seeds and
>= 0.85 x on every seed; transfer >= +0.05 on the mean. The phantom's latent oracle, the phase 3 -> 4 gains and
3d vs 3d_scratch are reported, never gated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stroke_tss import metrics
from stroke_tss.errors import UserError
from stroke_tss.report.ceiling import format_parts
from stroke_tss.report.collect import collect_predictions
from stroke_tss.report.tables import delong_table, phase_3_to_4, pooled_test, table2
from stroke_tss.tasks import detection_tasks

DETECTION_TARGET = 0.90
LARGE_LESION_ML = 0.5
ONSET_SHARE_EVERY_SEED = 0.85
ONSET_SHARE_MEAN = 0.90
TRANSFER_TARGET = 0.05
DETECTION, ONSET, TRANSFER = "detection", "onset", "transfer"


@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    """The gated figure (an AUC, or an AUC difference)."""
    target: float | None
    passed: bool
    detail: str = ""
    figures: dict = field(default_factory=dict)
    """Every number behind the gate, for `combine_seeds` and demo.json."""


def _best(hemi: pd.DataFrame, *tasks: str) -> pd.Series | None:
    rows = hemi[hemi["task"].isin(tasks) & hemi["auc"].notna()] if not hemi.empty else hemi
    return None if rows.empty else rows.loc[rows["auc"].idxmax()]


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def large_lesion_auc(pred: pd.DataFrame, table: pd.DataFrame, *, min_ml: float = LARGE_LESION_ML) -> dict:
    """AUC of one model's pooled test hemispheres whose lesion is >= `min_ml` against lesion-free ones."""
    columns = {f"lesion_{side}_ml" for side in ("left", "right")}
    if not columns <= set(table.columns):
        return {"auc": None, "note": "the store's table has no lesion_left_ml / lesion_right_ml"}
    volumes = table.set_index("subject_id")
    ml = np.array([volumes.at[s, f"lesion_{h}_ml"] for s, h in zip(pred["subject_id"], pred["hemisphere"])],
                  dtype=float)
    keep = (pred["label"].to_numpy() == 0) | (ml >= min_ml)
    kept = pred[keep]
    y = kept["label"].to_numpy()
    auc = metrics.binary_metrics(y, kept["probability"], threshold=0.5)["auc"] if np.unique(y).size == 2 else None
    return {"auc": _r(auc), "n_large": int(y.sum()), "n_free": int((y == 0).sum())}


def detection_gate(pred: pd.DataFrame, hemi: pd.DataFrame, table: pd.DataFrame) -> Gate:
    best = _best(hemi, *detection_tasks())
    if best is None:
        return Gate(DETECTION, None, DETECTION_TARGET, False, "no lesion_present predictions")
    test = pooled_test(pred)
    mine = test[(test["variant"] == best["variant"]) & (test["phase"] == best["phase"])
                & (test["task"] == best["task"])]
    large = large_lesion_auc(mine, table)
    auc = float(best["auc"])
    large_text = "-" if large["auc"] is None else f"{large['auc']:.3f}"
    detail = (f"{best['variant']}/{best['phase']}; lesions >= {LARGE_LESION_ML:g} mL: {large_text}"
              + (f" ({large['n_large']} vs {large['n_free']} lesion-free)" if "n_large" in large else ""))
    return Gate(DETECTION, _r(auc), DETECTION_TARGET, auc >= DETECTION_TARGET, detail,
                {"model": f"{best['variant']}/{best['phase']}", "auc": _r(auc),
                 f"auc_lesions_ge_{LARGE_LESION_ML:g}ml": large["auc"], **{k: v for k, v in large.items() if k != "auc"}})


def onset_gate(hemi: pd.DataFrame, ceiling: dict) -> Gate:
    best = _best(hemi, "tss_lt_4h5")
    value = None if best is None else float(best["auc"])
    top = ceiling.get("ceiling")
    if top is None or value is None:
        why = "no tss_lt_4h5 predictions" if value is None else f"no ceiling: {ceiling.get('reason')}"
        return Gate(ONSET, _r(value), None, False, why, {"auc": _r(value), "ceiling": _r(top)})
    target = ONSET_SHARE_EVERY_SEED * top
    parts = format_parts(ceiling)
    detail = (f"{best['variant']}/{best['phase']}; {value / top:.2f} x ceiling {top:.3f} "
              f"({ceiling['best']}; {parts})")
    return Gate(ONSET, _r(value), _r(target), value >= target, detail,
                {"model": f"{best['variant']}/{best['phase']}", "auc": _r(value), "ceiling": _r(top),
                 "ratio": _r(value / top), "ceiling_parts": ceiling["parts"]})


def paired_difference(pred: pd.DataFrame, hemi: pd.DataFrame, a: str, b: str, *, phase: str = "tss4h5",
                      task: str = "tss_lt_4h5") -> dict | None:
    """AUC of `a` minus `b` on `task` at `phase` (hemisphere level) and the paired DeLong p; None if one lacks it."""
    rows = hemi[(hemi["phase"] == phase) & (hemi["task"] == task)].set_index("variant")["auc"] if not hemi.empty else {}
    if a not in rows or b not in rows:
        return None
    dl = delong_table(pred[(pred["phase"] == phase) & (pred["task"] == task)], level="hemisphere")
    pair = dl[dl["model_a"].isin([a, b]) & dl["model_b"].isin([a, b])] if not dl.empty else dl
    p = float(pair["p_value"].iloc[0]) if len(pair) else None
    return {a: _r(rows[a]), b: _r(rows[b]), "difference": _r(rows[a] - rows[b]), "delong_p": _r(p)}


def transfer_gate(pred: pd.DataFrame, hemi: pd.DataFrame) -> Gate:
    diff = paired_difference(pred, hemi, "2d", "2d_scratch")
    if diff is None:
        return Gate(TRANSFER, None, TRANSFER_TARGET, False, "2d or 2d_scratch has no tss4h5 predictions")
    p = "-" if diff["delong_p"] is None else f"{diff['delong_p']:.3f}"
    detail = f"2d {diff['2d']:.3f} vs 2d_scratch {diff['2d_scratch']:.3f} (tss4h5), DeLong p={p}"
    return Gate(TRANSFER, diff["difference"], TRANSFER_TARGET, diff["difference"] >= TRANSFER_TARGET, detail, diff)


def evaluate(run_dir: Path, *, table: pd.DataFrame, ceilings: dict, oracle: dict) -> dict:
    """The run's gates and what is reported beside them: `table` is the store's subjects table, `ceilings`
    summary.json's ceiling per onset task, `oracle` the phantom's latent onset AUCs."""
    pred = collect_predictions([run_dir])
    hemi = table2(pred, level="hemisphere", num_resamples=200)
    gates = [detection_gate(pred, hemi, table), onset_gate(hemi, ceilings.get("tss_lt_4h5") or {}),
             transfer_gate(pred, hemi)]
    return {"gates": [asdict(g) for g in gates],
            "reported": {"latent_oracle": oracle, "phase_3_to_4": phase_3_to_4(hemi),
                         "3d_minus_3d_scratch": paired_difference(pred, hemi, "3d", "3d_scratch")}}


def format_gates(gates: list[dict]) -> list[str]:
    """One line per gate: PASS or MISS, its name, the figure, the target and what is behind it."""
    lines = []
    for g in gates:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        target = "-" if g["target"] is None else f"{g['target']:.3f}"
        lines.append(f"  {'PASS' if g['passed'] else 'MISS'}  {g['name']:<10} {value:>7} (target {target})  {g['detail']}")
    return lines


# ---- over seeds ----


def read_demo_results(outs: list[Path]) -> list[dict]:
    """demo.json of each demo folder (or the file itself), in the order given."""
    results = []
    for out in map(Path, outs):
        path = out if out.suffix == ".json" else out / "demo.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: run `stroke-tss demo --out {out} --seed K` first")
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); run the demo on that folder again") from None
    return results


def _figures(result: dict, name: str) -> dict | None:
    gate = next((g for g in result.get("gates", []) if g["name"] == name), None)
    return None if gate is None else {**gate.get("figures", {}), "value": gate["value"], "passed": gate["passed"]}


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def combine_seeds(results: list[dict]) -> list[dict]:
    """Per gate: each seed's figure and pass, and the over-seed figure and pass (module docstring's rules)."""
    seeds = [r.get("seed") for r in results]
    rows = []
    for name in (DETECTION, ONSET, TRANSFER):
        per = [_figures(r, name) for r in results]
        every = [bool(f and f["passed"]) for f in per]
        if name == DETECTION:
            values = [f and f["value"] for f in per]
            overall = min(values) if None not in values else None
            rule, passed = f"every seed >= {DETECTION_TARGET:g}", all(every)
        elif name == ONSET:
            auc, top = _mean([f and f.get("auc") for f in per]), _mean([f and f.get("ceiling") for f in per])
            overall = None if auc is None or not top else auc / top
            rule = f"mean AUC >= {ONSET_SHARE_MEAN:g} x mean ceiling, every seed >= {ONSET_SHARE_EVERY_SEED:g} x"
            passed = overall is not None and overall >= ONSET_SHARE_MEAN and all(every)
            values = [f and f.get("ratio") for f in per]
        else:
            values = [f and f["value"] for f in per]
            overall = _mean(values)
            rule, passed = f"mean >= +{TRANSFER_TARGET:g}", overall is not None and overall >= TRANSFER_TARGET
        rows.append({"gate": name, "rule": rule, "seeds": seeds, "values": values, "passed": every,
                     "overall": _r(overall), "overall_passed": bool(passed),
                     "details": [f.get("delong_p") if f and name == TRANSFER else None for f in per]})
    return rows


def format_seed_table(rows: list[dict]) -> str:
    """Gates x seeds: each seed's figure with PASS/MISS, then the over-seed figure, its rule and verdict."""
    seeds = rows[0]["seeds"] if rows else []
    head = f"{'gate':<10} " + " ".join(f"{f'seed {s}':>17}" for s in seeds) + f" {'overall':>14}  rule"
    lines = [head]
    for row in rows:
        cells = []
        for value, ok, p in zip(row["values"], row["passed"], row["details"]):
            text = "-" if value is None else f"{value:.3f}" + (f" p{p:.2f}" if p is not None else "")
            cells.append(f"{text} {'PASS' if ok else 'MISS'}")
        overall = "-" if row["overall"] is None else f"{row['overall']:.3f}"
        lines.append(f"{row['gate']:<10} " + " ".join(f"{c:>17}" for c in cells)
                     + f" {overall + (' PASS' if row['overall_passed'] else ' MISS'):>14}  {row['rule']}")
    lines.append("(onset: AUC / ceiling per seed, mean AUC / mean ceiling overall; transfer: 2d - 2d_scratch, "
                 "DeLong p; detection: AUC, the lowest seed overall)")
    return "\n".join(lines)
