"""Writing the ORIGINAL mPLUG-Owl2 layout (X-PLUG code, transformers 4.31) from the native model.

The inverse of :func:`~.convert.load_original`, so a model trained here runs in the original
``mplug_owl2`` code and the tools built on it (Q-Align, IQA-PyTorch):

- key names: ours already are the original's (``k_proj.multiway.0/1``, the fused vision
  ``query_key_value``, ``visual_abstractor.encoder.layers.N.crossattention.attention.{q,k}_pos_embed``);
  the per-layer ``model.layers.N.self_attn.rotary_emb.inv_freq`` buffers that transformers 4.31
  kept in the state dict (and the official converter wrote) are added back, computed as 4.31 does;
- ``config.json``: LLaMA fields at the top level, ``architectures: [MPLUGOwl2LlamaForCausalLM]``
  and the nested ``visual_config.{visual_model, visual_abstractor}`` blocks with the fields the
  original config classes read (:data:`ORIGINAL_VISION_FIXED`, :data:`ORIGINAL_ABSTRACTOR_FIXED`).

Usage::

    from icmlab.models.mplug_owl2.original import save_original
    save_original(bundle.model, out_dir, tokenizer=bundle.tokenizer, image_processor=bundle.image_processor)
    # reload: icmlab.models.mplug_owl2.load_original(out_dir) or the original builder
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from icmlab.models import write_safetensors

from .configuration import _ABSTRACTOR_KEYS, _VISION_KEYS, MPLUGOwl2Config

#: ``architectures`` of the original checkpoints (``MAGAer13/mplug-owl2-llama2-7b``).
ORIGINAL_ARCHITECTURE = "MPLUGOwl2LlamaForCausalLM"
#: The LLaMA fields of the original ``config.json`` (top level), as the 7B release writes them.
ORIGINAL_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp", "tie_word_embeddings", "use_cache",
    "attention_bias",
)  # fmt: skip
#: Fields of the original ``MplugOwlVisionConfig`` that mPLUG-Owl2 always sets this way
#: (``projection_dim`` is read by no forward pass; 768 is the class default the 7B release keeps).
ORIGINAL_VISION_FIXED = {
    "model_type": "mplug_owl_vision_model",
    "use_cls_token": True,
    "use_post_layernorm": True,
    "use_flash_attn": False,
    "projection_dim": 768,
}
#: Fields of the original ``MplugOwlVisualAbstractorConfig`` that mPLUG-Owl2 always sets this way.
ORIGINAL_ABSTRACTOR_FIXED = {
    "model_type": "mplug_owl_visual_abstract",
    "use_cls_token": True,
    "add_v2t_pos_emb": False,
}
#: The state-dict entries the original carries beyond ours (one per decoder layer).
INV_FREQ_KEY = "model.layers.{}.self_attn.rotary_emb.inv_freq"
#: Shard size of the original-layout weights (the 7B release ships 33 shards of ~500 MB).
MAX_SHARD_SIZE = "5GB"


def rope_theta(config: MPLUGOwl2Config) -> float:
    """The RoPE base of a config.

    Raises:
        ValueError: for a scaled RoPE, which the original code (transformers 4.31 LLaMA) reads
            differently (``rope_scaling: {type, factor}``) and this export does not translate.
    """
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_parameters.rope_type={params['rope_type']!r}: only the default RoPE of mPLUG-Owl2 "
            "can be written in the original layout"
        )
    return float(params.get("rope_theta", 10000.0))


def rotary_inv_freq(config: MPLUGOwl2Config) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in float32, the ``LlamaRotaryEmbedding.inv_freq`` buffer of transformers 4.31."""
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2).float() / dim))


def original_config_dict(config: MPLUGOwl2Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The original ``config.json`` of a native config (what :meth:`MPLUGOwl2Config.from_original_dict` reads back).

    Args:
        config: the native config.
        dtype: the weights' dtype, written as ``torch_dtype`` (4.31's name for it).
    """
    raw: dict[str, Any] = {"architectures": [ORIGINAL_ARCHITECTURE], "model_type": "mplug_owl2"}
    raw.update({k: getattr(config, k) for k in ORIGINAL_TEXT_KEYS})
    raw["rope_theta"] = rope_theta(config)
    raw["rope_scaling"] = None
    vision, abstractor = config.vision_config, config.abstractor_config
    raw["visual_config"] = {
        "visual_model": {**{k: getattr(vision, k) for k in _VISION_KEYS}, **ORIGINAL_VISION_FIXED},
        "visual_abstractor": {**{k: getattr(abstractor, k) for k in _ABSTRACTOR_KEYS}, **ORIGINAL_ABSTRACTOR_FIXED},
    }
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    return raw


def original_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the original key names, ``rotary_emb.inv_freq`` buffers included.

    A PEFT-wrapped model must be merged first (``merge_and_unload``).

    Raises:
        ValueError: if the model still carries LoRA or PEFT wrapper keys.
    """
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    wrapped = [k for k in state if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    if wrapped:
        raise ValueError(f"merge the LoRA adapter before writing the original layout (found {wrapped[:3]})")
    inv_freq = rotary_inv_freq(model.config)
    for i in range(model.config.num_hidden_layers):
        state[INV_FREQ_KEY.format(i)] = inv_freq.clone()
    return state


def save_original(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    image_processor: Any = None,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Write ``out_dir`` in the original mPLUG-Owl2 layout: ``config.json`` + safetensors (+ index),
    the tokenizer and the CLIP ``preprocessor_config.json``.

    Files go to a staging folder beside ``out_dir`` and move in with ``config.json`` last, so an
    interrupted save never looks like a complete checkpoint.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = original_state_dict(model)
        write_safetensors(state, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        dtype = next(iter(model.parameters())).dtype
        (tmp / "config.json").write_text(json.dumps(original_config_dict(model.config, dtype), indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
