"""Module groups shared by the model families: freezing by group.

Each family names its submodules in ``MODULE_GROUPS`` (``vision_encoder`` / ``projector`` / ``llm``);
these functions apply ``requires_grad`` per group. The optimizer groups (the projector at its own
learning rate) are built in one place, :meth:`icmlab.train.trainer.IcmTrainer.build_param_groups`.
"""

from __future__ import annotations

from torch import nn


def group_of(name: str, module_groups: dict[str, list[str]]) -> str | None:
    """The group whose prefix owns parameter ``name`` (None when no group does)."""
    for group, prefixes in module_groups.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return group
    return None


def apply_trainable(
    model: nn.Module,
    module_groups: dict[str, list[str]],
    defaults: dict[str, bool],
    groups: dict[str, bool] | None = None,
) -> dict[str, int]:
    """Set ``requires_grad`` per module group (``defaults`` overridden by ``groups``).

    Returns:
        Trainable parameter count per group.

    Raises:
        ValueError: for an unknown group or a parameter outside every group.
    """
    flags = dict(defaults)
    for key, value in (groups or {}).items():
        if key not in flags:
            raise ValueError(f"unknown module group {key!r}; allowed: {sorted(flags)}")
        flags[key] = bool(value)
    counts = dict.fromkeys(flags, 0)
    for name, param in model.named_parameters():
        group = group_of(name, module_groups)
        if group is None:
            raise ValueError(f"parameter {name} is in no MODULE_GROUPS entry (is this a PEFT-wrapped model?)")
        param.requires_grad_(flags[group])
        counts[group] += param.numel() if flags[group] else 0
    return counts
