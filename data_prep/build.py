"""`prep`: validate a manifest, then one Dask task per subject writes its block and record into the store.

The driver owns the store's metadata (creation, rows, attrs, table, failures); workers write only their own
subject's shards and record, so tasks never race. The histogram reference subject runs first (its quantiles
are the target of every other subject), then the rest stream through the cluster as it frees up.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep import qc
from data_prep import store as st
from data_prep.cohort import Manifest, SubjectRow, read_manifest
from data_prep.config import PrepConfig
from data_prep.errors import InputError
from data_prep.paths import subject_path
from data_prep.pipeline import preprocess_subject
from data_prep.rerun import fingerprint, refresh

log = logging.getLogger(__name__)
# one thread per worker for every numeric library, so a subject's result does not depend on scheduling
_SINGLE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NUMEXPR_NUM_THREADS")}


@dataclass
class PrepResult:
    store: Path
    done: list[str] = field(default_factory=list)
    """Subjects in the store after this run (earlier runs included)."""
    skipped: list[str] = field(default_factory=list)
    """Subjects already done before this run whose volumes were kept (inputs unchanged)."""
    failed: dict[str, str] = field(default_factory=dict)
    """subject_id (or manifest line) -> one-line reason; also in STORE/failures.csv."""
    reprocessed: dict[str, list[str]] = field(default_factory=dict)
    """Subjects done before whose input files changed -> those inputs; processed again in this run."""
    updated: dict[str, list[str]] = field(default_factory=dict)
    """Kept subjects whose manifest columns changed (a fixed onset time, a new clinical column) -> the columns."""


def process_subject(row: dict, *, store: str, index: int, config: dict, reference: dict | None) -> dict:
    """Worker task: preprocess, write the block, then the record. Returns the record or {'error': line}."""
    cfg = PrepConfig.model_validate(config)
    sid = row["subject_id"]
    try:
        inputs = fingerprint(row)  # before reading: a file replaced meanwhile is re-done next run, not missed
        result = preprocess_subject(row, config=cfg, reference=reference)
        st.write_subject(store, index, volume=result.volume, brain=result.brain, lesion=result.lesion)
        if cfg.qc_montage:
            qc.montage(subject_path(Path(store) / "qc", sid, ".png"), result, channels=cfg.channels, title=sid)
    except InputError as exc:
        return {"subject_id": sid, "error": str(exc)}
    except Exception as exc:  # one subject's crash must not stop the cohort; the reason goes to failures.csv
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"subject_id": sid, "error": f"subject {sid}: {type(exc).__name__}: {exc} "
                f"(at {Path(where.filename).name}:{where.lineno})"}
    record = {**_table_row(row), "index": index, **result.derived, "qc": result.qc,
              "landmarks": result.landmarks if reference is None else None, "inputs": inputs,
              "manifest_keys": sorted(row)}
    st.write_record(store, record)
    return record


def _table_row(row: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()}


def subject_dict(row: SubjectRow, channels: tuple[str, ...]) -> dict:
    """Manifest row -> plain dict the worker gets (paths as str; b0 stands in for t2 and back)."""
    out = row.as_dict()
    for name in channels:
        path = row.path(name)
        if path is not None:
            out[name] = str(path)
    return out


def _make_client(cluster, workers: int, cluster_options: dict | None, log_dir: Path):
    """(client, what to close afterwards): a client or cluster the caller passed stays open."""
    from distributed import Client, LocalCluster

    if isinstance(cluster, Client):
        return cluster, []
    if not isinstance(cluster, str):
        client = Client(cluster)
        return client, [client]
    env = dict(_SINGLE_THREAD_ENV)
    if cluster == "local":
        # ":0": any free port for the scheduler's HTTP endpoints, so two builds on one host do not clash
        # silence_logs: the scheduler's and nannies' INFO lines would drown the progress bar and our own logs
        lc = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          env=env, silence_logs=logging.WARNING, **(cluster_options or {}))
        client = Client(lc)
        return client, [client, lc]
    if cluster == "slurm":
        import dask
        from dask_jobqueue import SLURMCluster

        # worker job logs go next to the store, not into whatever folder prep was started from; scheduler
        # options of the user's Dask config (e.g. jobqueue.slurm.scheduler-options.interface: ib0) are kept
        scheduler = {**(dask.config.get("jobqueue.slurm.scheduler-options", None) or {}), "dashboard_address": ":0"}
        opts = {"cores": 1, "processes": 1, "memory": "4GB", "walltime": "01:00:00", "log_directory": str(log_dir),
                "scheduler_options": scheduler,
                "job_script_prologue": [f"export {k}={v}" for k, v in env.items()], **(cluster_options or {})}
        # Each worker retires (its tasks move elsewhere) before Slurm's time limit would kill it, and adapt
        # submits a new job for it: a build longer than one walltime finishes, with at most `workers` jobs.
        lifetime, stagger = _worker_lifetime(opts["walltime"])
        opts["worker_extra_args"] = [*opts.get("worker_extra_args", []), "--lifetime", f"{lifetime}s",
                                     "--lifetime-stagger", f"{stagger}s"]
        sc = SLURMCluster(**opts)
        sc.adapt(minimum_jobs=1, maximum_jobs=workers)
        client = Client(sc)
        client.wait_for_workers(1, timeout=300)
        return client, [client, sc]
    raise InputError(f"cluster must be 'local' or 'slurm', got {cluster!r}")


def _worker_lifetime(walltime: str) -> tuple[int, int]:
    """(lifetime, stagger) in seconds for a worker job of `walltime` ([D-]HH:MM:SS or MM:SS): it retires with
    a margin of a fifth of the walltime (at most 5 min) plus the stagger (1/20, at most 2 min) to spare."""
    days, _, clock = walltime.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        seconds = int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    except ValueError:
        raise InputError(f"walltime {walltime!r} is not [D-]HH:MM:SS; pass e.g. --walltime 01:00:00") from None
    margin, stagger = min(300, seconds // 5), min(120, seconds // 20)
    return max(10, seconds - margin - stagger), stagger


def prep(manifest: str | Path | Manifest, store: str | Path, *, config: PrepConfig | None = None,
         workers: int = 2, cluster="local", cluster_options: dict | None = None,
         progress: bool = True) -> PrepResult:
    """Build or complete `store` from `manifest`; failures are listed, never fatal to the rest.

    `cluster`: "local" (a LocalCluster of `workers` processes), "slurm" (dask-jobqueue, `workers` jobs,
    `cluster_options` passed to SLURMCluster), or a distributed Client / cluster the caller keeps open.
    """
    config = config or PrepConfig()
    if workers < 1:
        raise InputError(f"prep: workers must be >= 1, got {workers}")
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, channels=config.channels)
    store = Path(store).absolute()
    rows = {r.subject_id: subject_dict(r, config.channels) for r in manifest.rows}
    _check_reference_subject(config, manifest, store)  # before the store exists: a typo leaves nothing behind
    index = st.create_or_extend(store, config=config, subject_ids=list(rows))
    reprocess, updated = refresh(store, rows, st.done_subjects(store))
    done = st.done_subjects(store)
    failed: dict[str, str] = {f"manifest:{i}": line for i, line in enumerate(manifest.errors)}
    todo = [sid for sid in rows if sid not in done]
    result = PrepResult(store=store, skipped=[s for s in rows if s in done], reprocessed=reprocess,
                        updated=updated)
    reference = st.Store(store).attrs.get("reference_histogram")
    need_reference = config.zscore and config.histogram_match
    if need_reference and reference is None:
        reference = _reference_from_records(store, config)
    if todo:
        client, owned = _make_client(cluster, workers, cluster_options, store / "logs")
        try:
            if need_reference and reference is None:
                reference = _build_reference(client, rows, todo, index, store, config, failed, done)
            if need_reference and reference is None:
                todo = []  # every candidate failed: matching the rest to nothing would make a mixed store
            _run(client, [sid for sid in todo if sid not in done and sid not in failed], rows, index, store,
                 config, reference, failed, progress)
        finally:
            for thing in owned:
                thing.close()
    finish(store, failed=failed, valid=set(rows))
    result.done = sorted(st.done_subjects(store) & set(rows), key=index.get)
    result.failed = failed
    return result


def _check_reference_subject(config: PrepConfig, manifest: Manifest, store: Path) -> None:
    """A named histogram reference must be a valid row, unless the store already has its reference."""
    sid = config.reference_subject
    if sid is None or not (config.zscore and config.histogram_match) or sid in manifest.subject_ids:
        return
    if (store / "zarr.json").is_file() and st.check_is_store(store).get("reference_histogram"):
        return
    why = next((line for line in manifest.errors if line.startswith(f"subject {sid},")), None)
    raise InputError(f"reference_subject {sid!r} is not a valid subject of the manifest"
                     + (f" ({why})" if why else ""), field="reference_subject", file=manifest.path,
                     hint="name a subject of the manifest, or leave reference_subject empty for the first one")


def _reference_from_records(store: Path, config: PrepConfig) -> dict | None:
    """A run killed after the reference subject's record but before the attrs: take it from the record."""
    for path in sorted((store / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("landmarks"):
            reference = {"subject_id": rec["subject_id"], "levels": config.histogram_landmarks,
                         "channels": rec["landmarks"]}
            st.set_reference_histogram(store, reference)
            return reference
    return None


def _build_reference(client, rows, todo, index, store, config, failed, done) -> dict | None:
    """Run reference candidates one at a time until one succeeds; its landmarks become the store's."""
    candidates = [config.reference_subject] if config.reference_subject else todo
    for sid in candidates:
        rec = client.submit(process_subject, rows[sid], store=str(store), index=index[sid],
                            config=config.model_dump(mode="json"), reference=None, pure=False).result()
        if "error" in rec:
            failed[sid] = rec["error"]
            log.warning("prep: %s", rec["error"])
            continue
        reference = {"subject_id": sid, "levels": config.histogram_landmarks, "channels": rec["landmarks"]}
        st.set_reference_histogram(store, reference)
        done.add(sid)
        return reference
    return None


def _run(client, todo, rows, index, store, config, reference, failed, progress) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    cfg = config.model_dump(mode="json")
    futures = [client.submit(process_subject, rows[sid], store=str(store), index=index[sid], config=cfg,
                             reference=reference, key=f"prep-{sid}-{os.getpid()}", pure=False) for sid in todo]
    bar = tqdm(total=len(futures), desc="prep", unit="subject", disable=not progress)
    for future in as_completed(futures):
        rec = future.result()
        if "error" in rec:
            failed[rec["subject_id"]] = rec["error"]
            log.warning("prep: %s", rec["error"])
        bar.update(1)
        future.release()  # the driver keeps no subject data: memory stays flat in cohort size
    bar.close()


def finish(store: Path, *, failed: dict[str, str], valid: set[str]) -> None:
    """Driver: table, QC table and failures.csv from what is on disk now."""
    st.assemble_table(store)
    qc.qc_table(store)
    rows = [{"subject_id": "" if k.startswith("manifest:") else k, "reason": v} for k, v in failed.items()]
    pd.DataFrame(rows, columns=["subject_id", "reason"]).to_csv(store / "failures.csv", index=False)
