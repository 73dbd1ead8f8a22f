"""The single-process engine and hpc.checkpoint: a step trains, checkpoints resume identically (RNGs
included), old checkpoints are pruned, and run folders written before hpc.checkpoint still resume."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from hpc.checkpoint import Checkpoints, rng_state, set_rng_state
from hpc.engine import build_engine


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    return build_engine("local", model, torch.optim.Adam(model.parameters(), lr=1e-2))


def _steps(engine, start, stop):
    for s in range(start, stop):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(8, 4, generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(engine.model(x).squeeze(1), (x[:, 0] > 0).float())
        engine.backward(loss)
        engine.step()


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_checkpoint_resumes_an_identical_continuation(tmp_path):
    straight = _setup()
    _steps(straight, 0, 6)
    first = _setup()
    _steps(first, 0, 3)
    ckpts = Checkpoints(tmp_path)
    ckpts.save(first, tag="step-3", state={"step": 3})
    after_save = _draws()
    resumed = _setup(seed=99)  # different init and RNGs: everything must come from the checkpoint
    assert ckpts.load(resumed) == {"step": 3}
    assert _draws() == after_save  # torch, numpy and python RNGs continue where the save left them
    _steps(resumed, 3, 6)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_state_round_trips():
    state = rng_state()
    before = _draws()
    set_rng_state(state)
    assert _draws() == before


def test_keep_prunes_old_checkpoints_but_not_best(tmp_path):
    engine = _setup()
    ckpts = Checkpoints(tmp_path, keep=2)
    ckpts.save(engine, tag="best", state={})
    for step in range(4):
        ckpts.save(engine, tag=f"step-{step}", state={"step": step})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["best", "step-2", "step-3"]
    assert ckpts.tags() == ["best", "step-2", "step-3"]
    assert ckpts.latest() == "step-3"
    assert ckpts.load(engine) == {"step": 3}
    assert ckpts.load(engine, tag="best") == {}


def test_load_without_checkpoints_returns_none_and_rejects_a_partial_one(tmp_path):
    engine = _setup()
    ckpts = Checkpoints(tmp_path / "ckpt")
    assert ckpts.load(engine) is None and ckpts.latest() is None and ckpts.tags() == []
    (tmp_path / "ckpt" / "step-9").mkdir(parents=True)
    assert ckpts.load(engine) is None  # an interrupted save is not picked as latest
    with pytest.raises(ValueError, match="incomplete"):
        ckpts.load(engine, tag="step-9")


def test_a_checkpoint_of_another_engine_kind_is_refused(tmp_path):
    engine = _setup()
    Checkpoints(tmp_path).save(engine, tag="step-1", state={})
    (tmp_path / "step-1" / "done").write_text(json.dumps({"world_size": 2, "engine": "deepspeed"}))
    with pytest.raises(ValueError, match="written by the deepspeed engine, not local"):
        Checkpoints(tmp_path).load(engine)


def test_run_folders_written_before_hpc_checkpoint_still_resume(tmp_path):
    # The layout Engine.save wrote (and Checkpoints keeps): written here by hand, not by Checkpoints.
    old = _setup()
    _steps(old, 0, 2)
    tag = tmp_path / "epoch-0002"
    tag.mkdir()
    loop_state = {"loop": {"epoch": 2, "step_in_epoch": 0}, "stopper": {"best": 0.5, "bad": 1}}
    torch.save({"model": old.module.state_dict(), "optimizer": old.optimizer.state_dict(), "client": loop_state},
               tag / "state.pt")
    torch.save({"rng": rng_state()}, tag / "rank-00000.pt")
    after_save = _draws()
    (tag / "done").write_text(json.dumps({"world_size": 1, "engine": "local"}))
    (tmp_path / "latest").write_text("epoch-0002")

    resumed = _setup(seed=5)
    assert Checkpoints(tmp_path).load(resumed) == loop_state
    assert _draws() == after_save
    for a, b in zip(old.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    # and what Checkpoints writes is that same layout, with the digests of its files added
    Checkpoints(tmp_path).save(resumed, tag="epoch-0003", state=loop_state)
    new = tmp_path / "epoch-0003"
    assert sorted(p.name for p in new.iterdir()) == ["digests.json", "done", "rank-00000.pt", "state.pt"]
    assert json.loads((new / "done").read_text()) == {"world_size": 1, "engine": "local"}
    assert (tmp_path / "latest").read_text() == "epoch-0003"
    assert set(torch.load(new / "state.pt", weights_only=True)) == {"model", "optimizer", "client"}
    assert set(torch.load(new / "rank-00000.pt", weights_only=True)) == {"rng"}


def test_engine_errors_name_the_fix():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown engine 'horovod'"):
        build_engine("horovod", model, opt)
    with pytest.raises(ValueError, match="torchrun"):
        build_engine("ddp", model, opt)
    with pytest.raises(ValueError, match="DeepSpeed JSON"):
        build_engine("deepspeed", model, opt)
