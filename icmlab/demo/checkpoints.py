"""Tiny random checkpoints in the real on-disk layouts, for the demo and for tests.

:func:`build_tiny_checkpoints` writes, deterministically from ``seed``:

- ``llava_hf`` → ``llava-1.5-demo-hf/``: a llava-hf checkpoint (``LlavaForConditionalGeneration``
  safetensors + config, tokenizer with ``<image>``/``<pad>``, ``LlavaProcessor`` with patch 8,
  ``num_additional_image_tokens=1``, a 64 px ``CLIPImageProcessor`` and a chat template). Loads with
  plain ``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``; the
  processor expands ``<image>`` into 64 tokens. Text vocabulary padded to a multiple of 64, and the
  vision tower equals the CLIP checkpoint's (LLaVA keeps CLIP frozen), as in the real release.
- ``vicuna`` → ``vicuna-demo-v1.5/``: a text-only ``LlamaForCausalLM`` (sharded safetensors with an
  index, like the real vicuna) whose tokenizer has NO image token: model assembly adds it.
- ``clip`` → ``clip-vit-demo-patch8-64/``: a full ``CLIPModel`` (tiny text tower included, as
  ``openai/clip-vit-large-patch14-336`` is) with its ``preprocessor_config.json``;
  ``CLIPVisionModel.from_pretrained`` reads its vision part.
- ``mm_projector`` → ``llava-v1.5-mlp2x-64px-pretrain-vicuna-demo-v1.5/mm_projector.bin``: a stage-1
  ``mlp2x_gelu`` projector saved with ``torch.save`` under the keys
  ``model.mm_projector.{0,2}.{weight,bias}``, next to an original-LLaVA-style ``config.json``.

Sizes follow ``demo-learnability.md``: CLIP hidden 32, 2 layers, image 64, patch 8 (64 image
tokens); Llama hidden 64, 2 layers, 4 heads, 2 kv heads; ``initializer_range=0.1`` in both (the
setting that removes the long loss plateau).

Other families write one folder each, named after their key in :data:`FOLDER_BUILDERS` (the tiny
mPLUG-Owl2 of :mod:`icmlab.demo.owl2`): the result then holds ``"mplug_owl2": out_dir / "mplug_owl2"``
and the manifest covers its files. Every model config comes from the families' tiny builders
(:mod:`icmlab.models.llava15.tiny`, :mod:`icmlab.models.mplug_owl2.tiny`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from icmlab.models.llava15.tiny import TEXT_DEFAULTS, VISION_DEFAULTS, build_tiny_config, tiny_text_config

from ..io import atomic_write_json, read_json
from .bundle import DEMO_VERSION, IMAGE_SIZE
from .owl2 import build_tiny_owl2
from .pack import sha256_file
from .tokenizer import demo_tokenizer

MANIFEST_NAME = "checkpoints_manifest.json"
DIRS: dict[str, str] = {
    "llava_hf": "llava-1.5-demo-hf",
    "vicuna": "vicuna-demo-v1.5",
    "clip": "clip-vit-demo-patch8-64",
    "mm_projector": "llava-v1.5-mlp2x-64px-pretrain-vicuna-demo-v1.5",
}
PATCH_SIZE = 8
#: The demo's CLIP tower and LLM: the tiny-builder defaults, 64 px / patch 8 and 2048 positions.
VISION_KWARGS = {**VISION_DEFAULTS, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
TEXT_KWARGS = {**TEXT_DEFAULTS, "max_position_embeddings": 2048}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

# llava-hf style chat template (no system prompt): "USER: <image>\n{text} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CheckpointBuilder = Callable[[Path, int], Path]
#: Builders of the other families' checkpoints: ``builder(dest, seed) -> dest`` creates the folder
#: ``dest`` (a staging path, renamed to ``out_dir / key``), writes nothing outside it and is
#: deterministic in ``seed``.
FOLDER_BUILDERS: dict[str, CheckpointBuilder] = {"mplug_owl2": build_tiny_owl2}


def image_processor():
    """The 64 px CLIP image processor (resize shortest edge, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _build_clip(dest: Path, seed: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION_KWARGS, projection_dim=32)).eval()
    model.save_pretrained(dest)
    image_processor().save_pretrained(dest)
    return model


def _build_vicuna(dest: Path, seed: int) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    tok = demo_tokenizer(image_token=None, pad_token=None)
    torch.manual_seed(seed + 1)
    model = LlamaForCausalLM(tiny_text_config(len(tok), max_position_embeddings=TEXT_KWARGS["max_position_embeddings"]))
    model = model.eval()
    # Two shards plus model.safetensors.index.json, the layout of the real 7B checkpoint.
    model.save_pretrained(dest, max_shard_size="300KB")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(dest)
    tok.save_pretrained(dest)


def _build_projector(dest: Path, seed: int, vision_tower: str) -> None:
    hidden, mm_hidden = TEXT_KWARGS["hidden_size"], VISION_KWARGS["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 2)
    std = TEXT_KWARGS["initializer_range"]
    state = {
        "model.mm_projector.0.weight": torch.randn(hidden, mm_hidden, generator=gen) * std,
        "model.mm_projector.0.bias": torch.zeros(hidden),
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=gen) * std,
        "model.mm_projector.2.bias": torch.zeros(hidden),
    }
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest / "mm_projector.bin")
    atomic_write_json(
        dest / "config.json",
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "hidden_size": hidden,
            "mm_hidden_size": mm_hidden,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_tower": vision_tower,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "tune_mm_mlp_adapter": True,
            "image_aspect_ratio": "square",
        },
    )


def _to_hub_key_layout(weights: Path) -> None:
    """Rename ``vision_tower.*`` to ``vision_tower.vision_model.*`` in a saved llava checkpoint.

    transformers 5 saves the vision tower without the ``vision_model`` level, while the hub's
    llava-hf checkpoints (written by transformers 4.x) have it; ``from_pretrained`` reads both, and
    the demo must look like what users actually download.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    renamed = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value.contiguous()
    save_file(renamed, weights, metadata={"format": "pt"})


def _build_llava_hf(dest: Path, seed: int, clip_model) -> None:
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = demo_tokenizer(image_token="<image>", pad_token="<pad>")
    vocab = -(-len(tok) // 64) * 64  # llava-hf pads the embeddings to a multiple of 64
    config = build_tiny_config(
        vocab,
        tok.convert_tokens_to_ids("<image>"),
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        text={"max_position_embeddings": TEXT_KWARGS["max_position_embeddings"], "pad_token_id": tok.pad_token_id},
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed + 3)
    model = LlavaForConditionalGeneration(config).eval()
    # LLaVA never trains CLIP, so the released vision tower IS the CLIP checkpoint's.
    model.model.vision_tower.load_state_dict(clip_model.vision_model.state_dict())
    model.save_pretrained(dest)
    _to_hub_key_layout(dest / "model.safetensors")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id).save_pretrained(dest)
    processor = LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(dest)
    # The hub's llava-hf repos also carry a standalone preprocessor_config.json.
    image_processor().save_pretrained(dest)


def _files_digest(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _result(out_dir: Path, names) -> dict[str, Path]:
    res = {k: out_dir / v for k, v in DIRS.items()}
    res["mm_projector"] = out_dir / DIRS["mm_projector"] / "mm_projector.bin"
    res.update({k: out_dir / k for k in names if k not in DIRS})
    return res


def build_tiny_checkpoints(out_dir: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write the tiny checkpoints (module docstring) under ``out_dir``.

    Idempotent: reused when ``checkpoints_manifest.json`` matches (seed, demo version, builders)
    and every listed file still has its size and sha256. Each checkpoint is written into a
    staging folder and renamed into place.

    Args:
        out_dir: destination folder.
        seed: weight seed (same seed → byte-identical files).
        force: rebuild even if the manifest matches.

    Returns:
        ``{"llava_hf", "vicuna", "clip": dir, "mm_projector": .../mm_projector.bin}`` plus one entry
        per :data:`FOLDER_BUILDERS` entry (``"mplug_owl2"``).
    """
    out_dir = Path(out_dir).resolve()
    names = list(DIRS) + sorted(FOLDER_BUILDERS)
    result = _result(out_dir, names)
    manifest_path = out_dir / MANIFEST_NAME
    if not force and manifest_path.is_file():
        m = read_json(manifest_path)
        if (m.get("demo_version"), m.get("seed"), m.get("builders")) == (DEMO_VERSION, seed, names) and all(
            (out_dir / rel).is_file()
            and (out_dir / rel).stat().st_size == e["size"]
            and sha256_file(out_dir / rel) == e["sha256"]
            for rel, e in m.get("files", {}).items()
        ):
            return result
    staging = out_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    clip = _build_clip(staging / DIRS["clip"], seed)
    _build_vicuna(staging / DIRS["vicuna"], seed)
    _build_projector(staging / DIRS["mm_projector"], seed, DIRS["clip"])
    _build_llava_hf(staging / DIRS["llava_hf"], seed, clip)
    for name in sorted(FOLDER_BUILDERS):
        FOLDER_BUILDERS[name](staging / name, seed)
    for name in names:
        folder = DIRS.get(name, name)
        target = out_dir / folder
        if target.exists():
            shutil.rmtree(target)
        (staging / folder).rename(target)
    shutil.rmtree(staging)
    files = {}
    for name in names:
        folder = out_dir / DIRS.get(name, name)
        files.update({f"{folder.name}/{rel}": e for rel, e in _files_digest(folder).items()})
    atomic_write_json(manifest_path, {"demo_version": DEMO_VERSION, "seed": seed, "builders": names, "files": files})
    return result
