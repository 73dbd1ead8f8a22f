"""provenance.json: what produced a run folder (git sha, package versions, store hash, job ids)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("stroke-tss", "torch", "deepspeed", "numpy", "zarr", "monai", "pytorch-optimizer", "scikit-learn")


def git_sha(repo: Path | None = None) -> str | None:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def store_hash(store: Path) -> str:
    """Hash of the store's metadata and subjects table: changes when the store is rebuilt or extended."""
    h = hashlib.sha256()
    for name in ("zarr.json", "subjects.csv"):
        p = Path(store) / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_provenance(run_dir: Path, *, store: Path, extra: dict | None = None) -> Path:
    """Merge this job's facts into RUN/provenance.json (job ids accumulate across folds and requeues)."""
    path = Path(run_dir) / "provenance.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    jobs = data.get("slurm_job_ids", [])
    if job and job not in jobs:
        jobs.append(job)
    data.update({"git_sha": git_sha(), "versions": versions(), "store": str(store), "store_hash": store_hash(store),
                 "slurm_job_ids": jobs, "argv": sys.argv, "host": platform.node(), **(extra or {})})
    tmp = path.with_name(f".provenance.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path
