"""Tiny, fully offline training setups for the train-stage tests (``test_train.py``, ``test_resume.py``).

Builds in a temporary folder:

- a byte-level BPE tokenizer trained on the test prompts (specials ``<unk> <s> </s> <pad> <image>``);
- a llava-hf style checkpoint (``after``/CSFT start) with a 32 px CLIP tower (16 image tokens),
  and the MSFT parts (Vicuna-like LLM, CLIP tower, stage-1 ``mm_projector.bin``);
- a data root with small non-square PNG images and a LLaVA-format training JSON that mixes image
  and text-only records, placed where the train stage reads it (``paths.training_json``).

Everything is seeded, so two builds are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from icmlab import paths
from icmlab.config import RunConfig, config_from_dict
from icmlab.inputs.images import build_image_processor
from icmlab.io import atomic_write_json
from icmlab.models.llava15.tiny import build_tiny_config, tiny_text_config, tiny_vision_config

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QUESTIONS = ["Is this image bright?", "Is the picture dark?", "Describe the image quality."]
TEXT_ONLY = [("What is two plus two?", "Four."), ("Name a colour.", "Blue."), ("Say hello.", "Hello there.")]


def corpus() -> list[str]:
    """Texts the tokenizer is trained on (prompts, answers, template words)."""
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )
    return [system, "USER: ASSISTANT:", *QUESTIONS, "Yes. No. bright dark", *[a for qa in TEXT_ONLY for a in qa]] * 20


def make_tokenizer(with_image_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (about 300 tokens) with LLaMA-style BOS handling."""
    specials = SPECIALS if with_image_tokens else SPECIALS[:3]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs: dict[str, Any] = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_image_tokens:
        kwargs.update(pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(**kwargs)


def build_llava_hf(out: Path, seed: int = 0) -> Path:
    """A tiny llava-hf checkpoint (model + tokenizer + image processor) for ``strategy: after``."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = build_tiny_config(len(tok), tok.convert_tokens_to_ids("<image>"), text={"pad_token_id": 3}, pad_token_id=3)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor(32).save_pretrained(out)
    return out


def build_mplug_owl2(out: Path, seed: int = 0) -> Path:
    """A tiny mPLUG-Owl2 checkpoint in icmlab's layout (32 px, patch 8, 8 queries → 9 image tokens)."""
    from icmlab.models import mplug_owl2 as owl

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = owl.build_tiny_config(vocab_size=len(tok), image_token_index=len(tok), image_size=32, patch_size=8)
    owl.MPLUGOwl2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor(32).save_pretrained(out)
    return out


def to_mplug_dialect(records: list[dict]) -> list[dict]:
    """The records with ``<image>`` replaced by mPLUG-Owl2's ``<|image|>`` (what merge does for that family)."""
    return [
        {**r, "conversations": [{**c, "value": c["value"].replace("<image>", "<|image|>")} for c in r["conversations"]]}
        for r in records
    ]


def build_mix_parts(out: Path, seed: int = 0) -> dict[str, Path]:
    """Vicuna-like LLM + CLIP tower + stage-1 projector, laid out as upstream ships them (``strategy: mix``)."""
    torch.manual_seed(seed)
    tok = make_tokenizer(with_image_tokens=False)
    llm = LlamaForCausalLM(tiny_text_config(len(tok), pad_token_id=3))
    llm.save_pretrained(out / "vicuna")
    tok.save_pretrained(out / "vicuna")
    CLIPVisionModel(tiny_vision_config()).save_pretrained(out / "clip")
    g = torch.Generator().manual_seed(seed)
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32, generator=g) * 0.1,
        "model.mm_projector.0.bias": torch.zeros(64),
        "model.mm_projector.2.weight": torch.randn(64, 64, generator=g) * 0.1,
        "model.mm_projector.2.bias": torch.zeros(64),
    }
    torch.save(projector, out / "mm_projector.bin")
    return {"llm": out / "vicuna", "vision_tower": out / "clip", "mm_projector": out / "mm_projector.bin"}


def build_records(root: Path, n_image: int = 24, n_text: int = 8, seed: int = 0) -> list[dict]:
    """Write ``n_image`` small PNGs under ``root/images`` and return LLaVA records (+ text-only ones)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_image):
        bright = bool(i % 2)
        w, h = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        base = rng.integers(160, 255) if bright else rng.integers(0, 90)
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        q = QUESTIONS[i % 2]
        a = ("Yes." if bright else "No.") if i % 2 == 0 else ("No." if bright else "Yes.")
        records.append(
            {
                "id": f"img{i}",
                "image": f"images/{i}.png",
                "conversations": [{"from": "human", "value": f"{q}\n<image>"}, {"from": "gpt", "value": a}],
            }
        )
    for i in range(n_text):
        q, a = TEXT_ONLY[i % len(TEXT_ONLY)]
        records.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    order = rng.permutation(len(records))
    return [records[k] for k in order]


def make_config(tmp: Path, model_dir: Path | dict[str, Path], *, run_name: str = "tiny", **train: Any) -> RunConfig:
    """A CPU RunConfig over the tiny model; ``train`` overrides ``cfg.train`` keys (e.g. ``max_steps=3``)."""
    mix = isinstance(model_dir, dict)
    family = train.pop("family", "llava15")
    model = (
        {"family": family, "size": "tiny", "dtype": "float32", **{k: str(v) for k, v in model_dir.items()}}
        if mix
        else {"family": family, "size": "tiny", "base": str(model_dir), "base_format": "hf", "dtype": "float32"}
    )
    t = {
        "strategy": "mix" if mix else "after",
        "max_steps": 3,
        "per_device_batch_size": 4,
        "global_batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_steps": 1000,
        "save_total_limit": 2,
        "gradient_checkpointing": False,
        "bf16": False,
        "tf32": False,
        "dataloader_num_workers": 0,
        "group_by_modality_length": True,
        "report_to": ["none"],
    }
    t.update(train)
    raw = {
        "run_name": run_name,
        "seed": 7,
        "runs_root": str(tmp / "runs"),
        "model": model,
        "data": {"root": str(tmp / "data"), "datasets": ["icm_instruct"], "model_max_length": 256},
        "train": t,
        "hardware": {
            "device": "cpu",
            "num_gpus": 1,
            "deepspeed": "none",
            "attn_implementation": "sdpa",
            "launcher": "inprocess",
        },
    }
    return config_from_dict(raw, base_dir=tmp)


def write_training_json(cfg: RunConfig, records: list[dict]) -> Path:
    """Put the records where the train stage reads them (the merge stage's output path)."""
    return atomic_write_json(paths.merged_json(cfg), records)
