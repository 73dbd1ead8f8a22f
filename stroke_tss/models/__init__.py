"""The networks of the method, built by name: `build_model(name, **options)`.

Every model keeps `model.model_name` and `model.init_args` (all options, defaults resolved), so a
weights.pt holding {"model": name, "init_args": ..., "state_dict": ...} rebuilds it with
`build_model(name, **init_args)`. Classifiers return one logit per sample, shape (batch,), and offer
`forward_with_maps(x)` for their attention maps; `unet3d` returns the reconstruction.
"""

from __future__ import annotations

import inspect

from torch import nn

from stroke_tss.errors import UserError
from stroke_tss.models.attnvgg3d import LIGHT_VARIANTS, AttnVGG3D
from stroke_tss.models.encoder3d import AttentionEncoder3D
from stroke_tss.models.groups import GROUP_NAMES, backbone_groups, freeze, param_groups, reinit, train_only
from stroke_tss.models.norm import NORMS, convert_sync_batchnorm
from stroke_tss.models.slicewise2d import SliceWise2D
from stroke_tss.models.unet3d import UNet3D

_REGISTRY: dict[str, type[nn.Module]] = {
    "slicewise2d": SliceWise2D,
    "unet3d": UNet3D,
    "encoder3d": AttentionEncoder3D,
    "attnvgg3d": AttnVGG3D,
}
MODEL_NAMES = tuple(_REGISTRY)


def model_options(name: str) -> dict[str, object]:
    """{option: default} for a model name (inspect.Parameter.empty where the option is required)."""
    _check_name(name)
    params = inspect.signature(_REGISTRY[name].__init__).parameters
    return {p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, **options) -> nn.Module:
    """Build model `name` with keyword options; an unknown or missing option is a ValueError naming it."""
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"model {name!r} has no option(s) {unknown}; its options are {', '.join(known)}")
    missing = [k for k, v in known.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise UserError(f"model {name!r} needs option(s) {missing} (e.g. num_slices = the store's slice count)")
    return _REGISTRY[name](**options)


__all__ = ["GROUP_NAMES", "LIGHT_VARIANTS", "MODEL_NAMES", "NORMS", "backbone_groups", "build_model",
           "convert_sync_batchnorm", "freeze", "model_options", "param_groups", "reinit", "train_only"]
