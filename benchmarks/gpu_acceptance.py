"""One-shot GPU acceptance: run it on one H100/H200 (<= 8 min, no downloads); prints a table and appends it
to ``docs/benchmarks.md``.

Sections (each row says ok / FAIL / skipped and why):

1. **gpu tests** — ``pytest -m gpu`` over the test files that have GPU tests.
2. **attention kernels** — logits of the tiny LLaVA-v1.5 and mPLUG-Owl2 models (random weights,
   a right-padded batch of two samples) with ``flash_attention_2`` and ``sdpa`` against ``eager``:
   the largest absolute difference at the real (non-padding) positions.
3. **packed = unpacked** — the loss of one micro-batch packed (``train.packing``: flash-attention 2
   flattens the rows into one varlen row; sdpa uses the block-diagonal mask) against the same
   samples right-padded.
4. **training steps** — real-size LLaVA-v1.5-7B and mPLUG-Owl2-7B configs with random weights
   (bf16, the recipes' ``llava15-7b__q-instruct__mix`` / ``mplug-owl2-7b__q-instruct__mix``
   trainable parts, ZeRO-3 config and loss normalisation), on 1 GPU, gradient checkpointing on,
   the recipes' lengths (576 / 65 image tokens + text lengths shaped like Q-Instruct + mix665k,
   cut at 2048), padded and packed: tokens/s, samples/s, MFU and peak memory; then the largest
   micro-batch of 2048-token samples that fits (doubling until out of memory).
   A full-depth 7B needs ~16 bytes per trained parameter (bf16 weights and gradients, fp32 master
   and two Adam moments: ZeRO-3 on one GPU shards nothing); when that does not fit in 80 % of the
   GPU, the LLM keeps its real width and fewer decoder layers (the row says ``layers k/32``).

MFU counts model FLOPs only (not the recomputation of gradient checkpointing):
``6·N_trained·tokens + 2·N_frozen·tokens`` for the LLM and the vision tower (each with its own
token count: text+image positions for the LLM, 577 / 1025 patches per image for the vision tower)
plus attention ``12·L·d·Σ s²`` over the LLM's sequences (``s`` = row length padded, sample length
packed; causal masking not halved), divided by the step time and the GPU's dense bf16 peak
(H100/H200 989 TFLOP/s, A100 312; ``--peak-tflops`` otherwise).

``--tiny`` runs the same functions on the CPU with tiny models in fp32 and two steps (no flash-attn,
no CUDA memory, 256-token rows): ``tests/test_dry_start.py::test_gpu_acceptance_tiny`` runs it in CI.

Usage::

    python benchmarks/gpu_acceptance.py                    # on the GPU box; appends to docs/benchmarks.md
    python benchmarks/gpu_acceptance.py --tiny --no-append --no-pytest
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icmlab.config import load_run_config  # noqa: E402
from icmlab.models import get_family, set_loss_normalization  # noqa: E402
from icmlab.train.args import deepspeed_config  # noqa: E402
from icmlab.train.dataset import TrainingCollator  # noqa: E402
from icmlab.train.dry_start import single_process_group  # noqa: E402

RECIPES = {"llava15": "llava15-7b__q-instruct__mix", "mplug_owl2": "mplug-owl2-7b__q-instruct__mix"}
MAX_LEN = 2048
TINY_MAX_LEN = 256  # --tiny: the same code at CPU-sized lengths
PAD_ID = 0
GPU_TEST_FILES = ("tests/test_train.py", "tests/test_packing.py", "tests/test_generation.py")
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclasses.dataclass
class Row:
    """One line of the result table."""

    section: str
    item: str
    status: str
    values: str = ""


# --------------------------------------------------------------------------- models
def model_class(family: str) -> type:
    if family == "llava15":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    from icmlab.models.mplug_owl2.modeling import MPLUGOwl2ForCausalLM

    return MPLUGOwl2ForCausalLM


def tiny_config(family: str, vocab: int = 320) -> Any:
    """Tiny config of the family with the full structure (image token = last id)."""
    if family == "llava15":
        from icmlab.models.llava15.tiny import build_tiny_config

        return build_tiny_config(
            vocab, vocab - 1, text={"pad_token_id": PAD_ID, "max_position_embeddings": 4096}, pad_token_id=PAD_ID
        )
    from icmlab.models.mplug_owl2.tiny import build_tiny_config

    return build_tiny_config(
        vocab_size=vocab, image_token_index=vocab - 1, image_size=32, patch_size=8, max_position_embeddings=4096
    )


def real_config(family: str, layers: int | None = None) -> Any:
    """The 7B config of the family (``layers``: keep the width, use that many decoder layers)."""
    if family == "llava15":
        from icmlab.models.llava15.adapter import real_config as llava_real

        cfg = llava_real("7b")
        if layers:
            cfg.text_config.num_hidden_layers = layers
        return cfg
    from icmlab.models.mplug_owl2.configuration import MPLUGOwl2Config

    cfg = MPLUGOwl2Config()
    if layers:
        cfg.num_hidden_layers = layers
    return cfg


def text_config(config: Any) -> Any:
    return getattr(config, "text_config", config)


def vision_config(config: Any) -> Any:
    return config.vision_config


def geometry(config: Any) -> tuple[int, int, int, int]:
    """(image token id, placeholders per image, image side, vision patches per image incl. CLS)."""
    if hasattr(config, "image_seq_length"):  # LLaVA
        image_id, per_image = config.image_token_id, config.image_seq_length
    else:
        image_id, per_image = config.image_token_index, config.num_image_tokens
    v = vision_config(config)
    return image_id, per_image, v.image_size, (v.image_size // v.patch_size) ** 2 + 1


def build_model(family: str, config: Any, attn: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight model of ``config`` built directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    config._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(family)(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    text_config(model.config).use_cache = False
    return model


# --------------------------------------------------------------------------- data
def sample_lengths(n: int, per_image: int, seed: int = 0, max_len: int = MAX_LEN) -> list[int]:
    """Signed lengths (+ with an image) shaped like Q-Instruct (23 %) + mix665k (72 % image, 5 % text-only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, z in zip(torch.rand(n, generator=g).tolist(), torch.randn(n, generator=g).tolist()):
        if k < 0.23:
            out.append(min(max_len, per_image + max(20, int(90 * math.exp(0.6 * z)))))
        elif k < 0.95:
            out.append(min(max_len, per_image + max(20, int(160 * math.exp(z)))))
        else:
            out.append(-min(max_len, max(30, int(600 * math.exp(0.8 * z)))))
    return out


def make_samples(signed: list[int], config: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Token samples: BOS, the image's placeholder run, prompt (masked) then answer (trained)."""
    image_id, per_image, side, _ = geometry(config)
    vocab = text_config(config).vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in signed:
        image, n = n > 0, abs(n)
        head = [1] + ([image_id] * per_image if image else [])
        text = torch.randint(3, min(vocab, image_id) - 1, (max(1, n - len(head)),), generator=g).tolist()
        ids = head + text
        start = len(head) + len(text) // 3
        out.append(
            {
                "input_ids": ids,
                "labels": [-100] * start + ids[start:],
                "pixel_values": torch.randn(3, side, side, generator=g).to(dtype) if image else None,
            }
        )
    return out


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


# --------------------------------------------------------------------------- 2 + 3: kernels, packing
def attention_rows(families: list[str], kernels: list[str], dtype: torch.dtype, device: str) -> list[Row]:
    rows = []
    for family in families:
        config = tiny_config(family)
        ref_model = build_model(family, tiny_config(family), "eager", dtype, device).eval()
        state = ref_model.state_dict()
        samples = make_samples(sample_lengths(2, geometry(config)[1], seed=1, max_len=200), config, dtype=dtype)
        batch = to_device(TrainingCollator(PAD_ID)(samples), device, dtype)
        batch.pop("labels")
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            ref = ref_model(**batch).logits.float()
        scale = ref[real].abs().max().item()
        for attn in kernels:
            model = build_model(family, tiny_config(family), attn, dtype, device).eval()
            model.load_state_dict(state)
            with torch.no_grad():
                got = model(**batch).logits.float()
            diff = (got - ref)[real].abs().max().item()
            tol = (2e-2 if dtype != torch.float32 else 1e-4) * max(1.0, scale)
            rows.append(
                Row(
                    "attention",
                    f"{family} {attn} vs eager",
                    "ok" if diff <= tol else "FAIL",
                    f"max|Δlogit| {diff:.2e} (tol {tol:.1e}, |logit| ≤ {scale:.1f}, {str(dtype)[6:]})",
                )
            )
            del model
    return rows


def packing_rows(families: list[str], kernels: list[str], dtype: torch.dtype, device: str) -> list[Row]:
    rows = []
    for family in families:
        config = tiny_config(family)
        samples = make_samples(sample_lengths(6, geometry(config)[1], seed=2, max_len=400), config, dtype=dtype)
        for attn in kernels:
            model = build_model(family, tiny_config(family), attn, dtype, device).eval()
            with torch.no_grad():
                padded = model(**to_device(TrainingCollator(PAD_ID)(samples), device, dtype)).loss.item()
                packed_batch = TrainingCollator(
                    PAD_ID, packing=True, max_length=1024, flatten=attn == "flash_attention_2"
                )(samples)
                packed = model(**to_device(packed_batch, device, dtype)).loss.item()
            rel = abs(packed - padded) / abs(padded)
            tol = 1e-2 if dtype != torch.float32 else 1e-5
            rows.append(
                Row(
                    "packing",
                    f"{family} {attn}",
                    "ok" if rel <= tol else "FAIL",
                    f"packed {packed:.5f} vs padded {padded:.5f} (rel {rel:.1e}, "
                    f"{packed_batch['input_ids'].shape[0]} row(s) for {len(samples)} samples)",
                )
            )
            del model
    return rows


# --------------------------------------------------------------------------- 4: training steps
def fill_deepspeed(ds: dict, hidden: int, micro_batch: int, bf16: bool) -> dict:
    """The ``auto`` values the HF Trainer would fill (same rules as transformers' HfTrainerDeepSpeedConfig)."""
    ds = {
        **ds,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "zero_optimization": dict(ds["zero_optimization"]),
    }
    z = ds["zero_optimization"]
    auto = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in auto.items():
        if z.get(key) == "auto":
            z[key] = value
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 1.0
    return ds


def part_sizes(model: torch.nn.Module, family: str) -> dict[str, tuple[int, int]]:
    """(parameters, trained parameters) of the vision encoder and of the rest (LLM + projector)."""
    groups = get_family(family).MODULE_GROUPS
    vision = model.get_submodule(groups["vision_encoder"][0])
    vision_ids = {id(p) for p in vision.parameters()}
    out = {"vision": [0, 0], "llm": [0, 0]}
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        key = "vision" if id(p) in vision_ids else "llm"
        out[key][0] += n
        out[key][1] += n if p.requires_grad else 0
    return {k: (v[0], v[1]) for k, v in out.items()}


def step_flops(batch_lengths: list[int], row_lengths: list[int], sizes: dict, config: Any) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    _, per_image, _, patches = geometry(config)
    images = sum(1 for n in batch_lengths if n > 0)
    tokens = sum(abs(n) for n in batch_lengths)
    total, trained = sizes["llm"]
    flops = 6 * trained * tokens + 2 * (total - trained) * tokens
    total, trained = sizes["vision"]
    flops += 6 * trained * images * patches + 2 * (total - trained) * images * patches
    t = text_config(config)
    flops += 12 * t.num_hidden_layers * t.hidden_size * sum(s * s for s in row_lengths)
    return float(flops)


def train_rows(
    family: str,
    *,
    tiny: bool,
    device: str,
    steps: int,
    warmup: int,
    micro_batch: int,
    peak: float | None,
    search_limit: int,
    deadline: float,
    max_len: int = MAX_LEN,
) -> list[Row]:
    """Padded and packed training steps of the family's recipe config, then the largest micro-batch."""
    import deepspeed

    recipe = load_run_config(ROOT / "parameters" / f"{RECIPES[family]}.yaml")
    cfg = dataclasses.replace(
        recipe, hardware=dataclasses.replace(recipe.hardware, device="cpu" if tiny else "cuda", num_gpus=1)
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    attn = "sdpa" if tiny else ("flash_attention_2" if _has_flash() else "sdpa")
    layers_note = ""
    if tiny:
        config = tiny_config(family)
    else:
        config = real_config(family)
        full = text_config(config).num_hidden_layers
        fit = _layers_that_fit(family, config)
        if fit < full:
            config = real_config(family, layers=fit)
        layers_note = f", layers {min(fit, full)}/{full}"
    t0 = time.perf_counter()
    model = build_model(family, config, attn, dtype, device)
    fam = get_family(family)
    t = cfg.train
    fam.apply_trainable(model, {"vision_encoder": not t.freeze_vision, "projector": t.tune_projector, "llm": True})
    set_loss_normalization(model, t.loss_normalization)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sizes = part_sizes(model, family)
    build_s = time.perf_counter() - t0
    hidden = text_config(config).hidden_size
    ds = fill_deepspeed(deepspeed_config(cfg), hidden, micro_batch, bf16=not tiny)
    rows = []
    with single_process_group(cfg):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        _, per_image, _, _ = geometry(config)
        lengths = sample_lengths((warmup + steps) * micro_batch, per_image, seed=3, max_len=max_len)
        title = (
            f"{family} {'tiny' if tiny else '7B'}{layers_note}, {attn}, ZeRO-{ds['zero_optimization']['stage']}, "
            f"grad-ckpt, micro-batch {micro_batch}"
        )
        for packed in (False, True):
            collate = TrainingCollator(
                PAD_ID, packing=packed, max_length=max_len, flatten=packed and attn == "flash_attention_2"
            )
            stats = _run_steps(
                engine, collate, lengths, config, micro_batch, warmup, steps, device, dtype, sizes, offset=0
            )  # the same micro-batches, padded then packed
            mfu = f", MFU {stats['flops'] / stats['seconds'] / peak:.1%}" if peak else ""
            mem = f", peak {stats['peak_gib']:.1f} GiB" if stats["peak_gib"] is not None else ""
            ok = math.isfinite(stats["loss"])
            rows.append(
                Row(
                    "train",
                    f"{title}, {'packed' if packed else 'padded'}",
                    "ok" if ok else "FAIL",
                    f"{stats['tokens'] / stats['seconds']:,.0f} tokens/s, "
                    f"{stats['samples'] / stats['seconds']:.2f} samples/s{mfu}{mem}, "
                    f"padding {stats['padding']:.0%}, loss {stats['loss']:.3f} "
                    f"(build {build_s:.0f} s, {steps} timed steps)",
                )
            )
        rows.append(
            _largest_micro_batch(engine, config, micro_batch, search_limit, device, dtype, deadline, title, max_len)
        )
        del engine, optimizer
    del model
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _run_steps(engine, collate, lengths, config, mb, warmup, steps, device, dtype, sizes, offset) -> dict:
    tokens = samples = 0
    flops = seconds = 0.0
    padded_positions = 0
    loss = float("nan")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        chunk = lengths[(offset + i) * mb : (offset + i + 1) * mb]
        batch = collate(make_samples(chunk, config, seed=offset + i, dtype=dtype))
        rows = batch["input_ids"]
        row_lengths = _row_lengths(batch, chunk)
        batch = to_device(batch, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        _sync(device)
        dt_s = time.perf_counter() - t0
        loss = out.loss.item()
        if i >= warmup:
            seconds += dt_s
            tokens += sum(abs(n) for n in chunk)
            samples += len(chunk)
            flops += step_flops(chunk, row_lengths, sizes, config)
            padded_positions += rows.numel()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "tokens": tokens,
        "samples": samples,
        "flops": flops,
        "seconds": seconds,
        "loss": loss,
        "peak_gib": peak,
        "padding": 1 - tokens / max(1, padded_positions),
    }


def _row_lengths(batch: dict, chunk: list[int]) -> list[int]:
    """Sequence lengths attention really covers: each sample when packed (position ids restart), else the rows."""
    if "attention_mask" in batch:  # padded: every row is attended at its padded length
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    return [abs(n) for n in chunk]


def _largest_micro_batch(
    engine, config, start: int, limit: int, device: str, dtype, deadline: float, title: str, max_len: int = MAX_LEN
) -> Row:
    """Double the micro-batch of worst-case samples (each ``max_len`` tokens with an image) until it does not fit."""
    _, per_image, _, _ = geometry(config)
    collate = TrainingCollator(PAD_ID)
    fits, mb = 0, start
    note = ""
    while mb <= limit:
        if time.time() > deadline:
            note = " (stopped: time budget)"
            break
        try:
            batch = to_device(collate(make_samples([max_len] * mb, config, seed=mb, dtype=dtype)), device, dtype)
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            _sync(device)
            fits = mb
            mb *= 2
        except torch.OutOfMemoryError:
            note = f" ({mb} ran out of memory)"
            break
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    if mb > limit and not note:
        note = f" (limit {limit} reached)"
    return Row(
        "train",
        f"{title}: largest micro-batch of {max_len}-token samples",
        "ok" if fits else "FAIL",
        f"{fits} fits{note}",
    )


def _layers_that_fit(family: str, config: Any) -> int:
    """Decoder layers of the real width whose training state fits in 80 % of this GPU (ZeRO-3, one GPU)."""
    t = text_config(config)
    per_layer = 4 * t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    if family == "mplug_owl2":
        per_layer += 2 * t.hidden_size * t.hidden_size // max(1, t.num_attention_heads // t.num_key_value_heads)
    rest = 2 * t.vocab_size * t.hidden_size + 0.35e9  # embeddings, lm_head, vision tower, projector
    budget = 0.8 * torch.cuda.get_device_properties(0).total_memory - 12 * 2**30  # activations, buffers
    fit = int((budget / 16 - rest) // per_layer)
    return max(1, min(t.num_hidden_layers, fit))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _has_flash() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


# --------------------------------------------------------------------------- 1: gpu tests
def pytest_rows(tiny: bool) -> list[Row]:
    files = [f for f in GPU_TEST_FILES if (ROOT / f).is_file()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = [ln for ln in out.stdout.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", ln)]
    summary = tail[-1].strip("= ") if tail else out.stdout[-300:]
    ok = out.returncode in (0, 5) and "failed" not in summary and "error" not in summary
    if not tiny and "passed" not in summary:
        ok = False  # on the GPU box they must run, not skip
    return [
        Row(
            "gpu tests",
            "pytest -m gpu " + " ".join(Path(f).name for f in files),
            "ok" if ok else "FAIL",
            f"{summary} (wall {time.perf_counter() - t0:.0f} s)",
        )
    ]


# --------------------------------------------------------------------------- isolation
def argv_rest(args: argparse.Namespace, family: str, deadline: float) -> list[str]:
    """The worker's command line: this script, the same options, one family."""
    out = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--train-one",
        family,
        "--deadline",
        str(deadline),
        "--no-pytest",
        "--no-append",
    ]
    if args.tiny:
        out.append("--tiny")
    for flag, value in (
        ("--micro-batch", args.micro_batch),
        ("--steps", args.steps),
        ("--peak-tflops", args.peak_tflops),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def _isolated(family: str, cmd: list[str]) -> list[Row]:
    import json

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("ROWS ")), None)
    if line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return [Row("train", f"{family} worker", "FAIL", f"exit {out.returncode}: {tail[0][:300]}")]
    return [Row(**r) for r in json.loads(line[5:])]


# --------------------------------------------------------------------------- report
def device_line(device: str) -> str:
    import transformers

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "-"
    try:
        import flash_attn

        fa = flash_attn.__version__
    except ImportError:
        fa = "-"
    return (
        f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"deepspeed {ds}, flash-attn {fa}, Python {platform.python_version()}"
    )


def table(rows: list[Row]) -> str:
    lines = ["| section | item | status | result |", "|---|---|---|---|"]
    lines += [f"| {r.section} | {r.item} | {r.status} | {r.values} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny models, fp32, 2 steps (the CI path)")
    ap.add_argument("--no-pytest", action="store_true", help="skip section 1")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to --out")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--families", default="llava15,mplug_owl2")
    ap.add_argument("--micro-batch", type=int, default=None, help="micro-batch of the timed steps (16 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (4 on GPU, 2 tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (TFLOP/s)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop the micro-batch search after this")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train each family in its own process (default on the GPU: an out-of-memory probe "
        "cannot leave memory behind for the next model)",
    )
    ap.add_argument("--train-one", default=None, help=argparse.SUPPRESS)  # the isolated worker
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA GPU: run with --tiny (the CPU path) or on a GPU machine", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dtype = torch.bfloat16 if cuda else torch.float32
    kernels = ["sdpa"] + (["flash_attention_2"] if cuda and _has_flash() else [])
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in PEAKS.items() if cuda and k in torch.cuda.get_device_name(0)), None)
    )
    rows: list[Row] = []

    def section(fn: Callable[[], list[Row]], name: str) -> None:
        try:
            rows.extend(fn())
        except Exception as e:  # noqa: BLE001  (a failing section is a FAIL row, the others still run)
            rows.append(Row(name, "error", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))

    if not args.no_pytest:
        section(lambda: pytest_rows(args.tiny), "gpu tests")
    if cuda and not _has_flash():
        rows.append(Row("attention", "flash_attention_2", "skipped", "flash-attn not importable"))
    section(lambda: attention_rows(families, kernels, dtype, device), "attention")
    section(lambda: packing_rows(families, kernels, dtype, device), "packing")
    steps = args.steps or (2 if args.tiny else 4)
    mb = args.micro_batch or (2 if args.tiny else 16)
    deadline = time.time() + args.budget_s if args.deadline is None else args.deadline  # wall clock: crosses processes

    def train(family: str) -> list[Row]:
        return train_rows(
            family,
            tiny=args.tiny,
            device=device,
            steps=steps,
            warmup=0 if args.tiny else 1,
            micro_batch=mb,
            peak=peak,
            search_limit=mb if args.tiny else 256,
            deadline=deadline,
            max_len=TINY_MAX_LEN if args.tiny else MAX_LEN,
        )

    if args.train_one:  # worker of --isolate: one family, rows as JSON on the last line
        import json

        out: list[Row] = []
        try:
            out = train(args.train_one)
        except Exception as e:  # noqa: BLE001
            out = [
                Row("train", f"{args.train_one} error", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            ]
        print("ROWS " + json.dumps([dataclasses.asdict(r) for r in out]))
        return 0
    isolate = cuda if args.isolate is None else args.isolate
    for family in families:
        if isolate:
            section(lambda: _isolated(family, argv_rest(args, family, deadline)), "train")
        else:
            section(lambda: train(family), "train")
    elapsed = time.perf_counter() - started
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## GPU acceptance — {when}{' (--tiny, CPU)' if args.tiny else ''}\n\n"
        f"`benchmarks/gpu_acceptance.py{' --tiny' if args.tiny else ''}`: {device_line(device)}; "
        f"{elapsed:.0f} s. MFU = (6·N_trained + 2·N_frozen)·tokens per part + 12·L·d·Σs² attention, "
        f"over the dense bf16 peak ({peak / 1e12:.0f} TFLOP/s)"
        if peak
        else f"\n## GPU acceptance — {when}{' (--tiny, CPU)' if args.tiny else ''}\n\n"
        f"`benchmarks/gpu_acceptance.py{' --tiny' if args.tiny else ''}`: {device_line(device)}; {elapsed:.0f} s"
    )
    text += ".\n\n" + table(rows) + "\n"
    print(text)
    if not args.no_append:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)
        print(f"appended to {args.out}")
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
