"""The `stroke-tss` entry point: verbs, exit codes, one-line errors."""

import shutil
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stroke_tss", *args], capture_output=True, text=True, timeout=120)


def test_unknown_verb_exits_2_with_one_line():
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_env_reports_versions_as_json():
    """What `env --json` says is what this interpreter has installed and can do."""
    import importlib.metadata
    import json

    import torch

    out = run_cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] == importlib.metadata.version("torch") and info["torch"].split("+")[0] in torch.__version__
    for name in ("deepspeed", "zarr", "submitit", "stroke-tss"):
        assert info[name] == importlib.metadata.version(name), name
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cuda_available"] is torch.cuda.is_available()
    assert len(info["cuda_devices"]) == torch.cuda.device_count()
    # Slurm: reachable, installed but not answering, or not installed, and which of them it is
    assert info["slurm"].startswith(("reachable: ", "installed, ", "not installed")), info["slurm"]
    assert info["slurm"].startswith("not installed") == (shutil.which("sinfo") is None)


def test_every_registered_verb_has_help_that_says_what_it_does(capsys):
    from stroke_tss.cli import VERBS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    def flat(text: str) -> str:  # argparse wraps lines, also after a hyphen
        return "".join(text.split())

    top = flat(capsys.readouterr().out)
    for verb, text in VERBS.items():
        assert flat(f"{verb} {text[:30]}") in top, verb
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0, verb
        out = capsys.readouterr().out
        assert out.startswith(f"usage: stroke-tss {verb}"), (verb, out[:200])
        assert flat(text) in flat(out), verb


def _config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {store: s.zarr}\nrun: {dir: runs/c}\ncv: {folds: 3}\n")
    return path


def test_config_verb_prints_yaml_that_loads_back_into_the_same_config(tmp_path, capsys):
    import yaml

    from stroke_tss.cli import main
    from stroke_tss.config import load_config, validate

    path = _config_file(tmp_path)
    overrides = ["model.options.dropout=1e-3", "launch.account=12345"]
    assert main(["config", str(path), *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["cv"]["folds"] == 3 and printed["launch"]["account"] == "12345"
    assert printed["model"]["options"]["dropout"] == 1e-3
    assert validate(printed) == load_config(path, overrides)


def test_config_verb_errors_are_one_line_naming_the_override(tmp_path, capsys):
    from stroke_tss.cli import main

    assert main(["config", str(_config_file(tmp_path)), "train.batch_size=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stroke-tss config: error: override train.batch_size=abc: config key 'train.batch_size'")
    assert len(err.splitlines()) == 1
    assert main(["config"]) == 2 and "--schema" in capsys.readouterr().err


def test_config_schema_lists_every_key_with_type_default_and_docstring(capsys):
    from stroke_tss.cli import main

    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size: int = 4\n    Samples per rank per step.\n" in out
    assert "data.store: Path (required)\n" in out
    assert "phases.<name>.freeze: list[str] | Literal['auto'] = []\n" in out
    assert 'genesis.optimizer.lr: float = 1.0\n' in out  # the section's own default, not OptimizerSection's
    assert "launch.account: str | None = null\n    Slurm account to charge" in out


def test_version_prints_the_installed_version_without_torch():
    import importlib.metadata

    probe = ("import sys\nfrom stroke_tss.cli import main\ntry:\n    main(['--version'])\n"
             "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[:2] == [f"stroke-tss {importlib.metadata.version('stroke-tss')}", "0 False"]
