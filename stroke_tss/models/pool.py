"""Global pooling of classifier features by name: the paper's average, max (multiple-instance pooling), or
lesion-weighted (each cell weighted by the predicted lesion probability, `lesion_pool`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stroke_tss.errors import UserError

POOLS = ("avg", "max")
LESION = "lesion"
"""Pooling by a lesion map: only models with a segmentation head offer it (slicewise2d with seg_head)."""
_LAYERS = {("avg", 2): nn.AdaptiveAvgPool2d, ("avg", 3): nn.AdaptiveAvgPool3d,
           ("max", 2): nn.AdaptiveMaxPool2d, ("max", 3): nn.AdaptiveMaxPool3d}


def check_pool(pool: str, *, allowed: tuple[str, ...] = POOLS) -> str:
    if pool not in allowed:
        raise UserError(f"pool {pool!r} is not one of {', '.join(allowed)}; pick one of them")
    return pool


def make_pool(pool: str, *, spatial_dims: int) -> nn.Module:
    """Global (output size 1) average or max pooling over a 2D or 3D feature map."""
    return _LAYERS[check_pool(pool), spatial_dims](1)


def lesion_pool(features: torch.Tensor, weights: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(N, C, h, w) features -> (N, C): their mean weighted by ``weights`` (N, 1, H, W), non-negative lesion
    probabilities on any grid, brought onto the features' grid by area averaging (so a coarse cell weighs
    the lesion mass it covers) and normalised to sum 1 per map."""
    if weights.shape[2:] != features.shape[2:]:
        weights = F.adaptive_avg_pool2d(weights, features.shape[2:])
    weights = weights / weights.sum((2, 3), keepdim=True).clamp_min(eps)
    return (features * weights).sum((2, 3))
