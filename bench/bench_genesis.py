"""Models Genesis pair generation: vectorised (stroke_tss.genesis) against the official per-window loop,
and whether 2 DataLoader workers keep a CPU unet3d training step fed.

genesis_vs_loop: pairs/s of `make_pair` over pairs/s of `loop_pair`, the official code's algorithm written
the straightforward way (a Python loop over the 10,000 shuffle windows, a 100,000-point Bezier curve and
np.interp per voxel, as in Models Genesis' utils.py), run in alternating rounds on the same crops; the
output statistics of the two arms must agree within 4 standard errors.
genesis_data_wait: 1 - the share of training-step time spent waiting for the next batch (unet3d at base 8,
the narrower demo width and so the harder case for the loader; batch 4; 64x64x32 crops; 2 workers) over a
synthetic store written with data_prep's store writer at the default grid.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from stroke_tss.genesis import GenesisCrops, make_pair, scale_to_unit

CROP_ZYX = (32, 64, 64)


def _loop_shuffle(x: np.ndarray, rnd: random.Random, nrng: np.random.Generator) -> np.ndarray:
    out, orig = x.copy(), x
    _, depth, rows_y, rows_x = x.shape
    for _ in range(10_000):
        sx, sy, sz = rnd.randint(1, rows_x // 10), rnd.randint(1, rows_y // 10), rnd.randint(1, depth // 10)
        ox, oy, oz = rnd.randint(0, rows_x - sx), rnd.randint(0, rows_y - sy), rnd.randint(0, depth - sz)
        window = orig[:, oz:oz + sz, oy:oy + sy, ox:ox + sx].reshape(x.shape[0], -1)
        window = window[:, nrng.permutation(window.shape[1])]
        out[:, oz:oz + sz, oy:oy + sy, ox:ox + sx] = window.reshape(x.shape[0], sz, sy, sx)
    return out


def _loop_bezier(x: np.ndarray, rnd: random.Random) -> np.ndarray:
    from scipy.special import comb

    points = [[0, 0], [rnd.random(), rnd.random()], [rnd.random(), rnd.random()], [1, 1]]
    t = np.linspace(0.0, 1.0, 100_000)
    poly = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xvals, yvals = np.dot([p[0] for p in points], poly), np.dot([p[1] for p in points], poly)
    if rnd.random() < 0.5:
        xvals = np.sort(xvals)
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    return np.interp(x, xvals, yvals).astype(np.float32)


def _loop_box(rnd: random.Random, x: np.ndarray, low, high):
    _, depth, height, width = x.shape
    sizes = [rnd.randint(lo, hi) for lo, hi in zip(low, high)]
    starts = [rnd.randint(3, side - s - 3) for side, s in zip((width, height, depth), sizes)]
    return (slice(None), *[slice(a, a + s) for a, s in zip(starts, sizes)][::-1])


def loop_pair(crop: np.ndarray, rnd: random.Random, nrng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The official generate_pair for one crop, axes mapped to (C, z, y, x)."""
    x, y = crop, crop
    for _ in range(3):
        if rnd.random() >= 0.4:
            break
        axis = rnd.choice([None, -1, -2])
        if axis is not None:
            x, y = np.flip(x, axis), np.flip(y, axis)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if rnd.random() < 0.5:
        x = _loop_shuffle(x, rnd, nrng)
    if rnd.random() < 0.9:
        x = _loop_bezier(x, rnd)
    sides = x.shape[:0:-1]
    if rnd.random() < 0.9:
        if rnd.random() < 0.2:
            x = x.copy()
            for _ in range(5):
                if rnd.random() >= 0.95:
                    break
                box = _loop_box(rnd, x, [s // 6 for s in sides], [s // 3 for s in sides])
                x[box] = nrng.random(x[box].shape[1:])
        else:
            out = nrng.random(x.shape).astype(np.float32)
            for i in range(5):
                if i > 0 and rnd.random() >= 0.95:
                    break
                box = _loop_box(rnd, x, [s - 4 * s // 7 for s in sides], [s - 3 * s // 7 for s in sides])
                out[box] = x[box]
            x = out
    return x, y


def _crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [scale_to_unit(gaussian_filter(rng.standard_normal((1, *CROP_ZYX)), (0, 2, 2, 2)) * 6) for _ in range(n)]


def _stats(x: np.ndarray, y: np.ndarray) -> list[float]:
    return [float(x.mean()), float(x.std()), float((x != y).mean()), float(np.abs(x - y).mean())]


def genesis_vs_loop(*, seconds: float = 40.0) -> dict:
    crops = _crops(8)
    rnd, nrng = random.Random(0), np.random.default_rng(1)
    vec_rng = np.random.default_rng(2)
    time_loop = time_vec = 0.0
    stats_loop, stats_vec = [], []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(stats_loop) < 30:
        crop = crops[i % len(crops)]
        i += 1
        t0 = time.perf_counter()
        pair = loop_pair(crop, rnd, nrng)
        time_loop += time.perf_counter() - t0
        stats_loop.append(_stats(*pair))
        for _ in range(10):
            t0 = time.perf_counter()
            pair = make_pair(crop, vec_rng)
            time_vec += time.perf_counter() - t0
            stats_vec.append(_stats(*pair))
    a, b = np.array(stats_loop), np.array(stats_vec)
    se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    z = np.abs(a.mean(0) - b.mean(0)) / np.maximum(se, 1e-12)
    rate_loop, rate_vec = len(a) / time_loop, len(b) / time_vec
    match = bool((z < 4).all())
    names = ("mean", "std", "changed", "abs_diff")
    detail = (f"vectorised {rate_vec:.1f} pairs/s vs loop {rate_loop:.2f} pairs/s (1x{CROP_ZYX[::-1]} crops, "
              f"{len(b)} vs {len(a)} pairs); statistics "
              + ", ".join(f"{n} {x:.3f}/{y:.3f}" for n, x, y in zip(names, b.mean(0), a.mean(0)))
              + f" (max |z| {z.max():.1f}, {'match' if match else 'MISMATCH'})")
    return {"name": "genesis_vs_loop", "ratio": rate_vec / rate_loop if match else 0.0, "target": 10.0,
            "detail": detail}


def write_store(path: Path, *, num_subjects: int = 6) -> Path:
    """A store at the default grid (data_prep's writer): smooth z-scores inside a brain ellipsoid."""
    from data_prep.config import PrepConfig
    from data_prep.store import assemble_table, create_or_extend, write_record, write_subject

    config = PrepConfig(qc_montage=False)
    nx, ny, nz = config.shape
    sids = [f"sub-{i:02d}" for i in range(num_subjects)]
    rows = create_or_extend(path, config=config, subject_ids=sids)
    z, y, x = np.ogrid[:nz, :ny, :nx]
    brain = (((z - nz / 2) / (0.4 * nz)) ** 2 + ((y - ny / 2) / (0.42 * ny)) ** 2
             + ((x - nx / 2) / (0.4 * nx)) ** 2) < 1
    rng = np.random.default_rng(0)
    for sid in sids:
        volume = gaussian_filter(rng.standard_normal((len(config.channels), nz, ny, nx)), (0, 2, 2, 2)) * 6
        write_subject(path, rows[sid], volume=volume * brain, brain=brain, lesion=None)
        write_record(path, {"subject_id": sid, "index": rows[sid], "has_lesion_mask": False})
    assemble_table(path)
    return path


def data_wait(*, base_channels: int = 8, steps: int = 12, warmup: int = 3) -> dict:
    from stroke_tss.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store.zarr")
        sids = [f"sub-{i:02d}" for i in range(6)]
        ds = GenesisCrops(store, sids, crop=CROP_ZYX[::-1], seed=0, channels=["dwi"], crops_per_subject=40)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
        model = build_model("unet3d", base_channels=base_channels)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)  # the official Genesis optimiser
        waits, totals = [], []
        it = iter(loader)
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            x, y = next(it)
            t1 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
        del it
    wait, total = sum(waits[warmup:]), sum(totals[warmup:])
    detail = (f"unet3d base {base_channels}, batch 4, 2 workers: {total / steps:.2f} s/step, waiting "
              f"{100 * wait / total:.1f}% of step time over {steps} steps (first {warmup} excluded)")
    return {"name": "genesis_data_wait", "ratio": 1 - wait / total, "target": 0.9, "detail": detail}


def run() -> list[dict]:
    return [genesis_vs_loop(), data_wait()]


if __name__ == "__main__":
    for row in run():
        print(row)
