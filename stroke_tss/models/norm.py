"""Normalisation layers by name, swapping them in built networks, and SyncBatchNorm for DDP on CUDA."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from stroke_tss.errors import UserError

NORMS = ("batch", "group", "instance")
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise UserError(f"norm {norm!r} is not one of {', '.join(NORMS)}; pick one of them")
    return norm


def _num_groups(channels: int) -> int:
    # Up to 8 groups (GroupNorm's usual choice for narrow 3D nets); must divide the channel count.
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, channels: int, *, spatial_dims: int) -> nn.Module:
    """A normalisation layer for `channels` feature maps of a 2D or 3D network."""
    check_norm(norm)
    if norm == "batch":
        return _BATCH[spatial_dims](channels)
    if norm == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    # Affine so that every norm kind carries the same learnable scale and shift.
    return _INSTANCE[spatial_dims](channels, affine=True)


def replace_norm(module: nn.Module, norm: str, *, spatial_dims: int) -> nn.Module:
    """Replace every BatchNorm of `module` by `norm` in place (MONAI's ResNet ignores `norm` in its layers)."""
    check_norm(norm)
    if norm == "batch":
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, make_norm(norm, child.num_features, spatial_dims=spatial_dims))
        else:
            replace_norm(child, norm, spatial_dims=spatial_dims)
    return module


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm under DDP on CUDA; the model unchanged on CPU or without a process group."""
    if not (torch.cuda.is_available() and dist.is_available() and dist.is_initialized()):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
