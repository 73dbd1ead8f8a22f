"""Table 2's initial-weight rows: the commented variants of tss2d.yaml / tss3d.yaml load a file in the layout
their comment documents (torchvision's ImageNet ResNet-18; the released Models Genesis U-Net). The files are
generated here, spelled from those networks' own definitions, not from our models: nothing downloads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.store import open_store
from stroke_tss.config import load_config, merge, validate
from stroke_tss.models.external import inflate_conv_weight
from stroke_tss.schedule import phase_model
from tests.test_data import make_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(state: dict, key: str, out: int, inp: int, k: int, *, dims: int = 2, bias: bool = False) -> None:
    state[f"{key}.weight"] = torch.randn(out, inp, *([k] * dims))
    if bias:
        state[f"{key}.bias"] = torch.randn(out)


def _bn(state: dict, key: str, channels: int) -> None:
    state.update({f"{key}.weight": torch.rand(channels) + 0.5, f"{key}.bias": torch.randn(channels),
                  f"{key}.running_mean": torch.randn(channels), f"{key}.running_var": torch.rand(channels) + 0.5,
                  f"{key}.num_batches_tracked": torch.tensor(1000)})


def torchvision_resnet18_state(width: int = 64) -> dict[str, torch.Tensor]:
    """torchvision.models.resnet18().state_dict()'s keys and shapes: basic blocks, 1x1 downsample, fc of 1000."""
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv1", width, 3, 7)
    _bn(state, "bn1", width)
    inp = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        out = width * mult
        for block in (0, 1):
            key, cin = f"layer{stage}.{block}", inp if block == 0 else out
            _conv(state, f"{key}.conv1", out, cin, 3)
            _bn(state, f"{key}.bn1", out)
            _conv(state, f"{key}.conv2", out, out, 3)
            _bn(state, f"{key}.bn2", out)
            if block == 0 and stage > 1:
                _conv(state, f"{key}.downsample.0", out, cin, 1)
                _bn(state, f"{key}.downsample.1", out)
        inp = out
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 8 * width), torch.randn(1000)
    return state


def genesis_chest_ct_state() -> dict[str, torch.Tensor]:
    """The released Genesis_Chest_CT.pt's U-Net (1 input channel, 64..512), encoder and a decoder key, as the
    official code saves it: under "state_dict", every key prefixed `module.` (DataParallel)."""
    state: dict[str, torch.Tensor] = {}
    inp = 1
    for depth in range(4):
        mid = 32 * 2**depth
        for i, (cin, cout) in enumerate(((inp, mid), (mid, 2 * mid))):
            _conv(state, f"down_tr{64 * 2**depth}.ops.{i}.conv1", cout, cin, 3, dims=3, bias=True)
            _bn(state, f"down_tr{64 * 2**depth}.ops.{i}.bn1", cout)
        inp = 2 * mid
    _conv(state, "out_tr.final_conv", 1, 64, 1, dims=3, bias=True)  # the decoder: ignored by encoder3d
    return {f"module.{k}": v for k, v in state.items()}


def commented_variant(config: str, name: str, weights: Path) -> dict:
    """The variant `name` as the config's comment offers it, its init file replaced by `weights`."""
    line = re.search(rf"^\s*# ({name}: \{{.*\}})\s*$", Path(config).read_text(), re.M)
    assert line, f"{config} no longer offers the commented variant {name}"
    variant = yaml.safe_load(line.group(1))[name]
    assert Path(variant["phases"]["lesion"]["init"]).name.endswith((".pth", ".pt"))
    variant["phases"]["lesion"]["init"] = str(weights)
    return variant


def lesion_model(config: str, name: str, weights: Path, store: Path, run: Path):
    cfg = load_config(config, [f"data.store={store}", f"run.dir={run}"])
    vcfg = validate(merge(cfg.model_dump(mode="json"), commented_variant(config, name, weights)), schema=type(cfg),
                    source=f"variant {name}")
    return phase_model(vcfg, vcfg.phases["lesion"], open_store(store), phase_dirs={}, run_dir=run, fold=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("init") / "store.zarr", num_subjects=8)


@pytest.mark.parametrize("name", ["2d_imagenet", "2d_medical"])
def test_tss2d_weight_rows_load_a_torchvision_resnet18_file(name, store, tmp_path):
    state = torchvision_resnet18_state()
    assert len(state) == 122  # torchvision's resnet18 state dict: 62 parameters, 60 norm buffers
    torch.save(state, tmp_path / "resnet18.pth")
    model = lesion_model("configs/tss2d.yaml", name, tmp_path / "resnet18.pth", store, tmp_path / "run")
    own = model.state_dict()
    landed = {k for k, v in state.items() if not k.startswith("fc.") and torch.equal(own[f"backbone.{k}"], v)}
    assert landed == set(state) - {"fc.weight", "fc.bias"}
    assert own["classifier.weight"].shape[0] == 1  # the 1000-class fc stayed out


def test_tss3d_weight_row_loads_the_released_models_genesis_layout(store, tmp_path):
    state = genesis_chest_ct_state()
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "Genesis_Chest_CT.pt")
    model = lesion_model("configs/tss3d.yaml", "3d_genesis_ct", tmp_path / "Genesis_Chest_CT.pt", store,
                         tmp_path / "run")
    own, encoder = model.state_dict(), {k[len("module."):]: v for k, v in state.items() if "down_tr" in k}
    first = "down_tr64.ops.0.conv1.weight"  # 1 CT channel inflated to the 3 MRI series
    assert torch.allclose(own[first], inflate_conv_weight(encoder[first], 3))
    assert all(torch.equal(own[k], v) for k, v in encoder.items() if k != first)
    assert not any(k.startswith("out_tr") for k in own)
