"""The run folder's rules: one folder holds one experiment; every work item of a run starts the same way.

`check_run_folder` is what every verb that writes into a run folder passes first, before it writes anything:
the store opens and holds every channel the config reads, and a folder already there was made by this config
(config.yaml and splits.json). `prepare_run` then writes config.yaml, provenance.json and splits.json (once)
before any item starts. `RunTask` is the base of every submitit task of a run (folds,
Genesis pretraining, adapt depths): validate the config, join the item's process group, do the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.store import open_store
from hpc.env import destroy_distributed, init_distributed
from hpc.launch import CheckpointableTask
from stroke_tss.config import Config, dump_config, validate
from stroke_tss.config.loader import read_yaml
from stroke_tss.errors import UserError
from stroke_tss.logs import setup_logging
from stroke_tss.runs.provenance import write_provenance
from stroke_tss.schedule import resolve_variant
from stroke_tss.splits import ensure_splits, read_splits

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
    """data.store opens as a store and holds every channel the config and each of its variants read."""
    if not Path(cfg.data.store).exists():
        raise UserError(f"data.store {cfg.data.store} does not exist; build it with `stroke-tss prep`")
    have = list(open_store(cfg.data.store).channels)
    readers = [("data.channels", cfg.data.channels)]
    readers += [(f"variant {name}: data.channels", resolve_variant(cfg, name).data.channels) for name in cfg.variants]
    for key, channels in readers:
        unknown = [c for c in channels or () if c not in have]
        if unknown:
            raise UserError(f"{key}: {', '.join(unknown)} not in store {cfg.data.store} (it holds "
                            f"{', '.join(have)}); fix data.channels")


def check_run_folder(cfg: Config) -> Path:
    """What must hold before anything is written into run.dir (read-only, so every rank may call it)."""
    run_dir = Path(cfg.run.dir)
    check_store(cfg)
    check_same_config(cfg, run_dir / "config.yaml")
    if (run_dir / "splits.json").is_file():
        problem = splits_mismatch(cfg, read_splits(run_dir / "splits.json"))
        if problem:
            raise UserError(f"run folder {run_dir} holds splits of another config ({problem}); use a new run.dir or "
                            "the original config")
    return run_dir


def write_run_files(cfg: Config, *, provenance: dict | None = None) -> Path:
    """config.yaml and provenance.json of the run (rank 0, after `check_run_folder`)."""
    run_dir = Path(cfg.run.dir)
    dump_config(cfg, run_dir / "config.yaml")
    write_provenance(run_dir, store=Path(cfg.data.store), extra=provenance)
    return run_dir


def prepare_run(cfg: Config) -> Path:
    """Check the run folder belongs to this config, write config + provenance, write splits.json once."""
    run_dir = check_run_folder(cfg)
    write_run_files(cfg)
    ensure_splits(cfg, open_store(cfg.data.store).table)
    return run_dir


def splits_mismatch(cfg: Config, splits: dict) -> str | None:
    """How splits.json disagrees with the config's cv section and seed, or None."""
    if splits.get("kind") != cfg.cv.kind:
        return f"splits.json is of kind {splits.get('kind')!r}, cv.kind is {cfg.cv.kind!r}"
    if splits.get("seed") != cfg.seed:
        return f"splits.json was drawn with seed {splits.get('seed')}, the config's seed is {cfg.seed}"
    if cfg.cv.kind == "kfold" and len(splits["folds"]) != cfg.cv.folds:
        return f"splits.json holds {len(splits['folds'])} folds, cv.folds is {cfg.cv.folds}"
    return None


def check_same_config(cfg: Config, path: Path) -> None:
    """A run folder holds one experiment: refuse one made by a different config (launch keys aside)."""
    if not path.exists():
        return
    # Through the current schema, so that a key added to the package since (with its default) is no difference.
    old = validate(read_yaml(path) or {}, source=str(path)).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    for tree in (old, new):
        for key in _RUNTIME_KEYS:
            tree.pop(key, None)
        tree.get("run", {}).pop("dir", None)  # where the folder is: it may have moved since
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
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys; the run folder's config is damaged")
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
