"""The `stroke-tss` entry point: verbs, exit codes, one-line errors."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stroke_tss", *args], capture_output=True, text=True, timeout=120)


def test_unknown_verb_exits_2_with_one_line():
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_env_reports_versions_as_json():
    import json

    out = run_cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"].startswith("2.") and info["cuda_available"] in (True, False)
    assert "slurm" in info


def test_every_registered_verb_imports_and_has_help():
    from stroke_tss.cli import VERBS, _module

    for verb in VERBS:
        module = _module(verb)
        assert callable(module.add_arguments) and callable(module.main), verb
