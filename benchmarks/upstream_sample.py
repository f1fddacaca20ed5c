"""A re-implementation of upstream LLaVA-v1.5's per-sample path, for the input-pipeline benchmark.

``LazySupervisedDataset.__getitem__`` of LLaVA (``--version v1``, ``image_aspect_ratio pad``, the
transformers 4.37 ``CLIPImageProcessor``) does, per sample:

1. ``Image.open(path).convert("RGB")``, ``expand2square`` on the mean colour;
2. ``processor.preprocess(image, return_tensors="pt")``: ``convert_rgb``, ``to_numpy_array``,
   the shortest-edge size, ``resize`` (numpy -> PIL -> bicubic -> numpy), ``center_crop``,
   ``rescale`` (float64 product cast to float32), ``normalize``, channels first, ``BatchFeature``;
3. ``preprocess_multimodal`` on a deep copy of the turns (image token moved to the front);
4. ``preprocess_v1``: the ``vicuna_v1`` prompt, ``tokenizer_image_token`` (one tokenizer call per
   text chunk around ``<image>``), then per round two more ``tokenizer_image_token`` calls to find
   the instruction and round lengths, and the label masking.

The numpy image steps are transformers' own ``image_transforms`` functions, called in that
order (they are the 4.37 code paths, still shipped); the text steps are written from the
documented behaviour. Nothing of upstream is imported or copied. Only the work matters here:
the ids of this function are not the trainer's (transformers 5 tokenizes chunks differently; the
trainer's ids are checked against upstream fixtures in ``tests/test_preprocess.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_transforms import (
    center_crop,
    get_resize_output_image_size,
    normalize,
    rescale,
    resize,
    to_channel_dimension_format,
)
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format, to_numpy_array

from icmlab.inputs.conversation import get_template
from icmlab.inputs.images import expand2square  # the fixture-proven equal of upstream's

IGNORE, IMAGE_INDEX, IMAGE_TOKEN = -100, -200, "<image>"


def clip_preprocess(img: Image.Image, proc: Any) -> torch.Tensor:
    """The 4.37 ``CLIPImageProcessor.preprocess`` of one image (``return_tensors="pt"``)."""
    img = img.convert("RGB")  # convert_rgb
    arr = to_numpy_array(img)
    fmt = infer_channel_dimension_format(arr)
    size = get_resize_output_image_size(
        arr, size=proc.size.shortest_edge, default_to_square=False, input_data_format=fmt
    )
    arr = resize(arr, size=size, resample=Image.Resampling.BICUBIC, input_data_format=fmt)
    crop = (proc.crop_size.height, proc.crop_size.width)
    arr = center_crop(arr, size=crop, input_data_format=fmt)
    arr = rescale(arr, scale=proc.rescale_factor, input_data_format=fmt)
    arr = normalize(arr, mean=proc.image_mean, std=proc.image_std, input_data_format=fmt)
    arr = to_channel_dimension_format(arr, ChannelDimension.FIRST, input_channel_dim=fmt)
    return BatchFeature(data={"pixel_values": [arr]}, tensor_type="pt")["pixel_values"]


def tokenizer_image_token(prompt: str, tokenizer: Any) -> list[int]:
    """Tokenize the chunks around ``<image>`` separately and join them with ``IMAGE_INDEX``."""
    chunks = [tokenizer(c).input_ids for c in prompt.split(IMAGE_TOKEN)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_INDEX)
        ids.extend(chunk[offset:])
    return ids


def preprocess_v1(turns: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    tmpl = get_template("vicuna_v1")
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[turns[0]["from"]] != "USER":
        turns = turns[1:]
    prompt = tmpl.system + tmpl.sep
    for j, t in enumerate(turns):
        prompt += f"{roles[t['from']]}: {t['value']}" + (tmpl.sep if j % 2 == 0 else tmpl.sep2)
    input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    target = input_ids.clone()
    sep = tmpl.sep + "ASSISTANT: "
    cur = 1
    target[:cur] = IGNORE
    for rou in prompt.split(tmpl.sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur : cur + instruction_len] = IGNORE
        cur += round_len
    target[cur:] = IGNORE
    return {"input_ids": input_ids, "labels": target}


def upstream_sample(record: dict, root: Path, tokenizer: Any, proc: Any) -> dict[str, torch.Tensor]:
    """One training sample the way upstream builds it (``image_aspect_ratio pad``)."""
    image = Image.open(root / record["image"]).convert("RGB")
    image = expand2square(image, tuple(int(x * 255) for x in proc.image_mean))
    pixels = clip_preprocess(image, proc)[0]
    turns = copy.deepcopy(record["conversations"])
    for t in turns:
        if IMAGE_TOKEN in t["value"]:
            t["value"] = (IMAGE_TOKEN + "\n" + t["value"].replace(IMAGE_TOKEN, "").strip()).strip()
    out = preprocess_v1(turns, tokenizer)
    out["image"] = pixels
    return out


class UpstreamDataset(torch.utils.data.Dataset):
    """:func:`upstream_sample` over records, as a ``Dataset`` (for the DataLoader comparison)."""

    def __init__(self, records: list[dict], root: Path, tokenizer: Any, proc: Any) -> None:
        self.records, self.root, self.tokenizer, self.proc = records, root, tokenizer, proc

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return upstream_sample(self.records[i], self.root, self.tokenizer, self.proc)


def upstream_collate(samples: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Upstream's ``DataCollatorForSupervisedDataset``: ``pad_sequence`` of ids (pad id) and labels
    (-100), cut at ``model_max_length``, ``attention_mask = ids != pad``, images stacked."""
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([s["input_ids"] for s in samples], batch_first=True, padding_value=pad_token_id)[:, :max_length]
    labels = pad([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE)[:, :max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": ids.ne(pad_token_id),
        "images": torch.stack([s["image"] for s in samples]),
    }


def max_pixel_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two pixel tensors (the benchmark prints it as a parity check)."""
    return float(np.abs(a.numpy() - b.numpy()).max())
