"""What `pip install stroke-tss` (a wheel, not this checkout) gives a user: the shipped configs, found by the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_the_wheel_ships_the_configs_and_the_installed_demo_finds_them(tmp_path):
    from stroke_tss.runs.demo import SIZES

    # build from a copy: setuptools writes build/ and *.egg-info next to setup.py
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    for folder in ("configs", "stroke_tss", "hpc", "data_prep"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("stroke_tss-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    shipped = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert shipped and {f"stroke_tss/configs/{n}" for n in shipped} <= names

    # import the unpacked wheel from outside the checkout: the demo must resolve its configs inside it
    probe = ("import json; from stroke_tss.runs.demo import CONFIGS, SIZES; from stroke_tss.config import load_config\n"
             "spec = SIZES['small']; load_config(CONFIGS / spec.experiment, [])\n"
             "print(json.dumps({'configs': str(CONFIGS), 'files': sorted(p.name for p in CONFIGS.iterdir())}))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    assert Path(found["configs"]) == site / "stroke_tss" / "configs"
    wanted = {name for spec in SIZES.values() for name in (spec.experiment, spec.prep_config) if name}
    assert wanted <= set(found["files"])
