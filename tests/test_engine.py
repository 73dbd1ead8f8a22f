"""The single-process engine: a step trains, checkpoints resume identically, old checkpoints are pruned."""

import pytest
import torch
from torch import nn

from hpc.engine import build_engine, latest_tag
from stroke_tss.optim import build_optimizer


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    return build_engine("local", model, build_optimizer(model.parameters(), name="adabound", lr=1e-2))


def _steps(engine, start, stop):
    for s in range(start, stop):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(8, 4, generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(engine.model(x).squeeze(1), (x[:, 0] > 0).float())
        engine.backward(loss)
        engine.step()


def test_checkpoint_resumes_an_identical_continuation(tmp_path):
    straight = _setup()
    _steps(straight, 0, 6)
    first = _setup()
    _steps(first, 0, 3)
    rng = torch.Generator().manual_seed(7).get_state()
    first.save(tmp_path, tag="step-3", client_state={"step": 3}, rank_state={"rng": rng})
    resumed = _setup(seed=99)  # different init: everything must come from the checkpoint
    client, rank_state = resumed.load(tmp_path)
    assert client == {"step": 3} and torch.equal(rank_state["rng"], rng)
    _steps(resumed, 3, 6)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_keep_prunes_old_checkpoints_but_not_best(tmp_path):
    engine = _setup()
    engine.save(tmp_path, tag="best", client_state={})
    for step in range(4):
        engine.save(tmp_path, tag=f"step-{step}", client_state={"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["best", "step-2", "step-3"]
    assert latest_tag(tmp_path) == "step-3"
    assert engine.load(tmp_path)[0] == {"step": 3}
    assert engine.load(tmp_path, tag="best")[0] == {}


def test_load_without_checkpoints_returns_none_and_rejects_a_partial_one(tmp_path):
    engine = _setup()
    assert engine.load(tmp_path) is None
    (tmp_path / "step-9").mkdir()
    assert engine.load(tmp_path) is None  # an interrupted save is not picked as latest
    with pytest.raises(ValueError, match="incomplete"):
        engine.load(tmp_path, tag="step-9")


def test_engine_errors_name_the_fix():
    model = nn.Linear(2, 1)
    opt = build_optimizer(model.parameters(), name="sgd", lr=0.1)
    with pytest.raises(ValueError, match="unknown engine 'horovod'"):
        build_engine("horovod", model, opt)
    with pytest.raises(ValueError, match="torchrun"):
        build_engine("ddp", model, opt)
    with pytest.raises(ValueError, match="DeepSpeed JSON"):
        build_engine("deepspeed", model, opt)
