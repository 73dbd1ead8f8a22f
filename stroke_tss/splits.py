"""Subject-level splits: stratified k-fold with inner validation, fixed hold-out, leave-one-site-out.

Splits are by subject (both hemispheres travel together), seeded, and written once to ``RUN/splits.json``
before any fold starts; every later fold and resumed job reads the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stroke_tss.config import Config
from stroke_tss.errors import UserError
from stroke_tss.tasks import subject_strata

SPLIT_KINDS = ("kfold", "holdout", "loso")
SCHEMA = 1


def _stratified_chunks(ids: np.ndarray, strata: np.ndarray, num_chunks: int,
                       rng: np.random.Generator) -> list[list[str]]:
    """Deal subjects round-robin into chunks within each stratum (shuffled), so each chunk keeps the mix."""
    chunks: list[list[str]] = [[] for _ in range(num_chunks)]
    offset = 0
    for value in sorted(set(strata.tolist()), key=str):
        members = ids[strata == value]
        members = members[rng.permutation(members.size)]
        for i, sid in enumerate(members):
            chunks[(offset + i) % num_chunks].append(str(sid))
        offset += members.size  # carry on dealing where the last stratum stopped: sizes stay balanced
    return chunks


def _inner_val(train: list[str], strata_of: dict[str, object], val_fraction: float,
               rng: np.random.Generator) -> tuple[list[str], list[str]]:
    if not train:
        return [], []
    ids = np.array(sorted(train))
    strata = np.array([str(strata_of[s]) for s in ids])
    val: list[str] = []
    for value in sorted(set(strata.tolist())):
        members = ids[strata == value]
        members = members[rng.permutation(members.size)]
        val += members[: int(round(val_fraction * members.size))].tolist()
    if not val:
        val = [str(ids[rng.integers(ids.size)])]
    vs = set(val)
    return [s for s in ids.tolist() if s not in vs], sorted(val)


def make_splits(subject_ids: Sequence[str], *, kind: str = "kfold", strata: Sequence[object] | None = None,
                sites: Sequence[str] | None = None, num_folds: int = 5, val_fraction: float = 0.2,
                holdout: tuple[float, float, float] = (0.64, 0.16, 0.20), seed: int = 0) -> dict:
    """Folds of ``{"train", "val", "test"}`` subject lists.

    ``kfold``: stratified k-fold; each fold's non-test subjects are split again into train and validation.
    ``holdout``: one fold with the paper's fixed 64/16/20 stratified partition.
    ``loso``: one fold per site, the site is the test set.
    """
    ids = np.array([str(s) for s in subject_ids])
    if len(set(ids.tolist())) != ids.size:
        dup = sorted({s for s in ids.tolist() if (ids == s).sum() > 1})
        raise UserError(f"subject ids repeat in the subjects table: {', '.join(dup[:5])}")
    strata_arr = np.array(["_"] * ids.size if strata is None else [str(s) for s in strata])
    if strata_arr.size != ids.size:
        raise ValueError("strata must give one value per subject")
    strata_of = dict(zip(ids.tolist(), strata_arr.tolist()))
    rng = np.random.default_rng(seed)
    folds: list[dict[str, list[str]]] = []
    if kind == "kfold":
        if not 2 <= num_folds <= ids.size:
            raise UserError(f"cv.folds={num_folds} must be between 2 and the number of subjects ({ids.size})")
        tests = _stratified_chunks(ids, strata_arr, num_folds, rng)
        for test in tests:
            ts = set(test)
            train, val = _inner_val([s for s in ids.tolist() if s not in ts], strata_of, val_fraction, rng)
            folds.append({"train": train, "val": val, "test": sorted(test)})
    elif kind == "holdout":
        if len(holdout) != 3 or abs(sum(holdout) - 1) > 1e-6 or min(holdout) < 0:
            raise UserError(f"holdout fractions {holdout} must be three non-negative numbers summing to 1")
        parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for value in sorted(set(strata_arr.tolist())):
            members = ids[strata_arr == value]
            members = members[rng.permutation(members.size)]
            n_test = int(round(holdout[2] * members.size))
            n_val = int(round(holdout[1] * members.size))
            parts["test"] += members[:n_test].tolist()
            parts["val"] += members[n_test:n_test + n_val].tolist()
            parts["train"] += members[n_test + n_val:].tolist()
        folds.append({k: sorted(v) for k, v in parts.items()})
    elif kind == "loso":
        if sites is None:
            raise UserError("leave-one-site-out needs a 'site' column in the subjects table")
        site_arr = np.array([str(s) for s in sites])
        if len(set(site_arr.tolist())) < 2:
            raise UserError("leave-one-site-out needs at least two sites in the 'site' column")
        for site in sorted(set(site_arr.tolist())):
            test = ids[site_arr == site].tolist()
            rest = ids[site_arr != site].tolist()
            train, val = _inner_val(rest, strata_of, val_fraction, rng)
            folds.append({"train": train, "val": val, "test": sorted(test), "site": site})
    else:
        raise UserError(f"unknown split kind {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
    return {"schema": SCHEMA, "kind": kind, "seed": seed, "num_subjects": int(ids.size), "folds": folds}


def write_splits_once(path: str | Path, splits: dict) -> dict:
    """Write ``splits`` to ``path`` unless a file is already there; return what the file holds.

    The create is exclusive, so concurrent folds starting together agree on one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(splits, indent=1))
    try:
        os.link(tmp, path)  # atomic and fails if the file exists: first writer wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return read_splits(path)


def read_splits(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: run the first fold or `stroke-tss cv` to write it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it to write the splits again") from None
    if data.get("schema") != SCHEMA or "folds" not in data:
        raise UserError(f"{path} is not a splits file of schema {SCHEMA}; delete it to write the splits again")
    return data


def fold_of(splits: dict, fold: int) -> dict[str, list[str]]:
    """The subject lists of one fold; ValueError naming the valid range."""
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise UserError(f"--fold {fold} is outside 0..{len(folds) - 1} (splits.json holds {len(folds)} folds)")
    return folds[fold]


def ensure_splits(cfg: Config, table: pd.DataFrame) -> dict:
    """RUN/splits.json, written once from the store's subjects ``table``; every fold and rank reads the same."""
    path = Path(cfg.run.dir) / "splits.json"
    if path.exists():
        return read_splits(path)
    splits = make_splits(list(table["subject_id"]), kind=cfg.cv.kind, num_folds=cfg.cv.folds,
                         val_fraction=cfg.cv.val_fraction, seed=cfg.seed,
                         strata=subject_strata(table, cfg.cv.stratify),
                         sites=list(table["site"].astype(str)) if "site" in table else None)
    return write_splits_once(path, splits)
