"""Loading weights made elsewhere into our models: torchvision ResNet-18, Models Genesis, our own unet3d.

Nothing downloads: every loader takes a file the user already has (or a state dict). When the first conv's
input channels differ (Genesis has 1, our classifiers 3; adjacent slices multiply them), its kernel is
inflated: repeated along the input-channel axis and divided by the repeat count, so a constant input
gives the same response as before.

Layouts that load (a raw state dict, or one under "state_dict" or "model"; `module.` prefixes dropped):
- `load_torchvision_resnet18` (slicewise2d, e.g. ImageNet's resnet18-f37072fd.pth): torchvision's ResNet-18
  keys, conv1.weight, bn1.*, layer1.0.conv1.weight ... layer4.1.bn2.*, layer{2,3,4}.0.downsample.{0,1}.*
  (fc.* is dropped); every backbone key must be there, at the model's width (base_channels 64 for torchvision's).
- `load_encoder_weights` (encoder3d, unet3d): the Models Genesis U-Net's keys, down_tr{64,128,256,512}.ops.{0,1}.
  {conv1,bn1}.* (the released Genesis_Chest_CT.pt, under "state_dict" with `module.`; or a weights.pt of our
  unet3d); up_tr*/out_tr* load only into unet3d. Other 3D networks (MedicalNet's ResNets) do not load.
A phase's `init: FILE` picks the loader by the model (configs/tss2d.yaml and tss3d.yaml show the variants).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from stroke_tss.errors import UserError
from stroke_tss.models.slicewise2d import SliceWise2D
from stroke_tss.models.unet3d import Encoder3D

StateSource = str | Path | Mapping[str, torch.Tensor]
GENESIS_FIRST_CONV = "down_tr64.ops.0.conv1.weight"


def inflate_conv_weight(weight: torch.Tensor, in_channels: int, *, key: str = "conv weight") -> torch.Tensor:
    """Repeat a conv kernel (out, in, ...) to `in_channels` inputs, divided by the repeat count."""
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if in_channels % have:
        raise UserError(f"{key}: cannot inflate {have} input channels to {in_channels} "
                         f"(not a multiple); build the model with a multiple of {have} input channels")
    repeats = in_channels // have
    return weight.repeat(1, repeats, *([1] * (weight.dim() - 2))) / repeats


def read_state_dict(source: StateSource) -> dict[str, torch.Tensor]:
    """A state dict from a mapping or a file: raw, {"state_dict": ...} (Genesis, our weights.pt) or
    {"model": ...}; DataParallel/DDP `module.` prefixes removed."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist; give the path of a .pt file you have")
        source = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(source.get(key), Mapping):
            source = source[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()
            if isinstance(v, torch.Tensor)}


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], *, keys: list[str], origin: str,
                   first_conv: str) -> list[str]:
    own = model.state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(f"{origin}: {len(missing)} expected keys missing, e.g. {missing[:3]}; "
                         "is this the right kind of weights file?")
    loaded = {}
    for key in keys:
        value = state[key]
        if key == first_conv:
            value = inflate_conv_weight(value, own[key].shape[1], key=f"{origin}: {key}")
        if value.shape != own[key].shape:
            raise UserError(f"{origin}: {key} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)}; build the model at the width the weights were made with")
        loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    return keys


def load_encoder_weights(model: nn.Module, source: StateSource) -> list[str]:
    """Load the Genesis U-Net encoder (ours from `unet3d`'s weights.pt, or the official Genesis_Chest_CT.pt)
    into `unet3d` or `encoder3d` by name; returns the loaded keys. A `unet3d` target also gets the decoder
    when the source has it."""
    if not isinstance(model, Encoder3D):
        raise UserError(f"encoder weights load into unet3d or encoder3d, not {type(model).__name__}")
    state = read_state_dict(source)
    encoder = [k for k in model.state_dict() if k.startswith("down_tr")]
    rest = [k for k in model.state_dict() if not k.startswith("down_tr") and k in state]
    keys = encoder + (rest if model.model_name == "unet3d" else [])
    return _load_matching(model, state, keys=keys, origin="encoder weights", first_conv=GENESIS_FIRST_CONV)


def load_torchvision_resnet18(model: nn.Module, source: StateSource) -> list[str]:
    """Load a file in torchvision's ResNet-18 key layout (conv1, bn1, layer1..4; fc dropped) into the
    backbone of `slicewise2d`; returns the loaded keys (prefixed `backbone.`)."""
    if not isinstance(model, SliceWise2D):
        raise UserError(f"ResNet-18 weights load into slicewise2d, not {type(model).__name__}")
    state = {f"backbone.{k}": v for k, v in read_state_dict(source).items() if not k.startswith("fc.")}
    keys = [k for k in model.state_dict() if k.startswith("backbone.")]
    return _load_matching(model, state, keys=keys, origin="torchvision ResNet-18 weights",
                          first_conv="backbone.conv1.weight")
