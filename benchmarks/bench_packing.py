"""Padding and step time of micro-batches packed (``train.packing``) vs padded, at LLaVA-v1.5 lengths, on CPU.

Lengths are synthetic but shaped like the MSFT mix of Q-Instruct + ``llava_v1_5_mix665k`` after
tokenization with 576 image tokens per image and a 2048-token cut (assumed shares, not measured):

- Q-Instruct (23 %): one image, short question/answer: 576 + lognormal text (median 90 tokens);
- mix665k with an image (72 %): 576 + lognormal text (median 160, long multi-turn tail);
- mix665k text-only / ShareGPT (5 %): lognormal (median 600).

Printed for micro-batches of ``--batch`` (16, the recipes' per-device batch), in random order (the
plain sampler) and in LLaVA's modality-length-grouped order (``group_by_modality_length``, the
default: megabatches of 128 sorted by length):

- padding share and real tokens per row, padded vs packed into rows of <= 2048 (first-fit
  decreasing; flash-attention 2 flattens the rows into one and has no padding at all);
- attention score entries per batch: padded ``B·T²``, packed sdpa/eager ``R·T²`` (a dense
  block-diagonal mask, nothing skipped) and varlen flash-attn ``Σ Lᵢ²``;
- an LLM FLOP estimate for LLaMA-7B widths from those counts (linear layers per position plus
  attention per score entry), since the tiny model below over-weights attention;
- the forward+backward time of a tiny LLaVA (2+2 layers, width 64/32, real 336 px / 576-token
  image path) on the same random-order batches, padded vs packed, with the ratio measured in the
  same run (the machine is shared; the ratio is the figure to read).

Usage::

    .venv/bin/python benchmarks/bench_packing.py [--batches 400] [--timed 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icmlab.train.dataset import TrainingCollator  # noqa: E402
from icmlab.train.packing import padding_fraction, plan_rows  # noqa: E402
from icmlab.train.trainer import modality_length_grouped_indices  # noqa: E402

IMAGE_TOKENS = 576
MAX_LEN = 2048
VOCAB = 320
IMAGE_ID = 300
PAD_ID = 3


def synthetic_lengths(n: int, seed: int = 0) -> list[int]:
    """Signed token lengths (+ with an image, - text-only) of ``n`` samples shaped like the MSFT mix."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.rand(n, generator=g)
    normal = torch.randn(n, generator=g)
    out = []
    for k, z in zip(kind.tolist(), normal.tolist()):
        if k < 0.23:  # Q-Instruct: short answer about one image
            out.append(min(MAX_LEN, IMAGE_TOKENS + max(20, int(90 * 2.718 ** (0.6 * z)))))
        elif k < 0.95:  # mix665k with image: VQA to long multi-turn conversations
            out.append(min(MAX_LEN, IMAGE_TOKENS + max(20, int(160 * 2.718 ** (1.0 * z)))))
        else:  # ShareGPT text-only
            out.append(-min(MAX_LEN, max(30, int(600 * 2.718 ** (0.8 * z)))))
    return out


def batch_stats(batch: list[int]) -> dict[str, float]:
    """Padding, tokens per row and attention entries of one micro-batch of (unsigned) lengths."""
    rows = plan_rows(batch, MAX_LEN)
    row_len = [sum(batch[i] for i in r) for r in rows]
    width_u, width_p = max(batch), max(row_len)
    return {
        "pad_u": padding_fraction(batch),
        "pad_p": padding_fraction(row_len),
        "tok_row_u": sum(batch) / len(batch),
        "tok_row_p": sum(batch) / len(rows),
        "rows_p": len(rows),
        "tok_u": len(batch) * width_u,
        "tok_p": len(rows) * width_p,
        "attn_u": len(batch) * width_u**2,
        "attn_p": len(rows) * width_p**2,
        "attn_varlen": sum(n * n for n in batch),
    }


def summarize(name: str, batches: list[list[int]]) -> None:
    stats = [batch_stats(b) for b in batches]

    def mean(key: str) -> float:
        return statistics.fmean(s[key] for s in stats)

    print(f"\n{name}: {len(batches)} micro-batches of {len(batches[0])}")
    print(
        f"  padding share           padded {mean('pad_u'):6.1%}   packed {mean('pad_p'):6.1%}   "
        "flash-attn flattened 0.0%"
    )
    print(
        f"  real tokens per row     padded {mean('tok_row_u'):6.0f}   packed {mean('tok_row_p'):6.0f}   "
        f"(rows per batch {mean('rows_p'):.2f} instead of {len(batches[0])})"
    )
    print(
        f"  positions computed      padded {mean('tok_u'):6.0f}   packed {mean('tok_p'):6.0f}   "
        f"packed/padded {mean('tok_p') / mean('tok_u'):.2f}x"
    )
    print(
        f"  attention entries       packed sdpa/padded {mean('attn_p') / mean('attn_u'):.2f}x   "
        f"varlen flash/padded {mean('attn_varlen') / mean('attn_u'):.2f}x"
    )
    # LLaMA-7B estimate: ~6.5e9 weights x 2 FLOP per position, 4 x 4096 x 32 FLOP per attention entry
    # (forward; backward scales both alike). The frozen CLIP tower costs the same either way; left out.
    lin, att = 2 * 6.5e9, 4 * 4096 * 32
    padded_flop = lin * mean("tok_u") + att * mean("attn_u")
    sdpa_flop = lin * mean("tok_p") + att * mean("attn_p")
    flash_flop = lin * mean("tok_u") * (1 - mean("pad_u")) + att * mean("attn_varlen")
    print(
        f"  LLM FLOP estimate, 7B   packed sdpa/padded {sdpa_flop / padded_flop:.2f}x   "
        f"packed flash-attn/padded {flash_flop / padded_flop:.2f}x"
    )


# --------------------------------------------------------------------------- step time
def build_tiny_llava() -> torch.nn.Module:
    """A tiny LLaVA with the real image geometry (336 px, patch 14 -> 576 tokens), random weights."""
    from transformers import LlavaForConditionalGeneration

    from icmlab.models.llava15.tiny import build_tiny_config

    torch.manual_seed(0)
    cfg = build_tiny_config(
        VOCAB, IMAGE_ID, image_size=336, patch_size=14, text={"max_position_embeddings": 4096, "pad_token_id": PAD_ID}
    )
    assert cfg.image_seq_length == IMAGE_TOKENS
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model.train()


def make_samples(signed: list[int], seed: int) -> list[dict]:
    """Token samples of the given signed lengths: BOS, image run, prompt (masked), answer (trained)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in signed:
        image = n > 0
        n = abs(n)
        head = [1] + ([IMAGE_ID] * IMAGE_TOKENS if image else [])
        text = torch.randint(10, 290, (n - len(head),), generator=g).tolist()
        ids = head + text
        answer_from = len(head) + len(text) // 3
        labels = [-100] * answer_from + ids[answer_from:]
        pixels = torch.randn(3, 336, 336, generator=g) if image else None
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return out


def step_time(model: torch.nn.Module, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=400, help="micro-batches for the padding statistics")
    ap.add_argument("--batch", type=int, default=16, help="samples per micro-batch")
    ap.add_argument("--timed", type=int, default=3, help="micro-batches timed each way")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    n = args.batches * args.batch
    signed = synthetic_lengths(n)
    lengths = [abs(x) for x in signed]
    random_order = [lengths[i : i + args.batch] for i in range(0, n, args.batch)]
    order = modality_length_grouped_indices(signed, args.batch, 8, torch.Generator().manual_seed(0))
    grouped = [[lengths[i] for i in order[k : k + args.batch]] for k in range(0, n, args.batch)]
    print(
        f"synthetic MSFT-like lengths: median {statistics.median(lengths):.0f}, "
        f"{sum(x < 0 for x in signed) / n:.1%} text-only, {sum(x == MAX_LEN for x in lengths) / n:.1%} at the cut"
    )
    summarize("random order (plain sampler)", random_order)
    summarize("modality-length grouped (group_by_modality_length, megabatch 8 x 16)", grouped)

    model = build_tiny_llava()
    padded, packed = TrainingCollator(PAD_ID), TrainingCollator(PAD_ID, packing=True, max_length=MAX_LEN)
    times_u, times_p = [], []
    for k in range(args.timed + 1):  # the first pair warms up and is not counted
        samples = make_samples(signed[k * args.batch : (k + 1) * args.batch], seed=k)
        bu, bp = padded(samples), packed(samples)
        tu, tp = step_time(model, bu), step_time(model, bp)
        if k:
            times_u.append(tu)
            times_p.append(tp)
            print(
                f"  batch {k}: padded {tuple(bu['input_ids'].shape)} {tu:.2f} s   "
                f"packed {tuple(bp['input_ids'].shape)} {tp:.2f} s"
            )
    tu, tp = statistics.median(times_u), statistics.median(times_p)
    print(f"\ntiny LLaVA forward+backward, sdpa, {args.threads} CPU thread(s), random-order batches of {args.batch}:")
    print(f"  padded {tu:.2f} s/step   packed {tp:.2f} s/step   packed/padded = {tp / tu:.2f}")
    print(f"(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
