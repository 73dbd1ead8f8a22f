"""The root config: one typed section per concern, composed here; sections live with their owners."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hpc.launch_config import LaunchConfig
from stroke_tss.config.base import Section
from stroke_tss.config.training import (
    EngineSection,
    GenesisSection,
    ModelSection,
    PhaseSection,
    TrainSection,
    default_phases,
)

RUN_FOLDERS = ("genesis", "jobs", "explain", "predict")
"""Folders of a run folder that are no variant: Models Genesis, submitit's job folders, Grad-CAM maps, the stores
`predict` prepares."""
INIT_WORDS = ("random", "genesis")
"""What a phase's `init` names besides an earlier phase: no phase may take these names."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_folder_names(kind: str, names, *, reserved: tuple[str, ...] = ()) -> None:
    """Variant, ensemble and phase names become folder names (RUN/<variant>/fold-<k>/<phase>/): letters, digits,
    `_` and `-`, starting with a letter or digit, and none of the `reserved` names."""
    for name in names:
        if name in reserved:
            raise ValueError(f"{kind} name {name!r} is taken ({', '.join(reserved)} are); choose another name")
        if not _NAME.fullmatch(str(name)):
            raise ValueError(f"{kind} name {name!r} is used as a folder name: use letters, digits, '_' and '-', "
                             "starting with a letter or digit")


class DataConfig(Section):
    store: Path
    """Path of the preprocessed Zarr store (`stroke-tss prep` writes it)."""
    channels: list[str] = Field(default_factory=lambda: ["dwi", "b0", "flair"])
    """Input channels, in order, taken from the store."""
    manifest: Path | None = None
    """Cohort manifest the store was built from (reader columns for the report, predict)."""


class RunConfig(Section):
    dir: Path
    """Run folder: config, splits, checkpoints, metrics and predictions land here."""
    name: str | None = None
    """Human name of the run (defaults to the folder name)."""


class CVConfig(Section):
    kind: Literal["kfold", "holdout", "loso"] = "kfold"
    """Split kind: stratified k-fold, the paper's fixed 64/16/20 hold-out, or leave-one-site-out."""
    folds: int = Field(5, ge=1)
    """Number of folds (k-fold); ignored by holdout (1 fold) and loso (one fold per site)."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each fold's training subjects held out for validation (early stopping, thresholds)."""
    stratify: str = "tss_lt_4h5"
    """Task whose subject-level label the splits are stratified on."""


class Config(Section):
    seed: int = 0
    """Seed of splits, initialisation, sampling and augmentation."""
    data: DataConfig
    run: RunConfig
    cv: CVConfig = Field(default_factory=CVConfig)
    # Training sections (stroke_tss/config/training.py, owned by the training work).
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    phases: dict[str, PhaseSection] = Field(default_factory=default_phases)
    """Phase name -> phase, run in the order given."""
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": {}})
    """Variant name -> overrides of this config (nested keys), e.g. 2d_scratch: {phases: {tss3h: {init: random}}}."""
    ensembles: dict[str, list[str]] = Field(default_factory=dict)
    """Ensemble name -> member variants; its predictions (RUN/<name>/) are the mean of the members' per sample."""
    genesis: GenesisSection = Field(default_factory=GenesisSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where folds, sweeps and pretraining run (slurm job array, local processes, or in-process)."""

    @field_validator("variants", "ensembles", "phases")
    @classmethod
    def _names_are_folder_names(cls, value: dict, info):
        reserved = INIT_WORDS if info.field_name == "phases" else RUN_FOLDERS
        check_folder_names(info.field_name.rstrip("s"), value, reserved=reserved)
        return value

    @model_validator(mode="after")
    def _ensembles_of_variants(self):
        for name, members in self.ensembles.items():
            unknown = [m for m in members if m not in self.variants]
            if name in self.variants or len(members) < 2 or unknown:
                raise ValueError(f"ensemble {name!r} needs a name that is no variant and >= 2 member variants "
                                 f"of this config (unknown: {unknown}; variants: {', '.join(self.variants)})")
        return self
