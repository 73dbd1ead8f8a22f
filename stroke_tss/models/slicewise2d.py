"""Self-weighted slice-wise attention (the paper's 2D model) on a ResNet-18 backbone (MONAI, no torchvision).

Input: one hemisphere, (batch, channels, slices, H, W), any H, W >= 17 with the gate on stage 3 (224x112 gives 512x7x4 at stage 4).
Every slice goes through the backbone at once (slices folded into the batch, shared weights). A grid
attention gate on one stage, gated by the stage-4 output, and the stage-4 output itself are average-pooled
and concatenated into one logit per slice. Learnable per-slice weights in [0, 1] sum the slice logits.

Gate placement: the paper quotes a 256x28x14 attention map for a 224x112 input, which no standard ResNet-18
stage has (stage 2 = 128x28x14, stage 3 = 256x14x7). `gate_stage=3` (default) keeps the 256 channels, gated
by stage 4; `gate_stage=2` keeps the 28x14 grid with 128 channels. Slice weights are sigmoid-parametrised
(always inside [0, 1], gradient everywhere) and start at 1/num_slices, so the sum starts as a mean.

`pool="max"` takes each feature's maximum over the slice instead of its average: on a coarse grid (the 4 mm
demo, a few feature cells per slice) a lesion of a few voxels is averaged away, while its strongest response
survives a max (multiple-instance pooling). The paper's network averages.

`attention=False` runs the network without the gate: the gated branch's pooled features are zeros, so it
adds nothing to the logit and the gate's parameters get no gradient (`inactive_groups` keeps them frozen).
The parameters stay in the state dict, so the weights of a phase without the gate load into a phase with
it; see `stroke_tss.models.gates` for the paper's schedule (gates added in the last phase).

Beyond the paper: `seg_head=True` adds a small segmentation head (3x3 conv, ReLU, 1x1 conv) on stage
`seg_stage` (default 1: stride 4, the finest stage, 12x6 cells per 4 mm demo slice where stage 4 has 2x1),
giving a lesion logit per cell (`maps["lesion"]`, trained by the lesion_seg task against the mask pooled onto
that grid). `pool="lesion"` (needs the head) makes the onset head read where the lesion is: each slice's
feature cells (stage 4, the gated stage, and the seg stage itself, whose local features join the classifier)
are averaged with weights = the predicted lesion probability, and the slice logits are combined by each
slice's share of the predicted lesion mass instead of the learned slice weights (together: one lesion-weighted
mean over the hemisphere). The probabilities are detached: the onset loss cannot move where the head reads.
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets.resnet import ResNet
from torch import nn

from stroke_tss.errors import UserError
from stroke_tss.models.attention import GridAttentionGate
from stroke_tss.models.norm import check_norm, replace_norm
from stroke_tss.models.pool import LESION, POOLS, check_pool, lesion_pool, make_pool


def resnet18_backbone(*, in_channels: int, base_channels: int, norm: str) -> ResNet:
    """ResNet-18 (7x7/2 stem, max-pool, 4 basic stages) with torchvision's parameter names, no fc."""
    backbone = ResNet("basic", [2, 2, 2, 2], [base_channels * m for m in (1, 2, 4, 8)], spatial_dims=2,
                      n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False,
                      bias_downsample=False)
    return replace_norm(backbone, norm, spatial_dims=2)


def neighbour_stack(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, S, H, W) -> (B, S, (2k+1) C, H, W): each slice with k neighbours each side (edges repeat).

    Channel blocks run from slice s-k to s+k, so the slice itself is the middle block.
    """
    if k == 0:
        return x.transpose(1, 2)
    num_slices = x.shape[2]
    offsets = torch.arange(-k, k + 1, device=x.device)
    index = (torch.arange(num_slices, device=x.device)[:, None] + offsets).clamp_(0, num_slices - 1)
    stacked = x[:, :, index]  # (B, C, S, 2k+1, H, W)
    return stacked.permute(0, 2, 3, 1, 4, 5).flatten(2, 3)


class SliceWise2D(nn.Module):
    model_name = "slicewise2d"

    def __init__(self, *, num_slices: int, in_channels: int = 3, base_channels: int = 64, norm: str = "batch",
                 gate_stage: int = 3, adjacent_slices: int = 0, dropout: float = 0.0, pool: str = "avg",
                 attention: bool = True, seg_head: bool = False, seg_stage: int = 1):
        super().__init__()
        check_norm(norm)
        check_pool(pool, allowed=(*POOLS, LESION))
        if gate_stage not in (2, 3):
            raise UserError(f"gate_stage must be 2 or 3 (gated by stage 4), got {gate_stage}")
        if num_slices < 1 or adjacent_slices < 0:
            raise UserError(f"need num_slices >= 1 and adjacent_slices >= 0, got {num_slices}, {adjacent_slices}")
        if seg_stage not in (1, 2, 3, 4):
            raise UserError(f"seg_stage must be one of the backbone stages 1-4, got {seg_stage}")
        if pool == LESION and not seg_head:
            raise UserError("pool: lesion weights features by the predicted lesion map; set seg_head: true too")
        self.init_args = {"num_slices": num_slices, "in_channels": in_channels, "base_channels": base_channels,
                          "norm": norm, "gate_stage": gate_stage, "adjacent_slices": adjacent_slices,
                          "dropout": dropout, "pool": pool, "attention": attention, "seg_head": seg_head,
                          "seg_stage": seg_stage}
        b = base_channels
        self.backbone = resnet18_backbone(in_channels=in_channels * (2 * adjacent_slices + 1),
                                          base_channels=b, norm=norm)
        gated = b * 2 ** (gate_stage - 1)
        local = b * 2 ** (seg_stage - 1)
        self.gated_columns = slice(0, gated)  # the classifier's inputs from the gated branch
        self.gate = GridAttentionGate(gated, 8 * b, spatial_dims=2, norm=norm)
        if seg_head:
            self.seg_head = nn.Sequential(nn.Conv2d(local, local, 3, padding=1), nn.ReLU(inplace=True),
                                          nn.Conv2d(local, 1, 1))
        self.pool = None if pool == LESION else make_pool(pool, spatial_dims=2)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(gated + 8 * b + (local if pool == LESION else 0), 1)
        self.slice_weights = nn.Parameter(torch.full((num_slices,), -math.log(max(num_slices - 1, 1e-6))))

    @property
    def slice_weight_values(self) -> torch.Tensor:
        """The per-slice weights, each in [0, 1]."""
        return torch.sigmoid(self.slice_weights)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb = self.backbone
        x = bb.maxpool(bb.act(bb.bn1(bb.conv1(x))))
        out = []
        for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch,) plus {"attention": (B, S, h, w) gate map (absent with attention off),
        "lesion": (B, S, h, w) lesion logits on the seg stage's grid (with seg_head), "slice_logits": (B, S)}."""
        batch, _, num_slices, height, width = x.shape
        if num_slices != self.slice_weights.numel():
            raise UserError(f"input has {num_slices} slices but the model was built with "
                             f"num_slices={self.slice_weights.numel()}; rebuild with the store's slice count")
        # the gate's 2x2 stride-2 theta needs a 2x2 map at the gated stage, which is the input / 2**(stage+1)
        smallest = 2 ** (self.init_args["gate_stage"] + 1) + 1
        if min(height, width) < smallest:
            raise UserError(f"slices must be at least {smallest}x{smallest} for an attention gate on stage "
                             f"{self.init_args['gate_stage']}, got {height}x{width}")
        slices = neighbour_stack(x, self.init_args["adjacent_slices"]).flatten(0, 1)
        features = self.stages(slices)
        maps, weights = {}, None
        if self.init_args["seg_head"]:
            lesion = self.seg_head(features[self.init_args["seg_stage"] - 1])
            maps["lesion"] = lesion.view(batch, num_slices, *lesion.shape[2:])
            if self.pool is None:
                weights = torch.sigmoid(lesion.detach().float()).to(lesion.dtype)

        def pool(f: torch.Tensor) -> torch.Tensor:
            return self.pool(f).flatten(1) if weights is None else lesion_pool(f, weights)

        parts = [pool(features[3])]
        if self.init_args["attention"]:
            gated, attention = self.gate(features[self.init_args["gate_stage"] - 1], features[3])
            maps["attention"] = attention.view(batch, num_slices, *attention.shape[2:])
            parts.insert(0, pool(gated))
        else:
            parts.insert(0, parts[0].new_zeros(parts[0].shape[0], self.gated_columns.stop))
        if weights is not None:
            parts.append(pool(features[self.init_args["seg_stage"] - 1]))
        slice_logits = self.classifier(self.dropout(torch.cat(parts, 1))).view(batch, num_slices)
        logits = (slice_logits * self.slice_combination(weights, batch, num_slices)).sum(1)
        return logits, {**maps, "slice_logits": slice_logits}

    def slice_combination(self, weights: torch.Tensor | None, batch: int, num_slices: int) -> torch.Tensor:
        """(B, S) factors of the slice logits: the learned slice weights, or under lesion pooling each slice's
        share of the hemisphere's predicted lesion mass."""
        if weights is None:
            return self.slice_weight_values.expand(batch, num_slices)
        mass = weights.sum((1, 2, 3)).view(batch, num_slices)
        return mass / mass.sum(1, keepdim=True).clamp_min(1e-6)

    def forward(self, x: torch.Tensor, *, with_lesion: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch,); with_lesion: also the lesion logits (B, S, h, w), through the same call so a DDP or
        DeepSpeed wrapper sees the forward pass that the segmentation loss back-propagates through."""
        logits, maps = self.forward_with_maps(x)
        return (logits, maps["lesion"]) if with_lesion else logits

    def inactive_groups(self) -> tuple[str, ...]:
        """Groups that take no part in the forward pass (held frozen by `freeze`)."""
        off = () if self.init_args["attention"] else ("attention",)
        return off + (("slice_weights",) if self.init_args["pool"] == LESION else ())

    def group_prefixes(self) -> dict[str, tuple[str, ...]]:
        stages = {f"block{i}": (f"backbone.layer{i}",) for i in range(1, 5)}
        return {"stem": ("backbone.conv1", "backbone.bn1"), **stages, "seg_head": ("seg_head",), "attention": ("gate",),
                "slice_weights": ("slice_weights",), "head": ("classifier",)}
