"""`verify_store`: a store checked end to end, one line per problem naming the subject and what to re-run."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.store import (
    DAMAGE_ERRORS,
    StoreError,
    check_is_store,
    damage_reason,
    done_subjects,
    missing_chunks,
    open_arrays,
    read_table,
    redo_hint,
)


def verify_store(path: str | Path) -> list[str]:
    """Check a store end to end: metadata, records, table, every finished subject's chunks (present and
    decoding, checksums included). One line per problem: subject, what is wrong, what to re-run; [] = intact."""
    path = Path(path)
    try:
        attrs = check_is_store(path)
        _, arrays = open_arrays(path, mode="r")
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    index = attrs.get("subject_index") or {}
    records: dict[str, dict] = {}
    for file in sorted((path / "records").glob("*.json")):
        sid = file.stem
        try:
            record = json.loads(file.read_text())
            row = int(record["index"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            problems.append(f"subject {sid}: record {file} unreadable ({type(exc).__name__}); delete it and run "
                            f"`stroke-tss prep MANIFEST {path}` again")
            continue
        if record.get("subject_id") != sid or index.get(sid) != row:
            problems.append(f"subject {sid}: record {file} names subject {record.get('subject_id')!r} at row {row}, "
                            f"the store has it at row {index.get(sid)}; {redo_hint(path, sid)}")
            continue
        records[sid] = record
    try:
        table = read_table(path)
    except (ValueError, OSError) as exc:
        table = None
        problems.append(f"{path}/subjects.csv: unreadable ({type(exc).__name__}); run `stroke-tss prep MANIFEST "
                        f"{path}` again, it rewrites the table from the records")
    finished = done_subjects(path)
    if table is not None and set(table["subject_id"]) != finished:
        stale = sorted(set(table["subject_id"]) ^ finished)
        problems.append(f"{path}/subjects.csv: out of date with the records (subjects {', '.join(stale[:5])}); "
                        f"run `stroke-tss prep MANIFEST {path}` again, it rewrites the table")
    reference = (attrs.get("reference_histogram") or {}).get("subject_id")
    if reference is not None and reference not in finished:
        problems.append(f"subject {reference}: the histogram reference has no record; "
                        f"run `stroke-tss prep MANIFEST {path}` again with it in the manifest")
    complete = attrs.get("integrity", {}).get("empty_chunks") == "written"
    for sid, record in records.items():
        row = int(record["index"])
        missing = missing_chunks(path, arrays, row) if complete else []
        if missing:
            problems.append(f"subject {sid}: {len(missing)} chunk file(s) missing ({missing[0]}); "
                            f"{redo_hint(path, sid)}")
            continue
        for name, arr in arrays.items():
            try:
                arr[row]
            except DAMAGE_ERRORS as exc:
                problems.append(f"subject {sid}: {name} chunk unreadable ({damage_reason(exc)}); "
                                f"{redo_hint(path, sid)}")
                break
    return problems

