"""Attention gates switched on or off per phase (phases.NAME.attention).

The paper trains detection and the two onset phases, then adds the soft attention and fine-tunes it in the
last phase, reporting the gain of that phase. `slicewise2d` and `encoder3d` take an `attention` option: off,
the gated branch feeds zeros to the classifier, so it adds nothing to the logit and the gate parameters get
no gradient; their tensors stay in the state dict, so weights pass between phases either way. The option is
part of `init_args`, so a weights.pt made with the gates off is rebuilt with them off by predict and explain.

When a phase turns the gates on after a phase without them, the classifier's weights that read the gated
branch are set to zero: they never learned anything (their inputs were zeros), and random values there would
add noise to a trained predictor. From zero the phase starts with exactly the earlier phase's logits; the
first step moves those weights (their gradient is the gated features), and from then on the gates learn too.
So the phase must train the head as well as the attention group (`train_only: [attention, head, ...]`).
"""

from __future__ import annotations

import torch
from torch import nn

from stroke_tss.errors import UserError


def has_gates(model: nn.Module) -> bool:
    """Whether the model's attention can be switched (slicewise2d, encoder3d)."""
    return hasattr(model, "gated_columns")


def set_attention(model: nn.Module, on: bool, *, where: str) -> None:
    """Switch a built model's gates; `init_args` follows, so its weights.pt rebuilds the same network."""
    if not has_gates(model):
        if on:
            return  # nothing to switch: attnvgg3d's attention is its only path to the classifier
        raise UserError(f"{where}: attention: false, but model {model.model_name!r} has no attention gates to "
                        "switch off; remove the key (slicewise2d and encoder3d have them)")
    model.init_args["attention"] = bool(on)


def open_gates(model: nn.Module) -> None:
    """Zero the classifier's weights on the gated branch, so turning the gates on keeps the logits unchanged."""
    with torch.no_grad():
        model.classifier.weight[:, model.gated_columns] = 0.0


def attention_on(model_options: dict, phase_attention: bool | None) -> bool:
    """A phase's effective setting: its own `attention`, else the model option (default on)."""
    return bool(model_options.get("attention", True)) if phase_attention is None else phase_attention
