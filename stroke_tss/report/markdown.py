"""`write_report`: run folders -> OUT/report.md, OUT/report.csv and the PNGs it links."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from data_prep.store import StoreError, open_store
from stroke_tss.report import clinical, plots
from stroke_tss.report.ceiling import PARTS, run_ceilings
from stroke_tss.report.collect import (
    collect_logs,
    collect_predictions,
    run_names,
    schedule_order,
    store_path,
    tested_folds,
)
from stroke_tss.report.tables import (
    LEVELS,
    PHASE_3,
    PHASE_4,
    delong_table,
    phase_3_to_4,
    pooled_test,
    sensitivity_at_specificity_table,
    table2,
)

log = logging.getLogger(__name__)


def _ci(row, key: str) -> str:
    value, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None and not pd.isna(lo) else f"{value:.3f}"


def md_table(df: pd.DataFrame, columns: dict[str, object]) -> str:
    """A markdown table; `columns` maps a header to a column name or to a function of the row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = []
        for spec in columns.values():
            value = spec(row) if callable(spec) else row[spec]
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_schedule_order(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Rows by run, variant, then phase as the schedule runs them (unknown phases after, by name)."""
    if df.empty:
        return df
    rank = {p: i for i, p in enumerate(order)}
    keys = [k for k in ("run", "variant") if k in df.columns]
    ranked = df.assign(_rank=df["phase"].map(lambda p: rank.get(p, len(rank))), _name=df["phase"])
    return ranked.sort_values([*keys, "_rank", "_name"], kind="stable").drop(columns=["_rank", "_name"])


def _table2_md(t: pd.DataFrame) -> str:
    multi = t["run"].nunique() > 1
    cols = {"model": lambda r: f"{r['run']}/{r['variant']}" if multi else r["variant"],
            "phase": "phase", "task": "task", "n (pos)": lambda r: f"{r['n']} ({r['n_positive']})",
            "folds": "num_folds"}
    cols.update({k: (lambda r, k=k: _ci(r, k)) for k in ("sensitivity", "specificity", "accuracy", "auc")})
    cols["Brier"] = lambda r: _ci(r, "brier")
    return md_table(t, cols)


def write_report(runs: list[str | Path], *, out_dir: str | Path | None = None, store: str | Path | None = None,
                 specificity: float = 0.9, num_resamples: int = 2000, seed: int = 0) -> Path:
    """Write report.md, report.csv and PNGs into `out_dir` (default: the first run); returns report.md."""
    runs = [Path(r) for r in runs]
    out = Path(out_dir) if out_dir is not None else runs[0]
    if store is not None:
        open_store(store)  # a store asked for by name must be one: refused (StoreError) before anything is written
    pred = collect_predictions(runs)  # before mkdir: a mistyped run folder is refused, not created
    out.mkdir(parents=True, exist_ok=True)
    order = schedule_order(runs)
    tables = [in_schedule_order(table2(pred, level=level, num_resamples=num_resamples, seed=seed), order)
              for level in LEVELS]
    both = pd.concat(tables, ignore_index=True)
    both.to_csv(out / "report.csv", index=False)

    md = [f"# Report: {', '.join(r.name for r in runs)}", "",
          "Pooled out-of-fold test predictions; thresholds by Youden's J on each fold's validation split; "
          f"95% CIs from {num_resamples} subject bootstrap resamples.", ""]
    for level, t in zip(LEVELS, tables):
        md += [f"## Table 2 — {level} level", "", _table2_md(t) if not t.empty else "(no test predictions)", ""]
    md += _ceiling_section(runs, pred, store) + _phase_gain_section(tables[0]) + _genesis_lines(runs)

    test = pooled_test(pred)
    md += ["## ROC and calibration", ""]
    for task in sorted(test["task"].unique()):
        roc = plots.roc_plot(test, out / f"roc_{task}.png", task=task)
        rel = plots.reliability_plot(test, out / f"reliability_{task}.png", task=task)
        md += [f"![ROC {task}]({roc.name}) ![calibration {task}]({rel.name})", ""]
    logs = collect_logs(runs)
    if not logs.empty:
        md += ["## Learning curves", ""]
        for phase in in_schedule_order(logs[["phase"]].drop_duplicates(), order)["phase"]:
            png = plots.learning_curves(logs, out / f"learning_{phase}.png", phase=phase)
            if png is not None:
                md += [f"![learning curves {phase}]({png.name})", ""]

    dl = in_schedule_order(delong_table(pred, level="hemisphere"), order)
    md += ["## Model comparison (DeLong, hemisphere level)", ""]
    md += [md_table(dl, {"phase": "phase", "task": "task", "A": "model_a", "B": "model_b", "n": "n",
                         "AUC A": "auc_1", "AUC B": "auc_2", "p": "p_value"}) if not dl.empty
           else "(fewer than two models share test samples)", ""]
    sas = in_schedule_order(sensitivity_at_specificity_table(pred, specificity=specificity), order)
    md += [f"## Sensitivity at specificity >= {specificity:g} (hemisphere level)", "",
           md_table(sas, {"model": "variant", "phase": "phase", "task": "task", "sensitivity": "sensitivity",
                          "threshold": "threshold"}), ""]
    md += _clinical_sections(runs, store, specificity=specificity, num_resamples=num_resamples, seed=seed)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _f3(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.3f}"


PART_NAMES = {"flair": "-FLAIR", "b0": "-b0", "flair_b0": "-(FLAIR+b0)", "logistic": "logistic (inputs)"}


def _ceiling_section(runs: list[Path], pred: pd.DataFrame, store) -> list[str]:
    """Per run and onset task: each true-lesion readout's pooled test AUC and the best of them."""
    rows, notes = [], []
    for run, name in zip(runs, run_names(runs)):
        for task, entry in run_ceilings(run, folds=tested_folds(pred[pred["run"] == name]), store=store).items():
            if entry["ceiling"] is None:
                notes.append(f"{name}, {task}: no ceiling ({entry['reason']})")
                continue
            rows.append({"run": name, "task": task, **{PART_NAMES[p]: _f3(entry["parts"][p]) for p in PARTS},
                         "ceiling": f"{entry['ceiling']:.3f} ({PART_NAMES[entry['best']]})",
                         "n (early)": f"{entry['n']} ({entry['n_positive']})"})
    md = ["## Onset ceiling (mean of each channel over the true lesion, pooled test hemispheres)", "",
          "What a reader with a perfect segmentation gets from the images: unfitted means (lower = earlier) and "
          "a logistic regression fitted on each fold's non-test hemispheres; the ceiling is the best.", ""]
    if rows:
        shown = [c for c in rows[0] if c != "run" or len(runs) > 1]
        md += [md_table(pd.DataFrame(rows), {c: c for c in shown}), ""]
    return md + [f"- {n}" for n in notes] + ([""] if notes else [])


def _phase_gain_section(hemi: pd.DataFrame) -> list[str]:
    gains = phase_3_to_4(hemi)
    if not gains:
        return []
    table = pd.DataFrame([{"model": k, **v} for k, v in gains.items()])
    return [f"## Phase 3 -> 4: {PHASE_4} minus {PHASE_3} (tss_lt_4h5, hemisphere level)", "",
            md_table(table, {"model": "model", f"AUC {PHASE_3}": lambda r: _f3(r["phase_3_auc"]),
                             f"AUC {PHASE_4}": lambda r: _f3(r["phase_4_auc"]),
                             "difference": lambda r: f"{r['difference']:+.3f}"}), ""]


GENESIS_MODES = {"fold": "per fold, on each fold's non-test subjects",
                 "all": "once, on every subject of the store (test images unlabelled)"}
"""genesis.subjects -> what the report says (stroke_tss.runs.pretrain writes the records)."""


def genesis_provenance(run: Path) -> str | None:
    """One line on what Models Genesis pretrained on, from RUN/genesis/**/subjects.json; None without them."""
    records = [json.loads(p.read_text()) for p in sorted(Path(run).glob("genesis/**/subjects.json"))]
    if not records:
        return None
    modes = sorted({str(r.get("mode")) for r in records})
    seen = sum(int(r.get("test_subjects_seen") or 0) for r in records)
    where = "; ".join(GENESIS_MODES.get(m, m) for m in modes)
    return f"Models Genesis: {where} ({len(records)} pretraining(s)); test subjects seen: {seen}"


def _genesis_lines(runs: list[Path]) -> list[str]:
    lines = [(run.name, genesis_provenance(run)) for run in runs]
    lines = [f"{name}: {line}" if len(runs) > 1 else line for name, line in lines if line]
    return [*lines, ""] if lines else []


def _clinical_sections(runs, store, *, specificity, num_resamples, seed) -> list[str]:
    path = Path(store) if store is not None else store_path(runs)
    if path is None:
        return ["## Readers and baselines", "", "(no store given or named in config.yaml: skipped)", ""]
    try:
        st = open_store(path)
    except StoreError as exc:
        log.warning("readers and baselines skipped: %s", exc)
        return ["## Readers and baselines", "", f"(skipped: {exc})", ""]
    md = []
    perf, kappa = clinical.reader_section(st.table, num_resamples=num_resamples, seed=seed)
    if not perf.empty:
        cols = {"reader": "reader", "n (pos)": lambda r: f"{r['n']} ({r['n_positive']})"}
        cols.update({k: (lambda r, k=k: _ci(r, k)) for k in ("sensitivity", "specificity", "accuracy")})
        md += ["## Readers' DWI-FLAIR mismatch vs TSS < 4.5 h", "", md_table(perf, cols), "",
               f"Fleiss' kappa between readers: {kappa:.3f}" if kappa is not None else "", ""]
    base = clinical.baseline_table(st, specificity=specificity, num_resamples=num_resamples, seed=seed)
    if not base.empty:
        md += ["## Baselines (logistic regression, subject level, out-of-fold)", "",
               md_table(base, {"task": "task", "baseline": "baseline", "n (pos)":
                               lambda r: f"{r['n']} ({r['n_positive']})", "AUC": lambda r: _ci(r, "auc"),
                               f"sens @ spec {specificity:g}": "sensitivity_at_spec"}), ""]
    return md
