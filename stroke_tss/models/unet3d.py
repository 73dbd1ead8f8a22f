"""The Models Genesis 3D U-Net (Zhou et al. 2019), with the official module names so its weights load as is.

Levels out_channels = base, 2 base, 4 base, 8 base (64/128/256/512 at paper width) with 3 poolings, so
every input side must be divisible by 8; one input channel by default; sigmoid reconstruction head.
Unlike the official `ContBatchNorm3d`, BatchNorm uses running statistics in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from stroke_tss.errors import UserError
from stroke_tss.models.norm import check_norm, make_norm


class LUConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, norm: str):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = make_norm(norm, out_channels, spatial_dims=3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _two_convs(in_channels: int, mid: int, out: int, *, norm: str) -> nn.Sequential:
    return nn.Sequential(LUConv(in_channels, mid, norm=norm), LUConv(mid, out, norm=norm))


class DownTransition(nn.Module):
    """Two convs (base/2 * 2^d -> base * 2^d channels), then max-pool except at the deepest level."""

    def __init__(self, in_channels: int, depth: int, *, base: int, norm: str):
        super().__init__()
        out = base * 2**depth
        self.ops = _two_convs(in_channels, out // 2, out, norm=norm)
        self.pool = depth < 3
        self.maxpool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before_pool = self.ops(x)
        return (self.maxpool(before_pool) if self.pool else before_pool), before_pool


class UpTransition(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, *, norm: str):
        super().__init__()
        out = skip_channels
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_convs(in_channels + skip_channels, out, out, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class Encoder3D(nn.Module):
    """The four down levels; forward returns the pre-pool features of every level (1/1 .. 1/8 scale)."""

    def __init__(self, *, in_channels: int, base_channels: int, norm: str):
        super().__init__()
        check_norm(norm)
        if base_channels < 2 or base_channels % 2:
            raise UserError(f"base_channels must be an even number >= 2, got {base_channels}")
        b = base_channels
        self.down_tr64 = DownTransition(in_channels, 0, base=b, norm=norm)
        self.down_tr128 = DownTransition(b, 1, base=b, norm=norm)
        self.down_tr256 = DownTransition(2 * b, 2, base=b, norm=norm)
        self.down_tr512 = DownTransition(4 * b, 3, base=b, norm=norm)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if any(side % 8 for side in x.shape[2:]):
            raise UserError(f"3D U-Net input sides must be divisible by 8 (3 poolings); got {tuple(x.shape[2:])}")
        features = []
        for level in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512):
            x, before_pool = level(x)
            features.append(before_pool)
        return features

    def encoder_prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"stem": ("down_tr64",), "block1": ("down_tr128",), "block2": ("down_tr256",),
                "block3": ("down_tr512",)}


class UNet3D(Encoder3D):
    """Models Genesis U-Net: (batch, in_channels, Z, Y, X) -> sigmoid reconstruction of the same shape."""

    model_name = "unet3d"

    def __init__(self, *, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 64,
                 norm: str = "batch"):
        super().__init__(in_channels=in_channels, base_channels=base_channels, norm=norm)
        out_channels = out_channels or in_channels
        self.init_args = {"in_channels": in_channels, "out_channels": out_channels,
                          "base_channels": base_channels, "norm": norm}
        b = base_channels
        self.up_tr256 = UpTransition(8 * b, 4 * b, norm=norm)
        self.up_tr128 = UpTransition(4 * b, 2 * b, norm=norm)
        self.up_tr64 = UpTransition(2 * b, b, norm=norm)
        self.out_tr = nn.Module()
        self.out_tr.final_conv = nn.Conv3d(b, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip64, skip128, skip256, deep = self.encode(x)
        x = self.up_tr256(deep, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        return torch.sigmoid(self.out_tr.final_conv(x))

    def group_prefixes(self) -> dict[str, tuple[str, ...]]:
        # The decoder restores the image, so it counts as the reconstruction head.
        return {**self.encoder_prefixes(), "head": ("up_tr256", "up_tr128", "up_tr64", "out_tr")}
