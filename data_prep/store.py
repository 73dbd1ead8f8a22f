"""The preprocessed cohort store (Zarr v3): format owner, reader API and the writer primitives `prep` uses.

Layout of STORE/ (a Zarr v3 group):
  volumes  (subject, channel, z, y, x) float32|float16   brain, lesion  (subject, z, y, x) uint8
  records/<sid>.json   written by the worker after its chunks; a subject is done only once its record exists
  subjects.csv         the table (manifest columns + derived), assembled from the records by the driver
  failures.csv, qc.csv, qc/<sid>.png
  logs/                dask-jobqueue worker logs (prep --cluster slurm)
Chunking (measured by bench/bench_store.py; codec and chunks are config: PrepConfig.codec, chunk_zyx): the
default chunk is one hemisphere of all channels (C, Z, Y, X/2), the read every 2D/3D sample starts from, so a
hemisphere is one chunk read; a 64x64x32 crop decodes its hemisphere's chunk. Unsharded, since a chunk never
spans two subjects anyway: one hemisphere read cost 4.3 ms against 7.5 ms with a shard per subject and 6.4 ms
with a chunk per channel (zstd-1, 2 mm grid, one core). zstd level 1 is the default codec: in the same
measurement it was both smaller (2.9 vs 3.5 MB per subject) and faster to read than blosc-lz4; uncompressed
is 12.4 MB. With `chunk_zyx` (smaller chunks of one channel) each subject's block is one shard, so again no
chunk or shard spans two subjects and Dask workers never write into the same file.
The reader opens lazily and re-opens after fork, and pickles as a path, so DataLoader workers (fork or spawn)
each get their own handle.
Integrity (attrs "integrity"): every chunk (or shard) ends in a CRC32C of its encoded bytes (Zarr v3's crc32c
codec, after the compressor), so flipped bytes are an error instead of values near 1e33; and every chunk of a
subject is written, zeros included, so a chunk file missing from a finished subject is damage, not "all fill
value". The reader checks a subject's chunk files once per process, on its first read (a few stat calls), and
turns any decode failure into one StoreError naming the subject; data_prep.verify checks a whole store. A
store written before the checksums (no "integrity" attr) stays readable; only decode errors are caught there.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
import zarr.codecs

from data_prep.config import PrepConfig
from data_prep.errors import InputError
from data_prep.paths import subject_path

SCHEMA_VERSION = 1
MARKER = "stroke_tss_store"
LESION_FLAG_MIN_ML = 0.1  # a hemisphere counts as lesioned above this; below it is resampling spill-over
ARRAYS = ("volumes", "brain", "lesion")
INTEGRITY = {"checksum": "crc32c", "empty_chunks": "written"}
# what a subject's read may raise when its bytes are damaged: crc32c mismatch (ValueError), a codec's decode
# error (RuntimeError from zstd/blosc), a short or unreadable file (OSError)
DAMAGE_ERRORS = (ValueError, RuntimeError, OSError)
_VERSIONED = ("numpy", "zarr", "SimpleITK", "nibabel", "nilearn", "dask", "distributed", "stroke-tss")


def lesioned(voxels: float, spacing_mm: float) -> bool:
    """Whether `voxels` lesion voxels on a grid of `spacing_mm` count as a lesion (LESION_FLAG_MIN_ML and up)."""
    return voxels * spacing_mm**3 / 1000.0 >= LESION_FLAG_MIN_ML


def half_slice(width: int, side: str) -> slice:
    """The x range of one hemisphere on a grid `width` voxels wide (left = low RAS x)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return slice(None, width // 2) if side == "left" else slice(width // 2, None)


def onto_left(block: np.ndarray, side: str) -> np.ndarray:
    """A right half flipped along x onto the left half's grid (how every hemisphere is read); a left one as is."""
    return np.ascontiguousarray(block[..., ::-1]) if side == "right" else block


def half(array: np.ndarray, side: str, *, mirrored: bool = True) -> np.ndarray:
    """The `side` half of a (..., x) array on the store's grid: mirrored onto the left as Store.hemisphere reads
    it, or (mirrored=False) in the grid's own x order."""
    block = array[..., half_slice(array.shape[-1], side)]
    return onto_left(block, side) if mirrored else block


class StoreError(InputError):
    """The path is not a store of ours, or the store does not match the request."""


def grid_affine(config: PrepConfig) -> np.ndarray:
    """4x4 RAS affine of the common grid, indices in NIfTI order (x, y, z); x = 0 between two columns."""
    nx, ny, nz = config.shape
    sp = config.spacing_mm
    cy, cz = config.center_mm
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = [-(nx - 1) / 2 * sp, cy - (ny - 1) / 2 * sp, cz - (nz - 1) / 2 * sp]
    return aff


class Store:
    """Read-only view of a store: `open_store(path)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pid: int | None = None
        self._group = None
        self._table: pd.DataFrame | None = None
        self._index: dict[str, int] | None = None
        self._checked: set[str] = set()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def group(self):
        if self._group is None or self._pid != os.getpid():
            self._group, self._arrays = open_arrays(self.path, mode="r")
            self._complete = self._group.attrs.get("integrity", {}).get("empty_chunks") == "written"
            self._checked = set()
            self._pid = os.getpid()
        return self._group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def channels(self) -> list[str]:
        return list(self.attrs["channels"])

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.attrs["affine"], dtype=np.float64)

    @property
    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = read_table(self.path)
        return self._table

    @property
    def subject_ids(self) -> list[str]:
        return list(self.table["subject_id"])

    def _row(self, sid: str) -> int:
        if self._index is None:
            self._index = dict(zip(self.table["subject_id"], self.table["index"].astype(int)))
        if sid not in self._index:
            raise KeyError(f"subject {sid!r} is not in store {self.path}")
        return self._index[sid]

    def _array(self, name: str):
        self.group  # noqa: B018  (opens or re-opens after fork)
        return self._arrays[name]

    def _read(self, name: str, sid: str, selection: tuple, dtype) -> np.ndarray:
        """One subject's block of one array; damage becomes a StoreError naming the subject."""
        row = self._row(sid)
        arr = self._array(name)
        if self._complete and sid not in self._checked:
            missing = missing_chunks(self.path, self._arrays, row)
            if missing:
                raise StoreError(f"{len(missing)} chunk file(s) missing ({missing[0]}) of a finished subject",
                                 subject_id=sid, file=self.path, hint=redo_hint(self.path, sid))
            self._checked.add(sid)
        try:
            return np.asarray(arr[(row, *selection)], dtype=dtype)
        except DAMAGE_ERRORS as exc:
            raise StoreError(f"{name} chunk unreadable ({damage_reason(exc)})", subject_id=sid, file=self.path,
                             hint=redo_hint(self.path, sid)) from None

    def volume(self, sid: str) -> np.ndarray:
        """All channels, float32 (channel, z, y, x)."""
        return self._read("volumes", sid, (), np.float32)

    def hemisphere(self, sid: str, side: str) -> np.ndarray:
        """(channel, z, y, x/2); left = low RAS x; the right half is flipped along x onto the left."""
        cut = half_slice(self._array("volumes").shape[-1], side)
        return onto_left(self._read("volumes", sid, (slice(None),) * 3 + (cut,), np.float32), side)

    def brain(self, sid: str) -> np.ndarray:
        return self._read("brain", sid, (), np.uint8)

    def lesion(self, sid: str) -> np.ndarray | None:
        row = self.table.loc[self.table["subject_id"] == sid]
        if not row.empty and not bool(row["has_lesion_mask"].iloc[0]):
            return None
        return self._read("lesion", sid, (), np.uint8)


def damage_reason(exc: Exception) -> str:
    if "checksum" in str(exc):  # zarr's crc32c codec; its message shows both checksums' raw bytes
        return "checksum mismatch: its bytes changed on disk"
    return f"{type(exc).__name__}: {exc}"


def redo_hint(path: str | Path, sid: str) -> str:
    """What to run when one subject's data is damaged: drop its record, and prep re-makes it."""
    # text only, never opened: a store from before the id rule may hold an id subject_path would refuse
    return (f"delete {Path(path) / 'records' / f'{sid}.json'} and run `stroke-tss prep MANIFEST {path}` again; "
            "it re-processes that subject")


def open_arrays(path: Path, *, mode: str):
    """(group, {name: array}); a cut-short or missing array zarr.json becomes one StoreError."""
    try:
        group = zarr.open_group(path, mode=mode)
        return group, {name: group[name] for name in ARRAYS}
    except (ValueError, KeyError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise StoreError(f"{path}: the store's Zarr metadata is damaged ({type(exc).__name__}: {exc})",
                         hint="rebuild it: `stroke-tss prep MANIFEST NEW_STORE`") from None


def chunk_files(path: str | Path, arr, row: int) -> list[Path]:
    """The files (chunks, or shards when sharded) that hold row `row` of `arr`: none spans two subjects."""
    outer = arr.shards or arr.chunks
    counts = [range(math.ceil(n / c)) for n, c in zip(arr.shape[1:], outer[1:])]
    folder = Path(path) / arr.path
    return [folder / arr.metadata.encode_chunk_key((row, *rest)) for rest in itertools.product(*counts)]


def missing_chunks(path: str | Path, arrays: dict, row: int) -> list[str]:
    """Chunk files of row `row` that are not on disk, as paths relative to the store."""
    return [str(f.relative_to(path)) for arr in arrays.values() for f in chunk_files(path, arr, row)
            if not f.is_file()]


def open_store(path: str | Path) -> Store:
    """Open a store for reading; raises StoreError naming the path when it is not one of ours."""
    check_is_store(path)
    return Store(path)


def check_is_store(path: str | Path) -> dict:
    path = Path(path)
    meta = path / "zarr.json"
    if path.is_file():
        raise StoreError(f"{path}: a file, not a store (a store is a folder); build one with `stroke-tss prep`")
    if not meta.is_file():
        raise StoreError(f"{path}: not a stroke-tss store (no zarr.json); build one with `stroke-tss prep`")
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, AttributeError, OSError) as exc:  # cut short, not UTF-8, not an object
        raise StoreError(f"{meta}: unreadable store metadata ({type(exc).__name__}: {exc}); the file was cut short "
                         "or overwritten: restore it from a backup or rebuild the store with `stroke-tss prep`"
                         ) from None
    if attrs.get(MARKER) is None:
        raise StoreError(f"{path}: a Zarr group but not a stroke-tss store (attribute {MARKER!r} missing)")
    if attrs[MARKER] > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {attrs[MARKER]} is newer than this package's {SCHEMA_VERSION}")
    return attrs


def read_table(path: str | Path) -> pd.DataFrame:
    table = Path(path) / "subjects.csv"
    if not table.is_file():
        return pd.DataFrame({"subject_id": pd.Series(dtype=str), "index": pd.Series(dtype=int),
                             "has_lesion_mask": pd.Series(dtype=bool)})
    return pd.read_csv(table, dtype={"subject_id": str, "site": str, "sex": str, "stroke_side": str})


# --- writer primitives (driver: create/extend/assemble; worker: write_subject + write_record) ---------------


def _compressors(config: PrepConfig) -> list:
    """The codec, then a CRC32C of its output (checked before decompressing: a flipped byte never decodes)."""
    if config.codec == "none":
        return [zarr.codecs.Crc32cCodec()]
    if config.codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=config.codec_level), zarr.codecs.Crc32cCodec()]
    cname = config.codec.split("-", 1)[1]
    return [zarr.codecs.BloscCodec(cname=cname, clevel=min(config.codec_level, 9), shuffle="shuffle"),
            zarr.codecs.Crc32cCodec()]


def _layout(config: PrepConfig, *, channels: bool) -> tuple[tuple, tuple | None]:
    """(chunks, shards) of one array; the leading axis is always 1, so nothing spans two subjects."""
    nx, ny, nz = config.shape
    block = (nz, ny, nx)
    if config.chunk_zyx is None:
        half = (nz, ny, nx // 2)
        return ((1, len(config.channels)) + half if channels else (1,) + half), None
    inner = tuple(min(i, b) for i, b in zip(config.chunk_zyx, block))
    lead = (1, 1) if channels else (1,)
    shard_lead = (1, len(config.channels)) if channels else (1,)
    if all(b % i == 0 for b, i in zip(block, inner)):
        return lead + inner, shard_lead + block
    return lead + inner, None  # chunks that do not tile the block: plain chunks, still one subject each


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def create_or_extend(path: str | Path, *, config: PrepConfig, subject_ids: list[str]) -> dict[str, int]:
    """Driver only. Create the store (or check an existing one was built with `config`) and give every
    subject a fixed row; returns subject_id -> row. Rows follow first appearance, so a re-run matches."""
    path = Path(path)
    if path.is_file():
        raise StoreError(f"{path}: a file, not a store folder; choose a new or empty path")
    if path.exists() and not (path / "zarr.json").exists() and any(path.iterdir()):
        raise StoreError(f"{path}: exists and is not a stroke-tss store; choose a new or empty path")
    if (path / "zarr.json").exists():
        attrs = check_is_store(path)
        if attrs.get("config_hash") != config.config_hash() and _unused(path, attrs):
            _remove(path)  # nothing was finished under the old config: the corrected one may take its place
        elif attrs.get("config_hash") != config.config_hash():
            raise StoreError(f"{path}: store was built with another preprocessing config "
                             f"(hash {attrs.get('config_hash')} != {config.config_hash()}); "
                             "use a new store path or the store's own config (attrs 'prep_config')")
    if (path / "zarr.json").exists():
        group, _ = open_arrays(path, mode="r+")
    else:
        group = _create(path, config)
    index = dict(group.attrs.get("subject_index", {}))
    for sid in subject_ids:
        if sid not in index:
            index[sid] = len(index)
    num = max(len(index), 1)
    for name in ("volumes", "brain", "lesion"):
        arr = group[name]
        if arr.shape[0] < num:
            arr.resize((num, *arr.shape[1:]))
    group.attrs["subject_index"] = index
    return index


def _unused(path: Path, attrs: dict) -> bool:
    """No subject finished and no histogram reference set: a store a failed first run left behind."""
    return not done_subjects(path) and not attrs.get("reference_histogram")


def _remove(path: Path) -> None:
    """Only what a store of ours holds, so a stray file of the user's stops the removal instead of going."""
    for name in (*ARRAYS, "records", "qc", "logs"):
        shutil.rmtree(path / name, ignore_errors=True)
    for name in ("subjects.csv", "failures.csv", "qc.csv", "zarr.json"):
        (path / name).unlink(missing_ok=True)


def _create(path: Path, config: PrepConfig):
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    nx, ny, nz = config.shape
    chunks, shards = _layout(config, channels=True)
    group.create_array("volumes", shape=(1, len(config.channels), nz, ny, nx), dtype=config.dtype,
                       chunks=chunks, shards=shards, compressors=_compressors(config), fill_value=0,
                       dimension_names=("subject", "channel", "z", "y", "x"))
    chunks, shards = _layout(config, channels=False)
    for name in ("brain", "lesion"):
        group.create_array(name, shape=(1, nz, ny, nx), dtype="uint8", chunks=chunks, shards=shards,
                           compressors=[zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()],
                           fill_value=0, dimension_names=("subject", "z", "y", "x"))
    group.attrs.update({
        MARKER: SCHEMA_VERSION,
        "integrity": INTEGRITY,
        "affine": grid_affine(config).tolist(),
        "channels": list(config.channels),
        "spacing_mm": config.spacing_mm,
        "shape_xyz": list(config.shape),
        "prep_config": config.model_dump(mode="json"),
        "config_hash": config.config_hash(),
        "package_versions": package_versions(),
        "subject_index": {},
        "reference_histogram": None,
    })
    (path / "records").mkdir(exist_ok=True)
    return group


def set_reference_histogram(path: str | Path, reference: dict) -> None:
    """Driver only: {'subject_id', 'levels', 'channels': {name: quantiles}} reused by later runs and predict."""
    zarr.open_group(path, mode="r+").attrs["reference_histogram"] = reference


def write_subject(path: str | Path, row: int, *, volume: np.ndarray, brain: np.ndarray,
                  lesion: np.ndarray | None) -> None:
    """Worker: write one subject's block (whole shards, so concurrent subjects never share a file)."""
    _, arrays = open_arrays(Path(path), mode="r+")
    # every chunk on disk, zeros too: then a missing file of a finished subject is damage, never "all zero"
    vol, brain_arr, lesion_arr = (arrays[name].with_config({"write_empty_chunks": True}) for name in ARRAYS)
    vol[row] = volume.astype(vol.dtype)
    brain_arr[row] = brain.astype(np.uint8)
    lesion_arr[row] = np.zeros_like(brain, np.uint8) if lesion is None else lesion.astype(np.uint8)


def write_record(path: str | Path, record: dict) -> None:
    """Worker, after write_subject: the record marks the subject done (atomic rename)."""
    out = subject_path(Path(path) / "records", record["subject_id"], ".json")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, default=_json_default))
    os.replace(tmp, out)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a subject record")


RECORD_ONLY = ("qc", "landmarks", "inputs", "manifest_keys")
"""Record fields that stay out of subjects.csv (qc.csv has the QC; the rest is prep's own bookkeeping)."""


def done_subjects(path: str | Path) -> set[str]:
    records = Path(path) / "records"
    return {p.stem for p in records.glob("*.json")} if records.is_dir() else set()


def assemble_table(path: str | Path) -> pd.DataFrame:
    """Driver: the subjects table from all records (row order = store row), written to subjects.csv."""
    path = Path(path)
    rows = [json.loads(p.read_text()) for p in sorted((path / "records").glob("*.json"))]
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in RECORD_ONLY} for r in rows])
    if not table.empty:
        table = table.sort_values("index").reset_index(drop=True)
    table.to_csv(path / "subjects.csv", index=False)
    return table
