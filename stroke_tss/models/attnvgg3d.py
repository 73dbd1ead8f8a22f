"""VGG-like 3D CNN with "Learn to Pay Attention" (Jetley et al. 2018) at three scales, for 90-day outcome.

Stages: stem (b) -> pool -> block1 (2b) -> pool -> block2 (4b) -> pool -> block3 (8b) -> pool -> block4 (8b);
the global vector g is block4's output, average-pooled and passed through one linear layer. Attention reads
the local features of block2, block3 and block4: compatibility c = 1x1 conv(l + P g), P projecting g onto
l's channels; softmax over space (attended vector = sum a*l) or sigmoid (attended vector = mean a*l).
The three attended vectors are concatenated -> one logit. `LIGHT_VARIANTS` are the 8 light-weight
ensemble members (width x depth x normalisation); their exact table is not in the paper's text, this grid
is ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stroke_tss.errors import UserError
from stroke_tss.models.norm import check_norm, make_norm

LIGHT_VARIANTS = tuple(
    {"base_channels": width, "convs_per_stage": depth, "attention_norm": attn}
    for width in (8, 16) for depth in (1, 2) for attn in ("softmax", "sigmoid")
)


def _stage(in_channels: int, out_channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                   make_norm(norm, out_channels, spatial_dims=3), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class LinearAttention(nn.Module):
    """Jetley's parametrised compatibility between local features and the projected global vector."""

    def __init__(self, local_channels: int, global_channels: int, *, normalisation: str):
        super().__init__()
        self.project = nn.Linear(global_channels, local_channels, bias=False)
        self.score = nn.Conv3d(local_channels, 1, kernel_size=1, bias=False)
        self.normalisation = normalisation

    def forward(self, local: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        compat = self.score(local + self.project(g)[:, :, None, None, None])
        if self.normalisation == "softmax":
            attention = F.softmax(compat.flatten(2), dim=2).view_as(compat)
            return (attention * local).flatten(2).sum(2), attention
        attention = torch.sigmoid(compat)
        return (attention * local).flatten(2).mean(2), attention


class AttnVGG3D(nn.Module):
    """(batch, in_channels, Z, Y, X) -> one logit per sample; any side >= 16 (4 poolings, ceil mode)."""

    model_name = "attnvgg3d"

    def __init__(self, *, in_channels: int = 1, base_channels: int = 16, convs_per_stage: int = 2,
                 attention_norm: str = "softmax", norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        check_norm(norm)
        if attention_norm not in ("softmax", "sigmoid"):
            raise UserError(f"attention_norm must be softmax or sigmoid, got {attention_norm!r}")
        self.init_args = {"in_channels": in_channels, "base_channels": base_channels,
                          "convs_per_stage": convs_per_stage, "attention_norm": attention_norm, "norm": norm,
                          "dropout": dropout}
        b, n = base_channels, convs_per_stage
        self.stem = _stage(in_channels, b, n, norm)
        self.block1 = _stage(b, 2 * b, n, norm)
        self.block2 = _stage(2 * b, 4 * b, n, norm)
        self.block3 = _stage(4 * b, 8 * b, n, norm)
        self.block4 = _stage(8 * b, 8 * b, n, norm)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.global_fc = nn.Linear(8 * b, 8 * b)
        self.attend = nn.ModuleList(LinearAttention(c, 8 * b, normalisation=attention_norm)
                                    for c in (4 * b, 8 * b, 8 * b))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(20 * b, 1)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch,) and the three attention maps {"attention1".."attention3"}."""
        if min(x.shape[2:]) < 16:
            raise UserError(f"attnvgg3d needs every input side >= 16 (4 poolings), got {tuple(x.shape[2:])}")
        x = self.pool(self.block1(self.pool(self.stem(x))))
        l1 = self.block2(x)
        l2 = self.block3(self.pool(l1))
        l3 = self.block4(self.pool(l2))
        g = F.relu(self.global_fc(l3.mean(dim=(2, 3, 4))))
        vectors, maps = [], {}
        for i, (att, local) in enumerate(zip(self.attend, (l1, l2, l3)), start=1):
            vec, maps[f"attention{i}"] = att(local, g)
            vectors.append(vec)
        return self.classifier(self.dropout(torch.cat(vectors, 1))).squeeze(1), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(x)[0]

    def group_prefixes(self) -> dict[str, tuple[str, ...]]:
        blocks = {f"block{i}": (f"block{i}",) for i in range(1, 5)}
        return {"stem": ("stem",), **blocks, "attention": ("attend",), "head": ("global_fc", "classifier")}
