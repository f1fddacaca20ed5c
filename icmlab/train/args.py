"""From ``RunConfig`` to the HF Trainer's settings: device, ZeRO config, batch arithmetic, TrainingArguments.

Pure functions used by :mod:`icmlab.train.stage` (and re-exported there)::

    cfg = resolve_device(cfg)                 # hardware.device auto -> cuda/cpu, impossible combos refused
    print(batch_message(cfg))                 # "global batch 128 = 16 per device × 8 GPUs × 1 accumulation"
    args = build_training_args(cfg)           # TrainingArguments (create it BEFORE loading a ZeRO-3 model)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from icmlab import paths
from icmlab.config import RunConfig

#: ZeRO configs shipped with icmlab (``hardware.deepspeed`` names one of them).
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "parameters" / "deepspeed"


def resolve_device(cfg: RunConfig) -> RunConfig:
    """Return ``cfg`` with ``hardware.device`` decided (``auto`` → cuda when available, else cpu).

    Raises:
        ValueError: ``cuda`` requested without a GPU, or bf16 on CPU (naming the key to change).
    """
    h = cfg.hardware
    device = h.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("hardware.device: cuda but no CUDA GPU is visible; use device: cpu (or auto)")
    if device == "cpu" and cfg.train.bf16:
        raise ValueError("train.bf16: bfloat16 training needs an Ampere+ GPU; set train.bf16: false on CPU")
    return dataclasses.replace(cfg, hardware=dataclasses.replace(h, device=device))


def deepspeed_config_path(cfg: RunConfig) -> str | None:
    """``parameters/deepspeed/<hardware.deepspeed>.json``, or None.

    ``zero3_offload.json`` is upstream's minus its optimizer/scheduler blocks: IcmTrainer creates
    DeepSpeedCPUAdam itself, so the projector lr groups and the configured schedule still apply.

    Raises:
        FileNotFoundError: the named config is missing.
    """
    name = cfg.hardware.deepspeed
    if name == "none":
        return None
    path = DEEPSPEED_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"hardware.deepspeed: {name} → {path} does not exist")
    return str(path)


def batch_message(cfg: RunConfig) -> str:
    """``"global batch 128 = 16 per device × 8 GPUs × 1 accumulation"``."""
    t, world = cfg.train, cfg.world_size
    unit = ("GPU" if world == 1 else "GPUs") if cfg.hardware.device != "cpu" else "CPU process"
    return (f"global batch {t.global_batch_size} = {t.per_device_batch_size} per device × {world} {unit} × "
            f"{cfg.gradient_accumulation_steps} accumulation")


def build_training_args(cfg: RunConfig) -> Any:
    """``TrainingArguments`` of a run (device already resolved by :func:`resolve_device`).

    Returns:
        The arguments: output under ``<run_dir>/checkpoints``, upstream's schedule and precision,
        ``remove_unused_columns=False`` (samples carry images), token counting for tokens/s.
    """
    from transformers import TrainingArguments

    t, h = cfg.train, cfg.hardware
    cuda = h.device == "cuda"
    report = [r for r in t.report_to if r != "none"] or "none"
    return TrainingArguments(
        output_dir=str(paths.checkpoints_dir(cfg)),
        run_name=cfg.run_name,
        # ---- batch and length
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        # ---- optimiser and schedule
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,  # < 1 = ratio
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        # ---- precision and memory
        bf16=t.bf16,
        tf32=t.tf32 if cuda else None,  # TF32 is a CUDA switch; None leaves CPU alone
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        deepspeed=deepspeed_config_path(cfg),
        use_cpu=not cuda,
        # ---- logging and saving
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=report,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # our ProgressBarCallback replaces the Trainer's bar
        # ---- data
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
    )


def projector_parameters(model: torch.nn.Module, prefixes: Sequence[str]) -> list[torch.nn.Parameter]:
    """Parameters under the family's projector submodules, also inside a PEFT wrapper."""
    out = []
    for name, p in model.named_parameters():
        bare = name.removeprefix("base_model.model.")  # peft.PeftModel prefix
        if any(bare == q or bare.startswith(q + ".") for q in prefixes):
            out.append(p)
    return out
