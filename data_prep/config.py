"""PrepConfig: every switch of the preprocessing chain and the store layout, validated before work starts.

A store records the config it was built with; `prep` refuses to add subjects under a different one
(`config_hash` compares everything, layout included, since a mixed store could not be read consistently).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SERIES = ("dwi", "b0", "t2", "flair", "adc", "ct")


class PrepConfig(BaseModel):
    """Preprocessing chain and store layout (YAML section `prep`, or a file of its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[str, ...] = ("dwi", "b0", "flair")
    """Series stacked as store channels, in order; the first of b0/t2 present is the registration anchor."""
    spacing_mm: float = Field(2.0, gt=0.25, le=10.0)
    """Isotropic voxel size of the common grid."""
    shape: tuple[int, int, int] = (96, 112, 96)
    """Grid size (x, y, z); x must be even so the midline x = 0 falls between two columns."""
    center_mm: tuple[float, float] = (-18.0, 18.0)
    """Grid centre in MNI y and z (x is always 0, so the hemispheres split evenly)."""
    n4: bool = True
    """N4 bias-field correction (SimpleITK) of every MR series."""
    n4_spacing_mm: float = Field(8.0, gt=0, le=16.0)
    """N4 fits the field on the image shrunk to about this voxel size (speed); it corrects at full size."""
    n4_iterations: tuple[int, ...] = (30, 20, 10)
    """N4 iterations per fitting level."""
    skull_strip: Literal["auto", "given", "bet", "otsu", "template", "none"] = "auto"
    """Brain mask: auto = manifest mask if given, else BET if on PATH, else `otsu` (morphology on b0/T2)."""
    registration: Literal["affine", "rigid", "none"] = "affine"
    """Anchor series (b0/T2) -> MNI template: rigid then affine (Mattes MI), rigid only, or header only."""
    coregistration: Literal["auto", "rigid", "header"] = "auto"
    """Other series -> anchor: auto = header if on the anchor's grid else rigid MI; FLAIR always registers."""
    registration_seed: int = 0
    """Seed of the metric's random sampling (results do not depend on scheduling)."""
    sampling_fraction: float = Field(0.1, gt=0, le=1)
    """Share of fixed-image voxels sampled by the MI metric."""
    zscore: bool = True
    """Z-score every channel inside the brain mask; voxels outside the brain become 0."""
    normalize_on: Literal["robust", "brain", "normal_tissue"] = "robust"
    """Where the z-score statistics and histogram landmarks come from. robust: median and IQR of the whole
    brain, no lesion mask needed, so a new subject normalises as the training store did. brain: mean and SD of
    the whole brain (a large lesion drags them and loses part of its contrast). normal_tissue: the brain minus
    the expert lesion mask, dilated; kept only to read stores built with it (their inputs depend on the mask,
    and `predict` accepts new subjects for them only with a lesion mask)."""
    histogram_match: bool = True
    """Match each channel's in-brain histogram to the reference subject's (stored in the store attrs)."""
    reference_subject: str | None = None
    """Histogram reference; None = first subject of the manifest that preprocesses cleanly."""
    histogram_landmarks: int = Field(101, ge=3, le=1001)
    """Quantile landmarks of the piecewise-linear histogram map."""
    histogram_percentiles: tuple[float, float] = (1.0, 80.0)
    """In-brain percentiles of the first and last landmark; beyond them the map extends linearly. A lesion is
    bright on DWI, b0 and FLAIR and fills the top of the brain's histogram: with the last landmark at the 80th
    percentile, lesions of up to ~15% of the brain stay in the linear tail and keep their contrast (at the
    99th, one of 2% was mapped onto normal tissue's upper tail and kept half of it)."""
    ct_window: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Channel -> (centre, width) in HU: clip to the window and scale to [0, 1] instead of z-scoring."""
    dtype: Literal["float32", "float16"] = "float32"
    """Stored voxel type (the reader always returns float32)."""
    codec: Literal["none", "zstd", "blosc-lz4", "blosc-zstd"] = "zstd"
    """Chunk compressor; see bench/bench_store.py for the speed against size trade-off."""
    codec_level: int = Field(1, ge=0, le=22)
    """Compression level of the codec."""
    chunk_zyx: tuple[int, int, int] | None = None
    """Chunk (z, y, x) of one channel, a shard per subject; None = one hemisphere of all channels, unsharded."""
    qc_montage: bool = True
    """Write a QC montage PNG per subject under STORE/qc/."""

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in value if c not in SERIES]
        if not value or unknown or len(set(value)) != len(value):
            raise ValueError(f"channels must be distinct names from {', '.join(SERIES)}; got {list(value)}")
        return value

    @model_validator(mode="after")
    def _grid_and_windows(self) -> PrepConfig:
        if self.shape[0] % 2 or min(self.shape) < 8:
            raise ValueError(f"shape (x, y, z) needs an even x and sides >= 8; got {self.shape}")
        bad = [c for c in self.ct_window if c not in self.channels]
        if bad:
            raise ValueError(f"ct_window names channels {bad} that are not in channels {list(self.channels)}")
        low, high = self.histogram_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"histogram_percentiles must rise within [0, 100]; got {self.histogram_percentiles}")
        if self.chunk_zyx is not None and min(self.chunk_zyx) < 1:
            raise ValueError(f"chunk_zyx sides must be >= 1; got {self.chunk_zyx}")
        return self

    @property
    def anchor(self) -> str:
        """Series registered to the template; the others are registered to it."""
        for name in ("b0", "t2", "ct", "dwi", "flair", "adc"):
            if name in self.channels:
                return name
        raise AssertionError("validated channels cannot be empty")

    def config_hash(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
