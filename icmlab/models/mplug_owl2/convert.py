"""Bridges between the ORIGINAL mPLUG-Owl2 (X-PLUG code, transformers 4.31) and our native model.

- :func:`load_original`: load an original checkpoint directory (``config.json`` with
  ``visual_config`` + PyTorch ``.bin`` shards with their index, or ``.safetensors``) into
  :class:`~.modeling.MPLUGOwl2ForCausalLM`. Key names are used as they are (ours equal the
  original's); the per-layer ``rotary_emb.inv_freq`` buffers are dropped.
- :func:`read_original_state_dict`: the checkpoint's tensors as a dict (``weights_only=True``).
- :func:`expand_image_tokens`: turn original-form ids (one ``-200`` marker per image) into our
  form (``num_image_tokens`` placeholder ids per image), re-padding ids, mask and labels.

Save layout of a loaded model (``model.save_pretrained(out)``): ``config.json`` (model_type
``mplug_owl2``, LLaMA fields at top level, ``vision_config``/``abstractor_config`` blocks,
``image_token_index``), ``generation_config.json`` and ``model.safetensors`` (or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``) holding the original key
names without ``inv_freq``. ``MPLUGOwl2ForCausalLM.from_pretrained(out)`` reads it back, as does
``AutoModelForCausalLM`` once ``icmlab.models.mplug_owl2`` is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from icmlab.io import read_json

from .configuration import MPLUGOwl2Config
from .modeling import IGNORE_INDEX, MPLUGOwl2ForCausalLM

#: The original code's in-batch image marker.
ORIGINAL_IMAGE_MARKER = -200
#: Checkpoint entries that are recomputed rather than loaded.
DROPPED_KEY_PATTERN = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_WEIGHT_FILES = (
    ("model.safetensors.index.json", "safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "bin"),
    ("pytorch_model.bin", "bin"),
)


def _weight_files(path: Path) -> list[Path]:
    """List a checkpoint's weight files, preferring safetensors, resolving shard indexes."""
    for name, _ in _WEIGHT_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(candidate).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{candidate}: no 'weight_map' in the shard index")
            shards = [path / shard for shard in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"{candidate} lists shards that are missing: {missing}")
            return shards
        return [candidate]
    raise FileNotFoundError(
        f"{path}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]; "
        "point to the directory of an original mPLUG-Owl2 checkpoint"
    )


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an original checkpoint, dropping the recomputable RoPE buffers.

    ``.bin`` shards are read with ``torch.load(weights_only=True, mmap=True)``: no pickled code
    runs, and tensors stay memory-mapped until used.

    Args:
        path: checkpoint directory.

    Returns:
        ``{original key: tensor}`` without ``*.rotary_emb.inv_freq``.

    Raises:
        FileNotFoundError: if the directory holds no weights or a listed shard is missing.
        ValueError: if two shards hold the same key.
    """
    state: dict[str, torch.Tensor] = {}
    for shard in _weight_files(Path(path)):
        if shard.suffix == ".safetensors":
            part = load_file(str(shard))
        else:
            part = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        for key, tensor in part.items():
            if DROPPED_KEY_PATTERN.search(key):
                continue
            if key in state:
                raise ValueError(f"{shard}: key {key!r} also appears in another shard")
            state[key] = tensor
    return state


def load_original(
    path: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str | None = None,
    image_token_index: int | None = None,
    **from_pretrained_kwargs: Any,
) -> MPLUGOwl2ForCausalLM:
    """Load an ORIGINAL mPLUG-Owl2 checkpoint directory into the native model.

    Args:
        path: directory with the original ``config.json`` and weights (``.bin`` shards + index,
            or safetensors), e.g. a local copy of ``MAGAer13/mplug-owl2-llama2-7b``.
        dtype: parameter dtype (``"auto"`` keeps the on-disk dtype; the original code ran fp16).
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, or None (default).
        image_token_index: placeholder id; default ``vocab_size`` (never embedded).
        **from_pretrained_kwargs: forwarded to ``from_pretrained`` (e.g. ``device_map``).

    Returns:
        The model in eval mode, every checkpoint tensor loaded.

    Raises:
        FileNotFoundError: if ``config.json`` or the weights are missing.
        ValueError: if the checkpoint does not fit the config (missing, unexpected or
            mis-shaped tensors) or ``config.json`` is not an original mPLUG-Owl2 config.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: point to an original mPLUG-Owl2 checkpoint directory")
    _weight_files(path)  # fail early with a clear message
    overrides = {} if image_token_index is None else {"image_token_index": image_token_index}
    config = MPLUGOwl2Config.from_original_dict(read_json(config_file), **overrides)
    model, info = MPLUGOwl2ForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
        **from_pretrained_kwargs,
    )
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors: {sorted(info['missing_keys'])[:10]}")
    unexpected = [k for k in info.get("unexpected_keys", []) if not DROPPED_KEY_PATTERN.search(k)]
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)[:10]}")
    if info.get("mismatched_keys"):
        problems.append(f"shape mismatches: {list(info['mismatched_keys'])[:10]}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json: " + "; ".join(problems))
    # transformers 4.31 dumped every generation default into config.json (max_length 20, ...);
    # keep only the special tokens so callers' generate() arguments are not second-guessed.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.eval()


def expand_image_tokens(
    input_ids: torch.Tensor,
    *,
    num_image_tokens: int,
    image_token_index: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    marker: int = ORIGINAL_IMAGE_MARKER,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Replace each image marker by ``num_image_tokens`` placeholders and re-pad the batch.

    Only the tokens the attention mask keeps are carried over (padding is rebuilt), so the
    result is the native form of the same samples.

    Args:
        input_ids: ``[B, L]`` ids in original form (``marker`` where an image goes).
        num_image_tokens: placeholders per image (``config.num_image_tokens``).
        image_token_index: placeholder id (``config.image_token_index``).
        attention_mask: ``[B, L]`` 1/0; default all ones.
        labels: ``[B, L]``; image positions become ``-100``, padding ``-100``.
        marker: the image marker in ``input_ids`` (-200 in the original code).
        pad_token_id: id written into padding.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).

    Returns:
        ``{"input_ids", "attention_mask"[, "labels"]}`` of shape ``[B, T]``.

    Raises:
        ValueError: on a bad ``padding_side`` or mismatched shapes.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from input_ids {tuple(input_ids.shape)}")
    rows_ids, rows_labels = [], []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep]
        lab = labels[b][keep] if labels is not None else None
        is_marker = ids == marker
        repeats = torch.where(is_marker, num_image_tokens, 1)
        new_ids = torch.repeat_interleave(torch.where(is_marker, image_token_index, ids), repeats)
        rows_ids.append(new_ids)
        if lab is not None:
            rows_labels.append(torch.repeat_interleave(torch.where(is_marker, IGNORE_INDEX, lab), repeats))
    width = max(r.numel() for r in rows_ids)

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
        for i, r in enumerate(rows):
            if padding_side == "right":
                out[i, : r.numel()] = r
            else:
                out[i, width - r.numel() :] = r
        return out

    result = {
        "input_ids": pad(rows_ids, pad_token_id),
        "attention_mask": pad([torch.ones_like(r) for r in rows_ids], 0),
    }
    if labels is not None:
        result["labels"] = pad(rows_labels, IGNORE_INDEX)
    return result
