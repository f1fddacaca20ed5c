"""mPLUG-Owl2 (LLaMA-2-7B, modality-adaptive) as native transformers-5 classes.

Importing this package registers ``model_type = "mplug_owl2"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (no ``trust_remote_code``), so both an icmlab-saved directory and an
original X-PLUG checkpoint directory resolve through the Auto classes.

Public API::

    from icmlab.models import mplug_owl2 as owl
    model = owl.load_original("/ckpt/mplug-owl2-llama2-7b", dtype=torch.bfloat16)  # original .bin/.safetensors
    model.save_pretrained(out_dir)                       # safetensors, our config layout
    model = owl.MPLUGOwl2ForCausalLM.from_pretrained(out_dir)
    cfg = model.config                                   # original-form ids (-200 per image) -> ours:
    batch = owl.expand_image_tokens(ids, num_image_tokens=cfg.num_image_tokens,
                                    image_token_index=cfg.image_token_index, attention_mask=mask)
    out = model(**batch, pixel_values=px, labels=labels)  # px: one image per image run, batch order
    gen = model.generate(**batch, pixel_values=px, max_new_tokens=32, do_sample=False)
    tiny = owl.MPLUGOwl2ForCausalLM(owl.build_tiny_config(vocab_size=300, image_token_index=299))

The family-adapter API of :mod:`icmlab.models` (``DIALECT``, ``MODULE_GROUPS``,
``load_for_training``, ``load_for_inference``, ``save_bundle``, ...) lives in :mod:`.adapter`;
``MODULE_GROUPS`` names the submodules the shared trainer freezes or trains per group.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from .adapter import (
    DEFAULT_TRAINABLE,
    DIALECT,
    FAMILY,
    LORA_TARGETS,
    MODULE_GROUPS,
    apply_lora,
    apply_trainable,
    load_for_inference,
    load_for_training,
    optimizer_param_groups,
    save_bundle,
)
from .configuration import MPLUGOwl2AbstractorConfig, MPLUGOwl2Config, MPLUGOwl2VisionConfig
from .convert import expand_image_tokens, load_original, read_original_state_dict
from .modeling import (
    MPLUGOwl2CausalLMOutputWithPast,
    MPLUGOwl2ForCausalLM,
    MPLUGOwl2Model,
    MPLUGOwl2PreTrainedModel,
)

AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config, exist_ok=True)
AutoConfig.register(MPLUGOwl2VisionConfig.model_type, MPLUGOwl2VisionConfig, exist_ok=True)
AutoConfig.register(MPLUGOwl2AbstractorConfig.model_type, MPLUGOwl2AbstractorConfig, exist_ok=True)
AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2ForCausalLM, exist_ok=True)


def build_tiny_config(
    vocab_size: int,
    image_token_index: int,
    image_size: int = 64,
    *,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    num_learnable_queries: int = 16,
    initializer_range: float = 0.1,
    **overrides: Any,
) -> MPLUGOwl2Config:
    """Config of a tiny random mPLUG-Owl2 with the full model's structure (for demos and tests).

    Args:
        vocab_size: text vocabulary (embedding rows), e.g. ``len(tokenizer)``.
        image_token_index: placeholder id (may equal ``vocab_size``: then it is never embedded).
        image_size: square input size; must be a multiple of ``patch_size``.
        patch_size: ViT patch size (8 gives an 8x8 grid at 64 px: small marks stay visible).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the LLM.
        vision_hidden_size: width of the ViT and the abstractor.
        num_learnable_queries: abstractor queries (``num_image_tokens`` is this + 1).
        initializer_range: init std of every part. 0.1 avoids the long plateau of 0.02 at these
            widths (measured: a blur yes/no task leaves chance after ~300 steps and reaches 93% at
            ~700, AdamW lr 2e-3, batch 32; a brightness task is learnt in 50 steps).
        **overrides: any other :class:`MPLUGOwl2Config` field (e.g. ``max_position_embeddings``).

    Returns:
        The config.

    Raises:
        ValueError: if ``image_size`` is not a multiple of ``patch_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    vision_heads = 2 if vision_hidden_size % 2 == 0 else 1
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        image_token_index=image_token_index,
        vision_config=dict(
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=initializer_range,
        ),
        abstractor_config=dict(
            hidden_size=vision_hidden_size,
            encoder_hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size + 16,
            num_hidden_layers=2,
            num_attention_heads=vision_heads,
            grid_size=image_size // patch_size,
            num_learnable_queries=num_learnable_queries,
            initializer_range=initializer_range,
        ),
    )
    fields.update(overrides)
    return MPLUGOwl2Config(**fields)


__all__ = [
    "DEFAULT_TRAINABLE",
    "DIALECT",
    "FAMILY",
    "LORA_TARGETS",
    "MODULE_GROUPS",
    "apply_lora",
    "apply_trainable",
    "load_for_inference",
    "load_for_training",
    "optimizer_param_groups",
    "save_bundle",
    "MPLUGOwl2AbstractorConfig",
    "MPLUGOwl2CausalLMOutputWithPast",
    "MPLUGOwl2Config",
    "MPLUGOwl2ForCausalLM",
    "MPLUGOwl2Model",
    "MPLUGOwl2PreTrainedModel",
    "MPLUGOwl2VisionConfig",
    "build_tiny_config",
    "expand_image_tokens",
    "load_original",
    "read_original_state_dict",
]
