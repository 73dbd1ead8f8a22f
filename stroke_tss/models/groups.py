"""Named, ordered parameter groups shared by every model, and freezing by group.

Every model maps each group name to the module/parameter name prefixes it owns (`model.group_prefixes()`).
Order is depth order: the paper's "first two blocks" are `stem` + `block1`, and the adaptive freezing-depth
search walks `backbone_groups()` from the input side. Groups a model does not have are present and empty.
A model may name groups that take no part in its forward pass (`model.inactive_groups()`, e.g. the attention
gates switched off): `freeze` always holds those fixed, so no optimiser or DDP bucket waits on them.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from stroke_tss.errors import UserError

GROUP_NAMES = ("stem", "block1", "block2", "block3", "block4", "seg_head", "attention", "slice_weights", "head")
BACKBONE_GROUPS = GROUP_NAMES[:5]
# Frozen norm layers keep their running statistics: momentum 0 leaves them unchanged in train mode too,
# and survives `model.train()`, which a requires_grad flag alone does not cover.
_SAVED_MOMENTUM = "_stroke_tss_momentum"


def _owner(name: str, prefixes: dict[str, tuple[str, ...]]) -> str:
    owners = [group for group, pre in prefixes.items()
              if any(name == p or name.startswith(p + ".") for p in pre)]
    assert len(owners) == 1, f"parameter {name} belongs to groups {owners}; fix {type(prefixes)}"
    return owners[0]


def _prefixes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    prefixes = model.group_prefixes()
    unknown = set(prefixes) - set(GROUP_NAMES)
    assert not unknown, f"{type(model).__name__} declares unknown groups {sorted(unknown)}"
    return {name: tuple(prefixes.get(name, ())) for name in GROUP_NAMES}


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{group: parameters} in GROUP_NAMES order; every parameter of the model is in exactly one group."""
    prefixes = _prefixes(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        groups[_owner(name, prefixes)].append(param)
    return groups


def backbone_groups(model: nn.Module) -> list[str]:
    """The model's non-empty backbone groups, input side first (the freezing depths to search)."""
    groups = param_groups(model)
    return [name for name in BACKBONE_GROUPS if groups[name]]


def check_groups(groups: Iterable[str]) -> list[str]:
    groups = list(groups)
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        raise UserError(f"unknown parameter group(s) {unknown}; valid groups: {', '.join(GROUP_NAMES)}")
    return groups


def freeze(model: nn.Module, groups: Iterable[str]) -> None:
    """Freeze exactly `groups` and make every other group trainable (idempotent; a phase states its set).

    Frozen: requires_grad False on their parameters and their BatchNorm running statistics held still.
    The model's inactive groups are frozen too, whatever `groups` says.
    """
    frozen = set(check_groups(groups)) | set(getattr(model, "inactive_groups", tuple)())
    prefixes = _prefixes(model)
    for name, param in model.named_parameters():
        param.requires_grad_(_owner(name, prefixes) not in frozen)
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            continue
        is_frozen = _owner(f"{name}.weight", prefixes) in frozen
        if is_frozen and not hasattr(module, _SAVED_MOMENTUM):
            setattr(module, _SAVED_MOMENTUM, module.momentum)
            module.momentum = 0.0
        elif not is_frozen and hasattr(module, _SAVED_MOMENTUM):
            module.momentum = getattr(module, _SAVED_MOMENTUM)
            delattr(module, _SAVED_MOMENTUM)


def reinit(model: nn.Module, groups: Iterable[str]) -> None:
    """Re-initialise every layer of `groups` (their modules' own reset_parameters; seed torch first)."""
    chosen = set(check_groups(groups))
    prefixes = _prefixes(model)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own and hasattr(module, "reset_parameters") and _owner(f"{name}.{own[0][0]}", prefixes) in chosen:
            module.reset_parameters()


def train_only(model: nn.Module, groups: Iterable[str]) -> None:
    """Train only `groups` (e.g. attention + slice_weights + head in the paper's phase 4); freeze the rest."""
    keep = set(check_groups(groups))
    freeze(model, [g for g in GROUP_NAMES if g not in keep])
