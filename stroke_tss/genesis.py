"""Models Genesis self-supervision (Zhou et al. 2019): the four transformations and a crop Dataset.

Arrays are (channel, z, y, x) in [0, 1]. The official code works on (rows, cols, deps) = our (x, y, z);
its defaults are kept: flips on rows/columns only (p 0.4 per round, up to 3, mirrored in the target) ->
local pixel shuffling (p 0.5, 10,000 windows up to a tenth of each side, read from the original, later
windows overwrite earlier ones) -> Bezier intensity map (p 0.9, half decreasing) -> in-painting (p 0.2) or
out-painting (p 0.8) under paint p 0.9. Boxes, windows and curves are shared across channels. Everything is
array operations: Python loops run over window sizes or paint boxes, never over windows or voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.store import Store, open_store
from stroke_tss.errors import UserError


@dataclass(frozen=True, kw_only=True)
class GenesisRates:
    """Probabilities of each transformation (official Models Genesis defaults)."""

    flip: float = 0.4
    local: float = 0.5
    nonlinear: float = 0.9
    paint: float = 0.9
    inpaint: float = 0.2


def scale_to_unit(volume: np.ndarray, *, clip: tuple[float, float] = (-3.0, 3.0)) -> np.ndarray:
    """Z-scores -> [0, 1] by clipping to `clip` and scaling; use the same mapping when fine-tuning."""
    low, high = clip
    if not high > low:
        raise UserError(f"clip must be (low, high) with high > low, got {clip}")
    out = np.clip(volume, low, high, dtype=np.float32)
    out -= low
    out *= 1.0 / (high - low)
    return out


def flip_pair(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, prob: float = 0.4,
              max_flips: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Up to `max_flips` rounds, each taken with `prob`: flip input and target along the same axis.

    Each round picks one of three axes like the official code, whose first choice is its size-1 channel
    axis (a no-op); the other two are rows (x) and columns (y). Depth (z) is never flipped.
    """
    for _ in range(max_flips):
        if rng.random() >= prob:
            break
        axis = (None, -1, -2)[rng.integers(3)]
        if axis is not None:
            x, y = np.flip(x, axis), np.flip(y, axis)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


@lru_cache(maxsize=512)
def _window_offsets(window: tuple[int, int, int], image: tuple[int, int]) -> np.ndarray:
    """Flat offsets of the voxels of a (sx, sy, sz) window in a (.., height, width) image, x fastest."""
    (sx, sy, sz), (height, width) = window, image
    offsets = (np.arange(sz)[:, None, None] * height + np.arange(sy)[:, None]) * width + np.arange(sx)
    return offsets.ravel().astype(np.int32)


def local_pixel_shuffle(x: np.ndarray, rng: np.random.Generator, *, prob: float = 0.5,
                        num_windows: int = 10_000) -> np.ndarray:
    """Shuffle voxels inside many small random windows (sides 1 .. side // 10), each read from the original."""
    if rng.random() >= prob:
        return x
    num_channels, depth, height, width = x.shape
    sides = np.array((width, height, depth))
    # int32 throughout: half the memory traffic of the default int64 on these 250k-element index arrays.
    largest = np.maximum(sides // 10, 1)
    sizes = rng.integers(1, largest + 1, size=(num_windows, 3)).astype(np.int32)
    origins = rng.integers(0, sides - sizes + 1).astype(np.int32)
    base = (origins[:, 2] * height + origins[:, 1]) * width + origins[:, 0]
    volumes = sizes.prod(1)
    starts = np.cumsum(volumes, dtype=np.int32) - volumes
    total = int(starts[-1] + volumes[-1])
    keys = rng.random(total, dtype=np.float32)
    # Windows of one shape are handled together (a few dozen shapes, not 10,000 windows). Writes are laid
    # out in window order, so the scatter below lets later windows overwrite earlier ones, as the
    # sequential algorithm does.
    code = np.ravel_multi_index(sizes.T, tuple(largest + 1))
    order = np.argsort(code, kind="stable")
    cuts = np.flatnonzero(np.diff(code[order])) + 1
    dst, src = np.empty(total, np.int32), np.empty(total, np.int32)
    used = 0
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, num_windows]):
        windows = order[lo:hi]
        offsets = _window_offsets(tuple(sizes[windows[0]].tolist()), (height, width))
        count, volume = windows.size, offsets.size
        where = starts[windows, None] + np.arange(volume, dtype=np.int32)
        corner = base[windows, None]
        dst[where] = corner + offsets
        shuffle = keys[used:used + count * volume].reshape(count, volume).argsort(axis=1)
        src[where] = corner + offsets[shuffle]
        used += count * volume
    out = x.reshape(num_channels, -1).copy()
    out[:, dst] = x.reshape(num_channels, -1)[:, src]
    return out.reshape(x.shape)


def bezier_intensity(x: np.ndarray, rng: np.random.Generator, *, prob: float = 0.9,
                     num_points: int = 1000, table_size: int = 4096) -> np.ndarray:
    """Cubic Bezier intensity map from (0,0) to (1,1) through two random points, decreasing half the time.

    The official code samples the curve at 100,000 points and calls np.interp on every voxel; here the
    curve (1,000 points) is tabulated once on a uniform grid and read back by linear interpolation,
    which changes values by far less than float32 noise on a smooth cubic and is ~10x faster.
    """
    if rng.random() >= prob:
        return x
    px = np.array([0.0, rng.random(), rng.random(), 1.0])
    py = np.array([0.0, rng.random(), rng.random(), 1.0])
    t = np.linspace(0.0, 1.0, num_points)
    # Bernstein basis in the official order: comb(3, i) * t**(3-i) * (1-t)**i, so t runs from (1,1) to (0,0).
    basis = np.stack([t**3, 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3])
    xvals, yvals = px @ basis, py @ basis
    if rng.random() < 0.5:
        xvals = np.sort(xvals)  # yvals keep their 1 -> 0 order: a decreasing map
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    table = np.interp(np.linspace(0.0, 1.0, table_size), xvals, yvals).astype(np.float32)
    pos = np.clip(x, 0.0, 1.0) * np.float32(table_size - 1)
    index = np.minimum(pos.astype(np.int32), table_size - 2)
    low = table[index]
    return low + (pos - index.astype(np.float32)) * (table[index + 1] - low)


def _box(rng: np.random.Generator, shape: tuple[int, ...], low: Sequence[int], high: Sequence[int]):
    """Slices (z, y, x) of a box with side uniform in [low, high] (x, y, z order), 3 voxels from the edge."""
    depth, height, width = shape
    slices = []
    for side, lo, hi in zip((width, height, depth), low, high):
        size = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(3, max(side - size - 3, 3) + 1))
        slices.append(slice(start, start + size))
    return (slice(None), *slices[::-1])


def in_paint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to 5 boxes (sides 1/6 .. 1/3) replaced by uniform noise (shared across channels)."""
    x = x.copy()
    sides = x.shape[:0:-1]
    for _ in range(5):
        if rng.random() >= 0.95:
            break
        box = _box(rng, x.shape[1:], [s // 6 for s in sides], [s // 3 for s in sides])
        x[box] = rng.random(x[box].shape[1:], dtype=np.float32)
    return x


def out_paint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise everywhere except up to 5 boxes (sides 3/7 .. 4/7) kept from the original."""
    out = rng.random(x.shape, dtype=np.float32)
    sides = x.shape[:0:-1]
    low = [s - 4 * s // 7 for s in sides]
    high = [s - 3 * s // 7 for s in sides]
    for i in range(5):
        if i > 0 and rng.random() >= 0.95:
            break
        box = _box(rng, x.shape[1:], low, high)
        out[box] = x[box]
    return out


def make_pair(crop: np.ndarray, rng: np.random.Generator, *,
              rates: GenesisRates = GenesisRates()) -> tuple[np.ndarray, np.ndarray]:
    """(transformed input, target) from a (C, Z, Y, X) crop in [0, 1]."""
    x, y = flip_pair(crop, crop, rng, prob=rates.flip)
    x = local_pixel_shuffle(x, rng, prob=rates.local)
    x = bezier_intensity(x, rng, prob=rates.nonlinear)
    if rng.random() < rates.paint:
        x = in_paint(x, rng) if rng.random() < rates.inpaint else out_paint(x, rng)
    return x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)


def crop_around(volume: np.ndarray, center: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
    """A (C, *size_zyx) crop centred near `center`, shifted to stay inside; zero-padded if the volume is
    smaller than the crop."""
    slices, pads = [slice(None)], [(0, 0)]
    for c, size, side in zip(center, size_zyx, volume.shape[1:]):
        start = int(np.clip(c - size // 2, 0, max(side - size, 0)))
        slices.append(slice(start, start + size))
        pads.append((0, max(size - side, 0)))
    out = volume[tuple(slices)]
    return np.pad(out, pads) if any(p[1] for p in pads) else out


class GenesisCrops(Dataset):
    """(transformed, original) crop pairs cut from a store at random points inside each brain mask.

    `crop` is (x, y, z) like the official 64x64x32; items are (C, z, y, x) float32 tensors in [0, 1]
    (z-scores clipped to `clip` and scaled). Item i of epoch e draws from its own generator seeded by
    (seed, e, i), so pairs are reproducible and independent of the number of DataLoader workers.
    The store is opened lazily in each worker (it pickles as its path).
    """

    def __init__(self, store: Store | str | Path, subject_ids: Sequence[str], *,
                 crop: Sequence[int] = (64, 64, 32), clip: tuple[float, float] = (-3.0, 3.0), seed: int,
                 channels: Sequence[str] | None = None, crops_per_subject: int = 1,
                 rates: GenesisRates = GenesisRates()):
        if len(crop) != 3 or any(side % 8 or side < 8 for side in crop):
            raise UserError(f"genesis crop {tuple(crop)} must be 3 sides, each a multiple of 8 (U-Net poolings)")
        if not subject_ids:
            raise UserError(f"no subjects given for Models Genesis crops from {store}")
        scale_to_unit(np.zeros(1), clip=clip)  # validates clip now, not in a worker
        self.store = store if isinstance(store, Store) else open_store(store)
        missing = sorted(set(subject_ids) - set(self.store.subject_ids))
        if missing:
            raise UserError(f"store {self.store.path}: subjects {missing[:5]} are not in it; "
                             "choose subject ids from its subjects table")
        names = self.store.channels
        wanted = list(channels) if channels is not None else names
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise UserError(f"store {self.store.path}: channels {unknown} not in its channels {names}")
        self.channel_index = [names.index(c) for c in wanted]
        self.subject_ids = list(subject_ids)
        self.size_zyx = tuple(int(s) for s in crop)[::-1]
        self.clip = clip
        self.seed = seed
        self.crops_per_subject = crops_per_subject
        self.rates = rates
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New crops and transforms every epoch (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.subject_ids) * self.crops_per_subject

    def crop(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """The original crop of item `index`, scaled to [0, 1]."""
        sid = self.subject_ids[index % len(self.subject_ids)]
        inside = np.flatnonzero(self.store.brain(sid))
        if inside.size == 0:
            raise UserError(f"subject {sid}: brain mask in store {self.store.path} is empty; "
                             "re-run prep for this subject or leave it out of pretraining")
        volume = self.store.volume(sid)
        center = np.unravel_index(inside[rng.integers(inside.size)], volume.shape[1:])
        return scale_to_unit(crop_around(volume[self.channel_index], center, self.size_zyx), clip=self.clip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        x, y = make_pair(self.crop(index, rng), rng, rates=self.rates)
        return torch.from_numpy(x), torch.from_numpy(y)
