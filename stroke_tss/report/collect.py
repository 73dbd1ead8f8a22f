"""Read run folders (RUN/<variant>/fold-<k>/<phase>/) into one tidy predictions frame and one log frame."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stroke_tss.config.loader import read_yaml
from stroke_tss.config.schema import RUN_FOLDERS
from stroke_tss.errors import UserError

PREDICTION_COLUMNS = ("subject_id", "hemisphere", "task", "label", "probability", "split")
KEYS = ("run", "variant", "fold", "phase")
_FOLD = re.compile(r"^fold-(\d+)$")


@dataclass(frozen=True)
class PhaseDir:
    run: str
    variant: str
    fold: int
    phase: str
    path: Path


def run_names(runs: list[Path]) -> list[str]:
    """Folder names, made unique with their parent when two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def phase_dirs(runs: list[str | Path]) -> list[PhaseDir]:
    """Every RUN/<variant>/fold-<k>/<phase>/ folder, in a stable order; RUN/genesis/fold-<k>/ and the run
    folder's other own folders (RUN_FOLDERS) are no variant."""
    runs = [Path(r) for r in runs]
    out = []
    for run, name in zip(runs, run_names(runs)):
        if not run.is_dir():
            raise UserError(f"run folder {run} does not exist; pass the folder `stroke-tss train` wrote")
        for variant in sorted(p for p in run.iterdir() if p.is_dir() and p.name not in RUN_FOLDERS):
            for fold in sorted(variant.iterdir()):
                match = _FOLD.match(fold.name)
                if not (fold.is_dir() and match):
                    continue
                out += [PhaseDir(name, variant.name, int(match.group(1)), phase.name, phase)
                        for phase in sorted(fold.iterdir()) if phase.is_dir()]
    return out


def read_predictions(path: Path) -> pd.DataFrame:
    """One predictions.csv, checked: the columns the report needs, labels 0/1, probabilities in [0, 1]."""
    df = pd.read_csv(path, dtype={"subject_id": str})
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; predictions.csv needs "
                        f"{', '.join(PREDICTION_COLUMNS)}")
    bad = df[~df["label"].isin((0, 1))]
    if not bad.empty:
        raise UserError(f"{path}: subject {bad['subject_id'].iloc[0]}: field label is {bad['label'].iloc[0]!r}, "
                        "not 0 or 1; re-run the phase that wrote it")
    bad = df[~df["probability"].between(0, 1)]
    if not bad.empty:
        raise UserError(f"{path}: subject {bad['subject_id'].iloc[0]}: field probability is "
                        f"{bad['probability'].iloc[0]!r}, outside [0, 1]; re-run the phase that wrote it")
    return df


def collect_predictions(runs: list[str | Path]) -> pd.DataFrame:
    """All predictions of all runs with run, variant, fold, phase columns in front."""
    frames = []
    for d in phase_dirs(runs):
        path = d.path / "predictions.csv"
        if path.is_file():
            df = read_predictions(path)
            frames.append(df.assign(run=d.run, variant=d.variant, fold=d.fold, phase=d.phase))
    if not frames:
        raise UserError(f"no predictions.csv under {', '.join(map(str, runs))}; train (or finish) a run first")
    df = pd.concat(frames, ignore_index=True)
    return df[[*KEYS, *[c for c in df.columns if c not in KEYS]]]


def collect_logs(runs: list[str | Path]) -> pd.DataFrame:
    """Every log.jsonl line (one per epoch) with run, variant, fold, phase columns; empty when none."""
    rows = []
    for d in phase_dirs(runs):
        path = d.path / "log.jsonl"
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A job killed mid-write leaves a torn last line; the epochs before it still count.
                if number == len(path.read_text().splitlines()):
                    continue
                raise UserError(f"{path}: line {number} is not JSON; the log is damaged") from None
            rows.append({"run": d.run, "variant": d.variant, "fold": d.fold, "phase": d.phase, **record})
    return pd.DataFrame(rows)


def run_config(run: str | Path) -> dict:
    """RUN/config.yaml as a plain dict ({} when absent)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return {}
    return read_yaml(path) or {}


def tested_folds(pred: pd.DataFrame) -> list[int]:
    """The folds that wrote test predictions (a run still training has fewer than its splits)."""
    return sorted(int(k) for k in pred.loc[pred["split"] == "test", "fold"].unique())


def store_path(runs: list[str | Path]) -> Path | None:
    """The store the (first) run trained on, from its config.yaml (data.store)."""
    for run in runs:
        store = (run_config(run).get("data") or {}).get("store")
        if store:
            return Path(store)
    return None


def schedule_order(runs: list[str | Path]) -> list[str]:
    """Phase names in the order the runs' config.yaml schedules them (first run first), for tables and plots."""
    order: list[str] = []
    for run in runs:
        order += [p for p in (run_config(run).get("phases") or {}) if p not in order]
    return order
