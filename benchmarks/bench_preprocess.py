"""Benchmark of the shared preprocessing: tokenization + label masking, and the image pipeline.

1. Text: 1,000 mixed records (Q-Instruct multiple choice, ICM-style descriptions, multi-turn,
   text-only) through :func:`icmlab.inputs.encode.encode_conversation` with the real LLaMA-2
   tokenizer, against a baseline measured in the same run: a plain ``tokenizer(prompt)`` call on
   the same rendered prompt strings (no labels, no image handling).
2. Images: synthetic JPEGs written on the fly, loaded and preprocessed at 336 px with ``pad``
   (upstream v1.5) against the processor's own path (``square``, no padding) as the baseline.

Run from the repository root: ``.venv/bin/python benchmarks/bench_preprocess.py`` (~30 s).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icmlab.inputs.conversation import TEMPLATES, render_conversation, turns_from_record  # noqa: E402
from icmlab.inputs.encode import PieceEncoder, encode_conversation  # noqa: E402
from icmlab.inputs.images import build_image_processor, load_and_preprocess  # noqa: E402

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "llama2-tokenizer"
WORDS = (
    "the image shows a slightly blurry scene with low contrast noise sharp details clear focus bright "
    "dark overexposed colourful lighting texture sky building person tree water road"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Deterministic mix: 40% Q-Instruct MCQ, 30% ICM description, 20% multi-turn, 10% text-only."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.4:
            opts = "\n".join(f"{c}. {_sentence(rng, 3)}" for c in "ABCD")
            conv = [
                (
                    "human",
                    f"<image>\nHow is the clarity of this image?\n{opts}\n"
                    "Answer with the option's letter from the given choices directly.",
                ),
                ("gpt", "B."),
            ]
        elif kind < 0.7:
            conv = [
                ("human", f"{_sentence(rng, 12)}\n<image>"),
                ("gpt", " ".join(_sentence(rng, 15) for _ in range(6))),
            ]
        elif kind < 0.9:
            conv = [("human", "<image>\n" + _sentence(rng, 8))]
            for t in range(rng.randint(2, 4)):
                conv += [("gpt", _sentence(rng, 20)), ("human", _sentence(rng, 8))]
            conv.append(("gpt", _sentence(rng, 25)))
        else:
            conv = [("human", _sentence(rng, 10)), ("gpt", " ".join(_sentence(rng, 12) for _ in range(4)))]
        rec = {"id": f"b{i}", "conversations": [{"from": f, "value": v} for f, v in conv]}
        if "<image>" in conv[0][1]:
            rec["image"] = f"img_{i}.jpg"
        out.append(rec)
    return out


def bench_text(n: int = 1000, repeats: int = 3) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    records = make_records(n)
    encoder = PieceEncoder(tok, dialect="llava15")
    prompts = [
        render_conversation(
            TEMPLATES["vicuna_v1"],
            turns_from_record(r["conversations"], image_token="<image>" if "image" in r else None),
        )
        for r in records
    ]

    def ours() -> int:
        return sum(
            encode_conversation(
                r, tok, image_token_id=32000, num_image_tokens=576, model_max_length=2048, encoder=encoder
            ).num_tokens
            for r in records
        )

    def baseline() -> int:
        return sum(len(tok(p)["input_ids"]) for p in prompts)

    best = {}
    for name, fn in (("encode_conversation", ours), ("tokenizer(prompt)", baseline)):
        fn()  # warm-up (BPE cache, imports)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times) * 1000 * 1000 / n  # ms per 1,000 samples
    supervised = sum(
        encode_conversation(
            r, tok, image_token_id=32000, num_image_tokens=576, model_max_length=2048, encoder=encoder
        ).num_supervised
        for r in records
    )
    print(f"text: {n} records, {supervised} supervised tokens, best of {repeats}")
    for name, ms in best.items():
        print(f"  {name:22s} {ms:8.1f} ms / 1,000 samples")
    print(
        f"  ratio encode_conversation / tokenizer(prompt): {best['encode_conversation'] / best['tokenizer(prompt)']:.2f}x"
    )


def bench_images(n: int = 48, size: int = 336) -> None:
    rng = np.random.default_rng(0)
    proc = build_image_processor(size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            w, h = int(rng.integers(320, 800)), int(rng.integers(240, 640))
            arr = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content
            img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
            p = Path(tmp) / f"img_{i}.jpg"
            img.save(p, quality=90)
            paths.append(p)
        load_and_preprocess(paths[:2], proc, "pad")  # warm-up
        rates = {}
        for mode in ("pad", "square"):
            t0 = time.perf_counter()
            for p in paths:
                load_and_preprocess([p], proc, mode)
            rates[mode] = n / (time.perf_counter() - t0)
    print(f"images: {n} synthetic JPEGs (320-800 px), {size} px, one at a time, 1 thread")
    print(f"  pad + CLIP preprocess      {rates['pad']:7.1f} samples/s")
    print(f"  square (processor only)    {rates['square']:7.1f} samples/s")
    print(f"  ratio pad / square throughput: {rates['pad'] / rates['square']:.2f}x")


if __name__ == "__main__":
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    bench_text()
    bench_images()
    print(f"total {time.perf_counter() - t_start:.1f} s")
