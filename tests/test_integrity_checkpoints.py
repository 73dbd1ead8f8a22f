"""Checkpoints and weights as hostile or damaged input: a crafted pickle in any checkpoint file is refused with
one line and never runs, DeepSpeed's model and optimizer states included; flipped bytes never load silently;
a damaged latest tag falls back to the one before it, with a warning naming both.

This file is also the worker a DeepSpeed test starts (``python tests/test_integrity_checkpoints.py OUT``): the
engine needs a process group, which stays out of the pytest process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling it runs a shell command that creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch file whose unpickling runs the payload, and record its digest where a save
    would, as an attacker who can write the folder could."""
    torch.save({"model": Payload(marker)}, path)
    digests = path.parent / "digests.json"
    if digests.is_file():
        data = json.loads(digests.read_text())
        data["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        digests.write_text(json.dumps(data))
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        sidecar.write_text(hashlib.sha256(path.read_bytes()).hexdigest())


def flip(path: Path, *, inside: bytes | None = None, count: int = 64) -> None:
    """Invert ``count`` bytes of ``path``: inside the bytes ``inside`` when given (a tensor's data), else mid-file."""
    raw = bytearray(path.read_bytes())
    start = raw.find(inside) if inside is not None else len(raw) // 2
    assert start >= 0
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _engine(seed: int = 0):
    from hpc.engine import build_engine

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    return build_engine("local", model, torch.optim.Adam(model.parameters(), lr=1e-2))


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_the_crafted_file_would_run_its_payload_under_a_plain_load(tmp_path):
    # what makes the refusals below meaningful: DeepSpeed's own load (weights_only=False) runs this file
    marker = tmp_path / "ran"
    craft(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "rank-00000.pt"])
def test_a_crafted_checkpoint_file_is_refused_and_never_runs(tmp_path, name):
    from hpc.checkpoint import CheckpointError, Checkpoints

    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(_engine(), tag="step-1", state={"step": 1})
    marker = tmp_path / "ran"
    craft(tmp_path / "ckpt" / "step-1" / name, marker)
    assert ckpts.verify("step-1") == []  # the digests agree: only the loader stands between file and code
    with pytest.raises(CheckpointError) as err:
        ckpts.load(_engine(seed=1))
    message = str(err.value)
    assert "\n" not in message and name in message and "(posix.system); refused, since loading them could run code" in message
    assert not marker.exists()


def test_crafted_weights_and_best_weights_are_refused_and_never_run(tmp_path):
    from hpc.checkpoint import CheckpointError, load_file, save_file
    from stroke_tss.models import build_model
    from stroke_tss.weights import load_weights, save_weights

    model = build_model("encoder3d", base_channels=4)
    weights = save_weights(tmp_path / "weights.pt", model, model.state_dict())
    best = save_file(model.state_dict(), tmp_path / "best-weights.pt")
    marker = tmp_path / "ran"
    for path, load in ((weights, load_weights), (best, load_file)):
        craft(path, marker)
        with pytest.raises(CheckpointError, match=r"\(posix.system\); refused, since loading them could run code") as err:
            load(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path, caplog):
    from hpc.checkpoint import Checkpoints

    engine = _engine()
    ckpts = Checkpoints(tmp_path)
    ckpts.save(engine, tag="step-1", state={"step": 1})
    at_step_1 = _params(engine)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    ckpts.save(engine, tag="step-2", state={"step": 2})
    flip(tmp_path / "step-2" / "state.pt")
    resumed = _engine(seed=1)
    with caplog.at_level(logging.WARNING, logger="hpc.checkpoint"):
        assert ckpts.load(resumed) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(_params(resumed), at_step_1))
    [warning] = [r.getMessage() for r in caplog.records]
    assert "step-2" in warning and "damaged" in warning and "falling back to" in warning and "step-1" in warning


def test_when_no_checkpoint_is_intact_one_line_says_so(tmp_path):
    from hpc.checkpoint import CheckpointError, Checkpoints

    engine = _engine()
    ckpts = Checkpoints(tmp_path / "ckpt")
    for step in (1, 2):
        ckpts.save(engine, tag=f"step-{step}", state={"step": step})
        flip(tmp_path / "ckpt" / f"step-{step}" / "state.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step-2.*step-1.*delete") as err:
        ckpts.load(engine)
    assert "\n" not in str(err.value)


def test_a_tag_saved_before_digests_loads_with_a_warning(tmp_path, caplog):
    from hpc.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path)
    ckpts.save(_engine(), tag="step-1", state={"step": 1})
    (tmp_path / "step-1" / "digests.json").unlink()
    with caplog.at_level(logging.WARNING, logger="hpc.checkpoint"):
        assert ckpts.load(_engine(seed=1)) == {"step": 1}
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["state.pt", "rank-00000.pt"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_file_of_an_unverifiable_tag_is_one_line(tmp_path, name, damage):
    from hpc.checkpoint import CheckpointError, Checkpoints

    ckpts = Checkpoints(tmp_path)
    ckpts.save(_engine(), tag="step-1", state={"step": 1})
    (tmp_path / "step-1" / "digests.json").unlink()  # nothing to catch it before the read
    path = tmp_path / "step-1" / name
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is empty" if damage == "empty" else "is truncated or damaged") as err:
        ckpts.load(_engine())
    assert "\n" not in str(err.value) and name in str(err.value) and "delete" in str(err.value)


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped"])
def test_damaged_best_weights_are_one_line(tmp_path, damage):
    from hpc.checkpoint import CheckpointError, load_file, save_file

    state = _engine().state_dict()
    path = save_file(state, tmp_path / "best-weights.pt")
    if damage == "flipped":
        flip(path, inside=state["0.weight"].numpy().tobytes())
    else:
        path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="does not match the digest") as err:
        load_file(path, fix="delete the phase folder")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    path.with_name("best-weights.pt.sha256").unlink()  # without its digest: still one line, never a load
    if damage != "flipped":
        with pytest.raises(CheckpointError, match="is empty" if damage == "empty" else "is truncated or damaged"):
            load_file(path)


def test_weights_with_64_flipped_bytes_do_not_load(tmp_path):
    from stroke_tss.errors import UserError
    from stroke_tss.models import build_model
    from stroke_tss.weights import load_weights, save_weights

    model = build_model("encoder3d", base_channels=4)
    path = save_weights(tmp_path / "weights.pt", model, model.state_dict())
    assert load_weights(path)["model"] == "encoder3d"
    tensor = max(model.state_dict().values(), key=torch.Tensor.numel)
    flip(path, inside=tensor.numpy().tobytes()[:256])
    torch.load(path, weights_only=True)  # torch itself reads the damaged file without a word
    with pytest.raises(UserError, match="does not match the digest recorded when it was written") as err:
        load_weights(path)
    assert "\n" not in str(err.value)


def test_weights_written_before_digests_load_with_a_warning(tmp_path, caplog):
    from stroke_tss.models import build_model
    from stroke_tss.weights import load_weights

    model = build_model("encoder3d", base_channels=4)
    torch.save({"model": "encoder3d", "init_args": model.init_args, "state_dict": model.state_dict()},
               tmp_path / "weights.pt")
    with caplog.at_level(logging.WARNING, logger="stroke_tss.weights"):
        assert load_weights(tmp_path / "weights.pt")["model"] == "encoder3d"
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_a_non_torch_file_as_weights_is_one_line(tmp_path):
    from hpc.checkpoint import CheckpointError
    from stroke_tss.weights import load_weights

    path = tmp_path / "weights.pt"
    path.write_text("subject_id,probability\nsub-01,0.3\n")
    with pytest.raises(CheckpointError, match="is not a file torch.save wrote") as err:
        load_weights(path)
    assert "\n" not in str(err.value)


def test_weights_of_another_model_or_width_are_one_line(tmp_path):
    from stroke_tss.errors import UserError
    from stroke_tss.models import build_model
    from stroke_tss.weights import fit_weights

    narrow = build_model("encoder3d", base_channels=4)
    with pytest.raises(UserError, match=r"has shape .* but model 'encoder3d' expects .*width") as err:
        fit_weights(build_model("encoder3d", base_channels=8), narrow.state_dict(), source="w.pt")
    assert "\n" not in str(err.value)
    unet = build_model("unet3d", base_channels=4)
    with pytest.raises(UserError, match="holds weights of model 'unet3d', not 'encoder3d'"):
        fit_weights(narrow, unet.state_dict(), source="w.pt", made_for="unet3d")
    with pytest.raises(UserError, match="does not fit model 'encoder3d'"):
        fit_weights(narrow, unet.state_dict(), source="w.pt")


# -- DeepSpeed: its model states and ZeRO optimizer shards ------------------------------------------------

def test_a_deepspeed_config_that_loads_universal_checkpoints_is_refused():
    # DeepSpeed reads those with its own torch.load(weights_only=False), past the safe loader
    pytest.importorskip("deepspeed")
    from hpc.checkpoint import CheckpointError
    from hpc.engine import build_engine

    model = nn.Linear(2, 1)
    with pytest.raises(CheckpointError, match="load_universal is not supported"):
        build_engine("deepspeed", model, torch.optim.SGD(model.parameters(), lr=0.1),
                     deepspeed_config={"checkpoint": {"load_universal": True}})


DS_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.integration
def test_deepspeed_checkpoints_round_trip_through_the_safe_loader(deepspeed_results):
    # ZeRO-2 optimizer shards hold DeepSpeed's loss scaler, stage enum and slice addresses: the allow-list
    assert deepspeed_results["clean"] == {"step": 1}
    assert deepspeed_results["same_params"]


@pytest.mark.integration
@pytest.mark.parametrize("name", DS_FILES)
def test_a_crafted_deepspeed_file_is_refused_and_never_runs(deepspeed_results, name):
    result = deepspeed_results[name]
    assert result["error"] == "CheckpointError", result
    assert "\n" not in result["message"] and name in result["message"] and "posix.system" in result["message"]
    assert not result["ran"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_worker(out: Path) -> None:
    """One rank of DeepSpeed ZeRO-2 on CPU: save, load a clean tag, then each crafted file."""
    port = _free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from hpc.checkpoint import Checkpoints
    from hpc.engine import build_engine
    from hpc.env import finish_process

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.set_num_threads(1)

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        return build_engine("deepspeed", model, torch.optim.Adam(model.parameters(), lr=1e-2),
                            deepspeed_config=REPO / "configs" / "deepspeed" / "zero2.json")

    engine = make(0)
    engine.backward(engine.model(torch.randn(2, 4)).sum())
    engine.step()
    ckpts = Checkpoints(out / "ckpt")
    ckpts.save(engine, tag="clean", state={"step": 1})
    other = make(1)
    result = {"clean": ckpts.load(other, tag="clean"),
              "same_params": all(torch.equal(a, b) for a, b in zip(_params(engine), _params(other)))}
    for i, name in enumerate(DS_FILES):
        tag = f"crafted-{i}"
        ckpts.save(engine, tag=tag, state={"step": 1})
        marker = out / f"ran-{i}"
        craft(out / "ckpt" / tag / name, marker)
        try:
            ckpts.load(make(2), tag=tag)
            result[name] = {"error": None, "message": "", "ran": marker.exists()}
        except Exception as exc:  # noqa: BLE001 - the test asserts on the type and message
            result[name] = {"error": type(exc).__name__, "message": str(exc), "ran": marker.exists()}
    (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    finish_process(0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _deepspeed_worker(Path(sys.argv[1]))
