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

    `attention=False` leaves both gates out: their pooled features are zeros, so they add nothing to the logit
    and their parameters get no gradient (see slicewise2d and `stroke_tss.models.gates`).
    """

    model_name = "encoder3d"

    def __init__(self, *, in_channels: int = 3, base_channels: int = 64, norm: str = "batch",
                 dropout: float = 0.0, pool: str = "avg", attention: bool = True):
        check_pool(pool)
        super().__init__(in_channels=in_channels, base_channels=base_channels, norm=norm)
        self.init_args = {"in_channels": in_channels, "base_channels": base_channels, "norm": norm,
                          "dropout": dropout, "pool": pool, "attention": attention}
        b = base_channels
        self.gate128 = GridAttentionGate(2 * b, 8 * b, spatial_dims=3, norm=norm)
        self.gate256 = GridAttentionGate(4 * b, 8 * b, spatial_dims=3, norm=norm)
        self.pool = make_pool(pool, spatial_dims=3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(14 * b, 1)
        self.gated_columns = slice(0, 6 * b)  # the classifier's inputs from gate128 and gate256

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch,) and the attention maps {"gate128", "gate256"} (kept for explanations; none with
        attention off)."""
        _, f128, f256, deep = self.encode(x)
        pooled_deep = self.pool(deep).flatten(1)
        if not self.init_args["attention"]:
            gated = pooled_deep.new_zeros(pooled_deep.shape[0], self.gated_columns.stop)
            return self.classifier(self.dropout(torch.cat([gated, pooled_deep], 1))).squeeze(1), {}
        g128, a128 = self.gate128(f128, deep)
        g256, a256 = self.gate256(f256, deep)
        pooled = torch.cat([self.pool(g128).flatten(1), self.pool(g256).flatten(1), pooled_deep], 1)
        return self.classifier(self.dropout(pooled)).squeeze(1), {"gate128": a128, "gate256": a256}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(x)[0]

    def inactive_groups(self) -> tuple[str, ...]:
        """Groups that take no part in the forward pass (held frozen by `freeze`)."""
        return () if self.init_args["attention"] else ("attention",)

    def group_prefixes(self) -> dict[str, tuple[str, ...]]:
        return {**self.encoder_prefixes(), "attention": ("gate128", "gate256"), "head": ("classifier",)}
