"""mPLUG-Owl2 family adapter: load, train-configure and save ``MPLUGOwl2ForCausalLM`` bundles.

These are the functions the registry (:mod:`icmlab.models`) expects of a family module; the package
``icmlab.models.mplug_owl2`` re-exports them. Two checkpoint layouts are read, told apart by their
``config.json``: the ORIGINAL X-PLUG layout (``visual_config`` block, ``.bin`` shards, e.g.
``MAGAer13/mplug-owl2-llama2-7b``) and icmlab's own (``vision_config``/``abstractor_config``,
safetensors), which :func:`save_bundle` writes. Both ``train.strategy`` values start from
``cfg.model.base``: mPLUG-Owl2's pre-SFT weights were never released.

Usage::

    bundle = load_for_training(cfg)                  # trainable parts per cfg.train
    save_bundle(bundle, cfg.run_dir / "model")
    bundle = load_for_inference(cfg.run_dir / "model", device="cuda")   # left-padding tokenizer

The image placeholder id is ``config.image_token_index`` (default ``vocab_size`` = 32000 at full
size, outside the embedding table); the tokenizer needs no ``<|image|>`` token because
:mod:`icmlab.inputs.encode` splits the text on the dialect's image string itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from icmlab.io import read_json
from icmlab.models import ModelBundle, set_loss_normalization, write_bundle_dir
from icmlab.models import groups as _groups
from icmlab.models.llava15.adapter import compute_dtype, resolve_attn_implementation, resolve_dtype, training_dtype
from icmlab.models.llava15.files import hub_options, resolve_source
from icmlab.models.spec import FAMILY_SPECS

from .convert import load_original
from .modeling import MPLUGOwl2ForCausalLM

SPEC = FAMILY_SPECS["mplug_owl2"]
FAMILY = SPEC.name
DIALECT = SPEC.image_token
#: Submodule names (``model.get_submodule``) of each trainable group. The abstractor holds
#: ``visual_fc`` and ``vit_eos`` too, so "projector" is the whole vision-to-LLM bridge.
MODULE_GROUPS: dict[str, list[str]] = {
    "vision_encoder": ["model.vision_model"],
    "projector": ["model.visual_abstractor"],
    "llm": ["model.embed_tokens", "model.layers", "model.norm", "lm_head"],
}
#: Upstream ``train.py`` defaults (``freeze_vision_model=True``, ``tune_visual_abstractor=True``);
#: the Q-Instruct recipe trains the vision tower too (``train.freeze_vision: false``).
DEFAULT_TRAINABLE = {"vision_encoder": False, "projector": True, "llm": True}
#: LoRA on every linear layer of the LLM (upstream ``find_all_linear_names`` minus the visual parts).
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q_proj|o_proj|[kv]_proj\.multiway\.\d)|mlp\.\w+_proj)"


# ----------------------------------------------------------------------------- tokenizer / images
def _load_tokenizer(directory: Path, padding_side: str, max_length: int | None) -> Any:
    kwargs: dict[str, Any] = {"padding_side": padding_side}
    if max_length:
        kwargs["model_max_length"] = max_length
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{directory}: no loadable tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # upstream train.py: pad = unk (id 0)
    return tokenizer


def _image_processor(directory: Path, image_size: int) -> Any:
    """The checkpoint's CLIP processor (PIL backend); a 448-px CLIP one built from the config if absent."""
    names = ("preprocessor_config.json", "processor_config.json")
    if any((directory / n).is_file() for n in names):
        return AutoImageProcessor.from_pretrained(directory, backend="pil")
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _bundle(model: MPLUGOwl2ForCausalLM, tokenizer: Any, image_processor: Any, **extra: Any) -> ModelBundle:
    cfg = model.config
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_token_id=cfg.image_token_index,
        num_image_tokens=cfg.num_image_tokens,
        family=FAMILY,
        extra=extra,
    )


# ----------------------------------------------------------------------------- loading
def _load_any(
    source: str | Path,
    *,
    revision: str | None,
    dtype: torch.dtype,
    attn: str,
    padding_side: str,
    max_length: int | None,
) -> ModelBundle:
    """Load an original X-PLUG checkpoint (``visual_config``) or an icmlab-saved one."""
    path = resolve_source(source, revision=revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected an mPLUG-Owl2 checkpoint directory")
    raw = read_json(config_file)
    if raw.get("model_type") != "mplug_owl2":
        raise ValueError(f"{config_file}: model_type={raw.get('model_type')!r}, expected 'mplug_owl2'")
    if "visual_config" in raw:
        model, fmt = load_original(path, dtype=dtype, attn_implementation=attn), "original"
    else:
        model, fmt = MPLUGOwl2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn), "hf"
    tokenizer = _load_tokenizer(path, padding_side, max_length)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {len(tokenizer)} tokens but the embedding only {model.config.vocab_size} rows"
        )
    processor = _image_processor(path, model.config.vision_config.image_size)
    return _bundle(model, tokenizer, processor, source=str(path), format=fmt)


def load_for_training(cfg: Any) -> ModelBundle:
    """Build the starting model of a run (see :func:`_load_for_training`), fetching hub checkpoints that the
    download stage has not placed through ``cfg.download.endpoint`` (:func:`~icmlab.models.llava15.files.hub_options`)."""
    with hub_options(endpoint=getattr(getattr(cfg, "download", None), "endpoint", None)):
        return _load_for_training(cfg)


def _load_for_training(cfg: Any) -> ModelBundle:
    """Build the starting model of a run with the configured trainable parts.

    Reads ``cfg.model.{base, base_format, revision, dtype}``, ``cfg.train.{freeze_vision,
    tune_projector, lora, bf16}``, ``cfg.hardware.attn_implementation`` and
    ``cfg.data.model_max_length``.

    Returns:
        A bundle with a right-padding tokenizer and ``use_cache`` off.

    Raises:
        ValueError: if ``model.base`` is unset or its layout contradicts ``model.base_format``.
    """
    m, t = cfg.model, cfg.train
    if not getattr(m, "base", None):
        raise ValueError("model.base must name an mPLUG-Owl2 checkpoint (e.g. MAGAer13/mplug-owl2-llama2-7b)")
    dtype = training_dtype(cfg)  # fp32 masters for bf16 without DeepSpeed (see llava15.adapter.training_dtype)
    attn = resolve_attn_implementation(getattr(cfg.hardware, "attn_implementation", "auto"), compute_dtype(cfg))
    max_len = getattr(getattr(cfg, "data", None), "model_max_length", None)
    bundle = _load_any(
        m.base, revision=getattr(m, "revision", None), dtype=dtype, attn=attn, padding_side="right", max_length=max_len
    )
    fmt = getattr(m, "base_format", "hf")
    if bundle.extra["format"] != fmt:
        raise ValueError(f"model.base={m.base} is a {bundle.extra['format']} checkpoint but model.base_format={fmt!r}")
    bundle.model.config.use_cache = False
    tune_projector = getattr(t, "tune_projector", True)
    apply_trainable(
        bundle.model,
        {"vision_encoder": not getattr(t, "freeze_vision", True), "projector": tune_projector, "llm": True},
    )
    lora = getattr(t, "lora", None)
    use_lora = bool(lora is not None and getattr(lora, "enabled", False))
    if use_lora:
        bundle.model = apply_lora(bundle.model, lora.r, lora.alpha, lora.dropout, train_projector=tune_projector)
    set_loss_normalization(bundle.model, getattr(t, "loss_normalization", "micro_batch_mean"))
    bundle.extra.update(attn_implementation=attn, dtype=str(dtype).removeprefix("torch."), lora=use_lora)
    return bundle


def load_for_inference(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    device: str = "cpu",
    *,
    revision: str | None = None,
    endpoint: str | None = None,
) -> ModelBundle:
    """Load a saved bundle or an original checkpoint for generation.

    Args:
        path: local dir or hub id.
        dtype: ``auto`` (bf16 on CUDA, else fp32), a name (``bf16``...) or a torch dtype.
        attn_implementation: ``auto``, ``flash_attention_2``, ``sdpa`` or ``eager``.
        device: where to put the model.
        revision: hub revision.
        endpoint: hub URL used if the checkpoint is not in the cache (None = ``HF_ENDPOINT``).

    Returns:
        The bundle in eval mode with a LEFT-padding tokenizer (batched generation).
    """
    dt = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation, dt)
    with hub_options(endpoint=endpoint):
        bundle = _load_any(path, revision=revision, dtype=dt, attn=attn, padding_side="left", max_length=None)
    bundle.model.to(device).eval()
    bundle.extra.update(attn_implementation=attn, dtype=str(dt).removeprefix("torch."))
    return bundle


def save_bundle(bundle: ModelBundle, out_dir: str | Path) -> Path:
    """Write icmlab's layout: weights + config (safetensors), tokenizer, image processor, bundle facts.

    A PEFT (LoRA) model is merged first (``bundle.model`` becomes the merged model). Files are
    written into a temporary sibling folder and moved in with ``config.json`` last, so an
    interrupted save never looks complete.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    model = bundle.model
    if hasattr(model, "merge_and_unload"):  # peft.PeftModel
        model = bundle.model = model.merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        bundle.tokenizer.save_pretrained(tmp)
        bundle.image_processor.save_pretrained(tmp)

    return write_bundle_dir(out, bundle, write)


def save_original(bundle: ModelBundle, out_dir: str | Path) -> Path:
    """Write the ORIGINAL X-PLUG layout (see :mod:`.original`): what ``load_original``, the original
    ``mplug_owl2`` code, Q-Align and IQA-PyTorch read. A PEFT model is merged first.

    Returns:
        ``out_dir``.
    """
    from .original import save_original as write_original

    model = bundle.model
    if hasattr(model, "merge_and_unload"):  # peft.PeftModel
        model = bundle.model = model.merge_and_unload()
    return write_original(model, out_dir, tokenizer=bundle.tokenizer, image_processor=bundle.image_processor)


# ----------------------------------------------------------------------------- trainable parts
def apply_trainable(model: nn.Module, groups: dict[str, bool] | None = None) -> dict[str, int]:
    """Set ``requires_grad`` per module group (defaults: :data:`DEFAULT_TRAINABLE`); see
    :func:`icmlab.models.groups.apply_trainable`.

    Raises:
        ValueError: for an unknown group or a parameter outside every group.
    """
    return _groups.apply_trainable(model, MODULE_GROUPS, DEFAULT_TRAINABLE, groups)


def apply_lora(
    model: nn.Module,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    *,
    train_projector: bool = True,
) -> nn.Module:
    """Wrap the model with LoRA on the LLM's linear layers (both multiway copies of k/v).

    The vision tower and ``lm_head`` get no adapters; with ``train_projector`` the abstractor is
    trained fully as a PEFT ``modules_to_save`` copy, as upstream's ``finetune_lora.sh`` does.

    Returns:
        The PEFT model (the trainer builds the optimizer groups, projector lr included).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=LORA_TARGETS,
        modules_to_save=["visual_abstractor"] if train_projector else None,
    )
    # Adapters in the weights' dtype (upstream casts the PEFT model to bf16): PEFT's default fp32 adapters
    # beside bf16 weights make ZeRO-3 refuse the parameter group (one dtype per flat buffer).
    return get_peft_model(model, config, autocast_adapter_dtype=False)
