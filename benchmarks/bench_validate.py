"""Benchmark: schema + existence checks of ``icmlab.validate.stage`` on 865k records (Q-Instruct + mix665k shaped).

Data: the synthetic pair of :mod:`bench_merge` (200,000 + 665,298 records, ~1.1 GB), merged by
``icmlab.merge.stage`` into one ``train.json``. Image tree: one EMPTY file per referenced image, laid out
like the real folders (``spaq_koniq/``, ``livefb_liveitw_aigc/``, ``coco/train2017`` with 118,287
files, ``gqa/images``, ``ocr_vqa/images``, ``textvqa/train_images``, ``vg/VG_100K``): ~398k files,
no pixels, since the measured pass only checks existence with exact case. A few paths are removed
and one is renamed to another case, so the missing-image path is exercised too.

Measured, each in its own subprocess under ``/usr/bin/time -v`` (wall, CPU, peak RSS):

- ``icmlab``: ``validate_file(..., images="exists", setup=None)`` with 2 worker processes and with 1;
- baseline: the obvious script (``json.load``, a loop of the same record rules, ``os.path.exists``
  per record), as a user would write it.

Usage::

    .venv/bin/python benchmarks/bench_validate.py               # full size (data cached under --out)
    .venv/bin/python benchmarks/bench_validate.py --scale 0.05  # quick run

Target (issue 4): <= 30 s on 2 cores for the 865k records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orjson  # noqa: E402
from bench_merge import ROOT, generate_pair, timed  # noqa: E402

BASELINE = r"""
import json, os, sys
path, root = sys.argv[1], sys.argv[2]
records = json.load(open(path, encoding="utf-8"))
problems = 0
for r in records:
    bad = not isinstance(r, dict) or not r.get("id") or not r.get("conversations")
    if not bad:
        roles = [t.get("from") for t in r["conversations"]]
        bad = roles[0] != "human" or any(a == b for a, b in zip(roles, roles[1:]))
        n = sum(t.get("value", "").count("<image>") for t in r["conversations"])
        bad = bad or n != (1 if "image" in r else 0)
        if "image" in r and not os.path.exists(os.path.join(root, r["image"])):
            bad = True
    problems += bad
print(len(records), problems)
"""

OURS = r"""
import sys, json
from pathlib import Path
from icmlab.validate.stage import ValidationOutputs, validate_file
res = validate_file(Path(sys.argv[1]), data_root=Path(sys.argv[2]), family="llava15", images="exists",
                    workers=int(sys.argv[3]), outputs=ValidationOutputs.in_dir(Path(sys.argv[4])))
print(res.num_records, res.records_with_errors, json.dumps(res.counts), json.dumps(res.seconds))
"""


def build_inputs(out: Path, scale: float) -> tuple[Path, Path, int]:
    """Merged ``train.json`` and the empty-file image tree (cached): ``(json, image root, files)``."""
    from icmlab.merge.stage import MergeSource, merge_files

    low, high = generate_pair(out, scale)
    train, root = out / "validate" / "train.json", out / "validate" / "images"
    stamp = out / "validate" / f"tree-{low.stat().st_mtime_ns}-{high.stat().st_mtime_ns}"
    if not stamp.exists():
        t = time.perf_counter()
        merge_files(
            [MergeSource("q_instruct", low), MergeSource("llava_v1_5_mix665k", high)],
            train,
            train.with_name("train.provenance.jsonl"),
            image_token="<image>",
        )
        images = sorted({r["image"] for src in (low, high) for r in orjson.loads(src.read_bytes()) if "image" in r})
        for folder in sorted({os.path.dirname(p) for p in images}):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for p in images:
            os.close(os.open(root / p, os.O_CREAT | os.O_WRONLY, 0o644))
        for p in images[:: max(1, len(images) // 5)]:  # a few missing files, one with another case
            os.unlink(root / p)
        os.rename(root / images[1], root / os.path.dirname(images[1]) / os.path.basename(images[1]).upper())
        stamp.write_text(json.dumps({"images": len(images)}))
        print(f"built train.json and {len(images):,} empty image files in {time.perf_counter() - t:.0f} s")
    return train, root, json.loads(stamp.read_text())["images"]


def run_timed(cmd: list[str], out: Path) -> tuple[float, float, float, str]:
    """:func:`bench_merge.timed` plus the command's stdout: (wall s, peak RSS MiB, CPU s, stdout)."""
    wall, rss, cpu = timed(cmd, stdout=out)
    return wall, rss, cpu, out.read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "merge")
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    train, root, n_images = build_inputs(args.out, args.scale)
    print(f"input: {train} ({train.stat().st_size / 2**20:.0f} MiB), image tree: {n_images:,} files under {root}")
    log = args.out / "validate" / "stdout.txt"
    walls = {}
    for workers in (2, 1):
        cmd = [sys.executable, "-c", OURS, str(train), str(root), str(workers), str(args.out / "validate" / "report")]
        wall, rss, cpu, text = run_timed(cmd, log)
        n, errors, rest = text.strip().split(" ", 2)
        counts, phases = rest.rsplit(" {", 1)
        walls[workers] = wall
        print(
            f"icmlab validate, {workers} worker(s): {wall:6.2f} s wall {cpu:6.2f} s CPU  peak RSS {rss:5.0f} MiB; "
            f"{int(n):,} records, {int(errors):,} with errors; phases {{{phases}"
        )
    print(f"   problems found: {counts}")
    wall, rss, cpu, text = run_timed([sys.executable, "-c", BASELINE, str(train), str(root)], log)
    print(
        f"baseline (json.load + loop + os.path.exists): {wall:6.2f} s wall {cpu:6.2f} s CPU  peak RSS {rss:5.0f} MiB; "
        f"{text.strip()}"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes slow every run)")
    limit = 30 * min(1.0, args.scale)
    print(
        f"target <= {limit:.1f} s on 2 cores: {'met' if walls[2] <= limit else 'NOT met'} ({walls[2]:.1f} s); "
        f"{wall / walls[2]:.1f}x faster than the baseline; 2 workers vs 1: {walls[1] / walls[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
