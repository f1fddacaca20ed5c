"""Tiny random LLaVA-v1.5 configs with the real model's structure: the one builder for the demo,
tests and benchmarks.

The defaults are the sizes of ``demo-learnability.md``: CLIP width 32, 2 layers, 2 heads; Llama
width 64, 2 layers, 4 heads, 2 KV heads; ``initializer_range=0.1`` (it removes the long loss
plateau of 0.02 at these widths). ``image_size // patch_size`` squared patches give the image
tokens (the CLS token is dropped, ``vision_feature_select_strategy="default"``).

Usage::

    from icmlab.models.llava15.tiny import build_tiny_config
    config = build_tiny_config(vocab_size=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(config)                   # 32 px, patch 8: 16 image tokens
    real_geometry = build_tiny_config(300, 299, image_size=336, patch_size=14)   # 576 image tokens
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

#: Vision tower of every tiny LLaVA (``image_size``/``patch_size`` are set per call).
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
    initializer_range=0.1,
)
#: Language model of every tiny LLaVA (and of the text-only "vicuna" part of the demo).
TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_vision_config(image_size: int = 32, patch_size: int = 8, **overrides: Any) -> CLIPVisionConfig:
    """A tiny CLIP vision config (``VISION_DEFAULTS`` updated by ``overrides``).

    Raises:
        ValueError: if ``image_size`` is not a multiple of ``patch_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return CLIPVisionConfig(**{**VISION_DEFAULTS, "image_size": image_size, "patch_size": patch_size, **overrides})


def tiny_text_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A tiny Llama config (``TEXT_DEFAULTS`` updated by ``overrides``)."""
    return LlamaConfig(**{**TEXT_DEFAULTS, "vocab_size": vocab_size, **overrides})


def build_tiny_config(
    vocab_size: int,
    image_token_index: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    **overrides: Any,
) -> LlavaConfig:
    """Config of a tiny random LLaVA-v1.5 (``LlavaForConditionalGeneration``).

    Args:
        vocab_size: text vocabulary (embedding rows), e.g. ``len(tokenizer)``.
        image_token_index: id of ``<image>``.
        image_size, patch_size: the vision tower's geometry; ``(image_size // patch_size) ** 2``
            image tokens per image.
        vision: overrides of the vision config (see :data:`VISION_DEFAULTS`).
        text: overrides of the text config (see :data:`TEXT_DEFAULTS`), e.g. ``pad_token_id``.
        **overrides: any other :class:`~transformers.LlavaConfig` field.

    Returns:
        The config; the LLaVA-v1.5 choices (feature layer -2, CLS dropped) are set.

    Raises:
        ValueError: if ``image_size`` is not a multiple of ``patch_size``.
    """
    fields: dict[str, Any] = dict(
        vision_config=tiny_vision_config(image_size, patch_size, **(vision or {})),
        text_config=tiny_text_config(vocab_size, **(text or {})),
        image_token_index=image_token_index,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaConfig(**{**fields, **overrides})
