"""Model-family registry: each family (``llava15``, ``mplug_owl2``) is one module behind one interface.

The train, evaluate and inspect stages never branch on the model name; they ask this registry for
the family's adapter module, which provides:

- ``SPEC``: the family's row of :mod:`icmlab.models.spec` (image token, sizes, templates, parts);
- ``MODULE_GROUPS``: ``{"vision_encoder": [...], "projector": [...], "llm": [...]}`` submodule
  names of the native model, used to freeze/unfreeze and to build optimizer groups;
- ``load_for_training(cfg) -> ModelBundle`` and ``load_for_inference(path, ...) -> ModelBundle``;
- ``save_bundle(bundle, out_dir)`` writing a layout that ``load_for_inference`` (and, for LLaVA,
  plain ``LlavaForConditionalGeneration.from_pretrained``) reads back.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from icmlab.models.spec import FAMILY_SPECS

#: family -> adapter module (from :data:`icmlab.models.spec.FAMILY_SPECS`).
FAMILIES: dict[str, str] = {name: s.adapter for name, s in FAMILY_SPECS.items()}


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


#: ``train.loss_normalization`` values (see :mod:`icmlab.train.loss`).
LOSS_NORMALIZATIONS = ("micro_batch_mean", "token_mean")


def set_loss_normalization(model: Any, mode: str) -> None:
    """Tell the HF Trainer how ``model``'s loss is averaged over a step (its ``accepts_loss_kwargs`` switch).

    ``micro_batch_mean`` (upstream): the Trainer passes no token count, the model returns the mean over
    the micro-batch's answer tokens and the Trainer divides by the accumulation steps (ranks average
    their gradients). ``token_mean`` (transformers 5): the Trainer counts the answer tokens of the
    global batch and the model divides its summed loss by that count. Set on the unwrapped model
    (a PEFT wrapper forwards the attribute to it).

    Raises:
        ValueError: for an unknown mode, naming ``train.loss_normalization``.
    """
    if mode not in LOSS_NORMALIZATIONS:
        raise ValueError(f"train.loss_normalization: {mode!r}; allowed: {', '.join(LOSS_NORMALIZATIONS)}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.accepts_loss_kwargs = mode == "token_mean"


def get_family(name: str) -> ModuleType:
    """Return the adapter module of a model family.

    Raises:
        ValueError: if ``name`` is not a registered family.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; allowed: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def write_bundle_dir(out_dir: str | Path, bundle: ModelBundle, write: Callable[[Path], None]) -> Path:
    """Save a bundle through a staging folder beside ``out_dir``.

    ``write(tmp)`` saves the model, tokenizer and processor files; ``icmlab_bundle.json`` (family,
    image-token facts, JSON-able extras) is added, and the files move into ``out_dir`` with
    ``config.json`` last, so an interrupted save never looks like a complete checkpoint.
    """
    from icmlab.io import atomic_write_json

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        atomic_write_json(
            tmp / "icmlab_bundle.json",
            {
                "family": bundle.family,
                "image_token_id": bundle.image_token_id,
                "num_image_tokens": bundle.num_image_tokens,
                "extra": {k: v for k, v in bundle.extra.items() if isinstance(v, (str, int, float, bool, dict, list))},
            },
        )
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_safetensors(state: dict[str, Any], out_dir: Path, max_shard_size: str = "5GB") -> list[Path]:
    """Write a state dict as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``
    when it exceeds ``max_shard_size`` (the file names transformers and the serving engines read).

    Returns:
        The files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from icmlab.io import atomic_write_json

    out_dir = Path(out_dir)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    written = []
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(out_dir / filename), metadata={"format": "pt"})
        written.append(out_dir / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        written.append(atomic_write_json(out_dir / "model.safetensors.index.json", index))
    return written
