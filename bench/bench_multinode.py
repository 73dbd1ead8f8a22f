"""Two nodes vs one: samples/s of `stroke-tss train` on 2 nodes (1 rank each, gloo over the veth links of the
local two-node Slurm) vs 1 node with 1 rank, same global batch, measured side by side.

The run is the real command under srun: the tss3d.yaml encoder (width 64) on its lesion phase from random
init, 64 synthetic subjects (tests.test_data.make_store), global batch 16 (16 on one rank, 8 per
rank on two), one thread per rank. The rate of a run is the samples of its epochs after the first (warm-up)
over their `train_seconds` in log.jsonl. The arms alternate for ROUNDS rounds and the best round of each is
compared: on this shared 2-core machine other work only ever slows a run down, and it slows the 2-rank arm
(which needs both cores at once) the most.
Starts `slurm/local/up.sh --nodes 2` (root) unless STROKE_TSS_MULTINODE_ENV names a live two-node cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"
GLOBAL_BATCH, EPOCHS, ROUNDS, SUBJECTS = 16, 3, 3, 64


def _read_env(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, _, value in pairs}


def _cluster() -> tuple[dict[str, str], Path | None]:
    """(env of a two-node cluster, env file to stop afterwards or None when it was already up)."""
    named = os.environ.get("STROKE_TSS_MULTINODE_ENV")
    if named and Path(named).is_file():
        env = _read_env(Path(named))
        check = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,alloc,mix", "-o", "%N"], capture_output=True,
                               text=True, env={**os.environ, "SLURM_CONF": env["SLURM_CONF"]})
        if check.returncode == 0 and len(check.stdout.split()) == 2:
            return env, None
    environ = {k: v for k, v in os.environ.items() if k != "STROKE_TSS_SLURM_ENV"}
    proc = subprocess.run(["bash", str(LOCAL / "up.sh"), "--nodes", "2"], capture_output=True, text=True,
                          env=environ, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"the two-node Slurm did not start: {proc.stderr.strip().splitlines()[-1]}")
    env_file = Path(proc.stdout.strip())
    return _read_env(env_file), env_file


def _config(tmp: Path, store: Path) -> Path:
    path = tmp / "bench3d.yaml"
    path.write_text("\n".join([
        f"extends: {REPO / 'configs' / 'tss3d.yaml'}", f"data: {{store: {store}}}",
        "cv: {folds: 2, val_fraction: 0.1}",
        "train: {num_workers: 0, threads: 1, augment: {noise_std: 0.0, rotate_z_deg: 0, gamma: null},",
        f"        stopping: {{max_epochs: {EPOCHS}, min_epochs: {EPOCHS}}}}}",
        "phases: {tss3h: null, tss4h5: null, attention: null, lesion: {init: random}}",
        "variants: {3d_scratch: null}"]) + "\n")
    return path


def _train(env: dict[str, str], config: Path, run: Path, nodes: int) -> float:
    """samples/s of one `stroke-tss train` on `nodes` nodes, epochs after the first."""
    cmd = ["srun", "--partition=debug", f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--time=20", sys.executable, "-m", "stroke_tss", "train", str(config), "--fold", "0", f"run.dir={run}",
           f"train.batch_size={GLOBAL_BATCH // nodes}"]
    environ = {**os.environ, "SLURM_CONF": env["SLURM_CONF"], "OMP_NUM_THREADS": "1",
               "PATH": f"{env['STROKE_TSS_SLURM_BIN']}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(cmd, cwd=REPO, env=environ, check=True, capture_output=True, timeout=900)
    epochs = [json.loads(line) for line in (run / "3d" / "fold-0" / "lesion" / "log.jsonl").read_text().splitlines()]
    steps = epochs[0]["steps"]  # steps of one epoch (the log counts them cumulatively)
    timed = epochs[1:]
    return steps * GLOBAL_BATCH * len(timed) / sum(e["train_seconds"] for e in timed)


def run() -> list[dict]:
    from tests.test_data import make_store

    if os.geteuid() != 0:
        return [{"name": "multinode_2_vs_1", "ratio": None, "target": 1.6,
                 "detail": "needs root: the two-node Slurm lives in network namespaces"}]
    start = time.perf_counter()
    env, started = _cluster()
    up_s = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config = _config(tmp, make_store(tmp / "store.zarr", num_subjects=SUBJECTS))
            rates: dict[int, list[float]] = {1: [], 2: []}
            for round_ in range(ROUNDS):
                for nodes in (1, 2):
                    rates[nodes].append(_train(env, config, tmp / f"run-{nodes}-{round_}", nodes))
    finally:
        if started is not None:
            subprocess.run(["bash", str(LOCAL / "down.sh"), str(started)], capture_output=True)
    one, two = max(rates[1]), max(rates[2])
    ratio = two / one
    cluster = f"two-node cluster up in {up_s:.1f} s" if started else "reused the two-node cluster"
    return [{"name": "multinode_2_vs_1", "ratio": round(ratio, 3), "target": 1.6, "passed": ratio >= 1.6,
             "detail": (f"stroke-tss train, encoder3d w64, global batch {GLOBAL_BATCH}, 1 thread/rank: 1 node "
                        f"{one:.1f}, 2 nodes {two:.1f} samples/s (best of {ROUNDS} alternating rounds: "
                        f"{[round(r, 1) for r in rates[1]]} vs {[round(r, 1) for r in rates[2]]}); {cluster}")}]
