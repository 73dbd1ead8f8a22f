"""The run folder's rules: one folder holds one experiment; every work item of a run starts the same way.

`prepare_run` refuses a folder made by another config, then writes config.yaml, provenance.json and
splits.json (once) before any item starts. `RunTask` is the base of every submitit task of a run (folds,
Genesis pretraining, adapt depths): validate the config, join the item's process group, do the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from data_prep.store import open_store
from hpc.env import destroy_distributed, init_distributed
from hpc.launch import CheckpointableTask
from stroke_tss.config import Config, dump_config, validate
from stroke_tss.errors import UserError
from stroke_tss.logs import setup_logging
from stroke_tss.runs.provenance import write_provenance
from stroke_tss.schedule import resolve_variant
from stroke_tss.splits import ensure_splits

# Keys that may differ between two invocations on the same run folder: where it runs, not what it computes.
_RUNTIME_KEYS = ("launch",)
PREEMPT_PREFIX = "STROKE_TSS"
"""Environment prefix of the preemption flag file the sbatch templates set (STROKE_TSS_PREEMPT_FILE)."""


class RunTask(CheckpointableTask):
    """A work item of the run: validate the config, join the item's process group, do the work."""

    preempt_prefix = PREEMPT_PREFIX

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def run(self, item: Any, out_dir: Path) -> Any:
        cfg = validate(self.config)
        env = init_distributed(timeout_s=cfg.engine.timeout_s)
        setup_logging(env.rank)
        try:
            return self.work(cfg, item, is_main=env.is_main)
        finally:
            destroy_distributed()

    def work(self, cfg: Config, item: Any, *, is_main: bool) -> Any:
        raise NotImplementedError


def check_store(cfg: Config) -> None:
    if not Path(cfg.data.store).exists():
        raise UserError(f"data.store {cfg.data.store} does not exist; build it with `stroke-tss prep`")


def prepare_run(cfg: Config) -> Path:
    """Check the run folder belongs to this config, write config + provenance, write splits.json once."""
    run_dir = Path(cfg.run.dir)
    check_store(cfg)
    check_same_config(cfg, run_dir / "config.yaml")
    dump_config(cfg, run_dir / "config.yaml")
    write_provenance(run_dir, store=Path(cfg.data.store))
    ensure_splits(cfg, open_store(cfg.data.store).table)
    return run_dir


def check_same_config(cfg: Config, path: Path) -> None:
    """A run folder holds one experiment: refuse one made by a different config (launch keys aside)."""
    if not path.exists():
        return
    # Through the current schema, so that a key added to the package since (with its default) is no difference.
    old = validate(yaml.safe_load(path.read_text()) or {}, source=str(path)).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    for key in _RUNTIME_KEYS:
        old.pop(key, None)
        new.pop(key, None)
    diff = _first_difference(old, new)
    if diff is not None:
        raise UserError(f"run folder {path.parent} was made by another config (they differ at '{diff}'); "
                        "use a new run.dir or the original config")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return where
            found = _first_difference(a[key], b[key], where)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "<root>")


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run folder was made with (run.dir set to where the folder is now: it may have moved)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); pass the run.dir of a `stroke-tss cv`")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("run", {})["dir"] = str(run_dir)
    return validate(raw, source=str(path))


def select_variants(cfg: Config, variants: list[str] | None) -> list[str]:
    """The named variants (all of the config's when None), checked against the config."""
    unknown = sorted(set(variants or ()) - set(cfg.variants))
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; the config defines {', '.join(cfg.variants)}")
    return list(variants) if variants else list(cfg.variants)


def needs_genesis(cfg: Config, variants: list[str] | None = None) -> bool:
    return any(phase.init == "genesis" for name in select_variants(cfg, variants)
               for phase in resolve_variant(cfg, name).phases.values())


def record_job(cfg: Config, *, is_main: bool) -> None:
    """Add this job (ids, host) to RUN/provenance.json."""
    if is_main:
        write_provenance(Path(cfg.run.dir), store=Path(cfg.data.store))
