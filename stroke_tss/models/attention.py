"""Soft grid attention gate (Oktay et al. 2018 / Schlemper et al. 2019), 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stroke_tss.models.norm import make_norm

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_MODE = {2: "bilinear", 3: "trilinear"}


class GridAttentionGate(nn.Module):
    """Gate features `x` by a coarser gating signal `g`; returns (gated features, attention map on x's grid).

    theta(x) is a strided conv without bias; phi(g) is resampled onto theta's grid by interpolation (no
    assumption that g is exactly twice as coarse); psi gives a one-channel sigmoid map, resampled onto x,
    that multiplies x; a 1x1 conv + norm then mixes the gated channels, as in the reference implementation.
    """

    def __init__(self, in_channels: int, gating_channels: int, *, inter_channels: int | None = None,
                 spatial_dims: int = 2, sub_sample: int = 2, norm: str = "batch"):
        super().__init__()
        conv = _CONV[spatial_dims]
        inter = inter_channels or max(in_channels // 2, 1)
        self.spatial_dims = spatial_dims
        self.theta = conv(in_channels, inter, kernel_size=sub_sample, stride=sub_sample, bias=False)
        self.phi = conv(gating_channels, inter, kernel_size=1, bias=True)
        self.psi = conv(inter, 1, kernel_size=1, bias=True)
        self.out = nn.Sequential(conv(in_channels, in_channels, kernel_size=1),
                                 make_norm(norm, in_channels, spatial_dims=spatial_dims))

    def _resize(self, t: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if t.shape[2:] == size:
            return t
        return F.interpolate(t, size=size, mode=_MODE[self.spatial_dims], align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)
        phi_g = self._resize(self.phi(g), theta_x.shape[2:])
        attention = torch.sigmoid(self.psi(F.relu(theta_x + phi_g)))
        attention = self._resize(attention, x.shape[2:])
        return self.out(attention * x), attention
