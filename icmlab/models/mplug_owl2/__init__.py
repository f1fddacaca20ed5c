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
    save_bundle,
    save_original,
)
from .configuration import MPLUGOwl2AbstractorConfig, MPLUGOwl2Config, MPLUGOwl2VisionConfig
from .convert import expand_image_tokens, load_original, read_original_state_dict
from .modeling import (
    MPLUGOwl2CausalLMOutputWithPast,
    MPLUGOwl2ForCausalLM,
    MPLUGOwl2Model,
    MPLUGOwl2PreTrainedModel,
)
from .tiny import build_tiny_config

AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config, exist_ok=True)
AutoConfig.register(MPLUGOwl2VisionConfig.model_type, MPLUGOwl2VisionConfig, exist_ok=True)
AutoConfig.register(MPLUGOwl2AbstractorConfig.model_type, MPLUGOwl2AbstractorConfig, exist_ok=True)
AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2ForCausalLM, exist_ok=True)


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
    "save_bundle",
    "save_original",
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
