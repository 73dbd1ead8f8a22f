"""The networks: shapes, registry, parameter groups and freezing, slice weights, weight loading."""

from __future__ import annotations

import pytest
import torch

from stroke_tss.models import (
    GROUP_NAMES,
    MODEL_NAMES,
    backbone_groups,
    build_model,
    convert_sync_batchnorm,
    freeze,
    param_groups,
    reinit,
    train_only,
)
from stroke_tss.models.attention import GridAttentionGate
from stroke_tss.models.external import inflate_conv_weight, load_encoder_weights, load_torchvision_resnet18
from stroke_tss.models.slicewise2d import neighbour_stack

NARROW = {"slicewise2d": {"num_slices": 3, "base_channels": 4}, "unet3d": {"base_channels": 4},
          "encoder3d": {"base_channels": 4}, "attnvgg3d": {"base_channels": 4, "convs_per_stage": 1}}
INPUTS = {"slicewise2d": (3, 3, 40, 32), "unet3d": (1, 16, 24, 32), "encoder3d": (3, 16, 24, 32),
          "attnvgg3d": (1, 16, 24, 20)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_builds_every_name_and_rejects_unknown_options():
    for name in MODEL_NAMES:
        model = build_model(name, **NARROW[name])
        assert model.model_name == name
        rebuilt = build_model(name, **model.init_args)
        assert rebuilt.init_args == model.init_args
        assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="no option.*base_width"):
        build_model("unet3d", base_width=8)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="num_slices"):
        build_model("slicewise2d")


@pytest.mark.parametrize("name", ["slicewise2d", "encoder3d"])
def test_max_pool_option_takes_each_features_maximum(name):
    model = build_model(name, **NARROW[name], pool="max").eval()
    assert build_model(name, **model.init_args).init_args["pool"] == "max"
    seen = []
    model.pool.register_forward_hook(lambda _m, inputs, output: seen.append((inputs[0], output)) and None)
    with torch.no_grad():
        model(torch.rand(2, *INPUTS[name]))
    assert seen
    for features, pooled in seen:
        assert torch.equal(pooled.flatten(1), features.flatten(2).amax(2))
    with pytest.raises(ValueError, match="pool 'sum' is not one of avg, max"):
        build_model(name, **NARROW[name], pool="sum")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_at_two_sizes(name):
    model = build_model(name, **NARROW[name]).eval()
    c, *spatial = INPUTS[name]
    for scale in (1, 2):
        size = [s * scale for s in spatial]
        if name == "slicewise2d":
            size[0] = spatial[0]  # the slice count is fixed at build time
        x = torch.rand(2, c, *size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (x.shape if name == "unet3d" else (2,))
    if name == "unet3d":
        assert 0 <= out.min() and out.max() <= 1


def test_slicewise2d_paper_size_gives_512x7x4_last_stage():
    model = build_model("slicewise2d", num_slices=2, base_channels=64).eval()
    narrow = build_model("slicewise2d", num_slices=2, base_channels=4).eval()
    with torch.no_grad():
        stages = model.stages(torch.rand(1, 3, 224, 112))
        logits, maps = narrow.forward_with_maps(torch.rand(1, 3, 2, 224, 112))
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 56, 28), (128, 28, 14), (256, 14, 7), (512, 7, 4)]
    assert logits.shape == (1,) and maps["slice_logits"].shape == (1, 2)
    assert maps["attention"].shape == (1, 2, 14, 7)  # default gate: stage 3, gated by stage 4


def test_slicewise2d_rejects_wrong_slice_count():
    model = build_model("slicewise2d", num_slices=4, base_channels=4)
    with pytest.raises(ValueError, match="num_slices=4"):
        model(torch.rand(1, 3, 3, 32, 32))


def test_adjacent_slices_stack_neighbours_and_repeat_edges():
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 2, 4, 1, 1)  # slice s has value s, 2 channels
    stacked = neighbour_stack(x, 1)  # (B, S, 3 * C, 1, 1)
    assert stacked.shape == (1, 4, 6, 1, 1)
    assert stacked[0, :, :, 0, 0].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3],
                                               [2, 2, 3, 3, 3, 3]]
    model = build_model("slicewise2d", num_slices=4, base_channels=4, in_channels=2, adjacent_slices=1)
    assert model.backbone.conv1.in_channels == 6
    assert model(torch.rand(2, 2, 4, 32, 32)).shape == (2,)


def test_slice_weights_stay_in_unit_interval_under_training():
    model = build_model("slicewise2d", num_slices=3, base_channels=4)
    assert torch.allclose(model.slice_weight_values, torch.full((3,), 1 / 3))
    opt = torch.optim.SGD([model.slice_weights], lr=100.0)
    for sign in (1.0, -1.0):
        for _ in range(2):
            opt.zero_grad()
            (sign * model(torch.rand(2, 3, 3, 32, 32)).sum()).backward()
            opt.step()
        w = model.slice_weight_values
        assert ((w >= 0) & (w <= 1)).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_groups_cover_every_parameter_once_in_order(name):
    model = build_model(name, **NARROW[name])
    groups = param_groups(model)
    assert tuple(groups) == GROUP_NAMES
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert backbone_groups(model)[:2] == ["stem", "block1"]


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "unet3d"])
def test_reinit_draws_exactly_the_named_groups_afresh(name):
    model = build_model(name, **NARROW[name])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # a trained model's values, far from any initialisation
    reinit(model, ["head"])
    for group, params in param_groups(model).items():
        fresh = [p for p in params if not torch.all(p == 0.5)]
        assert len(fresh) == (len(params) if group == "head" else 0), group


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_freezing_a_group_leaves_exactly_it_unchanged(name):
    model = build_model(name, **NARROW[name])
    frozen = ["stem", "block1"]
    freeze(model, frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.rand(2, *INPUTS[name])
    loss = model(x).float().pow(2).mean() if name == "unet3d" else model(x).sum()
    loss.backward()
    opt.step()
    model(x)  # a second train-mode forward: running statistics of frozen norms must hold still too
    after = model.state_dict()
    prefixes = model.group_prefixes()
    for group, params in param_groups(model).items():
        names = [k for k in after if any(k.startswith(p + ".") or k == p for p in prefixes.get(group, ()))]
        changed = [k for k in names if not torch.equal(before[k], after[k]) and "num_batches" not in k]
        if group in frozen:
            assert not changed, f"{group} changed: {changed}"
        elif params:
            assert changed, f"trainable group {group} did not change"
    train_only(model, ["head"])
    assert all(p.requires_grad == (g == "head") for g, ps in param_groups(model).items() for p in ps)
    with pytest.raises(ValueError, match="unknown parameter group"):
        freeze(model, ["block9"])


def test_attention_gate_resamples_any_ratio_and_returns_map():
    gate = GridAttentionGate(6, 10, spatial_dims=3, norm="group")
    x, g = torch.rand(2, 6, 12, 10, 8), torch.rand(2, 10, 2, 3, 3)  # not a x2 ratio
    out, attention = gate(x, g)
    assert out.shape == x.shape and attention.shape == (2, 1, 12, 10, 8)
    assert 0 <= attention.min() and attention.max() <= 1


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_norm_option_replaces_batchnorm(norm):
    model = build_model("slicewise2d", num_slices=2, base_channels=8, norm=norm)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.rand(1, 3, 2, 64, 64)).shape == (1,)
    assert convert_sync_batchnorm(model) is model  # CPU: unchanged


def test_unet3d_rejects_sides_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("unet3d", base_channels=4)(torch.rand(1, 1, 16, 16, 12))


def test_unet3d_eval_uses_running_statistics():
    model = build_model("unet3d", base_channels=4).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():  # per-sample output must not depend on the rest of the batch in eval
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)


def test_encoder_loads_unet3d_checkpoint_with_channel_inflation(tmp_path):
    unet = build_model("unet3d", base_channels=4, in_channels=1)
    path = tmp_path / "weights.pt"
    torch.save({"model": "unet3d", "init_args": unet.init_args, "state_dict": unet.state_dict()}, path)
    encoder = build_model("encoder3d", base_channels=4, in_channels=3)
    keys = load_encoder_weights(encoder, path)
    assert keys and all(k.startswith("down_tr") for k in keys)
    source, target = unet.state_dict(), encoder.state_dict()
    first = "down_tr64.ops.0.conv1.weight"
    assert torch.allclose(target[first], source[first].repeat(1, 3, 1, 1, 1) / 3)
    assert all(torch.equal(target[k], source[k]) for k in keys if k != first)
    # Inflation keeps the response to a constant input: 3 equal channels == the 1-channel original.
    one = torch.rand(1, 1, 8, 8, 8)
    conv1 = torch.nn.functional.conv3d
    assert torch.allclose(conv1(one, source[first]), conv1(one.expand(1, 3, 8, 8, 8), target[first]), atol=1e-6)
    wrong_width = build_model("encoder3d", base_channels=8)
    with pytest.raises(ValueError, match="width"):
        load_encoder_weights(wrong_width, path)


def test_official_genesis_layout_loads_into_unet3d_and_encoder(tmp_path):
    official = build_model("unet3d", base_channels=4)
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, path)
    unet = build_model("unet3d", base_channels=4)
    keys = load_encoder_weights(unet, path)
    assert set(keys) == set(official.state_dict())
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(unet.eval()(x), official.eval()(x))
    encoder = build_model("encoder3d", base_channels=4, in_channels=3)
    assert all(k.startswith("down_tr") for k in load_encoder_weights(encoder, path))


def test_torchvision_resnet18_layout_loads_into_slicewise2d(tmp_path):
    reference = build_model("slicewise2d", num_slices=1, base_channels=4).backbone
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 32), torch.zeros(1000)  # torchvision's head
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model("slicewise2d", num_slices=2, base_channels=4, adjacent_slices=1)
    keys = load_torchvision_resnet18(model, path)
    assert len(keys) == len(reference.state_dict())
    own = model.state_dict()
    assert torch.allclose(own["backbone.conv1.weight"], inflate_conv_weight(state["conv1.weight"], 9))
    assert torch.equal(own["backbone.layer4.1.bn2.weight"], state["layer4.1.bn2.weight"])
    with pytest.raises(ValueError, match="not a multiple"):
        inflate_conv_weight(state["conv1.weight"], 4)


def test_the_segmentation_head_is_a_group_of_its_own_and_its_options_rebuild_the_model():
    """seg_head, seg_stage and pool: lesion are init_args (weights.pt rebuilds the same network), and the head's
    parameters form the seg_head group that phases freeze or train."""
    model = build_model("slicewise2d", num_slices=3, base_channels=4, seg_head=True, seg_stage=2, pool="lesion")
    groups = param_groups(model)
    assert groups["seg_head"] and {id(p) for p in groups["seg_head"]} == {id(p) for p in model.seg_head.parameters()}
    again = build_model("slicewise2d", **model.init_args)
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 3, 32, 32)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    assert model(x, with_lesion=True)[1].shape == (1, 3, 4, 4)  # stage 2 of 32x32: stride 8
    assert not param_groups(build_model("slicewise2d", num_slices=3, base_channels=4))["seg_head"]
