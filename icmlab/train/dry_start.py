"""Dry start: build everything the train and evaluate stages build for a recipe, on stand-in weights, without training.

A real recipe must not crash hours into a job (or at its first line on a GPU box) because of a
missing logger package, a ZeRO config DeepSpeed refuses, or a trainer that cannot be built. The
dry start builds, in the train stage's order and with its functions:

1. the package check of :func:`icmlab.envinfo.require` (reporting backends, DeepSpeed, flash-attn, PEFT);
2. ``TrainingArguments`` with the recipe's batch arithmetic, precision, ZeRO config and loggers
   (:func:`icmlab.train.args.build_training_args` with ``cpu_stand_in``: the GPU run's arguments on this CPU);
3. the model, tokenizer and image processor through the family adapter (``load_for_training``;
   ZeRO-3 partitions the weights as in a real run) and the training dataset and collator;
4. the :class:`~icmlab.train.trainer.IcmTrainer` with the stage's callbacks and the Trainer's own
   loggers (this is where a missing ``wandb``/``tensorboard`` used to crash), and its optimizer
   parameter groups;
5. optionally a few optimizer steps (``steps``);
6. the evaluate stage's model: ``load_for_inference`` of the same checkpoint.

``cfg.model`` must point at weights that exist here: the tests substitute tiny checkpoints of the
same family (:func:`with_stand_in_weights`); real-size shapes are checked on the meta device by
:func:`meta_model_report` (no memory, no weights).

Usage::

    from icmlab.train.dry_start import dry_start, with_stand_in_weights
    cfg = with_stand_in_weights(load_run_config("parameters/llava15-7b__q-instruct__mix.yaml"),
                                {"llm": vicuna_dir, "vision_tower": clip_dir, "mm_projector": proj}, runs_root=tmp)
    report = dry_start(cfg, records)       # raises on the first problem
    print(report.summary())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from icmlab.config import RunConfig
from icmlab.envinfo import require
from icmlab.models import get_family
from icmlab.train.args import build_training_args, deepspeed_config, effective_max_grad_norm
from icmlab.train.build import build_trainer, single_process_group


@dataclass
class DryStartReport:
    """What a dry start built.

    Attributes:
        recipe: the run name.
        args: the ``TrainingArguments``.
        deepspeed: the ZeRO config dict (None without DeepSpeed).
        model_class / processor_class / tokenizer_class: class names of the training bundle.
        inference_class: class of the evaluate stage's model.
        callbacks: class names of the trainer's callbacks (the Trainer's loggers included).
        param_groups: per optimizer group: number of tensors, lr, weight decay.
        trainable: trainable parameters in the optimizer groups (full sizes, also when ZeRO-3 partitions them).
        max_grad_norm: the clipping norm a step applies (None: no clipping).
        weights_dtype: dtype of the loaded weights (fp32 masters for bf16 without DeepSpeed).
        steps: optimizer steps run (``steps`` argument).
        loss: last training loss when steps were run.
    """

    recipe: str
    args: Any
    deepspeed: dict | None
    model_class: str
    processor_class: str
    tokenizer_class: str
    inference_class: str | None
    callbacks: list[str]
    param_groups: list[dict]
    trainable: int
    max_grad_norm: float | None
    weights_dtype: str = ""
    steps: int = 0
    loss: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        a = self.args
        groups = "; ".join(f"{g['tensors']} tensors lr {g['lr']:g} wd {g['weight_decay']:g}" for g in self.param_groups)
        ds = f"ZeRO-{self.deepspeed['zero_optimization']['stage']}" if self.deepspeed else "no DeepSpeed"
        lines = [
            f"dry start {self.recipe}: ok",
            f"  args: micro-batch {a.per_device_train_batch_size} × accumulation {a.gradient_accumulation_steps}, "
            f"bf16 {a.bf16}, {ds}, clipping {self.max_grad_norm or 'none'}, report_to {a.report_to}",
            f"  model {self.model_class}, tokenizer {self.tokenizer_class}, processor {self.processor_class}; "
            f"evaluate loads {self.inference_class}",
            f"  {self.trainable:,} trainable parameters in groups: {groups}",
            f"  callbacks: {', '.join(self.callbacks)}",
        ]
        if self.steps:
            lines.append(f"  {self.steps} step(s) run, loss {self.loss}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def with_stand_in_weights(
    cfg: RunConfig, weights: Mapping[str, str | Path], *, runs_root: Path | None = None, data_root: Path | None = None
) -> RunConfig:
    """``cfg`` with its checkpoints replaced by local stand-ins of the same family (everything else kept).

    Args:
        cfg: a recipe.
        weights: ``model.*`` key → local path (``base`` for an ``after`` run; ``llm``/``vision_tower``/
            ``mm_projector`` for LLaVA ``mix``; ``base`` for every mPLUG-Owl2 run). Stand-ins are in
            the ``hf`` layout, so ``model.base_format`` becomes ``hf``.
        runs_root, data_root: where the dry run writes (checkpoints dir) and reads images.

    Raises:
        ValueError: a key the recipe's strategy starts from has no stand-in.
    """
    from icmlab.models.spec import family_spec

    spec = family_spec(cfg.model.family)
    needed = spec.required_parts(cfg.train.strategy)
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ValueError(f"stand-in weights for {cfg.run_name}: missing model.{', model.'.join(missing)}")
    model = dataclasses.replace(cfg.model, base_format="hf", revision=None, **{k: str(v) for k, v in weights.items()})
    out = dataclasses.replace(cfg, model=model)
    if runs_root is not None:
        out = dataclasses.replace(out, runs_root=Path(runs_root))
    if data_root is not None:
        out = dataclasses.replace(out, data=dataclasses.replace(out.data, root=Path(data_root)))
    return out


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions leave p.numel() == 0


def dry_start(
    cfg: RunConfig, records: Sequence[Mapping[str, Any]], *, steps: int = 0, inference: bool = True
) -> DryStartReport:
    """Build the train and evaluate stages' objects for ``cfg`` (see the module docstring); raise on any problem.

    Args:
        cfg: a recipe whose ``model.*`` keys point at local weights (:func:`with_stand_in_weights`);
            ``hardware.device: auto``/``cuda`` is built as the GPU run would be, on this CPU.
        records: LLaVA-format training records whose images are under ``cfg.data.root``.
        steps: optimizer steps to run (0 = build only). Steps run on the CPU in the recipe's precision.
        inference: also load the evaluate stage's model (``load_for_inference`` of ``model.base``).

    Returns:
        A :class:`DryStartReport`.

    Raises:
        icmlab.envinfo.MissingPackageError: a package the recipe asks for is missing (key + install command).
        Exception: whatever the Trainer, DeepSpeed or the loaders raise.
    """
    from transformers import set_seed

    from icmlab.train.dataset import SupervisedDataset

    require(cfg)
    gpu_run = cfg.hardware.device != "cpu"
    run_cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, device="cuda")) if gpu_run else cfg
    if steps:
        t = dataclasses.replace(run_cfg.train, max_steps=steps, save_steps=10**9)
        run_cfg = dataclasses.replace(run_cfg, train=t)
    family = get_family(cfg.model.family)
    set_seed(cfg.seed)
    with single_process_group(run_cfg):
        args = build_training_args(run_cfg, cpu_stand_in=True)
        bundle = family.load_for_training(run_cfg)
        ds = getattr(args, "hf_deepspeed_config", None)
        if ds is not None and ds.is_zero3():
            base = bundle.model.get_base_model() if hasattr(bundle.model, "get_base_model") else bundle.model
            base._weight_conversions = None  # as the train stage does under ZeRO-3
        dataset = SupervisedDataset.from_bundle(list(records), bundle, run_cfg)
        if len(dataset) == 0:
            raise ValueError("dry start: no training records")
        trainer = build_trainer(run_cfg, bundle, dataset, args)
        optimizer = trainer.create_optimizer()
        groups = [
            {"tensors": len(g["params"]), "lr": g.get("lr", args.learning_rate), "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups
        ]
        trainable = sum(_numel(p) for g in optimizer.param_groups for p in g["params"])
        loss = None
        if steps:
            out = trainer.train()
            loss = float(out.training_loss)
        report = DryStartReport(
            recipe=cfg.run_name,
            args=args,
            deepspeed=deepspeed_config(run_cfg),
            model_class=type(bundle.model).__name__,
            processor_class=type(bundle.image_processor).__name__,
            tokenizer_class=type(bundle.tokenizer).__name__,
            inference_class=None,
            callbacks=[type(c).__name__ for c in trainer.callback_handler.callbacks],
            param_groups=groups,
            trainable=trainable,
            max_grad_norm=effective_max_grad_norm(run_cfg),
            weights_dtype=str(next(iter(bundle.model.parameters())).dtype).removeprefix("torch."),
            steps=steps,
            loss=loss,
        )
        del trainer, optimizer, bundle
    if inference:
        kwargs: dict[str, Any] = dict(dtype="float32", device="cpu", attn_implementation="sdpa")
        source = cfg.model.base
        if source and Path(source).exists():
            report.inference_class = type(family.load_for_inference(source, **kwargs).model).__name__
        else:
            report.notes.append(f"model.base {source!r} is not local: the evaluate stage's load was not tried")
    return report


# --------------------------------------------------------------------------- real-size shapes
def real_size_config(cfg: RunConfig) -> Any:
    """The full-size model config of the recipe's family and ``model.size`` (shapes only)."""
    if cfg.model.family == "llava15":
        from icmlab.models.llava15.adapter import real_config

        return real_config(cfg.model.size)
    if cfg.model.family == "mplug_owl2":
        from icmlab.models.mplug_owl2.configuration import MPLUGOwl2Config

        if cfg.model.size != "7b":
            raise ValueError(f"model.size={cfg.model.size!r}: mPLUG-Owl2 comes in 7b only")
        return MPLUGOwl2Config()
    raise ValueError(f"model.family={cfg.model.family!r}: no real-size config")


def meta_model_report(cfg: RunConfig) -> dict[str, Any]:
    """Build the recipe's real-size model on the meta device with its trainable parts (and LoRA).

    Returns:
        ``{"class", "params" (the model's own, adapters excluded), "trainable" (LoRA adapters and
        ``modules_to_save`` copies included), "groups": {group: (params, trainable)}, "bf16_weights_gib",
        "train_state_gib_per_gpu"}``: the last is weights + grads + fp32 master + Adam under the
        recipe's ZeRO stage over ``num_gpus × num_nodes`` devices (a planning figure, no activations).
    """
    family = get_family(cfg.model.family)
    config = real_size_config(cfg)
    config.use_cache = False
    with torch.device("meta"):
        if cfg.model.family == "llava15":
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(config)
        else:
            from icmlab.models.mplug_owl2.modeling import MPLUGOwl2ForCausalLM

            model = MPLUGOwl2ForCausalLM(config)
    t = cfg.train
    family.apply_trainable(model, {"vision_encoder": not t.freeze_vision, "projector": t.tune_projector, "llm": True})
    total = sum(p.numel() for p in model.parameters())  # the model itself, before any adapter
    if t.lora.enabled:
        with torch.device("meta"):  # the adapters too: no memory, no init
            model = family.apply_lora(model, t.lora.r, t.lora.alpha, t.lora.dropout, train_projector=t.tune_projector)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    groups = {}
    for group, prefixes in family.MODULE_GROUPS.items():
        mods = [base.get_submodule(p) for p in prefixes]
        ps = [p for m in mods for p in m.parameters()]
        groups[group] = (sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = cfg.hardware.num_gpus * cfg.hardware.num_nodes
    stage = {"zero2": 2, "zero3": 3, "zero3_offload": 3, "zero3_mplug_owl2": 3}.get(cfg.hardware.deepspeed, 0)
    weights = total * 2 / 2**30
    grads = trainable * 2 / 2**30
    optim = trainable * 12 / 2**30  # fp32 master + Adam m, v
    if stage == 3:
        per_gpu = (weights + grads + optim) / world
    elif stage == 2:
        per_gpu = weights + (grads + optim) / world
    else:
        per_gpu = weights * 2 + trainable * 12 / 2**30  # fp32 weights, grads, Adam m and v without DeepSpeed
    return {
        "class": type(base).__name__,
        "params": total,
        "trainable": trainable,
        "groups": groups,
        "bf16_weights_gib": round(weights, 1),
        "train_state_gib_per_gpu": round(per_gpu, 1),
    }
