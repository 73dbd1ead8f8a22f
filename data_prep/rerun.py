"""What a re-run of `prep` does with subjects the store already holds.

The store's config is the run's (create_or_extend refuses another), so a finished subject's volumes are still
right exactly when its inputs are: the image files of its row and the values that shape its images (b_value
for a derived b0). Each record keeps a fingerprint of them. A re-run re-processes a subject whose inputs
changed and, for every other finished subject, rewrites the record's manifest columns (onset, side, clinical
values, paths) from the manifest, so a fixed onset time reaches the labels without re-processing anything.

Files are compared by size and modification time first, by SHA-256 only when those differ: a re-run stats
each file and reads none in the common case, and a cohort copied elsewhere (new paths, new times, same bytes)
is still recognised.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from data_prep import store as st
from data_prep.cohort import IMAGE_COLUMNS
from data_prep.paths import subject_path

SHAPING_VALUES = ("b_value", "derived")
"""Manifest values that change the images themselves, not only the table."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file(path: Path, *, with_hash: bool) -> dict:
    stat = path.stat()
    out = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        out["sha256"] = _sha256(path)
    return out


def _present(value) -> bool:
    return value not in (None, "") and not (isinstance(value, float) and math.isnan(value))


def fingerprint(row: dict) -> dict:
    """Worker side, while processing: every input file of the row (size, time, SHA-256) and shaping values."""
    files = {col: _file(Path(row[col]), with_hash=True) for col in IMAGE_COLUMNS if _present(row.get(col))}
    return {"files": files, "values": {key: row.get(key) for key in SHAPING_VALUES}}


def changed_inputs(record: dict, row: dict) -> tuple[list[str], dict | None]:
    """(inputs that changed, the record's fingerprint refreshed where only times moved); driver side.

    A record of an earlier version has no fingerprint: its files are taken as they are now (nothing to compare
    with), and the refreshed fingerprint says so by existing."""
    old = record.get("inputs")
    columns = [col for col in IMAGE_COLUMNS if _present(row.get(col))]
    if old is None:
        return [], {"files": {col: _file(Path(row[col]), with_hash=True) for col in columns},
                    "values": {key: row.get(key) for key in SHAPING_VALUES}}
    changed = sorted(set(old["files"]) ^ set(columns))
    changed += [key for key in SHAPING_VALUES if old["values"].get(key) != row.get(key)]
    files, refreshed = dict(old["files"]), False
    for col in columns:
        if col not in old["files"]:
            continue
        now = _file(Path(row[col]), with_hash=False)
        was = old["files"][col]
        if now["size"] == was["size"] and now["mtime_ns"] == was["mtime_ns"]:
            continue
        digest = _sha256(Path(row[col])) if now["size"] == was["size"] else None
        if digest == was["sha256"]:
            files[col], refreshed = {**now, "sha256": digest}, True  # touched or copied, same bytes
        else:
            changed.append(col)
    if changed:
        return sorted(set(changed)), None
    return [], ({"files": files, "values": old["values"]} if refreshed else None)


def manifest_update(record: dict, row: dict) -> tuple[dict, list[str]]:
    """(the record with its manifest columns from `row`, the columns whose value changed)."""
    keys = set(row)
    # a record of an earlier version does not list its manifest columns: columns can be updated, not dropped
    old_keys = set(record.get("manifest_keys") or ()) - keys
    changed = sorted(k for k in keys if not _same(record.get(k), row[k]) and k != "subject_id")
    changed += sorted(old_keys)
    out = {k: v for k, v in record.items() if k not in old_keys}
    out.update(row)
    out["manifest_keys"] = sorted(keys)
    return out, changed


def _same(a, b) -> bool:
    return a == b or (not _present(a) and not _present(b))  # None, "" and NaN all mean "not given"


def record_of(store: Path, sid: str) -> dict:
    return json.loads(subject_path(store / "records", sid, ".json").read_text())


def drop_record(store: Path, sid: str) -> None:
    """The subject is no longer done: a crash before its new record leaves it to the next run, not stale."""
    os.remove(subject_path(store / "records", sid, ".json"))


def refresh(store: Path, rows: dict[str, dict], done: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Driver, before submitting: ({sid: changed inputs} to re-process, {sid: manifest columns updated}).

    Records of subjects to re-process are removed here; the others are rewritten when anything changed."""
    redo, updated = {}, {}
    for sid in sorted(done & set(rows)):
        record = record_of(store, sid)
        changed, inputs = changed_inputs(record, rows[sid])
        if changed:
            redo[sid] = changed
            drop_record(store, sid)
            continue
        new, columns = manifest_update(record, rows[sid])
        if inputs is not None:
            new["inputs"] = inputs
        if columns:
            updated[sid] = columns
        if columns or inputs is not None:
            st.write_record(store, new)
    return redo, updated
