"""The task registry: every label the package trains on, and everything that follows from its name.

A task says which clinical column its label comes from and the rule that binarises it, which samples take
part (both hemispheres, lesion hemispheres only, or the whole volume), how hemisphere scores become one
subject score, which label-aware augmentations keep its label true, and how a report names it. Other
modules ask this registry; none branches on a task's name.

    lesion_present  per hemisphere: the half holds a lesion (store masks, else the manifest's stroke_side)
    lesion_seg      per hemisphere, subjects with a lesion mask: the half's lesion mask (pixel-level), and its
                    presence; scored by the largest predicted lesion probability (a lesion_present-like score)
    tss_lt_3h       lesion hemispheres with a known onset: onset_to_mri_min < 180
    tss_lt_4h5      lesion hemispheres with a known onset: onset_to_mri_min < 270
    mrs_gt_2        per subject (whole volume): mrs_90d > 2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from stroke_tss.errors import UserError

SIDES = ("left", "right")


@dataclass(frozen=True)
class Task:
    name: str
    display: str
    """How tables and plots name the task."""
    samples: Literal["hemispheres", "lesion_hemispheres", "volume"]
    """Both halves of every subject, only the halves with a lesion, or one whole volume per subject."""
    column: str | None
    """Clinical column of the label (None: lesion presence, from the masks or stroke_side)."""
    cutoff: float | None = None
    positive_below: bool = True
    """label = value < cutoff (onset: early is positive), else value > cutoff (outcome: poor is positive)."""
    subject_score: Literal["max", "mean"] = "mean"
    """Hemispheres -> one subject score: a subject has a stroke if either half has one; onset averages."""
    augmentations: frozenset[str] = frozenset()
    """Label-aware augmentations whose label stays true for this task (see stroke_tss.data)."""
    target: Literal["label", "mask"] = "label"
    """label: one 0/1 per sample, BCE on the model's logit. mask: the sample also carries its hemisphere's
    lesion mask; the loss adds BCE + soft Dice on the model's lesion map, and a sample's score is its largest
    predicted lesion probability (stroke_tss.train)."""

    @property
    def idle_groups(self) -> list[str]:
        """Parameter groups this task's loss never reaches, so a phase holds them fixed (no optimiser state, no
        DDP bucket waiting for a gradient): a segmentation head learns only from a mask task."""
        return [] if self.target == "mask" else ["seg_head"]

    def rule(self, values: pd.Series) -> pd.Series:
        """0/1 labels of clinical ``values`` (numbers; NaN stays NaN)."""
        label = values < self.cutoff if self.positive_below else values > self.cutoff
        return label.astype(float).where(values.notna())


# lesion_swap relabels lesion presence, so only lesion_present keeps its label true under it; a transplant
# carries the lesion (where onset is read) into another brain with its label, which only onset tasks allow.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lesion_present", "Lesion present", "hemispheres", None, subject_score="max",
         augmentations=frozenset({"lesion_swap"})),
    # a swap moves the mask with the lesion (stroke_tss.data), so the segmentation stays true under it
    Task("lesion_seg", "Lesion segmentation", "hemispheres", None, subject_score="max",
         augmentations=frozenset({"lesion_swap"}), target="mask"),
    Task("tss_lt_3h", "TSS < 3 h", "lesion_hemispheres", "onset_to_mri_min", 180.0,
         augmentations=frozenset({"lesion_transplant"})),
    Task("tss_lt_4h5", "TSS < 4.5 h", "lesion_hemispheres", "onset_to_mri_min", 270.0,
         augmentations=frozenset({"lesion_transplant"})),
    Task("mrs_gt_2", "90-day mRS > 2", "volume", "mrs_90d", 2.0, positive_below=False),
)}
TASK_NAMES = tuple(TASKS)
LABEL_AUGMENTATIONS = frozenset().union(*(t.augmentations for t in TASKS.values()))


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def tasks_with_column(column: str) -> list[str]:
    return [t.name for t in TASKS.values() if t.column == column]


@dataclass(frozen=True)
class Sample:
    subject_id: str
    hemisphere: str  # left | right | both (whole volume)
    label: int
    side: str = "unknown"  # the subject's lesion side (left | right | bilateral | none): an oversampling stratum
    mask: bool = False  # the item carries the hemisphere's lesion mask (tasks with target "mask")


def _flag(value) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    return bool(value)


def lesion_sides(row: pd.Series) -> dict[str, bool] | None:
    """Which halves hold a lesion: the store's mask flags, else the manifest's stroke_side; None if unknown."""
    flags = {side: _flag(row.get(f"lesion_{side}")) for side in SIDES}
    if all(v is not None for v in flags.values()):
        return flags
    side = row.get("stroke_side")
    if isinstance(side, str) and side in ("left", "right", "bilateral", "none"):
        return {s: side in (s, "bilateral") for s in SIDES}
    return None


def side_name(sides: dict[str, bool] | None) -> str:
    if sides is None:
        return "unknown"
    return {(True, True): "bilateral", (True, False): "left", (False, True): "right"}.get(
        (sides["left"], sides["right"]), "none")


def task_samples(table: pd.DataFrame, task: str, subject_ids: Sequence[str] | None = None) -> tuple[list[Sample], int]:
    """Samples of ``task`` for ``subject_ids`` (default: all) and the number of subjects skipped (no label)."""
    spec = get_task(task)
    rows = table.set_index("subject_id", drop=False)
    ids = list(rows.index) if subject_ids is None else list(subject_ids)
    missing = [s for s in ids if s not in rows.index]
    if missing:
        raise UserError(f"subjects {missing[:5]} are in the splits but not in the store's subjects table; "
                        "rebuild the store or delete RUN/splits.json")
    samples, skipped = [], 0
    for sid in ids:
        row = rows.loc[sid]
        sides = lesion_sides(row)
        label = None
        if spec.column is not None:
            value = pd.to_numeric(pd.Series([row.get(spec.column)]), errors="coerce")
            label = spec.rule(value).iloc[0]
        if spec.samples == "volume":
            if pd.isna(label):
                skipped += 1
                continue
            samples.append(Sample(sid, "both", int(label), side_name(sides)))
            continue
        if sides is None or (spec.target == "mask" and not _flag(row.get("has_lesion_mask"))):
            skipped += 1
            continue
        if spec.samples == "hemispheres":
            samples += [Sample(sid, s, int(sides[s]), side_name(sides), spec.target == "mask") for s in SIDES]
            continue
        lesion_halves = [s for s in SIDES if sides[s]]
        if pd.isna(label) or not lesion_halves:
            skipped += 1
            continue
        samples += [Sample(sid, s, int(label), side_name(sides)) for s in lesion_halves]
    return samples, skipped


def subject_labels(table: pd.DataFrame, task: str) -> pd.Series:
    """0/1 per subject (index subject_id) from the clinical column; subjects without the value are dropped."""
    spec = get_task(task)
    if spec.column is None or spec.column not in table.columns:
        return pd.Series(dtype=float)
    values = pd.to_numeric(table.set_index("subject_id")[spec.column], errors="coerce").dropna()
    return spec.rule(values)


def subject_strata(table: pd.DataFrame, task: str) -> list[str]:
    """One stratum per subject (its task label, max over hemispheres; 'unknown' without one)."""
    labels: dict[str, int] = {}
    for s in task_samples(table, task)[0]:
        labels[s.subject_id] = max(labels.get(s.subject_id, 0), s.label)
    return [str(labels.get(sid, "unknown")) for sid in table["subject_id"]]


def detection_tasks() -> list[str]:
    """Tasks whose label is lesion presence per hemisphere: lesion_present, and any task scored like it
    (lesion_seg). The demo's detection gate and `predict`'s choice of the lesion hemisphere take any of them."""
    return [t.name for t in TASKS.values() if t.column is None and t.samples == "hemispheres"]


ONSET_TASKS = tuple(sorted(tasks_with_column("onset_to_mri_min"), key=lambda name: -TASKS[name].cutoff))
"""Onset tasks, the paper's headline (< 4.5 h) first."""
