"""weights.pt: the engine-neutral weights of a phase and the model's init args (what later phases, predict,
explain and adapt read; engine checkpoints for resuming are hpc.checkpoint's).

Each file carries ``sha256``, the digest of its content (model name, init args, tensors and extras) taken
before it was written; `load_weights` recomputes it, so a flipped byte never loads silently. Files written
before digests existed load with a warning that they cannot be verified.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from hpc.checkpoint import safe_load, state_digest
from stroke_tss.errors import UserError

log = logging.getLogger(__name__)

_DIGEST = "sha256"
_FIX = "re-run the phase that wrote it (delete the file first), or pass a weights.pt of a phase"


def save_weights(path: str | Path, model: nn.Module, state_dict: dict[str, torch.Tensor], **extra) -> Path:
    """weights.pt: {"model", "init_args", "state_dict", ..., "sha256"}; rebuild with build_model(model, **init_args)."""
    path = Path(path)
    blob = {"model": model.model_name, "init_args": dict(model.init_args), "state_dict": state_dict, **extra}
    blob[_DIGEST] = state_digest(blob)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # a crash never leaves a half-written weights.pt for the next phase
    return path


def load_weights(path: str | Path) -> dict:
    """A weights.pt, checked: tensors and plain values only, and its content matching its recorded digest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: run the phase that writes it first")
    return check_weights(safe_load(path, map_location="cpu", fix=_FIX), path)


def check_weights(data: object, path: str | Path) -> dict:
    """``data`` (what `safe_load` read from ``path``) as a weights.pt whose content matches its digest."""
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise UserError(f"{path} is not a stroke-tss weights.pt (no 'state_dict'); pass a weights.pt of a phase")
    recorded = data.get(_DIGEST)
    if recorded is None:
        log.warning("%s records no digest (written by an older version): it cannot be verified", path)
    elif state_digest({k: v for k, v in data.items() if k != _DIGEST}) != recorded:
        raise UserError(f"weights file {path} does not match the digest recorded when it was written (damaged); "
                        f"{_FIX}")
    return data


def fit_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | Path,
                made_for: str | None = None) -> None:
    """Load ``state_dict`` into ``model``, or one line saying why the weights are not this model's."""
    own = model.state_dict()
    name = getattr(model, "model_name", type(model).__name__)
    if made_for is not None and made_for != name:
        raise UserError(f"{source} holds weights of model {made_for!r}, not {name!r}; pass weights of a phase "
                        f"that trained {name}")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise UserError(f"{source} does not fit model {name!r}: {len(missing)} of its keys missing (e.g. "
                        f"{missing[:2]}), {len(unexpected)} unknown (e.g. {unexpected[:2]}); pass weights of the "
                        "same model and options")
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: {key} has shape {tuple(state_dict[key].shape)} but model {name!r} expects "
                            f"{tuple(value.shape)}; pass weights of the same width (model.options) or build the "
                            "model the weights were made with")
    model.load_state_dict(state_dict)
