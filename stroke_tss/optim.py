"""Optimisers by name: AdaBound (as in the paper), Adam, SGD.

AdaBound is pytorch-optimizer's implementation with ``weight_decouple=False``: the original ``adabound``
package (0.0.5) calls deprecated torch overloads, and this one matches it (tests/test_optim.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pytorch_optimizer import AdaBound

from stroke_tss.errors import UserError

OPTIMIZERS = ("adabound", "adam", "sgd")


def build_optimizer(params: Iterable[Any], *, name: str, lr: float, weight_decay: float = 0.0,
                    final_lr: float = 0.1, gamma: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """An optimizer over ``params`` (tensors or param-group dicts); ``final_lr``/``gamma`` are AdaBound's."""
    params = [p for p in params]
    if not params:
        raise UserError("the optimizer got no trainable parameters: check the phase's freeze/train_only groups")
    if name == "adabound":
        return AdaBound(params, lr=lr, final_lr=final_lr, betas=betas, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, weight_decouple=False, foreach=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
