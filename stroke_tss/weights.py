"""What a phase persists besides engine checkpoints: RNG states and the engine-neutral weights.pt."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn


def rng_state() -> dict:
    """Every RNG the loop touches, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        raise ValueError(f"weights file {path} does not exist: run the phase that writes it first")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # torch reports a truncated zip as a RuntimeError
        raise ValueError(f"weights file {path} is unreadable ({exc}); delete it and re-run its phase") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ValueError(f"{path} is not a stroke-tss weights.pt (no 'state_dict'); pass a weights.pt of a phase")
    return data
