"""Models Genesis at the run level: which subjects each pretraining sees, and each pretraining as a work item.

``genesis.subjects`` says which:

- ``fold`` (the default): one pretraining per fold, on that fold's train and val subjects, into
  RUN/genesis/fold-<k>/; the phases of fold k start from it, so no fold's encoder has seen its test subjects.
- ``all``: one pretraining on every subject of the store, into RUN/genesis/, shared by the folds. It sees every
  fold's test subjects: without their labels, but their images all the same.
- ``train``: what runs did before ``fold``: fold 0's training subjects, shared by every fold, so folds 1..K-1
  start from an encoder that saw their test subjects. A run folder that already holds those weights resumes and
  reports; a new pretraining of that kind is refused with a pointer to ``fold``.

Every pretraining writes subjects.json beside its weights: {"mode", "fold", "subjects", "test_subjects_seen"}
(for ``fold`` the fold's own test subjects among them; for ``all`` the most that any fold's test set has
there). The training itself is stroke_tss.pretrain's, through the one loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.store import open_store
from stroke_tss.config import Config
from stroke_tss.errors import UserError
from stroke_tss.pretrain import genesis_dir, pretrain_genesis
from stroke_tss.runs.folder import RunTask
from stroke_tss.splits import ensure_splits, fold_of

log = logging.getLogger(__name__)

GenesisItem = int | None
"""The fold a pretraining serves, or None for the run's one pretraining (`all`, `train`)."""

_TRAIN_REFUSED = ("genesis.subjects: train pretrains on fold 0's training subjects for every fold, so folds "
                  "1..K-1 would start from an encoder that saw their test subjects; set genesis.subjects=fold "
                  "(each fold pretrains on its own train and val subjects) or all (one pretraining on every "
                  "subject, test images included)")


def genesis_items(cfg: Config) -> list[GenesisItem]:
    """Every pretraining the run needs: one per fold for `fold`, else one for the run."""
    if cfg.genesis.subjects != "fold":
        return [None]
    return list(range(len(ensure_splits(cfg, open_store(cfg.data.store).table)["folds"])))


def item_name(item: GenesisItem) -> str:
    """The job folder name under RUN/jobs/."""
    return "genesis" if item is None else f"genesis-fold-{item}"


def genesis_label(item: GenesisItem) -> str:
    """How the epoch lines name a pretraining: genesis/fold-<k> as its folder (fold-<k> alone would read like a
    phase of the fold)."""
    return "genesis" if item is None else f"genesis/fold-{item}"


def genesis_weights(cfg: Config, item: GenesisItem) -> Path:
    return genesis_dir(cfg.run.dir, subjects=cfg.genesis.subjects, fold=item) / "weights.pt"


def genesis_todo(cfg: Config) -> list[GenesisItem]:
    """The pretrainings whose weights are not there yet (a started one resumes from its checkpoint)."""
    todo = [item for item in genesis_items(cfg) if not genesis_weights(cfg, item).is_file()]
    if todo and cfg.genesis.subjects == "train":
        raise UserError(_TRAIN_REFUSED)
    return todo


def genesis_subjects(cfg: Config, splits: dict, store_subjects: list[str], item: GenesisItem) -> tuple[list[str], dict]:
    """The subjects one pretraining sees, and its subjects.json record."""
    mode = cfg.genesis.subjects
    if mode == "train":
        raise UserError(_TRAIN_REFUSED)
    if mode == "fold":
        own = fold_of(splits, item)
        subjects = list(own["train"]) + list(own["val"])
    else:
        subjects = list(store_subjects)
    seen = [len(set(fold["test"]) & set(subjects)) for fold in splits["folds"]]
    record = {"mode": mode, "fold": item, "subjects": sorted(subjects),
              "test_subjects_seen": seen[item] if item is not None else max(seen)}
    return subjects, record


def pretrain_run(cfg: Config, fold: GenesisItem = None) -> Path:
    """One pretraining of the run (fold `fold`'s under `genesis.subjects: fold`), trained now unless its
    weights.pt exists; a started one resumes."""
    if cfg.genesis.subjects != "fold" and fold is not None:
        raise UserError(f"--fold {fold}: genesis.subjects is {cfg.genesis.subjects}, one pretraining for the "
                        "whole run; leave out --fold, or set genesis.subjects=fold")
    if cfg.genesis.subjects == "fold" and fold is None:
        raise UserError("genesis.subjects is fold: say which fold to pretrain (--fold K)")
    weights = genesis_weights(cfg, fold)
    if weights.is_file():
        log.info("%s exists; Models Genesis already done", weights)
        return weights
    store = open_store(cfg.data.store)
    subjects, record = genesis_subjects(cfg, ensure_splits(cfg, store.table), list(store.subject_ids), fold)
    if fold is not None:
        log.info("Models Genesis for fold %d: %d subjects (its train and val), none of its test subjects",
                 fold, len(subjects))
    else:
        log.warning("Models Genesis on all %d subjects of the store: up to %d test subjects of a fold among them "
                    "(unlabelled); genesis.subjects=fold keeps them out", len(subjects), record["test_subjects_seen"])
    return pretrain_genesis(store, subjects, weights.parent, genesis=cfg.genesis, channels=cfg.data.channels,
                            train=cfg.train, engine=cfg.engine, seed=cfg.seed, record=record,
                            name=genesis_label(fold))


def pretrain_folds(cfg: Config, folds: list[int] | None = None) -> list[Path]:
    """The `pretrain` verb: every pretraining the run needs (or those of `folds`), one after another."""
    items: list[GenesisItem] = list(folds) if folds is not None else genesis_items(cfg)
    return [pretrain_run(cfg, fold=item) for item in items]


class GenesisTask(RunTask):
    """One Models Genesis pretraining of the run as a work item (preemptible: it resumes at the step it saved)."""

    def work(self, cfg: Config, item: GenesisItem, *, is_main: bool) -> str:
        return str(pretrain_run(cfg, fold=item))
