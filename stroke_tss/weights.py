"""weights.pt: the engine-neutral weights of a phase and the model's init args (what later phases, predict,
explain and adapt read; engine checkpoints for resuming are hpc.checkpoint's)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stroke_tss.errors import UserError


def save_weights(path: str | Path, model: nn.Module, state_dict: dict[str, torch.Tensor], **extra) -> Path:
    """weights.pt: {"model", "init_args", "state_dict", ...}; rebuild with build_model(model, **init_args)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.model_name, "init_args": dict(model.init_args), "state_dict": state_dict, **extra},
               tmp)
    tmp.replace(path)  # a crash never leaves a half-written weights.pt for the next phase
    return path


def load_weights(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: run the phase that writes it first")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # torch reports a truncated zip as a RuntimeError
        raise UserError(f"weights file {path} is unreadable ({exc}); delete it and re-run its phase") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise UserError(f"{path} is not a stroke-tss weights.pt (no 'state_dict'); pass a weights.pt of a phase")
    return data
