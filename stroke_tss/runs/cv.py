"""Cross-validation as one job array: every (variant, fold) is a work item running that fold's schedule.

    run_cv(cfg)  ->  config + provenance  ->  splits.json once  ->  Models Genesis (if a variant needs it):
                     one item per fold, or one for the run (stroke_tss.runs.pretrain says which)
                 ->  one array of unfinished (variant, fold) items  ->  RUN/summary.json

On Slurm, the Genesis items are an array of their own and the fold array depends on it (afterok: every
pretraining done), so `cv --no-wait` returns at once; the local executors run them first and wait.

Everything resumes from the run folder: a finished phase is skipped, a started one continues from its
latest checkpoint, so re-running `cv` (or a requeue) only redoes what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from data_prep.store import open_store
from hpc.launch import ItemResult, launch_items
from stroke_tss.config import Config
from stroke_tss.errors import UserError
from stroke_tss.runs.folder import (
    RunTask,
    needs_genesis,
    prepare_run,
    read_run_config,
    record_job,
    select_variants,
)
from stroke_tss.runs.pretrain import GenesisItem, GenesisTask, genesis_todo, genesis_weights, item_name
from stroke_tss.runs.summary import write_summary
from stroke_tss.schedule import resolve_variant, run_fold
from stroke_tss.splits import ensure_splits
from stroke_tss.train import phase_done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldItem:
    variant: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.variant}-fold-{self.fold}"


class FoldTask(RunTask):
    """One (variant, fold) schedule; resumes from the run folder, so a requeue continues where it stopped."""

    def work(self, cfg: Config, item: FoldItem, *, is_main: bool) -> dict:
        record_job(cfg, is_main=is_main)
        results = run_fold(cfg, fold=item.fold, variants=[item.variant])
        return {key: value.get("test", value) for key, value in results.items()} if is_main else {}


def fold_items(cfg: Config, variants: list[str] | None = None) -> list[FoldItem]:
    """Every (variant, fold) of the config (or of the named variants), in submission order."""
    num_folds = len(ensure_splits(cfg, open_store(cfg.data.store).table)["folds"])
    return [FoldItem(variant, fold) for variant in select_variants(cfg, variants) for fold in range(num_folds)]


def item_done(cfg: Config, item: FoldItem) -> bool:
    """Done when every phase of the variant has written its metrics (the last thing a phase writes)."""
    fold_dir = Path(cfg.run.dir) / item.variant / f"fold-{item.fold}"
    return all(phase_done(fold_dir / phase) for phase in resolve_variant(cfg, item.variant).phases)


def unfinished_items(run_dir: str | Path) -> list[FoldItem]:
    """Items submitted for a run folder (they have a folder under RUN/jobs/) that have not finished: still
    waiting, running, or failed."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    return [item for item in fold_items(cfg) if (run_dir / "jobs" / item.name).is_dir() and not item_done(cfg, item)]


def run_cv(cfg: Config, *, wait: bool = True, variants: list[str] | None = None) -> list[ItemResult]:
    """Run (or finish) every fold of every variant (or of `variants`) through the launch layer; write
    summary.json when done."""
    select_variants(cfg, variants)
    run_dir = prepare_run(cfg)
    config = cfg.model_dump(mode="json")
    jobs_dir = run_dir / "jobs"
    genesis = launch_genesis(cfg, config, jobs_dir) if needs_genesis(cfg, variants) else []
    fold_launch = cfg.launch
    if genesis:  # submitted to Slurm, not finished: the folds wait for every one of them
        fold_launch = cfg.launch.model_copy(update={"slurm_extra": {
            **cfg.launch.slurm_extra, "dependency": f"afterok:{_job_of(genesis[0][1])}", "kill_on_invalid_dep": "yes"}})
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
            results = launch_items(FoldTask(config), todo, config=fold_launch, folder=jobs_dir,
                                   names=[item.name for item in todo], wait=wait)
        except ValueError as exc:  # the scheduler refused the submission: nothing was submitted
            raise UserError(str(exc)) from None
        for res in results:
            if res.state == "failed":
                log.error("%s failed: %s (log: %s)", res.name, res.error, res.log)
    failed = [res for item, res in genesis if not genesis_weights(cfg, item).is_file()]
    if wait and failed:
        # the folds were cancelled with their dependency: say why
        logs = cfg.launch.folder or jobs_dir / "submitit"
        raise UserError("; ".join(f"Models Genesis pretraining {res.name} (job {res.job_id}) failed, so the folds "
                                  f"never ran; log: {logs / f'{res.job_id}_0_log.err'}" for res in failed))
    if wait:
        write_summary(run_dir)
    return results


def launch_genesis(cfg: Config, config: dict, jobs_dir: Path) -> list[tuple[GenesisItem, ItemResult]]:
    """Start the Models Genesis pretrainings not done yet (one per fold, or one for the run). The local
    executors run them to the end here (nothing returned); on Slurm returns each item with its submitted job."""
    todo = genesis_todo(cfg)
    if not todo:
        return []
    names = [item_name(item) for item in todo]
    if cfg.launch.executor != "slurm":
        log.info("Models Genesis pretraining first: %s", ", ".join(names))
        results = launch_items(GenesisTask(config), todo, config=cfg.launch, folder=jobs_dir, names=names)
        failed = [res for res in results if not res.ok]
        if failed:
            raise UserError("; ".join(f"Models Genesis pretraining {res.name} failed: {res.error}; log: {res.log}"
                                      for res in failed))
        return []
    # An array of its own, which the fold array waits for in Slurm (afterok): nothing here has to wait, and a
    # preempted pretraining is requeued under the same id while the folds keep waiting.
    try:
        results = launch_items(GenesisTask(config), todo, config=cfg.launch, folder=jobs_dir, names=names,
                               wait=False)
    except ValueError as exc:  # the scheduler refused the submission: nothing was submitted
        raise UserError(str(exc)) from None
    log.info("Models Genesis pretraining is job %s; the folds wait for it (afterok)", _job_of(results[0]))
    log.info("Models Genesis items: %s", ", ".join(names))
    return list(zip(todo, results))


def _job_of(result: ItemResult) -> str:
    """The Slurm id naming the whole submission: an array's tasks are ARRAY_INDEX, a lone job its own id."""
    return result.job_id.split("_")[0]
