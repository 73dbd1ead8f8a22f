"""Global pooling of classifier features by name: the paper's average, or max (multiple-instance pooling)."""

from __future__ import annotations

from torch import nn

from stroke_tss.errors import UserError

POOLS = ("avg", "max")
_LAYERS = {("avg", 2): nn.AdaptiveAvgPool2d, ("avg", 3): nn.AdaptiveAvgPool3d,
           ("max", 2): nn.AdaptiveMaxPool2d, ("max", 3): nn.AdaptiveMaxPool3d}


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UserError(f"pool {pool!r} is not one of {', '.join(POOLS)}; pick one of them")
    return pool


def make_pool(pool: str, *, spatial_dims: int) -> nn.Module:
    """Global (output size 1) average or max pooling over a 2D or 3D feature map."""
    return _LAYERS[check_pool(pool), spatial_dims](1)
