"""Benchmark: ``icmlab.merge.stage`` against ``jq -s add`` on a synthetic Q-Instruct + llava_v1_5_mix665k pair.

The generator writes two LLaVA-format files shaped like the real ones (record counts, image-path
prefixes, turn counts, text-only ShareGPT-like records, sizes close to the 76.5 MB / ~1 GB
originals): ``cleaned_labels.json`` (200,000 records, compact) and ``llava_v1_5_mix665k.json``
(665,298 records, indented). Both tools then merge them, each in its own subprocess measured with
``/usr/bin/time -v`` (wall time, peak RSS); the two outputs are parsed and checked equal record by
record.

Usage::

    .venv/bin/python benchmarks/bench_merge.py                 # full size (~1.1 GB of JSON, cached)
    .venv/bin/python benchmarks/bench_merge.py --scale 0.05    # quick run
    .venv/bin/python benchmarks/bench_merge.py --out /tmp/bm   # where data and outputs go
    .venv/bin/python benchmarks/bench_merge.py --no-jq         # icmlab alone (quick iterations)

Target (issue 4): >= 10x faster than jq with <= 20% of jq's peak memory.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
N_LOW, N_HIGH = 200_000, 665_298
# llava_v1_5_mix665k composition by image prefix (LLaVA issue #657).
MIX_PARTS = [
    ("coco/train2017", 364_100),
    ("vg/VG_100K", 86_417),
    ("gqa/images", 72_140),
    ("ocr_vqa/images", 80_000),
    ("textvqa/train_images", 21_953),
    (None, 40_688),
]
WORDS = (
    "image quality clarity blur noise exposure lighting color composition detail sharp soft "
    "bright dark the a of in on with and is are this that very slightly good poor fair high "
    "low level texture focus background subject overall person car tree sky building table "
    "what which how where why would could visible left right top bottom center there"
).split()


def _pool(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


def low_level_records(n: int, seed: int = 0, n_images: int = 18_973) -> list[dict]:
    """Q-Instruct-shaped records: one round, ``<image>`` first, open / yes-no / MC / description."""
    rng = random.Random(seed)
    short, long_ = _pool(rng, 4000, 6, 16), _pool(rng, 2000, 60, 110)
    out = []
    for i in range(n):
        img = i % n_images
        folder = "spaq_koniq" if img % 2 else "livefb_liveitw_aigc"
        kind = rng.random()
        if kind < 0.4:
            q, a = rng.choice(short).rstrip(".") + "?", rng.choice(short)
        elif kind < 0.6:
            q, a = "Is this image " + rng.choice(WORDS) + "?", rng.choice(("Yes.", "No."))
        elif kind < 0.85:
            opts = "\n".join(f"{c}. {rng.choice(WORDS)}" for c in "ABCD")
            q = (
                rng.choice(short).rstrip(".")
                + "?\n"
                + opts
                + "\nAnswer with the option's letter from the given choices directly."
            )
            a = rng.choice("ABCD") + "."
        else:
            q, a = "Describe the quality of this image.", rng.choice(long_)
        out.append(
            {
                "id": f"{folder}_{img:05d}_{i}",
                "image": f"{folder}/{img:05d}.jpg",
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
            }
        )
    return out


def high_level_records(n: int = N_HIGH, seed: int = 1) -> list[dict]:
    """mix665k-shaped records: multi-turn image QA per folder and long text-only ShareGPT chats."""
    rng = random.Random(seed)
    short, mid, long_ = _pool(rng, 6000, 5, 14), _pool(rng, 3000, 25, 60), _pool(rng, 2000, 120, 260)
    out = []
    scale = n / N_HIGH
    for prefix, count in MIX_PARTS:
        for j in range(max(1, round(count * scale))):
            turns = []
            if prefix is None:
                for _ in range(rng.randint(2, 5)):
                    turns += [rng.choice(mid), rng.choice(long_)]
                out.append(
                    {
                        "id": f"sharegpt_{j}",
                        "model": "",
                        "conversations": [
                            {"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)
                        ],
                    }
                )
                continue
            for k in range(rng.randint(1, 6)):
                q = rng.choice(short).rstrip(".") + "?"
                turns += [("<image>\n" + q) if k == 0 else q, rng.choice(mid if rng.random() < 0.6 else short)]
            # COCO images are shared by several records (118,287 files for 364,100 records), and the
            # record ids are the image ids, so they repeat as well.
            stem = f"{j % 118_287 if prefix.startswith('coco') else j:012d}"
            out.append(
                {
                    "id": stem if prefix.startswith("coco") else f"{prefix.split('/')[0]}_{stem}",
                    "image": f"{prefix}/{stem}.jpg",
                    "conversations": [
                        {"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)
                    ],
                }
            )
    random.Random(seed + 1).shuffle(out)
    return out[:n]


def generate_pair(out_dir: Path, scale: float = 1.0, seed: int = 0) -> tuple[Path, Path]:
    """Write (or reuse) ``cleaned_labels.json`` and ``llava_v1_5_mix665k.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    low, high = out_dir / "cleaned_labels.json", out_dir / "llava_v1_5_mix665k.json"
    stamp = out_dir / f"generated-v2-{scale}-{seed}"
    if not stamp.exists():
        t = time.perf_counter()
        low.write_bytes(orjson.dumps(low_level_records(round(N_LOW * scale), seed)))
        high.write_bytes(orjson.dumps(high_level_records(round(N_HIGH * scale), seed + 1), option=orjson.OPT_INDENT_2))
        for old in out_dir.glob("generated-*"):
            old.unlink()
        stamp.touch()
        print(f"generated synthetic data in {time.perf_counter() - t:.1f} s")
    return low, high


def timed(cmd: list[str], stdout: Path | None = None) -> tuple[float, float, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``: (wall seconds, peak RSS MiB, CPU seconds user+sys)."""
    with open(stdout or os.devnull, "wb") as out:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return wall, rss, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "merge")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real record counts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (best wall time is reported)")
    ap.add_argument("--no-jq", action="store_true", help="time icmlab only (quick iterations; no ratio)")
    args = ap.parse_args()
    jq = shutil.which("jq")
    low, high = generate_pair(args.out, args.scale)
    size = (low.stat().st_size + high.stat().st_size) / 2**20
    print(
        f"inputs: {low.name} {low.stat().st_size / 2**20:.1f} MiB + {high.name} "
        f"{high.stat().st_size / 2**20:.1f} MiB = {size:.0f} MiB"
    )
    ours_out, prov, jq_out = (
        args.out / "merged.icmlab.json",
        args.out / "merged.provenance.jsonl",
        args.out / "merged.jq.json",
    )
    code = (
        "import sys; from pathlib import Path; from icmlab.merge.stage import MergeSource, merge_files; "
        "r = merge_files([MergeSource('q_instruct', Path(sys.argv[1])), MergeSource('llava_v1_5_mix665k', "
        "Path(sys.argv[2]))], Path(sys.argv[3]), Path(sys.argv[4]), image_token='<image>'); "
        "print(r.num_records, r.duplicate_ids)"
    )

    def run_ours() -> tuple[float, float, float]:
        # A fresh output each time, as jq's: replacing a big file costs ext4 a flush (auto_da_alloc) on top.
        for p in (ours_out, prov):
            p.unlink(missing_ok=True)
        return timed([sys.executable, "-c", code, str(low), str(high), str(ours_out), str(prov)])

    jq_out.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    ours = min(run_ours() for _ in range(args.repeat))
    print(
        f"icmlab merge : {ours[0]:7.2f} s wall  {ours[2]:7.2f} s CPU  peak RSS {ours[1]:8.0f} MiB  "
        f"(load average {load:.1f} at start)"
    )
    if not jq or args.no_jq:
        print("jq not installed (apt-get install -y jq): no baseline measured" if not jq else "jq skipped (--no-jq)")
        for p in (ours_out, prov):
            p.unlink(missing_ok=True)
        return
    load = os.getloadavg()[0]
    base = min(timed([jq, "-s", "add", str(low), str(high)], stdout=jq_out) for _ in range(args.repeat))
    version = subprocess.run([jq, "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"jq -s add    : {base[0]:7.2f} s wall  {base[2]:7.2f} s CPU  peak RSS {base[1]:8.0f} MiB  ({version}, "
        f"load average {load:.1f} at start)"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes slow both tools)")
    t = time.perf_counter()
    a, b = orjson.loads(ours_out.read_bytes()), orjson.loads(jq_out.read_bytes())
    equal = a == b
    print(f"records: icmlab {len(a):,}, jq {len(b):,}; equal: {equal} (checked in {time.perf_counter() - t:.1f} s)")
    del a, b
    speed, mem = base[0] / ours[0], ours[1] / base[1]
    print(
        f"speed-up {speed:.1f}x wall, {base[2] / ours[2]:.1f}x CPU (target >= 10x: {'met' if speed >= 10 else 'NOT met'}); "
        f"memory {100 * mem:.1f}% of jq's (target <= 20%: {'met' if mem <= 0.2 else 'NOT met'})"
    )
    for p in (ours_out, prov, jq_out):
        p.unlink(missing_ok=True)
    if not equal:
        sys.exit("merged records differ from jq's")


if __name__ == "__main__":
    main()
