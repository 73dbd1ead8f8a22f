"""DDP and DeepSpeed ZeRO 0-2 on 2 real gloo ranks under torchrun; a checkpoint (hpc.checkpoint) taken
mid-run resumes identically, each rank's RNG state included.

Parity reference: one process accumulating the gradients of the same per-rank micro-batches in rank order
(loss / world size, which is what averaging gradients across ranks computes). This file is also the worker
script torchrun starts (``python tests/test_engine_dist.py MODE ENGINE MODEL OUT``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures.dist import torchrun

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS, SAVE_AT = 4, 2
# small stand-ins for the 2D and 3D networks: convolutions, BatchNorm (per-rank batch statistics on gloo),
# one logit per sample; (input shape per sample)
MODELS = {"conv2d": (3, 32, 32), "conv3d": (1, 8, 16, 16)}
# engine kinds under test: DDP, and DeepSpeed through the JSON files we ship (their bf16 is dropped on CPU)
ENGINES = {"ddp": ("ddp", None), **{f"zero{k}": ("deepspeed", REPO / "configs" / "deepspeed" / f"zero{k}.json")
                                    for k in (0, 1, 2)}}


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    conv, norm, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if name == "conv2d"
                        else (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d))
    # no bias before BatchNorm: its gradient is rounding noise, which Adam would scale up to full steps
    return nn.Sequential(conv(MODELS[name][0], 4, 3, padding=1, bias=False), norm(4), nn.ReLU(),
                         conv(4, 8, 3, stride=2), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(8, 1), nn.Flatten(0))


def _optimizer(model: nn.Module):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _micro_batch(name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, *MODELS[name], generator=g)
    return x, torch.tensor([float(rank % 2), float(step % 2)])


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


def _worker(mode: str, kind: str, name: str, out: Path) -> None:
    from hpc.checkpoint import Checkpoints
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
                (out / "died_at").write_text(repr(time.time()))
                os._exit(3)  # a rank that dies mid-training without a word
            engine.backward(_loss(engine.model, *_micro_batch(name, step, env.rank)))
            engine.step()

    ckpts = Checkpoints(out / "ckpt")
    engine = make(0)
    run(engine, 0, SAVE_AT)
    torch.manual_seed(100 + env.rank)  # each rank's own RNG stream must come back to that rank
    ckpts.save(engine, tag=f"step-{SAVE_AT}", state={"step": SAVE_AT, "rank": env.rank})
    after_save = torch.rand(2).tolist()
    run(engine, SAVE_AT, STEPS)
    straight = _params(engine.module)
    resumed = make(1)  # other init: the checkpoint must restore weights and optimizer state
    state = ckpts.load(resumed)
    rng_back = torch.rand(2).tolist() == after_save
    run(resumed, state["step"], STEPS)
    gathered = engine.gather({"rank": env.rank, "rng_back": rng_back, "state": state})
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


def _torchrun(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(WORLD), __file__, *args, str(tmp_path)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_match_gradient_accumulation_and_resume_identically(tmp_path, kind, name):
    proc = _torchrun(tmp_path, "train", kind, name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    reference = _reference(name)
    saved = {"step": SAVE_AT, "rank": 0}  # rank 0's state is the one saved
    assert result["gathered"] == [{"rank": r, "rng_back": True, "state": saved} for r in range(WORLD)]
    moved = max((reference[k] - _params(_model(name, 0))[k]).abs().max().item() for k in reference)
    assert moved > 1e-3
    for key, ref in reference.items():
        # Same arithmetic up to summation order (gloo's all-reduce and DeepSpeed's flat buckets add the two
        # ranks' gradients in a different order than .backward() accumulation): float32 rounding, ~1e-7 per
        # step, grown over 4 Adam steps whose update divides by sqrt(v) - 1e-5 absolute leaves margin.
        torch.testing.assert_close(result["straight"][key], ref, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(result["resumed"][key], result["straight"][key]), key


@pytest.mark.integration
def test_a_dead_rank_stops_the_job_with_an_error_instead_of_hanging(tmp_path):
    """Rank 1 exits mid-training: the job ends with its exit code soon after, not at the 20 s process-group
    timeout of the surviving rank, let alone never (the subprocess timeout bounds start-up on a loaded box)."""
    proc = _torchrun(tmp_path, "die", "ddp", "conv3d", timeout=240)
    ended = time.time()
    assert proc.returncode != 0
    assert "exitcode  : 3" in proc.stderr or "exit code 3" in proc.stderr.lower(), proc.stderr[-2000:]
    after_death = ended - float((tmp_path / "died_at").read_text())
    print(f"the job ended {after_death:.1f} s after its rank died")
    assert after_death < 15, after_death


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
