"""scan_tree: a BIDS / ISLES'22-style folder (or one folder per subject) -> manifest table.

The series is the last `_` token of the file name, matched case-insensitively (`sub-1_ses-1_DWI.nii.gz`,
`dwi.nii.gz`); the subject is the BIDS `sub-` entity (plus `ses-` when a subject has several sessions),
else the first folder under the root. Masks live under `derivatives/` in BIDS (`*_msk`), or anywhere
named `lesion*`/`*_msk`/`brain_mask`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from data_prep.errors import InputError

log = logging.getLogger(__name__)

# name token (lower case) -> manifest column
TOKENS = {
    "dwi": "dwi", "trace": "dwi", "adc": "adc", "flair": "flair", "b0": "b0", "t2w": "t2", "t2": "t2",
    "msk": "lesion_mask", "lesion": "lesion_mask", "lesionmask": "lesion_mask", "roi": "lesion_mask",
    "brainmask": "brain_mask", "brain_mask": "brain_mask",
}
ORDER = ("subject_id", "dwi", "b0", "t2", "flair", "adc", "lesion_mask", "brain_mask")
_ENTITY = re.compile(r"^(sub|ses)-([A-Za-z0-9]+)")


def _stem(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return ""


def _column(rel: Path) -> str | None:
    stem = _stem(rel.name).lower()
    if stem in TOKENS:
        return TOKENS[stem]
    if "desc-brain" in stem and stem.endswith("mask"):
        return "brain_mask"
    token = stem.rsplit("_", 1)[-1]
    column = TOKENS.get(token)
    if column == "lesion_mask" or column is None and token == "mask":
        # BIDS masks sit under derivatives/; a bare *_mask elsewhere is most often a lesion label too
        return "lesion_mask"
    return column


def _entities(rel: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in (*rel.parts[:-1], *_stem(rel.name).split("_")):
        m = _ENTITY.match(part)
        if m and m.group(1) not in found:
            found[m.group(1)] = f"{m.group(1)}-{m.group(2)}"
    return found


def scan_tree(root: str | Path, *, clinical: str | Path | pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per subject with absolute image paths; `clinical` columns merged by subject_id."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise InputError(f"scan: {root} is not a folder (give the dataset's root folder)")
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not _stem(name):
                continue
            rel = (Path(dirpath) / name).relative_to(root)
            column = _column(rel)
            if column is None:
                continue
            ent = _entities(rel)
            sub = ent.get("sub") or (rel.parts[0] if len(rel.parts) > 1 else None)
            if sub is None:
                continue
            key = (sub, ent.get("ses", ""))
            cols = found.setdefault(key, {})
            if column in cols:
                raise InputError(f"scan: subject {sub}: two files for {column}: {cols[column]} and "
                                 f"{root / rel} (remove one, or write the manifest by hand)")
            cols[column] = root / rel
    if not found:
        raise InputError(f"scan: no NIfTI series (*_dwi, *_adc, *_flair, *_b0, *_T2w) found under {root}")
    sessions: dict[str, int] = {}
    for sub, _ses in found:
        sessions[sub] = sessions.get(sub, 0) + 1
    rows = []
    for (sub, ses), cols in sorted(found.items()):
        sid = f"{sub}_{ses}" if sessions[sub] > 1 and ses else sub
        rows.append({"subject_id": sid, **{k: str(v) for k, v in cols.items()}})
    table = pd.DataFrame(rows)
    table = table[[c for c in ORDER if c in table.columns]]
    if clinical is not None:
        table = merge_clinical(table, clinical)
    return table


def merge_clinical(table: pd.DataFrame, clinical: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Left-join clinical columns by subject_id (`participant_id` accepted; `sub-` prefix optional)."""
    if not isinstance(clinical, pd.DataFrame):
        path = Path(clinical)
        if not path.is_file():
            raise InputError(f"scan: clinical table {path} not found (give a CSV or TSV with subject_id)")
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        clinical = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    clinical = clinical.rename(columns={"participant_id": "subject_id"})
    if "subject_id" not in clinical.columns:
        raise InputError("scan: the clinical table needs a subject_id (or participant_id) column")

    def bare(s: str) -> str:
        return str(s).split("_")[0].removeprefix("sub-")

    # an id of several sessions (sub-1_ses-2) takes the subject's clinical row
    clinical = clinical.assign(_key=clinical["subject_id"].map(bare)).drop(columns="subject_id")
    clinical = clinical.drop_duplicates("_key")
    merged = table.assign(_key=table["subject_id"].map(bare)).merge(clinical, on="_key", how="left")
    missing = merged.loc[merged[clinical.columns.drop("_key")].isna().all(axis=1), "subject_id"].tolist()
    if missing and len(clinical.columns) > 1:
        log.warning("scan: no clinical row for %d subject(s): %s", len(missing), ", ".join(missing[:10]))
    return merged.drop(columns="_key")
