"""Batches for training (right-padded) and generation (left-padded).

Usage::

    from icmlab.inputs.collate import collate_for_training
    batch = collate_for_training([encode_conversation(record, tokenizer, ...)], pad_token_id=0)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from icmlab.inputs.encode import IGNORE_INDEX, EncodedSample


def pad_rows(rows: Sequence[Sequence[int]], value: int, length: int, left: bool) -> torch.Tensor:
    """``[len(rows), length]`` long tensor of ``rows`` padded with ``value`` on the right (or left)."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, length - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def sample_field(sample: EncodedSample | Mapping[str, Any], name: str) -> list[int]:
    """``input_ids`` / ``labels`` of a sample (mapping or :class:`EncodedSample`) as a list of ints."""
    value = sample[name] if isinstance(sample, Mapping) else getattr(sample, name)
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def collate_for_training(
    samples: Sequence[EncodedSample | Mapping[str, Any]], pad_token_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a training batch.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with ``-100``; ``attention_mask``
    is 1 on the real tokens. Unlike upstream (``input_ids != pad``), the mask comes from the
    lengths, so a genuine ``<unk>`` (id 0 = LLaMA's pad) inside the text stays attended.

    Args:
        samples: :class:`EncodedSample` objects or mappings with ``input_ids`` and ``labels``.
        pad_token_id: padding id (LLaMA training uses ``<unk>`` = 0).
        max_length: optional cut applied to every row (samples are normally cut already).

    Returns:
        ``{"input_ids", "labels", "attention_mask"}`` as ``[B, T]`` long tensors.

    Raises:
        ValueError: on an empty batch or ids/labels of different lengths.
    """
    if not samples:
        raise ValueError("collate_for_training: empty batch")
    ids = [sample_field(s, "input_ids")[:max_length] for s in samples]
    labels = [sample_field(s, "labels")[:max_length] for s in samples]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if len(a) != len(b):
            raise ValueError(f"collate_for_training: sample {i} has {len(a)} ids but {len(b)} labels")
    length = max(len(r) for r in ids)
    return {
        "input_ids": pad_rows(ids, pad_token_id, length, left=False),
        "labels": pad_rows(labels, IGNORE_INDEX, length, left=False),
        "attention_mask": pad_rows([[1] * len(r) for r in ids], 0, length, left=False),
    }


def collate_for_generation(
    prompts: Sequence[EncodedSample | Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched ``generate`` (new tokens then line up at the right edge).

    Args:
        prompts: :class:`EncodedSample` objects or plain id lists.
        pad_token_id: padding id.

    Returns:
        ``{"input_ids", "attention_mask"}`` as ``[B, T]`` long tensors.

    Raises:
        ValueError: on an empty batch or an empty prompt.
    """
    rows = [list(p.input_ids) if isinstance(p, EncodedSample) else list(p) for p in prompts]
    if not rows or any(not r for r in rows):
        raise ValueError("collate_for_generation: need at least one prompt and no empty prompt")
    length = max(len(r) for r in rows)
    return {
        "input_ids": pad_rows(rows, pad_token_id, length, left=True),
        "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, length, left=True),
    }
