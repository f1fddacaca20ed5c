"""LLaVA-v1.5 on transformers' native ``LlavaForConditionalGeneration``.

- :mod:`~icmlab.models.llava15.adapter`: the family-adapter API of :mod:`icmlab.models` (load,
  trainable groups, optimizer groups, LoRA, save in the llava-hf layout), re-exported here;
- :mod:`~icmlab.models.llava15.convert`: original ``liuhaotian`` checkpoints and the MSFT parts
  (Vicuna + CLIP + stage-1 projector) into the native model;
- :mod:`~icmlab.models.llava15.files`: reading checkpoint folders (local or cached);
- :mod:`~icmlab.models.llava15.tiny`: the tiny-model builder of the demo, tests and benchmarks.
"""

from icmlab.models.llava15.adapter import (
    ATTN_CHOICES,
    CHAT_TEMPLATE,
    DEFAULT_TRAINABLE,
    DIALECT,
    FAMILY,
    LORA_TARGETS,
    MODULE_GROUPS,
    SPEC,
    add_image_and_pad_tokens,
    apply_lora,
    apply_trainable,
    load_for_inference,
    load_for_training,
    real_config,
    resolve_attn_implementation,
    resolve_dtype,
    save_bundle,
    save_hub_layout,
    training_dtype,
)
from icmlab.models.llava15.tiny import build_tiny_config

__all__ = [
    "ATTN_CHOICES",
    "CHAT_TEMPLATE",
    "DEFAULT_TRAINABLE",
    "DIALECT",
    "FAMILY",
    "LORA_TARGETS",
    "MODULE_GROUPS",
    "SPEC",
    "add_image_and_pad_tokens",
    "apply_lora",
    "apply_trainable",
    "build_tiny_config",
    "load_for_inference",
    "load_for_training",
    "real_config",
    "resolve_attn_implementation",
    "resolve_dtype",
    "save_bundle",
    "save_hub_layout",
    "training_dtype",
]
