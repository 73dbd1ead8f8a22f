"""Check a store or a run folder end to end: what is damaged, by subject or phase, and what to re-run.

    report = verify("runs/tiny")      # or a store
    print(*report.lines(), sep="\n"); sys.exit(0 if report.ok else 1)

A run folder: config.yaml valid and agreeing with splits.json (and the subjects of splits.json in the store,
when the store is there); every phase that finished has a weights.pt matching its digest, a metrics.json and
a predictions.csv of its fold's subjects, and every Models Genesis folder (one per fold, or RUN/genesis/) that
finished its weights.pt; every checkpoint tag matches the digests of its save, and best-weights.pt its own.
A store: `data_prep.verify.verify_store`, subject by subject.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep import store as stores
from data_prep.errors import InputError
from data_prep.verify import verify_store
from hpc.checkpoint import Checkpoints, load_file
from hpc.errors import CheckpointError
from stroke_tss.config import Config
from stroke_tss.errors import UserError
from stroke_tss.pretrain import genesis_dir
from stroke_tss.runs.folder import read_run_config, splits_mismatch
from stroke_tss.schedule import resolve_variant
from stroke_tss.splits import read_splits
from stroke_tss.weights import load_weights

_PREDICTION_COLUMNS = ["subject_id", "hemisphere", "task", "label", "probability", "split"]


@dataclass
class Report:
    """What `verify` found: ``damaged`` lines (each naming what, where and what to do) and ``notes``."""

    target: Path
    kind: str
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def lines(self) -> list[str]:
        summary = ", ".join(f"{n} {what}" for what, n in self.counts.items()) or "nothing to check"
        verdict = "intact" if self.ok else f"{len(self.damaged)} problem(s)"
        return ([f"damaged: {line}" for line in self.damaged] + [f"note: {line}" for line in self.notes]
                + [f"{self.target} ({self.kind}): {verdict}; {summary}"])


def verify(path: str | Path) -> Report:
    """Check the store or run folder at ``path``."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        report = Report(path, "store")
        report.damaged += verify_store(path)
        try:
            report.counts["subjects in its table"] = len(stores.open_store(path).table)
        except InputError:
            pass  # verify_store said why
        return report
    if (path / "config.yaml").is_file():
        return verify_run(path)
    raise UserError(f"{path} is neither a store (no zarr.json) nor a run folder (no config.yaml); pass STORE or RUN")


def verify_run(run_dir: str | Path) -> Report:
    run_dir = Path(run_dir)
    report = Report(run_dir, "run")
    try:
        cfg = read_run_config(run_dir)
    except UserError as exc:
        report.damaged.append(f"{exc}; nothing else can be checked without it: restore it, or make the run again")
        return report
    splits = _check_splits(cfg, run_dir, report)
    if (run_dir / "genesis").is_dir():
        _check_genesis(cfg, run_dir, report, splits)
    for variant in cfg.variants:
        phases = resolve_variant(cfg, variant).phases
        for k, fold in enumerate(splits["folds"] if splits else []):
            rerun = f"stroke-tss train {run_dir}/config.yaml --fold {k} --variant {variant} run.dir={run_dir}"
            for phase in phases:
                _check_phase(run_dir / variant / f"fold-{k}" / phase, report,
                             subjects=set(fold["val"]) | set(fold["test"]), rerun=rerun)
    return report


def _check_genesis(cfg: Config, run_dir: Path, report: Report, splits: dict | None) -> None:
    """The Models Genesis folders: RUN/genesis/fold-<k>/ for every fold of splits.json under
    `genesis.subjects: fold` (none known without it), else RUN/genesis/ itself."""
    per_fold = cfg.genesis.subjects == "fold"
    items = list(range(len(splits["folds"]) if splits else 0)) if per_fold else [None]
    for item in items:
        fold = "" if item is None else f" --fold {item}"
        _check_phase(genesis_dir(run_dir, subjects=cfg.genesis.subjects, fold=item), report, subjects=None,
                     rerun=f"stroke-tss pretrain {run_dir}/config.yaml{fold} run.dir={run_dir}")


def _check_splits(cfg: Config, run_dir: Path, report: Report) -> dict | None:
    path = run_dir / "splits.json"
    if not path.is_file():
        report.notes.append(f"{path} is not written yet: no fold has started")
        return None
    try:
        splits = read_splits(path)
    except UserError as exc:
        report.damaged.append(f"{exc} (only if no fold has trained yet: the folds' results came from it)")
        return None
    problem = splits_mismatch(cfg, splits)
    if problem:
        report.damaged.append(f"{path} disagrees with config.yaml ({problem}); the folder mixes two experiments: "
                              "make the run again in a new run.dir")
    if not Path(cfg.data.store).exists():
        report.notes.append(f"data.store {cfg.data.store} is not there: its subjects were not compared")
        return splits
    try:
        table = stores.open_store(cfg.data.store).table
    except InputError as exc:
        report.notes.append(f"data.store cannot be opened ({exc}): its subjects were not compared")
        return splits
    listed = {s for fold in splits["folds"] for role in ("train", "val", "test") for s in fold[role]}
    absent = sorted(listed - set(table["subject_id"].astype(str)))
    if absent:
        report.damaged.append(f"{path}: {len(absent)} subject(s) not in data.store {cfg.data.store}, e.g. "
                              f"{', '.join(absent[:3])}; point data.store at the store the run was made with")
    return splits


def _check_phase(phase_dir: Path, report: Report, *, subjects: set[str] | None, rerun: str) -> None:
    """One phase (or genesis) folder: its outputs when it finished, its checkpoints in any case."""
    intact_tags = _check_checkpoints(phase_dir / "ckpt", report)
    weights = phase_dir / "weights.pt"
    if not weights.is_file():
        report.count("phases not finished" if phase_dir.is_dir() else "phases not started")
        return
    # Outputs a re-run writes again: from the phase's last checkpoint when one is intact, else from scratch.
    redo = (f"delete {weights} and re-run `{rerun}` (it rebuilds the outputs from the last checkpoint)"
            if intact_tags else f"delete {phase_dir} and re-run `{rerun}` (it trains the phase again)")
    problems = []
    try:
        blob = load_weights(weights)
        if "sha256" not in blob:
            report.notes.append(f"{weights} records no digest (written by an older version): not verifiable")
    except (UserError, CheckpointError) as exc:
        problems.append(str(exc).split("; ")[0])
    if (phase_dir / "metrics.json").is_file() or subjects is not None:
        problems += _check_metrics(phase_dir / "metrics.json")
    if subjects is not None:
        problems += _check_predictions(phase_dir / "predictions.csv", subjects)
    for problem in problems:
        report.damaged.append(f"{phase_dir}: {problem}; {redo}")
    report.count("phases finished and verified" if not problems else "phases damaged")


def _check_checkpoints(folder: Path, report: Report) -> int:
    """Damage and unverifiable tags of a ckpt folder; returns how many tags are intact."""
    ckpts = Checkpoints(folder)
    intact = 0
    for tag in ckpts.tags():
        problems = ckpts.verify(tag)
        if problems:
            report.damaged.append(f"checkpoint {folder / tag}: {'; '.join(problems)}; delete it: resuming falls back "
                                  "to the tag before it")
            continue
        intact += 1
        if ckpts.verifiable(tag):
            report.count("checkpoints verified")
        else:
            report.count("checkpoints unverifiable (saved before digests)")
    best = folder / "best-weights.pt"
    if best.is_file():
        try:
            load_file(best, fix=f"delete {folder.parent} and re-run its phase (the best epoch's weights cannot be "
                                "made again otherwise)")
            report.count("best weights verified")
        except CheckpointError as exc:
            report.damaged.append(str(exc))
    return intact


def _check_metrics(path: Path) -> list[str]:
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return ["metrics.json is missing"]
    except (ValueError, UnicodeDecodeError):
        return ["metrics.json is not valid JSON"]
    return [] if isinstance(metrics, dict) else ["metrics.json is not a mapping of splits to metrics"]


def _check_predictions(path: Path, subjects: set[str]) -> list[str]:
    try:
        pred = pd.read_csv(path, dtype={"subject_id": str})
    except FileNotFoundError:
        return ["predictions.csv is missing"]
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        return [f"predictions.csv is unreadable ({str(exc).splitlines()[0]})"]
    missing = [c for c in _PREDICTION_COLUMNS if c not in pred.columns]
    if missing:
        return [f"predictions.csv lacks column(s) {', '.join(missing)}"]
    prob = pd.to_numeric(pred["probability"], errors="coerce")
    if prob.isna().any() or not prob.between(0, 1).all():
        bad = pred.loc[prob.isna() | ~prob.between(0, 1), "subject_id"].astype(str).unique()
        return [f"predictions.csv has probabilities outside [0, 1] for subject(s) {', '.join(bad[:3])}"]
    strangers = sorted(set(pred["subject_id"].astype(str)) - subjects)
    if strangers:
        return [f"predictions.csv holds subject(s) outside its fold's val and test split, e.g. "
                f"{', '.join(strangers[:3])}: it was made with other splits"]
    return []
