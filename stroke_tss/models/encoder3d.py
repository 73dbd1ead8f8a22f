"""The 3D classifier of the paper: the Genesis U-Net encoder, gates on its 2b- and 4b-channel outputs."""

from __future__ import annotations

import torch
from torch import nn

from stroke_tss.models.attention import GridAttentionGate
from stroke_tss.models.pool import check_pool, make_pool
from stroke_tss.models.unet3d import Encoder3D


class AttentionEncoder3D(Encoder3D):
    """(batch, in_channels, Z, Y, X) -> one logit per sample.

    Levels 1 and 2 (128 and 256 channels at paper width) are gated by the deepest (512) level; the two gated
    maps and the deepest map are average-pooled (max-pooled with `pool="max"`, see slicewise2d), concatenated
    and classified by one linear layer. Module names match `unet3d`, so its encoder weights load by name (see
    `external.load_encoder_weights`).
    """

    model_name = "encoder3d"

    def __init__(self, *, in_channels: int = 3, base_channels: int = 64, norm: str = "batch",
                 dropout: float = 0.0, pool: str = "avg"):
        check_pool(pool)
        super().__init__(in_channels=in_channels, base_channels=base_channels, norm=norm)
        self.init_args = {"in_channels": in_channels, "base_channels": base_channels, "norm": norm,
                          "dropout": dropout, "pool": pool}
        b = base_channels
        self.gate128 = GridAttentionGate(2 * b, 8 * b, spatial_dims=3, norm=norm)
        self.gate256 = GridAttentionGate(4 * b, 8 * b, spatial_dims=3, norm=norm)
        self.pool = make_pool(pool, spatial_dims=3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(14 * b, 1)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch,) and the attention maps {"gate128", "gate256"} (kept for explanations)."""
        _, f128, f256, deep = self.encode(x)
        g128, a128 = self.gate128(f128, deep)
        g256, a256 = self.gate256(f256, deep)
        pooled = torch.cat([self.pool(t).flatten(1) for t in (g128, g256, deep)], 1)
        return self.classifier(self.dropout(pooled)).squeeze(1), {"gate128": a128, "gate256": a256}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(x)[0]

    def group_prefixes(self) -> dict[str, tuple[str, ...]]:
        return {**self.encoder_prefixes(), "attention": ("gate128", "gate256"), "head": ("classifier",)}
