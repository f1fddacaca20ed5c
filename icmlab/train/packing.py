"""Multimodal sequence packing inside one micro-batch (``train.packing: true``).

The samples of a micro-batch (tokenized, image placeholders already expanded) are laid out in as
few rows of at most ``max_length`` tokens as possible, so the batch carries (almost) no padding.
What the optimizer step sees is unchanged: the same samples, the same trained tokens and the same
loss (:mod:`tests.test_packing` proves loss, gradients and per-sample logits equal the unpacked
batch's). Only the padding, and the compute spent on it, goes away.

How the rows stay independent:

- **Rows**: first-fit decreasing over the sample lengths (:func:`plan_rows`); a sample is never
  split, and one longer than ``max_length`` gets a row of its own.
- **Position ids** restart at 0 for every sample. There is **no** ``attention_mask``: with
  ``attention_mask=None`` transformers (5.x ``masking_utils.find_packed_sequence_indices``) starts a
  new segment wherever a position id does not follow its left neighbour by +1 and builds a
  block-diagonal causal mask for sdpa/eager, so no token attends across samples.
- **Padding** (right, up to the longest row) gets ``input_ids = pad``, ``labels = -100`` and position
  ids restarting at 0: a segment of its own, attended by nobody else (it also lies after every
  real token of its row, so the causal mask hides it anyway).
- **Label boundary**: the first label of every packed sample is ``-100``. The shifted loss would
  otherwise train the last token of one sample to predict the first token of the next. (It is
  BOS in our samples, masked already; the rule keeps packing correct for any sample.)
- **Images**: ``pixel_values`` are stacked in the order of the placeholder runs in the flattened
  rows, the order in which LLaVA and mPLUG-Owl2 scatter image features.
- **No KV cache**: the batch carries ``use_cache=False``. transformers ignores the position-id
  segments whenever a cache object exists, and LLaVA's inner ``LlamaModel`` reads ``use_cache``
  from ``text_config`` (left ``True`` by the checkpoints), so it would build a ``DynamicCache`` in
  every training forward and silently attend across the packed samples.
- **flash-attention 2** (``flatten=True``): transformers runs varlen flash-attn from position ids
  only for a batch of *one* row (``_is_packed_sequence`` needs ``batch_size == 1``); with several
  rows it would run plain causal attention across the packed samples. The rows are therefore
  concatenated into a single ``[1, total]`` row without any padding.

Usage::

    batch = pack_samples([ds[i] for i in idx], pad_token_id=tok.pad_token_id, max_length=2048)
    loss = model(**batch).loss          # == model(**collate_for_training(...)).loss
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from icmlab.inputs.collate import pad_rows, sample_field
from icmlab.inputs.encode import IGNORE_INDEX


def plan_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Assign samples to rows by first-fit decreasing.

    Samples are taken longest first (ties by index, so the plan is deterministic) and put into the
    first row that still has room; a sample that fits nowhere opens a new row. A sample longer
    than ``max_length`` opens a row that nothing else joins.

    Args:
        lengths: token count of every sample.
        max_length: capacity of a row (``data.model_max_length``).

    Returns:
        The rows, each a list of sample indices in placement order; every index appears once.

    Raises:
        ValueError: ``max_length`` < 1 or a length < 1.
    """
    if max_length < 1:
        raise ValueError(f"packing needs a positive row length (data.model_max_length), got {max_length}")
    bad = [i for i, n in enumerate(lengths) if n < 1]
    if bad:
        raise ValueError(f"packing: sample {bad[0]} of the micro-batch has no tokens")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(max_length - n, 0))
    return rows


def _pixels(sample: Mapping[str, Any] | Any) -> torch.Tensor | None:
    if isinstance(sample, Mapping):
        return sample.get("pixel_values")
    return getattr(sample, "pixel_values", None)


def pack_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    max_length: int,
    flatten: bool = False,
) -> dict[str, Any]:
    """Pack a micro-batch into rows (see the module docstring for the layout).

    Args:
        samples: mappings (or objects) with ``input_ids``, ``labels`` and optionally
            ``pixel_values`` (``[3, H, W]`` or None for text-only samples).
        pad_token_id: id written into the padding.
        max_length: row capacity (``data.model_max_length``).
        flatten: concatenate all rows into one unpadded row (flash-attention 2).

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` as ``[R, T]`` long tensors (``R = 1`` when
        flattened), plus ``pixel_values`` ``[num_images, 3, H, W]`` when any sample has an image.
        No ``attention_mask``: its absence is what makes transformers read the segments from
        ``position_ids``. ``use_cache`` is ``False`` (a cache would switch that reading off).

    Raises:
        ValueError: an empty batch, a sample without tokens, or ids and labels of different lengths.
    """
    if not samples:
        raise ValueError("pack_samples: empty micro-batch")
    ids = [sample_field(s, "input_ids") for s in samples]
    labels = [sample_field(s, "labels") for s in samples]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if len(a) != len(b):
            raise ValueError(f"pack_samples: sample {i} has {len(a)} input_ids but {len(b)} labels")
    plan = plan_rows([len(a) for a in ids], max_length)

    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    images: list[torch.Tensor] = []
    for row in plan:
        r_ids: list[int] = []
        r_labels: list[int] = []
        r_pos: list[int] = []
        for i in row:
            r_ids += ids[i]
            # Label boundary: nothing before this sample may learn to predict its first token.
            r_labels += [IGNORE_INDEX] + labels[i][1:]
            r_pos += range(len(ids[i]))
            pixels = _pixels(samples[i])
            if pixels is not None:
                images.append(pixels)  # row by row, sample by sample = placeholder-run order
        rows_ids.append(r_ids)
        rows_labels.append(r_labels)
        rows_pos.append(r_pos)
    if flatten:
        rows_ids = [[t for r in rows_ids for t in r]]
        rows_labels = [[t for r in rows_labels for t in r]]
        rows_pos = [[t for r in rows_pos for t in r]]

    width = max(len(r) for r in rows_ids)
    # Padding restarts at 0 too: a separate segment for find_packed_sequence_indices.
    rows_pos = [p + list(range(width - len(p))) for p in rows_pos]
    batch: dict[str, Any] = {
        "input_ids": pad_rows(rows_ids, pad_token_id, width, left=False),
        "labels": pad_rows(rows_labels, IGNORE_INDEX, width, left=False),
        "position_ids": pad_rows(rows_pos, 0, width, left=False),
        "use_cache": False,
    }
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


def padding_fraction(row_lengths: Sequence[int], width: int | None = None) -> float:
    """Share of a right-padded ``[len(row_lengths), width]`` batch that is padding.

    Args:
        row_lengths: real tokens per row.
        width: padded row length; default the longest row.

    Returns:
        ``1 - sum(row_lengths) / (rows × width)`` (0.0 for an empty batch).
    """
    if not row_lengths:
        return 0.0
    width = max(row_lengths) if width is None else width
    return 1.0 - sum(row_lengths) / (len(row_lengths) * width)
