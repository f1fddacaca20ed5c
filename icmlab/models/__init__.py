"""Model-family registry: each family (``llava15``, ``mplug_owl2``) is one module behind one interface.

The train, evaluate and inspect stages never branch on the model name; they ask this registry for
the family's adapter module, which provides:

- ``DIALECT``: the image token the family's JSON uses (``<image>`` / ``<|image|>``);
- ``MODULE_GROUPS``: ``{"vision_encoder": [...], "projector": [...], "llm": [...]}`` submodule
  names of the native model, used to freeze/unfreeze and to build optimizer groups;
- ``load_for_training(cfg) -> ModelBundle`` and ``load_for_inference(path, ...) -> ModelBundle``;
- ``save_bundle(bundle, out_dir)`` writing a layout that ``load_for_inference`` (and, for LLaVA,
  plain ``LlavaForConditionalGeneration.from_pretrained``) reads back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

FAMILIES: dict[str, str] = {
    "llava15": "icmlab.models.llava15",
    "mplug_owl2": "icmlab.models.mplug_owl2",
}


@dataclass
class ModelBundle:
    """A loaded model with everything needed to build its inputs.

    Attributes:
        model: the native ``PreTrainedModel`` (LlavaForConditionalGeneration or our MPLUGOwl2 model).
        tokenizer: the text tokenizer (right padding for training).
        image_processor: a CLIP-style image processor (``crop_size``/``image_mean``/``image_std``).
        image_token_id: id of the placeholder token that the text's image token expands into.
        num_image_tokens: placeholders per image (576 LLaVA-336, 65 mPLUG-Owl2-448).
        family: registry key.
        extra: family-specific facts (e.g. the source checkpoint, conversion notes).
    """

    model: Any
    tokenizer: Any
    image_processor: Any
    image_token_id: int
    num_image_tokens: int
    family: str
    extra: dict = field(default_factory=dict)


def get_family(name: str) -> ModuleType:
    """Return the adapter module of a model family.

    Raises:
        ValueError: if ``name`` is not a registered family.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; allowed: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
