"""Config sections of training: model, optimiser, stopping, augmentation, phases, genesis, engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stroke_tss.config.base import Section
from stroke_tss.tasks import TASK_NAMES

Task = Literal[TASK_NAMES]  # the task registry's names


class ModelSection(Section):
    name: Literal["slicewise2d", "unet3d", "encoder3d", "attnvgg3d"] = "slicewise2d"
    """Model from stroke_tss.models; num_slices (2D) is taken from the store when not given."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the model (base_channels, norm, gate_stage, dropout, ...)."""


class OptimizerSection(Section):
    name: Literal["adabound", "adam", "sgd"] = "adabound"
    """AdaBound as in the paper; Adam (outcome model); SGD (Models Genesis)."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate (AdaBound: the initial Adam-like rate)."""
    final_lr: float = Field(0.1, gt=0)
    """AdaBound: the SGD rate the bounds converge to."""
    gamma: float = Field(1e-3, gt=0)
    """AdaBound: convergence speed of the bounds."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 penalty (coupled, as in the original AdaBound)."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate over the phase: constant, or cosine from `lr` down to `lr * min_lr_factor` at the last
    step of `max_epochs` (set from the step count, so a resumed run follows the same curve)."""
    min_lr_factor: float = Field(0.01, ge=0, le=1)
    """Cosine schedule: the final learning rate as a share of `lr`."""


class StoppingSection(Section):
    max_epochs: int = Field(100, ge=1)
    """Upper bound on epochs."""
    min_epochs: int = Field(1, ge=1)
    """Never stop before this many epochs."""
    patience: int = Field(10, ge=1)
    """Epochs without improvement of `monitor` before stopping."""
    monitor: Literal["val_loss", "val_auc", "val_dice"] = "val_loss"
    """Validation quantity that defines 'best' and drives early stopping (val_dice: segmentation tasks, the
    Dice of the thresholded lesion map over the validation hemispheres)."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""
    restore_best: bool = True
    """Predict with the best epoch's weights (by `monitor`); false: with the last epoch's. On a small validation
    split the best epoch is partly chosen by noise: with a cosine schedule and min_epochs = max_epochs the last
    weights are the steadier choice."""


class AugmentSection(Section):
    gamma: tuple[float, float] | None = None
    """Random gamma range on intensities, e.g. [0.9, 1.1]; null = off."""
    rotate_z_deg: float = Field(0.0, ge=0, le=45)
    """Random in-plane rotation about the z axis, +- degrees; 0 = off."""
    noise_std: float = Field(0.0, ge=0)
    """Standard deviation of added Gaussian noise (in z-score units); 0 = off."""
    lesion_swap: float = Field(0.0, ge=0, le=1)
    """Detection phases (lesion_present, lesion_seg): probability that a hemisphere trades lesions with its
    mirror half (needs lesion masks in the store; see stroke_tss.data); 0 = off."""
    lesion_transplant: float = Field(0.0, ge=0, le=1)
    """Onset phases: probability that a sample's lesion is carved into another subject's healthy half, label
    kept (needs lesion masks; see stroke_tss.data); 0 = off."""


class TrainSection(Section):
    batch_size: int = Field(4, ge=1)
    """Samples per rank per step."""
    eval_batch_size: int = Field(8, ge=1)
    """Samples per rank per validation/prediction step."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank."""
    threads: int | None = Field(None, ge=1)
    """torch threads per rank (null: leave torch's default)."""
    oversample: bool = False
    """Random oversampling of the minority class in each training epoch."""
    oversample_by: Literal["label", "label_and_side"] = "label"
    """What oversampling balances: the task label, or label x lesion side (the outcome model)."""
    intensity: Literal["zscore", "unit"] = "zscore"
    """Input scaling: store z-scores, or clipped to [-3, 3] and scaled to [0, 1] (as Models Genesis saw)."""
    augment: AugmentSection = Field(default_factory=AugmentSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    stopping: StoppingSection = Field(default_factory=StoppingSection)
    ckpt_every_epochs: int = Field(1, ge=1)
    """Save a resumable checkpoint every N epochs."""
    ckpt_every_steps: int | None = Field(None, ge=1)
    """Also save every N optimizer steps (mid-epoch; null = off)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Resumable checkpoints kept per phase (the newest K)."""
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Cap on steps per epoch (debug-size runs)."""


class AdaptSection(Section):
    """The adaptive freezing-depth search of `freeze: auto` (Jung & Whangbo); w1 = w2 = 0.5 is our choice."""

    epochs: int = Field(3, ge=1)
    """Fine-tuning epochs per candidate depth."""
    w1: float = Field(0.5, ge=0)
    """Weight of the first epoch's validation BCE in f(theta)."""
    w2: float = Field(0.5, ge=0)
    """Weight of the mean validation BCE over the epochs in f(theta)."""


class PhaseSection(Section):
    task: Task
    """Labels of this phase (see DESIGN.md: names)."""
    init: str = "random"
    """random | the name of an earlier phase | genesis | a weights file (natural/medical-image baselines)."""
    freeze: list[str] | Literal["auto"] = Field(default_factory=list)
    """Parameter groups held fixed (stem, block1..block4, seg_head, attention, slice_weights, head), or `auto`: search
    the depth (none, stem, stem+block1, ...) by `adapt` and train at the chosen one."""
    adapt: AdaptSection = Field(default_factory=AdaptSection)
    """Settings of the depth search when freeze is `auto`."""
    train_only: list[str] | None = None
    """If set, only these groups train (the paper's attention phase); excludes `freeze`."""
    reinit: list[str] = Field(default_factory=list)
    """Groups re-initialised after loading `init`, e.g. [head] when the labels change meaning: a lesion
    detector's head scores bright (late) lesions high, the opposite of onset < 4.5 h."""
    attention: bool | None = None
    """Whether the attention gates (slicewise2d, encoder3d) feed the classifier in this phase; null: as
    model.options.attention says (default true: gates in every phase). The paper's schedule: false in the
    detection and onset phases, true in the last one, which adds the gates and fine-tunes them; a phase that
    turns them on starts their classifier weights at zero, so it must train `head` (see models/gates.py)."""
    optimizer: OptimizerSection | None = None
    """Overrides train.optimizer for this phase."""
    stopping: StoppingSection | None = None
    """Overrides train.stopping for this phase."""

    @model_validator(mode="after")
    def _one_of_freeze_or_train_only(self):
        if self.freeze and self.train_only is not None:
            raise ValueError("give either 'freeze' or 'train_only' in a phase, not both")
        return self


class GenesisSection(Section):
    subjects: Literal["fold", "all", "train"] = "fold"
    """fold: each fold pretrains on its own train and val subjects (RUN/genesis/fold-<k>/), no test subject
    seen; all: one pretraining on every subject of the store, which sees every fold's test images (unlabelled,
    but test images); train: fold 0's training subjects for every fold, so folds 1..K-1 started from an
    encoder that saw their test subjects: accepted so older run folders load and resume, refused for a new
    pretraining."""
    crop: tuple[int, int, int] = (64, 64, 32)
    """Crop size (x, y, z), sides multiples of 8."""
    crops_per_subject: int = Field(4, ge=1)
    """Crops drawn per subject per epoch."""
    channels: list[str] | None = None
    """Store channels the U-Net sees (null: all); the classifier's first conv is inflated to match."""
    base_channels: int = Field(64, ge=1)
    """U-Net width (64 in the official code); the 3D classifier must use the same."""
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(6, ge=1)
    optimizer: OptimizerSection = Field(default_factory=lambda: OptimizerSection(name="sgd", lr=1.0))
    """SGD lr 1 as in the official code."""


class EngineSection(Section):
    kind: Literal["auto", "local", "ddp", "deepspeed"] = "auto"
    """auto: ddp when started with several ranks, local otherwise."""
    deepspeed_config: Path | None = None
    """DeepSpeed JSON (configs/deepspeed/zero{0,1,2}.json); required by kind=deepspeed."""
    timeout_s: float = Field(600.0, gt=0)
    """Process-group timeout: a dead peer makes the others fail after this long instead of hanging."""

    @model_validator(mode="after")
    def _deepspeed_needs_config(self):
        if self.kind == "deepspeed" and self.deepspeed_config is None:
            raise ValueError("engine.kind=deepspeed needs engine.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
        return self


def default_phases() -> dict[str, PhaseSection]:
    """The paper's schedule: detection, then TSS < 3 h and < 4.5 h with two blocks frozen, then attention."""
    frozen = ["stem", "block1"]
    return {
        "lesion": PhaseSection(task="lesion_present"),
        "tss3h": PhaseSection(task="tss_lt_3h", init="lesion", freeze=frozen),
        "tss4h5": PhaseSection(task="tss_lt_4h5", init="tss3h", freeze=frozen),
        "attention": PhaseSection(task="tss_lt_4h5", init="tss4h5", train_only=["attention", "slice_weights"]),
    }
