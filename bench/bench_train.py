"""Training throughput: our phase loop vs a bare loop, and 2 gloo ranks vs 1 (paper-width encoder3d).

Run as a module by `python -m bench`; this file is also the torchrun worker of ddp2_vs_1.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, WARMUP, GLOBAL_BATCH = 12, 2, 4
ROUNDS = 3  # train_vs_bare: alternating rounds per arm


def _train_vs_bare(tmp: Path) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from hpc.sampler import ShardedSampler
    from stroke_tss.config.training import EngineSection, TrainSection
    from stroke_tss.data import StoreDataset
    from stroke_tss.models import build_model
    from stroke_tss.optim import build_optimizer
    from stroke_tss.tasks import task_samples
    from stroke_tss.train import train_phase
    from tests.test_data import make_store

    torch.set_num_threads(1)
    store = make_store(tmp / "store.zarr", num_subjects=32)
    from data_prep.store import open_store

    samples, _ = task_samples(open_store(store).table, "lesion_present")
    ds = StoreDataset(store, samples)
    splits = {"train": ds, "val": StoreDataset(store, samples[:4]), "test": StoreDataset(store, samples[:4])}
    train = TrainSection(batch_size=4, stopping={"max_epochs": 1})
    bce = nn.BCEWithLogitsLoss()

    def ours(round_: int) -> float:
        torch.manual_seed(0)
        model = build_model("slicewise2d", num_slices=8, base_channels=8)
        out = tmp / f"phase-{round_}"
        train_phase(model, splits, out, task="lesion_present", train=train, engine=EngineSection(kind="local"))
        return json.loads((out / "log.jsonl").read_text().splitlines()[0])["train_seconds"]

    def bare() -> float:
        torch.manual_seed(0)
        model = build_model("slicewise2d", num_slices=8, base_channels=8)
        opt = build_optimizer(model.parameters(), name="adabound", lr=1e-3)
        loader = DataLoader(ds, batch_size=4, sampler=ShardedSampler(ds.labels, seed=0),
                            generator=torch.Generator().manual_seed(0))
        model.train()
        start = time.perf_counter()
        for batch in loader:
            loss = bce(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    # each arm is a fraction of a second: alternate them over rounds (the first is a warm-up) and compare
    # medians, so neither arm gets the warm caches of going second
    bare()
    times = {"ours": [], "bare": []}
    for round_ in range(ROUNDS):
        times["ours"].append(ours(round_))
        times["bare"].append(bare())
    n = len(ds)
    rate = {arm: n / statistics.median(t) for arm, t in times.items()}
    ratio = rate["ours"] / rate["bare"]
    return {"name": "train_vs_bare", "ratio": round(ratio, 3), "target": 0.95, "passed": ratio >= 0.95,
            "detail": f"ours {rate['ours']:.1f} samples/s, bare {rate['bare']:.1f} samples/s (medians of {ROUNDS} "
                      f"alternating rounds), {n} samples, slicewise2d w8"}


def _torchrun(world: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # --standalone: the rendezvous store binds port 0, no port is probed free and then taken by someone else
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           __file__, str(out)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    return json.loads(out.read_text())


def _worker(out: Path) -> None:
    import torch
    from torch import nn

    from hpc.engine import build_engine
    from hpc.env import init_distributed
    from stroke_tss.models import build_model
    from stroke_tss.optim import build_optimizer

    env = init_distributed(timeout_s=300)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("encoder3d", base_channels=64)  # paper width
    engine = build_engine("ddp" if env.world_size > 1 else "local", model,
                          build_optimizer(model.parameters(), name="adabound", lr=1e-3))
    micro = GLOBAL_BATCH // env.world_size
    x = torch.randn(micro, 3, 16, 32, 32)
    y = torch.ones(micro)
    bce = nn.BCEWithLogitsLoss()
    for step in range(STEPS + WARMUP):
        if step == WARMUP:
            engine.barrier()
            start = time.perf_counter()
        engine.backward(bce(engine.model(x), y))
        engine.step()
    engine.barrier()
    seconds = time.perf_counter() - start
    rss = engine.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if env.rank == 0:
        out.write_text(json.dumps({"samples_per_s": STEPS * GLOBAL_BATCH / seconds, "peak_rss_mb": rss}))


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [_train_vs_bare(tmp)]
        one = _torchrun(1, tmp / "one.json")
        two = _torchrun(2, tmp / "two.json")
    ratio = two["samples_per_s"] / one["samples_per_s"]
    rows.append({"name": "ddp2_vs_1", "ratio": round(ratio, 3), "target": 1.6, "passed": ratio >= 1.6,
                 "detail": (f"encoder3d w64, global batch {GLOBAL_BATCH}, 1 thread/rank: 1 rank "
                            f"{one['samples_per_s']:.2f}, 2 ranks {two['samples_per_s']:.2f} samples/s; peak RSS "
                            f"per rank MB: 1 rank {one['peak_rss_mb']}, 2 ranks {[round(r) for r in two['peak_rss_mb']]}")})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(Path(sys.argv[1]))
