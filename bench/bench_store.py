"""The store against the ways a user reads volumes without one, and `prep`'s scaling and memory.

load_vs_niigz / load_vs_npy: hemisphere samples per second through `open_store(...).hemisphere` in a
DataLoader with 2 workers, over the same arm with the subject's raw series (dwi, b0, flair as the cohort holds
them) read from .nii.gz by nibabel and cut in half along x (no other preprocessing: what a user without a
store does at best), and over the preprocessed volume read from one raw uncompressed .npy per
subject opened as a memmap (the practical limit). Every arm: 2 workers, one warm-up pass (page cache, worker
start), then a timed pass. The volumes are two phantom subjects preprocessed at the default 2 mm grid, written
as N_SUBJECTS subjects. Every store codec is measured beside its MB per subject; the ratios use the default.
prep_2w_vs_1w: `prep` of a 4 mm phantom cohort with 2 Dask workers over 1 (one ITK thread each), both arms
on a copy of a store whose histogram reference subject is already done (that subject runs alone first).
prep_rss_16_vs_64: peak RSS of the whole `stroke-tss prep` process tree (driver and workers, sampled) for 16
subjects over that for 64 (rows reuse the cohort's files under new ids; a cheap chain: no N4, header pose).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import torch

from data_prep.build import prep
from data_prep.config import PrepConfig
from data_prep.phantom import synthesize_cohort
from data_prep.store import (
    assemble_table,
    create_or_extend,
    open_store,
    write_record,
    write_subject,
)

N_SUBJECTS = 12
CODECS = ("none", "blosc-lz4", "blosc-zstd", "zstd")
SMALL = {"spacing_mm": 4.0, "shape": (40, 48, 40), "n4_iterations": (10, 10), "qc_montage": False}


class _Halves(torch.utils.data.Dataset):
    """(subject, side) -> hemisphere (channel, z, y, x/2), read by one of three readers."""

    def __init__(self, reader, items):
        self.reader, self.items = reader, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.reader(*self.items[i])


class _StoreReader:
    def __init__(self, path):
        self.store = open_store(path)

    def __call__(self, sid, side):
        return self.store.hemisphere(sid, side)


def _cut(volume: np.ndarray, side: str) -> np.ndarray:
    half = volume.shape[-1] // 2
    return np.ascontiguousarray(volume[..., :half] if side == "left" else volume[..., half:][..., ::-1])


class _NpyReader:
    def __init__(self, folder):
        self.folder = folder

    def __call__(self, sid, side):
        return _cut(np.load(self.folder / f"{sid}.npy", mmap_mode="r"), side).astype(np.float32, copy=False)


class _NiftiReader:
    """The subject's raw series as the cohort holds them, each cut in half along x: no other preprocessing."""

    def __init__(self, files):
        self.files = files

    def __call__(self, sid, side):
        return [_cut(np.asarray(nib.load(path).dataobj, dtype=np.float32).T, side) for path in self.files[sid]]


def _rate(reader, items) -> float:
    """Samples/s of a timed pass, after a warm-up pass, 2 DataLoader workers kept alive between them."""
    loader = torch.utils.data.DataLoader(_Halves(reader, items), batch_size=None, num_workers=2,
                                         persistent_workers=True, worker_init_fn=lambda _: torch.set_num_threads(1))
    for _ in loader:
        pass
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return n / (time.perf_counter() - start)


def _preprocessed(tmp: Path) -> tuple[list[tuple], list[list[Path]]]:
    """Two phantom subjects through the default chain: (volume, brain, lesion) each, and their raw series."""
    manifest = synthesize_cohort(tmp / "cohort", num_subjects=2, seed=3, spacing_mm=2.0)
    result = prep(manifest, tmp / "src.zarr", config=PrepConfig(codec="none", qc_montage=False), workers=2,
                  progress=False)
    s = open_store(result.store)
    raw = [[manifest.parent / sid / f"{c}.nii.gz" for c in s.channels] for sid in s.subject_ids]
    return [(s.volume(sid), s.brain(sid), s.lesion(sid)) for sid in s.subject_ids], raw


def _write_store(path: Path, config: PrepConfig, subjects: list[tuple], ids: list[str]) -> float:
    rows = create_or_extend(path, config=config, subject_ids=ids)
    for i, sid in enumerate(ids):
        volume, brain, lesion = subjects[i % len(subjects)]
        write_subject(path, rows[sid], volume=volume, brain=brain, lesion=lesion)
        write_record(path, {"subject_id": sid, "index": rows[sid], "has_lesion_mask": True})
    assemble_table(path)
    size = sum(f.stat().st_size for f in (path / "volumes").rglob("*") if f.is_file())
    return size / len(ids) / 1e6


def load_benchmarks(tmp: Path) -> list[dict]:
    subjects, raw = _preprocessed(tmp)
    ids = [f"sub-{i:03d}" for i in range(N_SUBJECTS)]
    items = [(sid, side) for sid in ids for side in ("left", "right")]
    default = PrepConfig()
    rates, sizes = {}, {}
    for codec in CODECS:
        path = tmp / f"{codec}.zarr"
        sizes[codec] = _write_store(path, PrepConfig(codec=codec, qc_montage=False), subjects, ids)
        rates[codec] = _rate(_StoreReader(path), items)
    (tmp / "npy").mkdir()
    for i, sid in enumerate(ids):
        np.save(tmp / "npy" / f"{sid}.npy", subjects[i % len(subjects)][0])
    npy = _rate(_NpyReader(tmp / "npy"), items)
    nii = _rate(_NiftiReader({sid: raw[i % len(raw)] for i, sid in enumerate(ids)}), items)
    store = rates[default.codec]
    codecs = "; ".join(f"{c} {rates[c]:.0f}/s {sizes[c]:.1f} MB" for c in CODECS)
    common = (f"default codec {default.codec}: store_mb_per_subject {sizes[default.codec]:.2f} "
              f"(raw {subjects[0][0].nbytes / 1e6:.1f}); per codec: {codecs}")
    return [
        {"name": "load_vs_niigz", "ratio": store / nii, "target": 10.0,
         "detail": f"store {store:.0f} vs nii.gz {nii:.1f} hemispheres/s, 2 workers; {common}"},
        {"name": "load_vs_npy", "ratio": store / npy, "target": 0.7,
         "detail": f"store {store:.0f} vs npy memmap {npy:.0f} hemispheres/s, 2 workers"},
    ]


def _absolute_manifest(manifest: Path, out: Path, *, copies: int = 1, first: int | None = None) -> Path:
    """The cohort's rows with absolute paths, repeated `copies` times under new ids (files shared)."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table = table.iloc[:first] if first else table
    for col in {"dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask"} & set(table.columns):
        table[col] = [str(manifest.parent / v) if v else "" for v in table[col]]
    parts = []
    for k in range(copies):
        part = table.copy()
        part["subject_id"] = [f"{sid}-{k:02d}" for sid in table["subject_id"]] if copies > 1 else table["subject_id"]
        parts.append(part)
    pd.concat(parts).to_csv(out, index=False)
    return out


def prep_scaling(tmp: Path, manifest: Path) -> dict:
    from distributed import Client, LocalCluster

    from data_prep.build import _SINGLE_THREAD_ENV
    from data_prep.register import template

    config = PrepConfig(**SMALL)
    base = tmp / "base.zarr"
    prep(_absolute_manifest(manifest, tmp / "first.csv", first=1), base, config=config, workers=1, progress=False)
    full = _absolute_manifest(manifest, tmp / "all.csv", copies=2)
    first = pd.read_csv(tmp / "first.csv")["subject_id"].iloc[0]
    table = pd.read_csv(full)
    table.loc[table["subject_id"] == f"{first}-00", "subject_id"] = first  # the base store's done subject
    table.to_csv(full, index=False)
    seconds = {}
    for workers in (1, 2):
        store = tmp / f"w{workers}.zarr"
        shutil.copytree(base, store)
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0",
                          env=_SINGLE_THREAD_ENV) as cluster, Client(cluster) as client:
            client.run(template)  # imports and the template load: a per-worker start cost, not throughput
            start = time.perf_counter()
            result = prep(full, store, config=config, cluster=client, progress=False)
            seconds[workers] = time.perf_counter() - start
        assert not result.failed, result.failed
    n = len(table) - 1
    return {"name": "prep_2w_vs_1w", "ratio": seconds[1] / seconds[2], "target": 1.7,
            "detail": f"{n} subjects at 4 mm, warm workers: 1 worker {seconds[1]:.1f} s, 2 workers "
                      f"{seconds[2]:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"}


def _peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS of the process tree, peak RSS of the driver) in MB, sampled every 50 ms."""
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ,
                        "OMP_NUM_THREADS": "1"})
    tree = driver = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
        except psutil.NoSuchProcess:
            continue
        tree, driver = max(tree, sum(rss)), max(driver, rss[0])
        time.sleep(0.05)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}"
    return tree / 1e6, driver / 1e6


def prep_memory(tmp: Path, manifest: Path) -> dict:
    cheap = tmp / "cheap.yaml"
    cheap.write_text("prep:\n  spacing_mm: 4.0\n  shape: [40, 48, 40]\n  n4: false\n  registration: none\n"
                     "  coregistration: header\n  skull_strip: otsu\n  qc_montage: false\n")
    rows = len(pd.read_csv(manifest))
    peaks = {}
    for n in (16, 64):
        table = _absolute_manifest(manifest, tmp / f"m{n}.csv", copies=-(-n // rows))
        pd.read_csv(table).iloc[:n].to_csv(table, index=False)
        cmd = [sys.executable, "-m", "stroke_tss.cli", "prep", str(table), str(tmp / f"rss{n}.zarr"), "--config",
               str(cheap), "--workers", "2", "--no-progress"]
        peaks[n] = _peak_rss(cmd)
    return {"name": "prep_rss_16_vs_64", "ratio": peaks[16][0] / peaks[64][0], "target": 0.83,
            "detail": f"process tree peak {peaks[16][0]:.0f} MB (16) vs {peaks[64][0]:.0f} MB (64); driver alone "
                      f"{peaks[16][1]:.0f} vs {peaks[64][1]:.0f} MB"}


def run() -> list[dict]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        tmp = Path(tmp)
        rows = load_benchmarks(tmp)
        manifest = synthesize_cohort(tmp / "small", num_subjects=9, seed=11, spacing_mm=4.0)
        rows.append(prep_scaling(tmp, manifest))
        rows.append(prep_memory(tmp, manifest))
    return rows


if __name__ == "__main__":
    from bench.__main__ import format_table

    print(format_table(run()))
