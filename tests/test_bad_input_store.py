"""Damaged stores and wrong store paths (issue 16): flipped bytes, a missing chunk, a cut-short zarr.json, a
file where a store should be, a store from before the checksums. Each read names the subject and what to re-run,
`verify_store` lists the damage, and following its advice repairs the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
import zarr.codecs

from data_prep.build import prep
from data_prep.store import ARRAYS, StoreError, chunk_files, create_or_extend, open_store
from data_prep.verify import verify_store
from stroke_tss.cli import main as cli_main
from tests.fixtures.data import tiny_prep_config


@pytest.fixture()
def store(tiny_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


def _chunk(store: Path, name: str, sid: str, k: int = 0) -> Path:
    row = open_store(store)._row(sid)
    return chunk_files(store, zarr.open_group(store, mode="r")[name], row)[k]


def _flip(path: Path, count: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, middle + count):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _one_line_naming(exc: pytest.ExceptionInfo, sid: str, store: Path) -> str:
    line = str(exc.value)
    assert "\n" not in line and f"subject {sid}" in line, line
    assert f"delete {store / 'records' / (sid + '.json')}" in line and "stroke-tss prep" in line, line
    return line


def test_intact_store_verifies_clean(tiny_store) -> None:
    assert verify_store(tiny_store) == []


def test_flipped_bytes_name_the_subject_and_the_advice_repairs_it(store, tiny_cohort, tmp_path) -> None:
    want = open_store(store).volume("sub-002")
    _flip(_chunk(store, "volumes", "sub-002", k=1))  # the right hemisphere
    s = open_store(store)
    with pytest.raises(StoreError, match="volumes chunk unreadable \\(checksum mismatch") as info:
        s.hemisphere("sub-002", "right")
    _one_line_naming(info, "sub-002", store)
    np.testing.assert_array_equal(s.volume("sub-001"), open_store(store).volume("sub-001"))  # others read
    problems = verify_store(store)
    assert len(problems) == 1 and problems[0].startswith("subject sub-002: volumes chunk unreadable"), problems
    # what the line says to do: drop the record, run prep again -> the subject is re-made, bit-identical
    (store / "records" / "sub-002.json").unlink()
    result = prep(tiny_cohort, store, config=tiny_prep_config(), workers=1, progress=False)
    assert not result.failed and verify_store(store) == []
    np.testing.assert_array_equal(open_store(store).volume("sub-002"), want)


def test_damage_read_in_a_dataloader_worker_is_still_one_line(store) -> None:
    torch = pytest.importorskip("torch")
    _flip(_chunk(store, "volumes", "sub-003", k=0))
    s = open_store(store)
    loader = torch.utils.data.DataLoader([("sub-003", "left")], batch_size=None, num_workers=1,
                                         collate_fn=lambda item: s.hemisphere(*item))
    with pytest.raises(StoreError) as info:
        list(loader)
    _one_line_naming(info, "sub-003", store)


def test_missing_chunk_of_a_finished_subject_is_an_error_not_zeros(store) -> None:
    # a healthy hemisphere's lesion chunk is all zeros: without a check its loss would read as "no lesion"
    sid = "sub-004"
    side = open_store(store).table.set_index("subject_id").loc[sid, "stroke_side"]
    chunk = _chunk(store, "lesion", sid, k=1 if side == "left" else 0)
    assert chunk.is_file()  # written although it holds only zeros
    chunk.unlink()
    with pytest.raises(StoreError, match="chunk file\\(s\\) missing") as info:
        open_store(store).volume(sid)  # any read of the subject checks all its chunk files
    _one_line_naming(info, sid, store)
    problems = verify_store(store)
    assert len(problems) == 1 and problems[0].startswith(f"subject {sid}: 1 chunk file(s) missing"), problems


def _as_before_checksums(store: Path) -> None:
    """Rewrite the arrays as stores were written before issue 16: zstd only, no CRC, zero chunks not written."""
    group = zarr.open_group(store, mode="r+")
    for name in ARRAYS:
        arr = group[name]
        data, spec = arr[:], dict(shape=arr.shape, chunks=arr.chunks, shards=arr.shards, dtype=arr.dtype,
                                  fill_value=0, dimension_names=arr.metadata.dimension_names)
        shutil.rmtree(store / name)
        group.create_array(name, compressors=[zarr.codecs.ZstdCodec(level=1)], **spec)[:] = data
    del group.attrs["integrity"]


def test_store_from_before_checksums_reads_the_same_and_names_the_subject_on_a_zstd_error(store) -> None:
    want = {sid: open_store(store).volume(sid) for sid in ("sub-001", "sub-005")}
    _as_before_checksums(store)
    assert "crc32c" not in (store / "volumes" / "zarr.json").read_text()
    s = open_store(store)
    for sid, vol in want.items():
        np.testing.assert_array_equal(s.volume(sid), vol)
    assert verify_store(store) == []
    chunk = _chunk(store, "volumes", "sub-005")
    chunk.write_bytes(chunk.read_bytes()[:100])  # zstd cannot decode a cut-short frame
    with pytest.raises(StoreError, match="Zstd") as info:
        open_store(store).hemisphere("sub-005", "left")
    _one_line_naming(info, "sub-005", store)
    assert [p.split(":")[0] for p in verify_store(store)] == ["subject sub-005"]


@pytest.mark.parametrize("which", ["zarr.json", "volumes/zarr.json"])
def test_cut_short_zarr_json_is_one_line(store, tiny_cohort, which, capsys) -> None:
    meta = store / which
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError) as info:
        open_store(store).volume("sub-001")
    line = str(info.value)
    assert "\n" not in line and str(store) in line and ("cut short" in line or "metadata is damaged" in line), line
    problems = verify_store(store)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert cli_main(["prep", str(tiny_cohort), str(store), "--no-progress"]) == 2  # refused, not a traceback
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_store_path_that_is_a_file(tiny_cohort, tmp_path, capsys) -> None:
    target = tmp_path / "store.zarr"
    target.write_text("my notes\n")
    assert cli_main(["prep", str(tiny_cohort), str(target), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a file, not a store" in err and str(target) in err
    assert target.read_text() == "my notes\n"
    with pytest.raises(StoreError, match="a file, not a store"):
        open_store(target)
    assert verify_store(target) and "a file, not a store" in verify_store(target)[0]


def test_an_unused_store_takes_a_corrected_config_a_used_one_does_not(tmp_path) -> None:
    path = tmp_path / "s.zarr"
    first = tiny_prep_config().model_copy(update={"reference_subject": "sub-bad"})
    create_or_extend(path, config=first, subject_ids=["a"])
    fixed = tiny_prep_config()
    create_or_extend(path, config=fixed, subject_ids=["a"])  # nothing finished under `first`: replaced
    assert open_store(path).attrs["config_hash"] == fixed.config_hash()
    (path / "records" / "a.json").write_text('{"subject_id": "a", "index": 0}')
    with pytest.raises(StoreError, match="another preprocessing config"):
        create_or_extend(path, config=first, subject_ids=["a"])


def test_report_store_that_does_not_exist_is_an_error_before_anything_is_written(tmp_path, capsys) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    pd.DataFrame({"subject_id": ["a"]}).to_csv(run / "predictions.csv", index=False)
    assert cli_main(["report", str(run), "--store", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nothing") in err and "not a stroke-tss store" in err
    assert not out.exists()
