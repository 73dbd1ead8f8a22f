"""Ensembles of variants (config `ensembles: {name: [variants]}`): per fold and phase, the mean of the
members' probabilities per sample.

An ensemble is written as a variant of its own, RUN/<name>/fold-<k>/<phase>/{predictions.csv, metrics.json},
so summary.json, the report and DeLong treat it like any trained variant; its thresholds come from its own
validation predictions like theirs. It has no weights.pt, so predict and explain never take it for a model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from stroke_tss.errors import UserError
from stroke_tss.metrics import phase_metrics
from stroke_tss.report.collect import read_predictions, run_config

log = logging.getLogger(__name__)

KEY = ["subject_id", "hemisphere", "task", "split"]


def mean_predictions(members: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean probability per sample over the members' predictions (each must hold the same samples and labels)."""
    names = list(members)
    first = members[names[0]]
    index = pd.MultiIndex.from_frame(first[KEY].astype(str))
    probs = []
    for name in names:
        frame = members[name]
        own = pd.MultiIndex.from_frame(frame[KEY].astype(str))
        if len(own) != len(index) or not own.sort_values().equals(index.sort_values()) or own.has_duplicates:
            raise UserError(f"ensemble member {name} predicted other samples than {names[0]}; members must share "
                            "splits and task (re-run the members with one config)")
        series = pd.Series(frame["probability"].to_numpy(), index=own)
        labels = pd.Series(frame["label"].to_numpy(), index=own).reindex(index)
        if not (labels.to_numpy() == first["label"].to_numpy()).all():
            raise UserError(f"ensemble member {name} has other labels than {names[0]} for the same samples; "
                            "the members were trained on different stores")
        probs.append(series.reindex(index).to_numpy())
    out = first[[*KEY, "label"]].copy()
    out["probability"] = sum(probs) / len(probs)
    return out[["subject_id", "hemisphere", "task", "label", "probability", "split"]]


def write_ensemble(run_dir: Path, name: str, members: list[str]) -> list[Path]:
    """RUN/<name>/fold-<k>/<phase>/ for every fold and phase all members finished with the same task (a phase
    name the members share for different tasks is skipped with a log line); returns the folders."""
    run_dir = Path(run_dir)
    written = []
    folds = sorted({p.name for m in members for p in (run_dir / m).glob("fold-*") if p.is_dir()})
    for fold in folds:
        phases = sorted({p.parent.name for m in members for p in (run_dir / m / fold).glob("*/predictions.csv")})
        for phase in phases:
            paths = {m: run_dir / m / fold / phase / "predictions.csv" for m in members}
            missing = [m for m, p in paths.items() if not p.is_file()]
            if missing:
                log.info("ensemble %s: %s/%s waits for %s", name, fold, phase, ", ".join(missing))
                continue
            frames = {m: read_predictions(p) for m, p in paths.items()}
            tasks = {m: ",".join(sorted(set(f["task"].astype(str)))) for m, f in frames.items()}
            if len(set(tasks.values())) > 1:  # e.g. 2d's lesion phase (lesion_present) and 2d_seg's (lesion_seg)
                log.info("ensemble %s: %s/%s skipped: its members predict different tasks (%s)", name, fold, phase,
                         "; ".join(f"{m}: {t}" for m, t in tasks.items()))
                continue
            pred = mean_predictions(frames)
            out = run_dir / name / fold / phase
            out.mkdir(parents=True, exist_ok=True)
            pred.to_csv(out / "predictions.csv", index=False)
            (out / "metrics.json").write_text(json.dumps(phase_metrics(pred), indent=1))
            (out / "members.json").write_text(json.dumps({"members": members}))
            written.append(out)
    return written


def write_ensembles(run_dir: str | Path) -> list[Path]:
    """Every ensemble of the run's config.yaml, from what its members have finished."""
    written = []
    for name, members in (run_config(run_dir).get("ensembles") or {}).items():
        written += write_ensemble(Path(run_dir), name, list(members))
    return written
