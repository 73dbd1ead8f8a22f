"""Cross-validation as one job array: every (variant, fold) is a work item running that fold's schedule.

    run_cv(cfg)  ->  config + provenance  ->  splits.json once  ->  Models Genesis once (if a variant needs it)
                 ->  one array of unfinished (variant, fold) items  ->  RUN/summary.json

Everything resumes from the run folder: a finished phase is skipped, a started one continues from its
latest checkpoint, so re-running `cv` (or a requeue) only redoes what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpc.launch import CheckpointableTask, ItemResult, launch_items
from stroke_tss.config import Config, dump_config, validate
from stroke_tss.errors import UserError

log = logging.getLogger(__name__)

# Keys that may differ between two invocations on the same run folder: where it runs, not what it computes.
_RUNTIME_KEYS = ("launch",)


@dataclass(frozen=True)
class FoldItem:
    variant: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.variant}-fold-{self.fold}"


class RunTask(CheckpointableTask):
    """A work item of the run: validate the config, join the item's process group, do the work."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def run(self, item: Any, out_dir: Path) -> Any:
        from hpc.env import destroy_distributed, init_distributed
        from stroke_tss.logs import setup_logging

        cfg = validate(self.config)
        env = init_distributed(timeout_s=cfg.engine.timeout_s)
        setup_logging(env.rank)
        try:
            return self.work(cfg, item, is_main=env.is_main)
        finally:
            destroy_distributed()

    def work(self, cfg: Config, item: Any, *, is_main: bool) -> Any:
        raise NotImplementedError


class FoldTask(RunTask):
    """One (variant, fold) schedule; resumes from the run folder, so a requeue continues where it stopped."""

    def work(self, cfg: Config, item: FoldItem, *, is_main: bool) -> dict:
        from stroke_tss.schedule import run_fold

        _record_job(cfg, is_main)
        results = run_fold(cfg, fold=item.fold, variants=[item.variant])
        return {key: value.get("test", value) for key, value in results.items()} if is_main else {}


class GenesisTask(RunTask):
    """Models Genesis pretraining of the run (once, shared by every fold)."""

    def work(self, cfg: Config, item: str, *, is_main: bool) -> str:
        from stroke_tss.pretrain import pretrain_genesis

        return str(pretrain_genesis(cfg))


def _record_job(cfg: Config, main: bool) -> None:
    if main:
        from stroke_tss.provenance import write_provenance

        write_provenance(Path(cfg.run.dir), store=Path(cfg.data.store))


def prepare_run(cfg: Config) -> Path:
    """Check the run folder belongs to this config, write config + provenance, write splits.json once."""
    from stroke_tss.provenance import write_provenance
    from stroke_tss.schedule import ensure_splits

    run_dir = Path(cfg.run.dir)
    if not Path(cfg.data.store).exists():
        raise UserError(f"data.store {cfg.data.store} does not exist; build it with `stroke-tss prep`")
    check_same_config(cfg, run_dir / "config.yaml")
    dump_config(cfg, run_dir / "config.yaml")
    write_provenance(run_dir, store=Path(cfg.data.store))
    try:
        ensure_splits(cfg)
    except ValueError as exc:
        raise UserError(f"splits for {run_dir}: {exc}") from None
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


def needs_genesis(cfg: Config, variants: list[str] | None = None) -> bool:
    from stroke_tss.schedule import resolve_variant

    return any(phase.init == "genesis" for name in select_variants(cfg, variants)
               for phase in resolve_variant(cfg, name).phases.values())


def select_variants(cfg: Config, variants: list[str] | None) -> list[str]:
    """The named variants (all of the config's when None), checked against the config."""
    unknown = sorted(set(variants or ()) - set(cfg.variants))
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; the config defines {', '.join(cfg.variants)}")
    return list(variants) if variants else list(cfg.variants)


def fold_items(cfg: Config, variants: list[str] | None = None) -> list[FoldItem]:
    """Every (variant, fold) of the config (or of the named variants), in submission order."""
    from stroke_tss.schedule import ensure_splits

    num_folds = len(ensure_splits(cfg)["folds"])
    return [FoldItem(variant, fold) for variant in select_variants(cfg, variants) for fold in range(num_folds)]


def item_done(cfg: Config, item: FoldItem) -> bool:
    """Done when every phase of the variant has written its metrics (the last thing a phase writes)."""
    from stroke_tss.schedule import resolve_variant
    from stroke_tss.train import phase_done

    fold_dir = Path(cfg.run.dir) / item.variant / f"fold-{item.fold}"
    return all(phase_done(fold_dir / phase) for phase in resolve_variant(cfg, item.variant).phases)


def unfinished_items(run_dir: str | Path) -> list[FoldItem]:
    """Items submitted for a run folder (they have a folder under RUN/jobs/) that have not finished: still
    waiting, running, or failed."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); pass the run.dir of a `stroke-tss cv`")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("run", {})["dir"] = str(run_dir)  # the folder may have moved since
    cfg = validate(raw, source=str(path))
    return [item for item in fold_items(cfg) if (run_dir / "jobs" / item.name).is_dir() and not item_done(cfg, item)]


def run_cv(cfg: Config, *, wait: bool = True, variants: list[str] | None = None) -> list[ItemResult]:
    """Run (or finish) every fold of every variant (or of `variants`) through the launch layer; write
    summary.json when done."""
    select_variants(cfg, variants)
    run_dir = prepare_run(cfg)
    config = cfg.model_dump(mode="json")
    jobs_dir = run_dir / "jobs"
    if needs_genesis(cfg, variants) and not (run_dir / "genesis" / "weights.pt").is_file():
        log.info("Models Genesis pretraining first (once for the run)")
        [res] = launch_items(GenesisTask(config), ["genesis"], config=cfg.launch, folder=jobs_dir, names=["genesis"])
        if not res.ok:
            raise UserError(f"Models Genesis pretraining failed: {res.error}; log: {res.log}")
    items = fold_items(cfg, variants)
    todo = [item for item in items if not item_done(cfg, item)]
    if not wait and cfg.launch.executor == "local" and cfg.launch.array_parallelism < len(todo):
        # local processes beyond array_parallelism are started by the waiting cv; without it they never would
        raise UserError(f"--no-wait with the local executor cannot hold items back: set launch.array_parallelism="
                        f"{len(todo)} (now {cfg.launch.array_parallelism}) to start all at once, or leave out --no-wait")
    if not todo:
        log.info("every fold of every variant is done in %s", run_dir)
        results: list[ItemResult] = []
    else:
        log.info("submitting %d of %d (variant, fold) items through the %s executor", len(todo),
                 len(items), cfg.launch.executor)
        try:
            results = launch_items(FoldTask(config), todo, config=cfg.launch, folder=jobs_dir,
                                   names=[item.name for item in todo], wait=wait)
        except ValueError as exc:  # the scheduler refused the submission: nothing was submitted
            raise UserError(str(exc)) from None
        for res in results:
            if res.state == "failed":
                log.error("%s failed: %s (log: %s)", res.name, res.error, res.log)
    if wait:
        from stroke_tss.summary import write_summary

        write_summary(run_dir)
    return results
