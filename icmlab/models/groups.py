"""Module groups shared by the model families: freezing by group and upstream-style optimizer groups.

Each family names its submodules in ``MODULE_GROUPS`` (``vision_encoder`` / ``projector`` / ``llm``);
these functions apply ``requires_grad`` per group and split the trainable parameters into optimizer
groups where the projector (LLaVA's ``multi_modal_projector``, mPLUG-Owl2's ``visual_abstractor``)
can get its own learning rate.
"""

from __future__ import annotations

from torch import nn


def group_of(name: str, module_groups: dict[str, list[str]]) -> str | None:
    """The group whose prefix owns parameter ``name`` (None when no group does)."""
    for group, prefixes in module_groups.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return group
    return None


def apply_trainable(model: nn.Module, module_groups: dict[str, list[str]], defaults: dict[str, bool],
                    groups: dict[str, bool] | None = None) -> dict[str, int]:
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


def optimizer_param_groups(model: nn.Module, projector_marker: str, *, projector_lr: float | None = None,
                           weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of the trainable parameters: (projector | rest) × (decay | no decay).

    Parameters whose name contains ``projector_marker`` get ``projector_lr`` when set; tensors with
    ``ndim < 2`` (biases, norms) get no weight decay. Empty groups are omitted; each carries a ``name``.
    """
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = "projector" if projector_marker in name else "rest"
            buckets.setdefault((part, param.ndim >= 2), []).append(param)
    out = []
    for (part, decay), params in sorted(buckets.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "name": f"{part}_{'decay' if decay else 'no_decay'}"}
        if part == "projector" and projector_lr is not None:
            group["lr"] = projector_lr
        out.append(group)
    return out
