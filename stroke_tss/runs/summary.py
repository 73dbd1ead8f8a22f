"""RUN/summary.json: per variant x phase, pooled out-of-fold test metrics with subject-bootstrap CIs.

Pooled means every fold's test predictions together, each binarised at its own fold's validation (Youden)
threshold; never an average of per-fold AUCs. Hemisphere level as trained, and subject level (a subject's
score from its hemispheres). Also the mean validation AUC over folds, which sweeps rank points by.

Rows are keyed "variant/phase". Two more top-level keys, without a "/", describe the run as a whole:
``ceiling`` (per onset task, what a perfect segmentation reads from the images: stroke_tss.report.ceiling)
and ``phase_3_to_4`` (per variant, the attention phase's tss_lt_4h5 AUC minus the tss4h5 phase's).
`rows(summary)` gives the rows alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stroke_tss.metrics import binary_metrics
from stroke_tss.report.ceiling import format_ceiling, run_ceilings
from stroke_tss.report.collect import collect_predictions, tested_folds
from stroke_tss.report.tables import LEVELS, phase_3_to_4, table2
from stroke_tss.runs.ensemble import write_ensembles

log = logging.getLogger(__name__)

_KEEP = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "ap", "brier")


RUN_KEYS = ("ceiling", "phase_3_to_4")
"""The top-level keys that are not variant/phase rows."""


def summarize(run_dir: str | Path, *, num_resamples: int = 2000, seed: int = 0) -> dict:
    """Rows per variant/phase, then the run's ceiling (on the folds that have test predictions) and the
    phase 3 -> 4 differences."""
    pred = collect_predictions([run_dir])
    out: dict[str, dict] = {}
    tables = {}
    for level in LEVELS:
        table = tables[level] = table2(pred, level=level, num_resamples=num_resamples, seed=seed)
        for row in table.to_dict("records"):
            entry = out.setdefault(f"{row['variant']}/{row['phase']}", {
                "variant": row["variant"], "phase": row["phase"], "task": row["task"],
                "num_folds": int(row["num_folds"])})
            entry[level] = {
                **{k: _num(row.get(k)) for k in _KEEP if k in row},
                "ci95": {k: [_num(row.get(f"{k}_lo")), _num(row.get(f"{k}_hi"))] for k in _KEEP if f"{k}_lo" in row},
                "n": int(row["n"]), "n_positive": int(row["n_positive"]),
                "thresholds": [float(t) for t in str(row["thresholds"]).split(";") if t],
            }
            if row.get("note"):
                entry[level]["note"] = row["note"]
    for (variant, phase), g in pred[pred["split"] == "val"].groupby(["variant", "phase"], sort=False):
        aucs = [binary_metrics(f["label"], f["probability"], threshold=0.5)["auc"] for _, f in g.groupby("fold")]
        aucs = [a for a in aucs if a is not None]
        if f"{variant}/{phase}" in out:
            out[f"{variant}/{phase}"]["val_auc_mean"] = float(np.mean(aucs)) if aucs else None
    out["ceiling"] = run_ceilings(run_dir, folds=tested_folds(pred))
    out["phase_3_to_4"] = phase_3_to_4(tables["hemisphere"])
    return out


def rows(summary: dict) -> dict[str, dict]:
    """The variant/phase rows of a summary (without the run-level keys)."""
    return {k: v for k, v in summary.items() if k not in RUN_KEYS}


def write_summary(run_dir: str | Path, **kwargs) -> Path:
    run_dir = Path(run_dir)
    write_ensembles(run_dir)  # ensembles are variants made of finished members: refresh them before summing up
    summary = summarize(run_dir, **kwargs)
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    log.info("wrote %s (%d variant x phase rows)", path, len(rows(summary)))
    return path


def read_summary(run_dir: str | Path) -> dict:
    """RUN/summary.json as written (what the terminal shows must be what the file holds)."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def format_summary(summary: dict, *, level: str = "hemisphere") -> str:
    """A plain table for the terminal: variant, phase, task, n, AUC [CI], sensitivity, specificity."""
    lines = [f"{'variant':<16} {'phase':<10} {'task':<15} {'n':>5} {'AUC':>6} {'95% CI':>15} {'sens':>6} {'spec':>6}"]
    for entry in rows(summary).values():
        m = entry.get(level)
        if not m:
            continue
        lo, hi = m["ci95"].get("auc", [None, None])
        ci = f"[{_fmt(lo)}, {_fmt(hi)}]"
        lines.append(f"{entry['variant']:<16} {entry['phase']:<10} {entry['task']:<15} {m['n']:>5} "
                     f"{_fmt(m.get('auc')):>6} {ci:>15} {_fmt(m.get('sensitivity')):>6} {_fmt(m.get('specificity')):>6}")
    for task, entry in (summary.get("ceiling") or {}).items():
        lines.append(f"ceiling {task}: {format_ceiling(entry)}")
    for variant, d in (summary.get("phase_3_to_4") or {}).items():
        lines.append(f"phase 3 -> 4 {variant}: {d['phase_4_auc']:.3f} - {d['phase_3_auc']:.3f} = {d['difference']:+.3f} "
                     f"({d['task']}, hemispheres)")
    return "\n".join(lines)


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) or pd.isna(x) else float(x)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
