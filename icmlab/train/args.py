"""From ``RunConfig`` to the HF Trainer's settings: device, ZeRO config, batch arithmetic, TrainingArguments.

Pure functions used by :mod:`icmlab.train.stage` (and re-exported there)::

    cfg = resolve_device(cfg)                 # hardware.device auto -> cuda/cpu, impossible combos refused
    print(batch_message(cfg))                 # "global batch 128 = 16 per device × 8 GPUs × 1 accumulation"
    ds = deepspeed_config(cfg)                # the ZeRO JSON as a dict, with train.max_grad_norm applied
    args = build_training_args(cfg)           # TrainingArguments (create it BEFORE loading a ZeRO-3 model)

Upstream semantics (docs/semantics.md): gradient clipping is what upstream's DeepSpeed JSON says
(``train.max_grad_norm: null``: none under zero2/zero3, 1.0 under zero3_offload, the Trainer's 1.0
without DeepSpeed; a number applies everywhere), and the loss is averaged per micro-batch unless
``train.loss_normalization: token_mean`` (see :mod:`icmlab.train.loss`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.envinfo import require

#: The Trainer's clipping norm when ``train.max_grad_norm`` is null (HF's default, which upstream's
#: ``train.py`` inherits; under DeepSpeed the JSON's ``gradient_clipping`` decides instead).
HF_DEFAULT_MAX_GRAD_NORM = 1.0

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


def deepspeed_config(cfg: RunConfig) -> dict | None:
    """The run's ZeRO config: ``parameters/deepspeed/<hardware.deepspeed>.json`` with ``train.max_grad_norm`` applied.

    ``train.max_grad_norm: null`` keeps upstream's behaviour: ``zero2``/``zero3``/``zero3_mplug_owl2`` have
    no ``gradient_clipping`` key, which the DeepSpeed versions upstream used read as 0 (no clipping);
    it is written as an explicit 0 here, because DeepSpeed 0.19 reads a missing key as 1.0.
    ``zero3_offload`` says ``auto``: the Trainer's 1.0. A number sets ``gradient_clipping`` to it (0 = off).

    Returns:
        The config dict, or None for ``hardware.deepspeed: none``.

    Raises:
        FileNotFoundError: the named config is missing.
    """
    path = deepspeed_config_path(cfg)
    if path is None:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if cfg.train.max_grad_norm is not None:
        data["gradient_clipping"] = float(cfg.train.max_grad_norm)
    else:
        # Upstream's JSONs have no gradient_clipping key, which meant 0 (off) in the DeepSpeed versions
        # they pinned (0.9.5, 0.12.x); DeepSpeed 0.19 defaults a missing key to 1.0. Say 0 explicitly.
        data.setdefault("gradient_clipping", 0.0)
    return data


def effective_max_grad_norm(cfg: RunConfig) -> float | None:
    """The clipping norm a step really applies (None: no clipping), following :func:`deepspeed_config`."""
    ds = deepspeed_config(cfg)
    if ds is None:
        norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else HF_DEFAULT_MAX_GRAD_NORM
    else:
        clip = ds.get("gradient_clipping", 0.0)
        norm = HF_DEFAULT_MAX_GRAD_NORM if clip == "auto" else float(clip)
    return norm or None


def batch_message(cfg: RunConfig) -> str:
    """``"global batch 128 = 16 per device × 8 GPUs × 1 accumulation"``."""
    t, world = cfg.train, cfg.world_size
    unit = ("GPU" if world == 1 else "GPUs") if cfg.hardware.device != "cpu" else "CPU process"
    return (
        f"global batch {t.global_batch_size} = {t.per_device_batch_size} per device × {world} {unit} × "
        f"{cfg.gradient_accumulation_steps} accumulation"
    )


def build_training_args(cfg: RunConfig, *, cpu_stand_in: bool = False) -> Any:
    """``TrainingArguments`` of a run (device already resolved by :func:`resolve_device`).

    Args:
        cfg: the run config.
        cpu_stand_in: build the arguments of the configured (GPU) run on this CPU, for the dry start:
            the batch arithmetic, precision, ZeRO config and loggers of ``cfg``, with ``use_cpu`` and
            no TF32 switch (see :mod:`icmlab.train.dry_start`).

    Returns:
        The arguments: output under ``<run_dir>/checkpoints``, upstream's schedule and precision,
        ``remove_unused_columns=False`` (samples carry images), token counting for tokens/s.

    Raises:
        icmlab.envinfo.MissingPackageError: a ``train.report_to`` logger or DeepSpeed is not installed
            (the message names the key and the install command).
    """
    from transformers import TrainingArguments

    t, h = cfg.train, cfg.hardware
    require(cfg, keys=("train.report_to", "hardware.deepspeed"))
    cuda = h.device == "cuda" and not cpu_stand_in
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
        # Without DeepSpeed the Trainer clips at this norm; under DeepSpeed the config's gradient_clipping
        # clips, and the Trainer insists both agree (0 = off), see deepspeed_config().
        max_grad_norm=effective_max_grad_norm(cfg) or 0.0,
        # token_mean: the token count of the global batch is summed over ranks (micro_batch_mean never counts).
        average_tokens_across_devices=t.loss_normalization == "token_mean",
        # ---- precision and memory
        bf16=t.bf16,
        tf32=t.tf32 if cuda else None,  # TF32 is a CUDA switch; None leaves CPU alone
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        deepspeed=deepspeed_config(cfg),
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
