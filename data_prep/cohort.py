"""The cohort manifest: one CSV row per subject, read and validated before any work starts.

Columns: `subject_id`; image paths `dwi`, `b0` (or `t2`), `flair`, `adc`, `lesion_mask`, `brain_mask`
(relative to the manifest's folder; a relative path may not climb out of it, an absolute path is taken
as the user wrote it); `onset_to_mri_min` (empty = unknown); `stroke_side` (left, right, bilateral,
none; derived from the lesion mask when empty); `site`, `mrs_90d`, `nihss`, `age`, `sex`, `reader_*`
(0/1 DWI-FLAIR mismatch reads) and any further columns, kept as data.

Sides follow the NIfTI world frame, RAS+: +x points to the patient's Right, so the patient's left
hemisphere is at low (negative) x. (Radiological display puts it on the screen's right; the data does not.)
Checked on the shared data: the SOOP atlas's "left" territories and the ISLES'22 left-sided infarct lie at
x < 0.

`read_manifest` never stops at the first bad subject: each bad row becomes one line in `.errors` naming
subject, file and field; the good rows are in `.rows`. A row is bad when its subject id is not safe as a file
name (data_prep/paths.py: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit) or when it has
more or fewer fields than the header. Whole-file problems (not UTF-8 text, no rows, no subject_id column, a
semicolon-separated file) raise InputError.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from data_prep.cohort_scan import scan_tree
from data_prep.diffusion import b_value_from_sidecar, derive_b0
from data_prep.errors import InputError
from data_prep.nifti import load_nifti, world_coords
from data_prep.paths import ID_RULE, id_problem, shown

IMAGE_COLUMNS = ("dwi", "b0", "t2", "flair", "adc", "lesion_mask", "brain_mask")
SIDES = ("left", "right", "bilateral", "none")
MAX_ONSET_MIN = 30 * 24 * 60  # beyond 30 days the row is a typo (seconds? hours?), not an acute scan
# numeric clinical columns and their plausible ranges
RANGES = {"mrs_90d": (0, 6), "nihss": (0, 42), "age": (0, 120)}
# a lesion with at least this share of its volume on each side of the midline, beyond a band of
# MIDLINE_BAND_MM (head tilt and a midline estimated from the centroid blur the plane by a few mm), is bilateral
BILATERAL_SHARE = 0.1
MIDLINE_BAND_MM = 5.0

__all__ = ["Manifest", "SubjectRow", "read_manifest", "scan_tree", "write_manifest", "side_from_lesion",
           "load_channel"]


@dataclass(frozen=True)
class SubjectRow:
    """One validated subject: absolute paths, parsed clinical values, and how missing channels are made."""

    subject_id: str
    series: dict[str, Path]
    """Every image column the row gives (dwi, b0, t2, flair, adc, lesion_mask, brain_mask) -> absolute path."""
    derived: dict[str, str]
    """Channel -> recipe for channels made from others, e.g. {"b0": "dwi*exp(b*adc)"}."""
    b_value: float | None
    onset_to_mri_min: float | None
    stroke_side: str | None
    """left, right, bilateral, none; None when neither given nor derivable (no lesion mask)."""
    site: str
    clinical: dict[str, Any] = field(default_factory=dict)
    """mrs_90d, nihss, age, sex, reader_* and any other columns (None where empty)."""

    def path(self, channel: str) -> Path | None:
        """The file of a channel; b0 and t2 stand in for each other."""
        if channel in self.series:
            return self.series[channel]
        alias = {"b0": "t2", "t2": "b0"}.get(channel)
        return self.series.get(alias) if alias else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subject_id": self.subject_id}
        out.update({k: str(v) for k, v in self.series.items()})
        out.update({"onset_to_mri_min": self.onset_to_mri_min, "stroke_side": self.stroke_side,
                    "site": self.site, "b_value": self.b_value,
                    "derived": ";".join(f"{k}={v}" for k, v in self.derived.items())})
        out.update(self.clinical)
        return out


@dataclass
class Manifest:
    path: Path
    root: Path
    rows: list[SubjectRow]
    errors: list[str]

    @property
    def subject_ids(self) -> list[str]:
        return [r.subject_id for r in self.rows]

    @property
    def table(self) -> pd.DataFrame:
        """The valid rows as a DataFrame, one row per subject, every column kept (paths absolute)."""
        return pd.DataFrame([r.as_dict() for r in self.rows])


def read_manifest(path: str | Path, *, channels: tuple[str, ...] = ("dwi", "b0", "flair")) -> Manifest:
    """Read and validate a manifest CSV; bad subjects go to `.errors`, one line each."""
    path = Path(path)
    if not path.is_file():
        raise InputError("manifest not found" if not path.is_dir() else "a folder, not a manifest CSV", file=path,
                         hint="run `stroke-tss scan` or `stroke-tss synth`")
    header, records = _csv_rows(path)
    root = path.parent.absolute()
    rows, errors = [], []
    seen: dict[str, int] = {}
    for line, raw in records:
        if isinstance(raw, str):  # the row's shape was wrong: already one line
            errors.append(raw)
            continue
        sid = raw["subject_id"]
        if not sid:
            errors.append(f"manifest {path} line {line}: field subject_id: empty (give every row an id)")
            continue
        problem = id_problem(sid)
        if problem is not None:
            errors.append(str(InputError(f"line {line}: unsafe subject id: {problem}", subject_id=shown(sid),
                                         field="subject_id", file=path, hint=f"rename it: ids are {ID_RULE}")))
            continue
        if sid in seen:
            errors.append(f"subject {sid}, field subject_id, file {path}: duplicate of line {seen[sid]} "
                          f"(make subject ids unique)")
            continue
        seen[sid] = line
        try:
            rows.append(_validate_row(raw, sid=sid, root=root, manifest=path, channels=channels))
        except InputError as exc:
            errors.append(str(exc))
    return Manifest(path=path, root=root, rows=rows, errors=errors)


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str] | str]]]:
    """(header, [(line, {column: value} or the row's error line)]): whole-file problems raise InputError."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise InputError("a binary file, not a CSV text", file=path,
                         hint="give the manifest as comma-separated UTF-8 text, one row per subject")
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheets put a byte-order mark in front of "subject_id"
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}; Latin-1 or Windows-1252?)",
                         file=path, hint="save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD.csv > NEW.csv` or "
                         "'CSV UTF-8' in a spreadsheet") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        table = [(reader.line_num, row) for row in reader if any(v.strip() for v in row)]
    except csv.Error as exc:
        raise InputError(f"not a readable CSV near line {reader.line_num} ({exc})", file=path,
                         hint="check the quotes on that line: a value with a comma goes in double quotes") from None
    if not table:
        raise InputError("empty manifest", file=path, field="subject_id",
                         hint="the first line must name the columns, subject_id first")
    header = [name.strip() for name in table[0][1]]
    if "subject_id" not in header:
        first = ",".join(table[0][1])
        for sep, name in ((";", "semicolon"), ("\t", "tab")):
            if sep in first and "subject_id" in first.split(sep):
                raise InputError(f"the header looks {name}-separated", file=path, field="subject_id",
                                 hint="save it with commas between the fields")
        raise InputError("no subject_id column", file=path, field="subject_id",
                         hint="the first line must name the columns, subject_id first")
    named = [name for name in header if name]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise InputError(f"column(s) {', '.join(twice)} appear twice in the header", file=path, field=twice[0],
                         hint="keep one column of each name")
    if len(table) == 1:
        raise InputError("empty manifest: a header but no subjects", file=path, hint="add one row per subject")
    id_col = header.index("subject_id")
    records: list[tuple[int, dict[str, str] | str]] = []
    for line, row in table[1:]:
        values = [v.strip() for v in row]
        sid = values[id_col] if id_col < len(values) else ""
        # a row of another width is refused, not padded: its values would land under the wrong columns
        # (an unquoted comma in a site name shifts every later column, a path into onset_to_mri_min)
        extra = [v for name, v in zip(header + [""] * len(values), values) if not name and v]
        if len(values) < len(header) or extra:
            records.append((line, str(InputError(
                f"line {line} has {len(values)} fields where the header has {len(header)}",
                subject_id=shown(sid) if sid else None, file=path,
                hint="quote values that hold a comma, and give every row every column (empty when unknown)"))))
            continue
        records.append((line, {name: v for name, v in zip(header, values) if name}))
    return header, records


def _validate_row(raw: dict[str, str], *, sid: str, root: Path, manifest: Path,
                  channels: tuple[str, ...]) -> SubjectRow:
    series = {}
    for col in IMAGE_COLUMNS:
        if raw.get(col):
            series[col] = _resolve(raw[col], sid=sid, col=col, root=root, manifest=manifest)
    derived: dict[str, str] = {}
    b_value = _number(raw, "b_value", sid=sid, manifest=manifest)
    for ch in channels:
        have = ch in series or (ch in ("b0", "t2") and ({"b0", "t2"} & series.keys()))
        if have:
            continue
        if ch in ("b0", "t2") and {"dwi", "adc"} <= series.keys():
            b_value = b_value or b_value_from_sidecar(series["dwi"], subject_id=sid)
            if b_value is None:
                raise InputError("b0 must be derived from DWI and ADC but the b-value is unknown",
                                 subject_id=sid, file=series["dwi"], field="dwi",
                                 hint="add a JSON sidecar with DiffusionBValue or a b_value column")
            derived[ch] = "dwi*exp(b*adc)"
            continue
        hint = "give the series, or drop it from the channel set"
        if ch in ("b0", "t2"):
            hint = "give a b0/t2 series, or dwi and adc so b0 can be derived"
        raise InputError(f"channel {ch} is needed but missing", subject_id=sid, file=manifest, field=ch,
                         hint=hint)
    onset = _number(raw, "onset_to_mri_min", sid=sid, manifest=manifest)
    if onset is not None and not 0 <= onset <= MAX_ONSET_MIN:
        raise InputError(f"onset {raw['onset_to_mri_min']} min is outside 0-{MAX_ONSET_MIN} (30 days)",
                         subject_id=sid, file=manifest, field="onset_to_mri_min",
                         hint="give minutes from onset to MRI, or leave it empty when unknown")
    side = raw.get("stroke_side", "").lower() or None
    if side is not None and side not in SIDES:
        raise InputError(f"unknown stroke_side {raw['stroke_side']!r}", subject_id=sid, file=manifest,
                         field="stroke_side", hint=f"use one of {', '.join(SIDES)}, or leave it empty")
    if side is None and "lesion_mask" in series:
        side = side_from_lesion(series["lesion_mask"], subject_id=sid, brain=series.get("brain_mask"),
                                 anatomy=series.get("dwi"))
    clinical: dict[str, Any] = {}
    for key, value in raw.items():
        if key in IMAGE_COLUMNS or key in ("subject_id", "onset_to_mri_min", "stroke_side", "site", "b_value"):
            continue
        if key in RANGES or key.startswith("reader_"):
            clinical[key] = _clinical_number(raw, key, sid=sid, manifest=manifest)
        else:
            clinical[key] = value or None
    return SubjectRow(subject_id=sid, series=series, derived=derived, b_value=b_value, onset_to_mri_min=onset,
                      stroke_side=side, site=raw.get("site", ""), clinical=clinical)


def _resolve(text: str, *, sid: str, col: str, root: Path, manifest: Path) -> Path:
    given = Path(text)
    if given.is_absolute():
        p = Path(os.path.normpath(given))
    else:
        # normpath, not resolve(): a symlinked data folder under the root is fine, a "../" climb is not
        p = Path(os.path.normpath(root / given))
        if os.path.commonpath([p, root]) != str(root):
            raise InputError(f"path {text!r} escapes the manifest's folder {root}", subject_id=sid,
                             file=manifest, field=col,
                             hint="keep relative paths inside the manifest's folder, or write absolute paths")
    if not p.is_file():
        raise InputError("file not found", subject_id=sid, file=p, field=col,
                         hint="fix the path in the manifest (relative to the manifest's folder)")
    return p


def _number(raw: dict[str, str], key: str, *, sid: str, manifest: Path) -> float | None:
    text = raw.get(key, "")
    if not text or text.lower() in ("na", "nan", "n/a", "unknown"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{text!r} is not a number", subject_id=sid, file=manifest, field=key,
                         hint="write a plain number, or leave it empty when unknown") from None
    if not np.isfinite(value):
        raise InputError(f"{text!r} is not a finite number", subject_id=sid, file=manifest, field=key,
                         hint="leave it empty when unknown")
    return value


def _clinical_number(raw: dict[str, str], key: str, *, sid: str, manifest: Path) -> float | None:
    value = _number(raw, key, sid=sid, manifest=manifest)
    low, high = RANGES.get(key, (0, 1))
    if value is not None and not low <= value <= high:
        raise InputError(f"{value:g} is outside {low}-{high}", subject_id=sid, file=manifest, field=key,
                         hint="fix the value, or leave it empty when unknown")
    return value


def side_from_lesion(lesion: str | Path, *, subject_id: str, brain: str | Path | None = None,
                     anatomy: str | Path | None = None) -> str:
    """left/right/bilateral/none from the lesion voxels' world x relative to the head's midline.

    The midline is the world-x centroid of the brain mask, else of the anatomy image's foreground
    (scanner isocentre and head centre differ by a few mm), else x = 0. RAS+: low x = patient's left.
    """
    img = load_nifti(lesion, subject_id=subject_id, field="lesion_mask") if Path(lesion).is_file() else None
    if img is None:
        raise InputError("file not found", subject_id=subject_id, file=lesion, field="lesion_mask")
    mask = np.asarray(img.dataobj) > 0.5
    if not mask.any():
        return "none"
    x = world_coords(img, mask)[:, 0] - _midline_x(brain, anatomy, subject_id=subject_id)
    left, right = float(np.mean(x < -MIDLINE_BAND_MM)), float(np.mean(x > MIDLINE_BAND_MM))
    if min(left, right) >= BILATERAL_SHARE:
        return "bilateral"
    return "left" if float(np.mean(x < 0)) > 0.5 else "right"


def _midline_x(brain, anatomy, *, subject_id: str) -> float:
    for p, field_name in ((brain, "brain_mask"), (anatomy, "dwi")):
        if p is None:
            continue
        img = load_nifti(p, subject_id=subject_id, field=field_name)
        data = np.asarray(img.dataobj, dtype=np.float32)
        fg = data > 0.5 if field_name == "brain_mask" else data > 0.2 * np.percentile(data, 99)
        return float(world_coords(img, fg)[:, 0].mean())
    return 0.0


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest CSV; image paths inside the manifest's folder become relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.absolute()
    out = df.copy()
    for col in IMAGE_COLUMNS:
        if col in out.columns:
            out[col] = [_relative(v, root) for v in out[col]]
    if "subject_id" not in out.columns:
        raise ValueError("write_manifest: the table needs a subject_id column")
    out.to_csv(path, index=False)
    return path


def _relative(value: Any, root: Path) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return ""
    p = Path(os.path.normpath(Path(value).absolute()))
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def load_channel(row: SubjectRow, channel: str) -> nib.Nifti1Image:
    """A row's channel through the safe loader; a derived b0/t2 is computed from DWI and ADC."""
    sid = row.subject_id
    if channel in row.derived:
        dwi = load_nifti(row.series["dwi"], subject_id=sid, field="dwi")
        adc = load_nifti(row.series["adc"], subject_id=sid, field="adc")
        return derive_b0(dwi, adc, b_value=row.b_value, subject_id=sid, adc_file=row.series["adc"])
    p = row.path(channel)
    if p is None:
        raise InputError(f"channel {channel} is not in the manifest", subject_id=sid, field=channel,
                         hint="add the column or drop the channel from the channel set")
    return load_nifti(p, subject_id=sid, field=channel)
