"""Input pipeline throughput of the train stage at real LLaVA-v1.5 size (336 px, 576 image tokens), on CPU.

Measures, on demo-like images (the demo's distorted scenes rendered at ``--size``, JPEG) and the
demo's Q-Instruct/ICM-Instruct records tokenized with the real LLaMA-2 vocabulary
(``tests/fixtures/llama2-tokenizer`` + ``<image>``/``<pad>`` as in llava-hf):

- upstream: a re-implementation of LLaVA's ``LazySupervisedDataset.__getitem__`` (``upstream_sample.py``:
  the transformers 4.37 CLIP processor steps, ``tokenizer_image_token`` per chunk and round) against
  one :class:`icmlab.train.dataset.SupervisedDataset` sample, in alternating pairs of passes over the
  same records (one process = one data-loader worker's work); the ratio is per pair, and the pixels
  of both are compared (max abs difference);
- baseline: bare PIL decode (``Image.open(...).convert("RGB")``), samples/s;
- image path: decode + ``pad`` + CLIP preprocessing to 336 px as the training loader does it
  (``LeanClip.from_file``), samples/s;
- one sample of :class:`icmlab.train.dataset.SupervisedDataset` (tokenize + mask + image), samples/s in
  this process (= one data-loader worker), then through a ``DataLoader`` with N workers and the
  training collator (samples/s per worker), beside upstream's dataset and collator through the same
  ``DataLoader`` (the worker's sample plus batching and the hand-over of the batch to the rank);
- tokenization + masking alone (``SupervisedDataset.encode``): seconds per 1,000 samples, against
  a plain fast-tokenizer call on the same rendered prompt strings.

Every figure is printed with its ratio to the baseline measured in the same run (the machines
are shared; absolute numbers move, ratios less so).

Usage::

    .venv/bin/python benchmarks/bench_input_pipeline.py [--images 400] [--size 640x480] [--pairs 3] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icmlab.demo.bundle import generate_bundle  # noqa: E402
from icmlab.demo.images import render_bytes  # noqa: E402
from icmlab.inputs.conversation import conversation_segments, get_template, turns_from_record  # noqa: E402
from icmlab.inputs.images import build_image_processor  # noqa: E402
from icmlab.train.dataset import SupervisedDataset, TrainingCollator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream_sample import UpstreamDataset, max_pixel_difference, upstream_collate, upstream_sample  # noqa: E402

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "llama2-tokenizer"


def make_data(root: Path, n_images: int, size: tuple[int, int]) -> list[dict]:
    """Render ``n_images`` demo images at ``size`` under ``root`` and return records pointing at them."""
    bundle = generate_bundle(seed=0, scale=0.2)
    records = []
    for ds in (bundle.q_instruct, bundle.icm_instruct):
        for rec in ds.payload:
            if "image" in rec:
                records.append((rec, ds.images[rec["image"]]))
    records = records[:n_images]
    out = []
    for i, (rec, spec) in enumerate(records):
        spec = dataclasses.replace(spec, width=size[0], height=size[1], fmt="JPEG")
        name = f"img/{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(render_bytes(spec))
        out.append({**rec, "image": name})
    return out


def llava_tokenizer():
    """LLaMA-2 tokenizer with llava-hf's added ``<image>`` (32000) and ``<pad>`` (32001)."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, padding_side="right", model_max_length=2048)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def rate(fn, items, repeat: int = 1) -> float:
    """Items per second of ``fn`` over ``items`` (best of ``repeat`` passes)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return len(items) / best


def loader_rate(ds, workers: int, batch: int, n_batches: int, collate) -> float:
    """Samples per second through a DataLoader (after its first batch, i.e. without worker start-up)."""
    dl = DataLoader(
        ds,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    it = iter(dl)
    next(it)
    t = time.perf_counter()
    n = 0
    for b in itertools.islice(it, n_batches):
        n += b["input_ids"].shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="images rendered (and samples per pass)")
    p.add_argument("--size", default="640x480", help="rendered image size WxH (COCO-sized; non-square exercises pad)")
    p.add_argument("--pairs", type=int, default=3, help="alternating upstream/icmlab pass pairs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    p.add_argument("--batch", type=int, default=16, help="micro-batch of the DataLoader runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        records = make_data(root, args.images, size)
        print(f"rendered {len(records)} images {size[0]}x{size[1]} JPEG in {time.perf_counter() - t0:.1f} s")
        tok = llava_tokenizer()
        proc = build_image_processor(336)
        ds = SupervisedDataset(
            records,
            tokenizer=tok,
            image_processor=proc,
            data_root=root,
            family="llava15",
            image_token_id=32000,
            num_image_tokens=576,
            model_max_length=2048,
            aspect_ratio="pad",
        )
        paths = [root / r["image"] for r in records]

        diff = max(
            max_pixel_difference(upstream_sample(r, root, tok, proc)["image"], ds[i]["pixel_values"])
            for i, r in enumerate(records)
        )
        print(f"pixels, icmlab vs upstream re-implementation, max abs difference over {len(records)} images: {diff:g}")
        print(f"\n{'pair':<6} {'upstream samples/s':>19} {'icmlab samples/s':>17} {'ratio':>7}")
        ratios = []
        for k in range(args.pairs):
            up = rate(lambda r: upstream_sample(r, root, tok, proc), records)
            ours = rate(lambda i: ds[i], range(len(ds)))
            ratios.append(ours / up)
            print(f"{k + 1:<6} {up:>19.1f} {ours:>17.1f} {ours / up:>6.2f}×")
        print(
            f"icmlab / upstream per worker: {min(ratios):.2f}–{max(ratios):.2f}× (median {sorted(ratios)[len(ratios) // 2]:.2f}×)"
        )

        base = rate(lambda q: Image.open(q).convert("RGB"), paths, repeat=2)
        image = rate(ds.lean.from_file, paths)  # the training loader's image path (what __getitem__ calls)
        sample = rate(lambda i: ds[i], range(len(ds)))
        print(f"\n{'stage':<52} {'samples/s':>10} {'× baseline time':>16}")
        print(f"{'baseline: PIL decode + convert(RGB)':<52} {base:>10.1f} {1.0:>16.2f}")
        print(f"{'image: decode + pad + CLIP 336':<52} {image:>10.1f} {base / image:>16.2f}")
        print(f"{'dataset sample: tokenize + mask + image (1 process)':<52} {sample:>10.1f} {base / sample:>16.2f}")
        collate = TrainingCollator(tok.pad_token_id)
        up_ds = UpstreamDataset(records, root, tok, proc)
        up_collate = functools.partial(upstream_collate, pad_token_id=tok.pad_token_id, max_length=2048)
        n_batches = max(2, len(ds) // args.batch - 2)
        for w in args.workers:
            r = loader_rate(ds, w, args.batch, n_batches, collate)
            up = loader_rate(up_ds, w, args.batch, n_batches, up_collate)
            print(
                f"{f'DataLoader {w} worker(s) + collate, batch {args.batch}':<52} {r:>10.1f} {base / r:>16.2f}"
                f"   ({r / w:.1f} per worker; upstream's dataset and collator: {up / w:.1f}, {r / up:.2f}×)"
            )

        # tokenization + masking alone, per 1,000 samples, vs a plain tokenizer call on the same prompts
        idx = [i % len(ds) for i in range(1000)]
        tmpl = get_template("vicuna_v1")
        prompts = [
            "".join(
                s.text
                for s in conversation_segments(
                    tmpl, turns_from_record(records[i]["conversations"], image_token="<image>")
                )
            )
            for i in idx
        ]
        t = time.perf_counter()
        for i in idx:
            ds.encode(i)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        for s in prompts:
            tok(s)
        plain = time.perf_counter() - t
        n_tok = sum(len(ds.encode(i)["input_ids"]) for i in idx[:100]) / 100
        print(
            f"\ntokenize + mask (encode_conversation), per 1,000 samples: {ours:.3f} s "
            f"({ours / plain:.2f} × a plain fast-tokenizer call on the rendered prompt: {plain:.3f} s); "
            f"mean length {n_tok:.0f} tokens incl. 576 image tokens"
        )


if __name__ == "__main__":
    main()
