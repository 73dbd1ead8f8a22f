"""`stroke-tss demo`: the whole method on the embedded phantom cohort, stage by stage, each with a time budget.

    synth (phantom cohort, real SOOP lesion shapes when ../shared/data is there)  ->  prep (Dask LocalCluster)
    ->  cv of configs/demo.yaml (2d, 3d after Models Genesis, 2d_scratch, 2d_seg; 5 folds)  ->  report  ->  Grad-CAM

Every stage resumes: the cohort is deterministic per seed and kept, prep skips finished subjects, cv skips
finished phases. So a demo stopped half-way continues where it stopped when run again on the same --out.
The quality gates (stroke_tss.runs.gates) measure the networks against what the images carry (the onset
ceiling in summary.json), on the pooled out-of-fold predictions; `stroke-tss demo --gates OUT...` combines
the demo.json of several seeds.
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
from stroke_tss.runs.cv import run_cv
from stroke_tss.runs.gates import evaluate, format_gates
from stroke_tss.runs.stages import StageTimer
from stroke_tss.runs.summary import read_summary

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
    checked = evaluate(out / "run", table=open_store(out / "store.zarr").table,
                       ceilings=read_summary(out / "run").get("ceiling") or {}, oracle=oracle)
    result = {"out": str(out), "size": size, "seed": seed, "subjects": num_subjects, "oracle": oracle,
              "stages": timer.records, "total_s": round(timer.elapsed_s, 1), **checked,
              "report": str(report), "gradcam": gradcam}
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


def format_result(result: dict, timer: StageTimer) -> str:
    lines = ["", "stroke-tss demo: done", timer.summary(), "",
             f"quality gates, seed {result['seed']} (pooled out-of-fold test hemispheres):", *format_gates(result["gates"]),
             "reported, not gated:"]
    reported = result["reported"]
    lines += [f"  latent oracle {task}: {auc:.3f}" for task, auc in reported["latent_oracle"].items()
              if isinstance(auc, (int, float))]
    lines += [f"  phase 3 -> 4 {v}: {d['difference']:+.3f} ({d['phase_4']} {d['phase_4_auc']:.3f} vs {d['phase_3']} "
              f"{d['phase_3_auc']:.3f})" for v, d in reported["phase_3_to_4"].items()]
    if reported["3d_minus_3d_scratch"]:
        d = reported["3d_minus_3d_scratch"]
        lines.append(f"  3d - 3d_scratch tss_lt_4h5: {d['difference']:+.3f} (DeLong p={d['delong_p']})")
    out = Path(result["out"])
    lines += [f"  (over seeds: stroke-tss demo --gates {out} OUT_OF_ANOTHER_SEED ...)"]
    lines += ["", f"report:   {result['report']}", f"ROC:      {out / 'run' / 'roc_tss_lt_4h5.png'}",
              f"summary:  {out / 'run' / 'summary.json'}"]
    if "png" in result["gradcam"]:
        ratio = (result["gradcam"].get("overlap") or {}).get("ratio", float("nan"))
        lines.append(f"Grad-CAM: {result['gradcam']['png']}  (lesion in the top 5% of the map: {ratio:.1f}x chance)")
    return "\n".join(lines)
