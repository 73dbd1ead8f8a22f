"""The import contracts of .importlinter hold, and lint-imports catches a wrong-way import (a function-local
one included), a cycle inside stroke_tss, the fold level calling the run level and a module no level names,
on a copy of the packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # of the dev extra: ./dev setup installs it
FORBIDDEN = ["hpc-generic", "data-prep-standalone"]
ACYCLIC = "stroke-tss-acyclic"
LEVELS = "stroke-tss-levels"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("hpc", "data_prep", "stroke_tss"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO / ".importlinter", tmp_path)
    return tmp_path


def _lint(folder: Path, *contracts: str) -> subprocess.CompletedProcess:
    # cwd first on the path: the copy, not the installed packages, is what gets analysed
    args = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=folder,
                           capture_output=True, text=True, timeout=120)


def test_every_contract_holds_on_the_tree(copy):
    proc = _lint(copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 4 kept, 0 broken." in proc.stdout, proc.stdout


def test_a_function_local_wrong_way_import_breaks_the_contract(copy):
    (copy / "hpc" / "wrong_way.py").write_text("def f():\n    import stroke_tss.train\n")
    proc = _lint(copy, *FORBIDDEN)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "hpc imports neither stroke_tss nor data_prep BROKEN" in proc.stdout
    assert "hpc.wrong_way -> stroke_tss.train (l.2)" in proc.stdout, proc.stdout


def test_a_cycle_inside_stroke_tss_breaks_the_acyclic_contract(copy):
    (copy / "stroke_tss" / "cycle_a.py").write_text("from stroke_tss import cycle_b\n")
    (copy / "stroke_tss" / "cycle_b.py").write_text("def f():\n    from stroke_tss import cycle_a\n")
    proc = _lint(copy, ACYCLIC)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "No cycles are allowed in stroke_tss." in proc.stdout
    assert ".cycle_a -> .cycle_b" in proc.stdout or ".cycle_b -> .cycle_a" in proc.stdout, proc.stdout


def test_the_fold_level_calling_the_run_level_breaks_the_levels_contract(copy):
    train = copy / "stroke_tss" / "train.py"
    train.write_text(train.read_text() + "\n\ndef _back():\n    from stroke_tss.runs import cv  # noqa\n")
    proc = _lint(copy, LEVELS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stroke_tss.train -> stroke_tss.runs.cv" in proc.stdout, proc.stdout


def test_a_module_no_level_names_breaks_the_levels_contract(copy):
    (copy / "stroke_tss" / "newcomer.py").write_text("X = 1\n")
    proc = _lint(copy, LEVELS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stroke_tss.newcomer" in proc.stdout, proc.stdout
