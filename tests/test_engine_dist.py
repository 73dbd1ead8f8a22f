"""DDP and DeepSpeed ZeRO-2 on 2 real gloo ranks under torchrun.

Parity reference: one process accumulating the gradients of the same per-rank micro-batches in rank order
(loss / world size, which is what averaging gradients across ranks computes). This file is also the worker
script torchrun starts (``python tests/test_engine_dist.py MODE ENGINE MODEL OUT``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS, SAVE_AT = 4, 2
MODELS = {
    "slicewise2d": ({"num_slices": 3, "base_channels": 4}, (3, 3, 32, 32)),
    "encoder3d": ({"base_channels": 4}, (3, 8, 16, 16)),
}
# engine kinds under test: DDP, and DeepSpeed through the JSON files we ship (their bf16 is dropped on CPU)
ENGINES = {"ddp": ("ddp", None), **{f"zero{k}": ("deepspeed", REPO / "configs" / "deepspeed" / f"zero{k}.json")
                                    for k in (0, 1, 2)}}


def _model(name: str, seed: int) -> nn.Module:
    from stroke_tss.models import build_model

    torch.manual_seed(seed)
    return build_model(name, **MODELS[name][0])


def _optimizer(model: nn.Module):
    from stroke_tss.optim import build_optimizer

    return build_optimizer(model.parameters(), name="adabound", lr=1e-2)


def _micro_batch(name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, *MODELS[name][1], generator=g)
    return x, torch.tensor([float(rank % 2), float(step % 2)])


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


def _worker(mode: str, kind: str, name: str, out: Path) -> None:
    from hpc.engine import build_engine
    from hpc.env import finish_process, init_distributed

    env = init_distributed(timeout_s=20 if mode == "die" else 120)
    torch.set_num_threads(1)

    def make(seed):
        model = _model(name, seed)
        engine_kind, ds_config = ENGINES[kind]
        return build_engine(engine_kind, model, _optimizer(model), deepspeed_config=ds_config)

    def run(engine, start, stop):
        engine.train()
        for step in range(start, stop):
            if mode == "die" and step == 1 and env.rank == 1:
                os._exit(3)  # a rank that dies mid-training without a word
            engine.backward(_loss(engine.model, *_micro_batch(name, step, env.rank)))
            engine.step()

    engine = make(0)
    run(engine, 0, SAVE_AT)
    engine.save(out / "ckpt", tag=f"step-{SAVE_AT}", client_state={"step": SAVE_AT})
    run(engine, SAVE_AT, STEPS)
    straight = _params(engine.module)
    resumed = make(1)  # other init: the checkpoint must restore weights and optimizer state
    client, _ = resumed.load(out / "ckpt")
    run(resumed, client["step"], STEPS)
    gathered = engine.gather({"rank": env.rank})
    if env.rank == 0:
        torch.save({"straight": straight, "resumed": _params(resumed.module), "gathered": gathered},
                   out / "result.pt")
    torch.distributed.barrier()
    finish_process(0)  # leaves the group and exits past the teardown that can abort a finished rank


def _reference(name: str) -> dict[str, torch.Tensor]:
    model = _model(name, 0)
    opt = _optimizer(model)
    model.train()
    for step in range(STEPS):
        for rank in range(WORLD):
            (_loss(model, *_micro_batch(name, step, rank)) / WORLD).backward()
        opt.step()
        opt.zero_grad()
    return _params(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-port", str(free_port()), __file__, *args, str(tmp_path)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("name", ["slicewise2d", "encoder3d"])
def test_two_ranks_match_gradient_accumulation_and_resume_identically(tmp_path, kind, name):
    proc = _torchrun(tmp_path, "train", kind, name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    reference = _reference(name)
    assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
    moved = max((reference[k] - _params(_model(name, 0))[k]).abs().max().item() for k in reference)
    assert moved > 1e-3
    for key, ref in reference.items():
        # Same arithmetic up to summation order (gloo's all-reduce and DeepSpeed's flat buckets add the two
        # ranks' gradients in a different order than .backward() accumulation): float32 rounding, ~1e-7 per
        # step, grown over 4 AdaBound steps whose update divides by sqrt(v) - 1e-5 absolute leaves margin.
        torch.testing.assert_close(result["straight"][key], ref, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(result["resumed"][key], result["straight"][key]), key


@pytest.mark.integration
def test_a_dead_rank_stops_the_job_with_an_error_instead_of_hanging(tmp_path):
    start = time.monotonic()
    proc = _torchrun(tmp_path, "die", "ddp", "encoder3d", timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert took < 90
    assert "exitcode  : 3" in proc.stderr or "exit code 3" in proc.stderr.lower(), proc.stderr[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
