"""Distributed self-test: every rank joins the process group the environment describes and all_reduces.

    python -m hpc.selftest [--out FILE]      (under srun, torchrun, srun+torchrun, or alone)

Each rank contributes rank + 1; all must see world_size * (world_size + 1) / 2. Rank 0 writes a JSON
summary to --out (ranks, launcher, hosts, backend), so sbatch templates can be checked end to end.
Exit status 1 when the ranks disagree.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON summary written by rank 0")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout")
    args = parser.parse_args(argv)

    # after the arguments: `--help` answers without importing torch
    import torch
    import torch.distributed as dist

    from hpc.env import DistEnv, finish_process, init_distributed

    torch.set_num_threads(1)
    env = init_distributed(DistEnv.from_environ(), timeout_s=args.timeout_s)
    value = torch.tensor([float(env.rank + 1)])
    hosts = [socket.gethostname()]
    backend = "none"
    if dist.is_initialized():
        backend = dist.get_backend()
        dist.all_reduce(value)
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, socket.gethostname())
        hosts = gathered
    expected = env.world_size * (env.world_size + 1) / 2
    ok = value.item() == expected
    print(f"rank {env.rank}/{env.world_size} ({env.launcher}, {backend}): sum {value.item():g}, "
          f"expected {expected:g}", file=sys.stderr)
    if env.is_main and args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"ok": ok, "world_size": env.world_size, "num_nodes": env.num_nodes, "launcher": env.launcher,
                   "backend": backend, "sum": value.item(), "expected": expected, "hosts": hosts,
                   "job_id": env.job_id}
        args.out.write_text(json.dumps(summary, indent=1))
    return finish_process(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
