"""Print versions and what this machine can run (CUDA, DeepSpeed, Slurm)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import shutil
import subprocess

PACKAGES = ("torch", "deepspeed", "monai", "zarr", "dask", "distributed", "dask-jobqueue", "submitit",
            "nibabel", "SimpleITK", "nilearn", "scikit-learn", "numpy", "stroke-tss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def collect() -> dict:
    info: dict[str, object] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["bf16_supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    info["slurm"] = _slurm_status()
    return info


def _slurm_status() -> str:
    if shutil.which("sinfo") is None:
        return "not installed (no sinfo on PATH)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "installed, controller not answering (sinfo timed out)"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines() or ["no output"]
        return f"installed, not reachable ({last[-1]})"
    return "reachable: " + "; ".join(out.stdout.split("\n")[:4]).strip("; ")


def main(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0
