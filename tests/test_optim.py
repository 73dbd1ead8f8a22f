"""AdaBound parity with the original package, and the optimizer registry."""

import warnings

import pytest
import torch
from torch import nn

from stroke_tss.optim import build_optimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = (x[:, :1] > 0).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_adabound_matches_original_package_after_50_steps(weight_decay):
    import adabound  # the original package, in the dev extra: CI must run this comparison, never skip it
    ref, ours = _model(0), _model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the original calls deprecated add_/addcmul_ overloads
        _run(ref, adabound.AdaBound(ref.parameters(), lr=1e-2, final_lr=0.1, weight_decay=weight_decay), 50)
    _run(ours, build_optimizer(ours.parameters(), name="adabound", lr=1e-2, final_lr=0.1,
                               weight_decay=weight_decay), 50)
    moved = max((a - b).abs().max().item() for a, b in zip(_model(0).parameters(), ours.parameters()))
    assert moved > 1e-2  # the comparison means something only if training moved the weights
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "sgd", "adabound"])
def test_optimizer_lowers_the_loss(name):
    model = _model(3)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    y = (x[:, :1] > 0).float()
    opt = build_optimizer(model.parameters(), name=name, lr=0.05)
    first = None
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_optimizer_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(_model(0).parameters(), name="lamb", lr=1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], name="adam", lr=1e-3)
