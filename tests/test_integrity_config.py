"""Config files as hostile input: reading is bounded (size, aliases, depth) and fails fast with one line;
`extends:` takes what it documents."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from stroke_tss.cli import main
from stroke_tss.config.loader import MAX_CONFIG_BYTES, load_config
from stroke_tss.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _alias_bomb(levels: int = 9) -> str:
    """The billion laughs: under 1 KB, 9**9 values once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_1kb_alias_bomb_fails_fast_with_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert bomb.stat().st_size < 1024
    start = time.perf_counter()
    err = _one_line_error(capsys, "config", str(bomb))
    assert time.perf_counter() - start < 2.0
    assert "bomb.yaml" in err and "aliases are expanded" in err


def test_an_alias_bomb_in_an_override_is_never_expanded():
    inner = "&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for name in "bcdefghi":
        inner = f"&{name} [{', '.join([inner] + [f'*{chr(ord(name) - 1)}'] * 8)}]"
    start = time.perf_counter()
    cfg = load_config(REPO / "configs/tiny.yaml", [f"model.options.x={inner}"])
    assert time.perf_counter() - start < 2.0
    assert cfg.model.options["x"] == inner  # refused as a structure, it stays the text it was


def test_nesting_beyond_the_bound_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nesting deeper than" in _one_line_error(capsys, "config", str(deep))


def test_a_recursive_alias_is_one_line(tmp_path, capsys):
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &x [1, *x]\n")
    assert "recursive" in _one_line_error(capsys, "config", str(loop))


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    assert "more than a config may hold" in _one_line_error(capsys, "config", str(big))


def test_a_binary_file_as_config_is_one_line(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    assert "not UTF-8 text" in _one_line_error(capsys, "config", str(binary))


def test_ordinary_anchors_and_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(f"extends: {REPO / 'configs/tiny.yaml'}\n"
                    "train:\n  optimizer: &opt {name: adam, lr: 0.003}\n"
                    "phases:\n  lesion: {optimizer: *opt}\n")
    cfg = load_config(path)
    assert cfg.phases["lesion"].optimizer.lr == 0.003 == cfg.train.optimizer.lr


@pytest.mark.parametrize("value", ["[tss2d.yaml, tiny.yaml]", "{file: tss2d.yaml}", "3", "''"])
def test_extends_takes_one_path_and_says_so_otherwise(tmp_path, capsys, value):
    path = tmp_path / "child.yaml"
    path.write_text(f"extends: {value}\nseed: 1\n")
    err = _one_line_error(capsys, "config", str(path))
    assert "'extends' takes one file path (a string" in err and "child.yaml" in err


def test_extends_with_a_path_still_merges(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(f"extends: {REPO / 'configs/tiny.yaml'}\nseed: 7\n")
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.phases  # phases come from the files it extends


@pytest.mark.parametrize(("section", "name", "words"), [
    ("variants", "../elsewhere", "variant name '../elsewhere'"),
    ("variants", "genesis", "variant name 'genesis' is taken (genesis, jobs, explain, predict are)"),
    ("variants", "predict", "is taken"),
    ("ensembles", "jobs", "is taken"),
    ("phases", "random", "phase name 'random' is taken (random, genesis are)"),
    ("phases", "tss/4h5", "phase name 'tss/4h5'"),
    ("phases", "config.yaml", "phase name 'config.yaml'"),
])
def test_names_that_become_folders_are_folder_names(tmp_path, section, name, words):
    """RUN/<variant>/fold-<k>/<phase>/: a name with a slash or dots would write outside its place, a variant
    called genesis would share its folds' folders with Models Genesis, and a phase called random would make
    `init: random` mean two things."""
    body = {"variants": f"variants: {{'{name}': {{}}}}\n",
            "ensembles": f"variants: {{a: {{}}, b: {{}}}}\nensembles: {{'{name}': [a, b]}}\n",
            "phases": f"phases: {{'{name}': {{task: lesion_present}}}}\n"}[section]
    path = tmp_path / "c.yaml"
    path.write_text("data: {store: s.zarr}\nrun: {dir: r}\n" + body)
    with pytest.raises(UserError, match=re.escape(words)) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"config key '{section}'" in message
