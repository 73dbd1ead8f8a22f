"""Datasets over the store: one task's samples (stroke_tss.tasks) read, augmented and labelled.

A sample is (subject, hemisphere, label). Hemisphere tasks read ``store.hemisphere`` (right flipped onto
left); ``mrs_gt_2`` reads the whole volume. Augmentation of item i in epoch e draws from a generator
seeded by (seed, e, i), so batches do not depend on worker count and a resumed run sees the same data.

Lesion swap (``augment.lesion_swap``, lesion_present and lesion_seg, whose mask moves with the lesion): with
that probability a hemisphere trades lesions with its mirror image, which the store holds on the same grid.
Voxels under this half's lesion mask (dilated one voxel, soft-edged) take the other half's values, and the
other half's lesion is pasted in; the label becomes the other half's. A subject's anatomy then shows up both
with and without a lesion, so the network cannot score anatomy; without it, the paper's networks from random
initialisation memorised the training hemispheres of a phantom cohort of 80 subjects and stayed near chance on
held-out ones (the paper trains its 2D network on lesion detection from scratch too; ImageNet weights are one
of the baselines it compares with). Within one subject; CarveMix (Zhang et al., MICCAI 2021) mixes lesions
between subjects the same way.

Lesion transplant (``augment.lesion_transplant``, onset tasks only): with that probability the sample's
lesion (all channels under its soft-edged mask) is carved into the healthy half of another subject of the
dataset, at the same place on the common grid; the label (the donor's onset) stays. The onset signal lives
in the lesion's FLAIR and b0 contrast, so the label travels with the lesion while the anatomy around it is
someone else's: the network cannot tie onset labels to the brains it trains on.

Segmentation samples (``Sample.mask``, task lesion_seg) also carry the hemisphere's lesion mask, cut and
flipped as the hemisphere is; a swap hands over the mirror half's mask with its lesion, a transplant keeps
the carved lesion's mask, and a rotation turns the mask with the pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_dilation, gaussian_filter, rotate
from torch.utils.data import Dataset

from data_prep.store import Store, half, lesioned, open_store
from stroke_tss.errors import UserError
from stroke_tss.genesis import scale_to_unit
from stroke_tss.tasks import SIDES, Sample

log = logging.getLogger(__name__)


def _soft_mask(mask: np.ndarray) -> np.ndarray:
    return np.clip(gaussian_filter(binary_dilation(mask > 0).astype(np.float32), 0.7), 0.0, 1.0)


def swap_lesions(own: np.ndarray, other: np.ndarray, own_mask: np.ndarray, other_mask: np.ndarray) -> np.ndarray:
    """``own`` hemisphere (C, Z, Y, X) with its lesion replaced by the mirror half's tissue and the mirror
    half's lesion pasted in (masks (Z, Y, X) on the same mirrored grid)."""
    w_own, w_other = _soft_mask(own_mask), _soft_mask(other_mask)
    x = own * (1 - w_own) + other * w_own
    return (x * (1 - w_other) + other * w_other).astype(np.float32)


def augment(x: np.ndarray, rng: np.random.Generator, *, gamma: tuple[float, float] | None = None,
            rotate_z_deg: float = 0.0, noise_std: float = 0.0) -> np.ndarray:
    """Gamma on min-max scaled intensities, in-plane rotation about z, Gaussian noise; (C, Z, Y, X)."""
    return augment_with_mask(x, None, rng, gamma=gamma, rotate_z_deg=rotate_z_deg, noise_std=noise_std)[0]


def augment_with_mask(x: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
                      gamma: tuple[float, float] | None = None, rotate_z_deg: float = 0.0,
                      noise_std: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """`augment`, moving a lesion mask (Z, Y, X) with the pixels: the rotation turns it by the same angle
    (nearest neighbour, so it stays 0/1); intensity changes leave it alone. Same draws as `augment`."""
    if gamma is not None:
        g = rng.uniform(*gamma)
        lo, hi = x.min(), x.max()
        if hi > lo:
            x = ((x - lo) / (hi - lo)) ** g * (hi - lo) + lo
    if rotate_z_deg > 0:
        angle = rng.uniform(-rotate_z_deg, rotate_z_deg)
        x = rotate(x, angle, axes=(-1, -2), reshape=False, order=1, mode="nearest")
        if mask is not None:
            mask = rotate(mask, angle, axes=(-1, -2), reshape=False, order=0, mode="constant")
    if noise_std > 0:
        x = x + rng.normal(0.0, noise_std, size=x.shape)
    return np.ascontiguousarray(x, dtype=np.float32), mask


class StoreDataset(Dataset):
    """Items {"x": (C, Z, Y, X') float32, "y": float, "index": int} of one task's samples from a store, plus
    "mask": (Z, Y, X') float32, the hemisphere's lesion mask on the same grid, for samples that ask for it
    (`Sample.mask`, segmentation tasks); it follows the swap, transplant and rotation of its pixels."""

    def __init__(self, store: Store | str | Path, samples: Sequence[Sample], *, channels: Sequence[str] | None = None,
                 intensity: str = "zscore", augment: dict | None = None, seed: int = 0):
        """``store``: an opened store (it pickles as its path: each worker reopens it) or its path.
        ``augment``: keyword arguments of `augment`, plus ``lesion_swap`` (lesion_present) and
        ``lesion_transplant`` (onset tasks), probabilities; see the module docstring."""
        self.store = store if isinstance(store, Store) else open_store(store)
        names = self.store.channels
        wanted = list(channels) if channels else names
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise UserError(f"store {self.store.path}: channels {unknown} not in its channels {names}; "
                            "fix data.channels")
        if intensity not in ("zscore", "unit"):
            raise UserError(f"train.intensity must be 'zscore' or 'unit', not {intensity!r}")
        self.channel_index = [names.index(c) for c in wanted]
        self.spacing_mm = float(self.store.attrs["spacing_mm"])
        self.samples = list(samples)
        self.intensity = intensity
        self.augment = dict(augment or {})
        self.lesion_swap = float(self.augment.pop("lesion_swap", 0.0))
        self.lesion_transplant = float(self.augment.pop("lesion_transplant", 0.0))
        if (self.lesion_swap or self.lesion_transplant) and any(smp.hemisphere not in SIDES for smp in self.samples):
            raise UserError("augment.lesion_swap and lesion_transplant apply to hemisphere samples, not whole volumes")
        # recipients of transplants: subjects with a lesion on one side only (the other half is healthy)
        self._recipients = [smp for smp in self.samples if smp.side in SIDES]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def oversample_classes(self, by: str = "label") -> np.ndarray:
        """One integer class per sample for the oversampler: the label, or label x lesion side."""
        if by == "label":
            return self.labels
        if by != "label_and_side":
            raise UserError(f"train.oversample_by must be 'label' or 'label_and_side', not {by!r}")
        keys = [f"{s.label}/{s.side}" for s in self.samples]
        return np.unique(keys, return_inverse=True)[1].astype(np.int64)

    def _hemisphere_masks(self, sid: str) -> dict[str, np.ndarray] | None:
        """The lesion mask of each half on the mirrored hemisphere grid (as `store.hemisphere` reads them)."""
        lesion = self.store.lesion(sid)
        if lesion is None:
            return None
        return {side: half(lesion, side) for side in SIDES}

    def _swapped(self, s: Sample) -> tuple[np.ndarray, int, np.ndarray] | None:
        """The hemisphere after trading lesions with its mirror half, its new label and lesion mask (the mirror
        half's); None without masks."""
        other = "right" if s.hemisphere == "left" else "left"
        masks = self._hemisphere_masks(s.subject_id)
        if masks is None or s.side == "unknown":
            return None
        x = swap_lesions(self.store.hemisphere(s.subject_id, s.hemisphere), self.store.hemisphere(s.subject_id, other),
                         masks[s.hemisphere], masks[other])
        return x, int(s.side in (other, "bilateral")), masks[other]

    def _transplanted(self, s: Sample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """The lesion of ``s`` carved into the healthy half of another subject, and its mask (unchanged: same
        place on the common grid); None without masks/recipients."""
        others = [r for r in self._recipients if r.subject_id != s.subject_id]
        masks = self._hemisphere_masks(s.subject_id)
        mask = None if masks is None else masks[s.hemisphere]
        if not others or mask is None or not mask.any():
            return None
        r = others[int(rng.integers(len(others)))]
        healthy = self.store.hemisphere(r.subject_id, "right" if r.side == "left" else "left")
        w = _soft_mask(mask)
        return (healthy * (1 - w) + self.store.hemisphere(s.subject_id, s.hemisphere) * w).astype(np.float32), mask

    def _own_mask(self, s: Sample) -> np.ndarray:
        masks = self._hemisphere_masks(s.subject_id)
        if masks is None:
            raise UserError(f"subject {s.subject_id}, file {self.store.path}: no lesion mask in the store, and task "
                            "samples of a segmentation task need one; add lesion_mask to the manifest and re-run prep")
        return masks[s.hemisphere]

    def read_with_mask(self, index: int, rng: np.random.Generator | None = None
                       ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Item ``index`` (channels selected, intensity mapped), its label, and its lesion mask when the sample
        asks for one (else None); ``rng`` draws the lesion swap or transplant."""
        s = self.samples[index]
        x, label, mask = None, s.label, None
        if self.lesion_swap and rng is not None and rng.random() < self.lesion_swap:
            x, label, mask = self._swapped(s) or (None, label, None)
        elif self.lesion_transplant and rng is not None and rng.random() < self.lesion_transplant:
            x, mask = self._transplanted(s, rng) or (None, None)
        if x is None:
            x = self.store.volume(s.subject_id) if s.hemisphere == "both" else self.store.hemisphere(s.subject_id, s.hemisphere)
        if s.mask and mask is None:
            mask = self._own_mask(s)
        if s.mask and not lesioned(float(mask.sum()), self.spacing_mm):
            # under LESION_FLAG_MIN_ML a half's voxels are resampling spill-over, and the store flags (labels) it
            # unlesioned: nothing to segment, so the target agrees with the label
            mask = np.zeros_like(mask)
        x = x[self.channel_index]
        if self.intensity == "unit":
            x = scale_to_unit(x)
        return x, label, (mask.astype(np.float32) if s.mask else None)

    def __getitem__(self, index: int) -> dict:
        drawn = self.augment or self.lesion_swap or self.lesion_transplant
        rng = np.random.default_rng((self.seed, self.epoch, index)) if drawn else None
        x, label, mask = self.read_with_mask(index, rng)
        if self.augment:
            x, mask = augment_with_mask(x, mask, rng, **self.augment)
        item = {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.tensor(float(label)), "index": index}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return item
