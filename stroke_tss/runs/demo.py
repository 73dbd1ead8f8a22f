"""`stroke-tss demo`: the whole method on the embedded phantom cohort, stage by stage, each with a time budget.

    synth (phantom cohort, real SOOP lesion shapes when ../shared/data is there)  ->  prep (Dask LocalCluster)
    ->  cv of configs/demo.yaml (2d, 3d after Models Genesis, 2d_scratch; 5 folds)  ->  report  ->  Grad-CAM

Every stage resumes: the cohort is deterministic per seed and kept, prep skips finished subjects, cv skips
finished phases. So a demo stopped half-way continues where it stopped when run again on the same --out.
The quality gates (`quality_gates`) are what the paper claims, checked on the pooled out-of-fold predictions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep.build import prep
from data_prep.paths import subject_path
from data_prep.phantom import synthesize_cohort
from data_prep.store import open_store
from stroke_tss.config import load_config
from stroke_tss.config.prep import load_prep_config
from stroke_tss.errors import UserError
from stroke_tss.explain import explain_subject
from stroke_tss.report import write_report
from stroke_tss.report.collect import collect_predictions
from stroke_tss.report.tables import delong_table, table2
from stroke_tss.runs.cv import run_cv
from stroke_tss.runs.stages import StageTimer

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
REPO = PACKAGE.parent
# a checkout's configs/; an installed wheel carries the same files as stroke_tss/configs (setup.py)
CONFIGS = REPO / "configs" if (REPO / "configs").is_dir() else PACKAGE / "configs"
SHARED_LESIONS = REPO.parent / "shared" / "data" / "soop" / "lesions"


@dataclass(frozen=True)
class DemoSize:
    subjects: int
    spacing_mm: float
    prep_config: str | None
    """YAML under configs/ (None: PrepConfig's paper-size defaults)."""
    experiment: str
    budgets_s: dict[str, float] = field(default_factory=dict)


SIZES = {
    # 2-core CPU: 20 minutes in all at most, about 17 measured (README has the figure)
    "small": DemoSize(subjects=100, spacing_mm=4.0, prep_config="prep_4mm.yaml", experiment="demo.yaml",
                      budgets_s={"synth": 30, "prep": 150, "cv": 960, "report": 30, "grad-cam": 30}),
    # a GPU cluster: the paper's grid and widths
    "paper": DemoSize(subjects=300, spacing_mm=2.0, prep_config=None, experiment="demo_paper.yaml",
                      budgets_s={"synth": 900, "prep": 3600, "cv": 6 * 3600, "report": 300, "grad-cam": 120}),
}


@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    target: float
    passed: bool
    detail: str = ""


def run_demo(out: Path, *, size: str = "small", executor: str = "local", seed: int = 0,
             subjects: int | None = None, workers: int = 2, lesions: Path | None = None,
             overrides: list[str] = ()) -> dict:
    """Run every stage into `out`; returns {'stages', 'gates', 'report', 'gradcam', ...} (also out/demo.json)."""
    spec = SIZES[size]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    num_subjects = subjects or spec.subjects
    lesions = lesions if lesions is not None else (SHARED_LESIONS if SHARED_LESIONS.is_dir() else None)
    cfg = load_config(CONFIGS / spec.experiment, [f"data.store={out / 'store.zarr'}", f"run.dir={out / 'run'}",
                                                  f"launch.executor={executor}", f"seed={seed}", *overrides])
    timer = StageTimer(total_budget_s=sum(spec.budgets_s.values()))
    log.info("demo (%s): %d phantom subjects at %.0f mm, lesions %s, %s executor, into %s", size, num_subjects,
             spec.spacing_mm, lesions or "generated", executor, out)

    manifest = timer.run("synth", spec.budgets_s["synth"],
                         lambda: _synth(out / "cohort", num_subjects=num_subjects, seed=seed,
                                        spacing_mm=spec.spacing_mm, lesions=lesions))
    timer.run("prep", spec.budgets_s["prep"], lambda: _prep(manifest, out / "store.zarr", spec, workers=workers))
    timer.run("cv", spec.budgets_s["cv"], lambda: _cv(cfg))
    report = timer.run("report", spec.budgets_s["report"], lambda: _report(out / "run"))
    gradcam = timer.run("grad-cam", spec.budgets_s["grad-cam"], lambda: _gradcam(out / "run", out / "store.zarr"))

    oracle = json.loads((out / "cohort" / "oracle.json").read_text())
    gates = quality_gates(out / "run", oracle=oracle)
    result = {"out": str(out), "size": size, "seed": seed, "subjects": num_subjects, "oracle": oracle,
              "stages": timer.records, "total_s": round(timer.elapsed_s, 1),
              "gates": [g.__dict__ for g in gates], "report": str(report), "gradcam": gradcam}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_result(result, timer))
    return result


def _synth(folder: Path, *, num_subjects: int, seed: int, spacing_mm: float, lesions: Path | None) -> Path:
    manifest = folder / "manifest.csv"
    if manifest.is_file() and (folder / "oracle.json").is_file() and len(pd.read_csv(manifest)) == num_subjects:
        log.info("cohort already in %s (deterministic per seed): kept", folder)
        return manifest
    return synthesize_cohort(folder, num_subjects=num_subjects, seed=seed, lesions_dir=lesions,
                             spacing_mm=spacing_mm)


def _prep(manifest: Path, store: Path, spec: DemoSize, *, workers: int) -> None:
    config = load_prep_config(CONFIGS / spec.prep_config if spec.prep_config else None)
    result = prep(manifest, store, config=config, workers=workers, progress=True)
    if result.failed:
        # the phantom is ours: a failure here is a bug, but the demo goes on with the subjects that landed
        log.warning("%d subjects failed preprocessing (see %s/failures.csv): %s", len(result.failed), store,
                    "; ".join(result.failed.values()))
    if len(result.done) < 20:
        raise UserError(f"only {len(result.done)} subjects preprocessed into {store}; too few to cross-validate")


def _cv(cfg) -> None:
    results = run_cv(cfg)
    failed = [r for r in results if r.state == "failed"]
    for r in failed:
        log.error("%s failed: %s (log: %s)", r.name, r.error, r.log)
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} folds failed (logs above); re-run the demo with the "
                        "same --out to retry only those")


def _report(run_dir: Path) -> Path:
    return write_report([run_dir], num_resamples=1000)


def _gradcam(run_dir: Path, store_path: Path) -> dict:
    """Grad-CAM of the 2D lesion detector on the test subject with the largest lesion of fold 0."""
    phase_dir = run_dir / "2d" / "fold-0" / "lesion"
    pred = pd.read_csv(phase_dir / "predictions.csv")
    store = open_store(store_path)
    candidates = pred.loc[(pred["split"] == "test") & (pred["label"] == 1), "subject_id"].unique()
    if len(candidates) == 0:
        return {"note": "fold 0 has no lesion in its test subjects"}
    sid = max(candidates, key=lambda s: int(store.lesion(s).sum()) if store.lesion(s) is not None else 0)
    result = explain_subject(phase_dir / "weights.pt", store, str(sid), out_dir=subject_path(run_dir / "explain", str(sid)))
    return {"subject": str(sid), **result}


def quality_gates(run_dir: Path, *, oracle: dict, lesion_target: float = 0.95, tss_share: float = 0.9) -> list[Gate]:
    """The paper's claims on pooled out-of-fold test predictions (subject-level AUC where a subject has one label).

    lesion_present AUC >= lesion_target (best variant); best tss_lt_4h5 AUC >= tss_share x the oracle's; and
    transfer helps: 2d beats 2d_scratch on tss_lt_4h5 (paired DeLong p reported, not required to be small).
    """
    pred = collect_predictions([run_dir])
    hemi = table2(pred, level="hemisphere", num_resamples=200)
    lesion = hemi[hemi["task"] == "lesion_present"]
    tss = hemi[(hemi["task"] == "tss_lt_4h5")]
    gates = []
    best_lesion = lesion.loc[lesion["auc"].idxmax()] if len(lesion) else None
    gates.append(Gate("lesion_present AUC", _val(best_lesion, "auc"), lesion_target,
                      _val(best_lesion, "auc", -1) >= lesion_target, _who(best_lesion)))
    best_tss = tss.loc[tss["auc"].idxmax()] if len(tss) else None
    target = tss_share * float(oracle["tss_lt_4h5"])
    gates.append(Gate("best tss_lt_4h5 AUC", _val(best_tss, "auc"), round(target, 3),
                      _val(best_tss, "auc", -1) >= target, f"{_who(best_tss)}; oracle {oracle['tss_lt_4h5']:.3f}"))
    by_variant = tss[tss["phase"] == "tss4h5"].set_index("variant")["auc"]
    if {"2d", "2d_scratch"} <= set(by_variant.index):
        dl = delong_table(pred[pred["phase"] == "tss4h5"], level="hemisphere")
        pair = dl[dl["model_a"].isin(["2d", "2d_scratch"]) & dl["model_b"].isin(["2d", "2d_scratch"])]
        p = float(pair["p_value"].iloc[0]) if len(pair) and "p_value" in pair else float("nan")
        diff = float(by_variant["2d"] - by_variant["2d_scratch"])
        gates.append(Gate("2d - 2d_scratch tss_lt_4h5 AUC", round(diff, 3), 0.0, diff > 0,
                          f"2d {by_variant['2d']:.3f} vs 2d_scratch {by_variant['2d_scratch']:.3f}, DeLong p={p:.3f}"))
    return gates


def _val(row, key: str, missing=None):
    return missing if row is None or pd.isna(row[key]) else round(float(row[key]), 3)


def _who(row) -> str:
    return "no predictions" if row is None else f"{row['variant']}/{row['phase']}"


def format_result(result: dict, timer: StageTimer) -> str:
    lines = ["", "stroke-tss demo: done", timer.summary(), "", "quality gates (pooled out-of-fold test, hemispheres):"]
    for g in result["gates"]:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(f"  {'PASS' if g['passed'] else 'MISS'}  {g['name']:<32} {value:>6} (target {g['target']})  "
                     f"{g['detail']}")
    out = Path(result["out"])
    lines += ["", f"report:   {result['report']}", f"ROC:      {out / 'run' / 'roc_tss_lt_4h5.png'}",
              f"summary:  {out / 'run' / 'summary.json'}"]
    if "png" in result["gradcam"]:
        ratio = (result["gradcam"].get("overlap") or {}).get("ratio", float("nan"))
        lines.append(f"Grad-CAM: {result['gradcam']['png']}  (lesion in the top 5% of the map: {ratio:.1f}x chance)")
    return "\n".join(lines)
