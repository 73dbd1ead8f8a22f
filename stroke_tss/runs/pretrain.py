"""Models Genesis at the run level: once per run, into RUN/genesis/, shared by the folds that start from it.

``genesis.subjects: train`` pretrains on fold 0's training subjects (never a test subject of that fold),
``all`` on every subject of the store. The training itself is stroke_tss.pretrain's, through the one loop.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.store import open_store
from stroke_tss.config import Config
from stroke_tss.pretrain import pretrain_genesis
from stroke_tss.runs.folder import RunTask
from stroke_tss.splits import ensure_splits


def pretrain_run(cfg: Config) -> Path:
    """RUN/genesis/weights.pt, trained now unless it exists (a started pretraining resumes)."""
    store = open_store(cfg.data.store)
    subjects = (ensure_splits(cfg, store.table)["folds"][0]["train"] if cfg.genesis.subjects == "train"
                else list(store.subject_ids))
    return pretrain_genesis(store, subjects, Path(cfg.run.dir) / "genesis", genesis=cfg.genesis,
                            channels=cfg.data.channels, train=cfg.train, engine=cfg.engine, seed=cfg.seed)


class GenesisTask(RunTask):
    """Models Genesis pretraining of the run as a work item (preemptible: it resumes at the step it saved)."""

    def work(self, cfg: Config, item: str, *, is_main: bool) -> str:
        return str(pretrain_run(cfg))
