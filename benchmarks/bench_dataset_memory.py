"""Benchmark: memory of the train stage's dataset per rank, RecordStore against a list of dicts.

Data: a synthetic merged ``train.json`` of ``--records`` records (default 865,298: 200,000
Q-Instruct-shaped + 665,298 llava_v1_5_mix665k-shaped, ~1.07 GB, the mix records indented as
the downloaded file is), written to ``/tmp`` in seconds: 8,653 records of ``bench_merge``'s
generators are serialised once and repeated with fresh ids.

Each variant runs in its own process (one "rank"):

- ``icmlab``: :class:`icmlab.train.dataset.SupervisedDataset` over
  :class:`icmlab.inputs.recordstore.RecordStore` (offsets into the mapped file);
- baseline: ``json.load`` of the file (upstream's ``LazySupervisedDataset``: a list of dicts) and
  the modality lengths in Python, the same encoding per sample.

Measured: build time (for icmlab the first open, which scans the file and keeps the offsets in
``<file>.offsets.npz``, and a later open); RSS after the build; then a ``DataLoader`` with 4 workers iterates an epoch
of text encoding (``SupervisedDataset.encode``: tokenize + mask, no images), and the private
memory of the rank plus its workers is summed from ``/proc/<pid>/smaps_rollup`` (``Pss_Anon``:
anonymous memory with shared pages split among their sharers, i.e. the real total; and
``Private_Dirty``) once the workers run and at the end of the epoch. File-backed pages of the
mapped JSON are shared page cache and count in neither.

Usage::

    nice .venv/bin/python benchmarks/bench_dataset_memory.py                    # 865k records
    nice .venv/bin/python benchmarks/bench_dataset_memory.py --records 100000   # smaller
    ... --baseline-records 200000   # the list-of-dicts baseline on fewer records (it needs ~5 GB per 865k
                                      per process once the workers have copied it)

Targets (issue 15, 865k records): build <= 5 s, <= 300 MB RSS per rank, private growth <= 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

N_LOW, N_HIGH = 200_000, 665_298
TEMPLATES_LOW, TEMPLATES_HIGH = 2_000, 6_653


def generate(path: Path, n: int) -> Path:
    """Write ``n`` records (low/high-level shaped, in the 200k:665k proportion) to ``path``; reused if present."""
    import orjson
    from bench_merge import high_level_records, low_level_records

    if path.exists():
        return path
    t = time.perf_counter()
    low = [orjson.dumps(r) for r in low_level_records(TEMPLATES_LOW, 0)]
    high = [orjson.dumps(r, option=orjson.OPT_INDENT_2) for r in high_level_records(TEMPLATES_HIGH, 1)]
    # Per template: the text before and after the id's value, so a record is prefix + id + suffix.
    parts = []
    for text in low + high:
        k = text.index(b'"id"')
        lo = text.index(b'"', k + 4) + 1
        hi = text.index(b'"', lo)
        parts.append((text[:lo], text[hi:]))
    n_low = round(n * N_LOW / (N_LOW + N_HIGH))
    chunks = []
    for i in range(n):
        pre, post = parts[i % TEMPLATES_LOW] if i < n_low else parts[TEMPLATES_LOW + i % TEMPLATES_HIGH]
        chunks.append(pre + b"%d" % i + post)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"[\n" + b",\n".join(chunks) + b"\n]\n")
    tmp.rename(path)
    print(f"generated {n:,} records, {path.stat().st_size / 1e9:.2f} GB, in {time.perf_counter() - t:.1f} s")
    return path


def smaps(pid: int) -> dict[str, int]:
    """``Rss``, ``Pss_Anon``, ``Private_Dirty`` (bytes) of a process from ``/proc/<pid>/smaps_rollup``."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss_Anon", "Private_Dirty"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:  # the process has exited
        pass
    return out


def total(pids: list[int]) -> dict[str, int]:
    sums = {"Rss": 0, "Pss_Anon": 0, "Private_Dirty": 0}
    for pid in pids:
        for k, v in smaps(pid).items():
            sums[k] += v
    return sums


class TextOnly:
    """The dataset's text encoding per sample (no image decode): what the epoch measures."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return len(self.ds.encode(i)["input_ids"])


def child(variant: str, path: Path, epoch: int | None, workers: int) -> dict:
    """One rank: build the dataset, then an epoch of text encoding through a DataLoader."""
    import torch
    from bench_input_pipeline import llava_tokenizer
    from torch.utils.data import DataLoader

    from icmlab.inputs.images import build_image_processor
    from icmlab.inputs.recordstore import RecordStore, modality_length
    from icmlab.train.dataset import SupervisedDataset

    torch.set_num_threads(1)
    tok, proc = llava_tokenizer(), build_image_processor(336)
    kw = dict(tokenizer=tok, image_processor=proc, data_root=path.parent, family="llava15", image_token_id=32000,
              num_image_tokens=576, model_max_length=2048)  # fmt: skip
    before = total([os.getpid()])
    t = time.perf_counter()
    cold = None
    if variant == "icmlab":
        path.with_name(path.name + ".offsets.npz").unlink(missing_ok=True)
        RecordStore.open(path)  # the first open scans the file and keeps the offsets beside it
        cold = time.perf_counter() - t
        before = total([os.getpid()])
        t = time.perf_counter()
        ds = SupervisedDataset(RecordStore.open(path), **kw)  # every later open (ranks, resumes)
    else:
        records = json.load(open(path, encoding="utf-8"))
        ds = SupervisedDataset(RecordStore.from_records(records[:1]), **kw)  # the encoder; records below
        ds.records, ds.modality_lengths = records, [modality_length(r) for r in records]
    build = time.perf_counter() - t
    built = total([os.getpid()])
    n = len(ds) if epoch is None else min(epoch, len(ds))
    # persistent workers: still alive at the end of the epoch, where the last figure is taken (once a
    # worker exits, the pages it shared with the rank count as the rank's private ones).
    loader = DataLoader(torch.utils.data.Subset(TextOnly(ds), range(n)), batch_size=64, num_workers=workers,
                        collate_fn=lambda b: sum(b), prefetch_factor=4, persistent_workers=workers > 0)  # fmt: skip
    it = iter(loader)
    tokens = next(it)
    pids = [os.getpid(), *(w.pid for w in it._workers)]
    start = total(pids)
    peak = dict(start)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            now = total(pids)
            for k in peak:
                peak[k] = max(peak[k], now[k])

    threading.Thread(target=poll, daemon=True).start()
    t = time.perf_counter()
    warm, warm_at = None, max(1, len(loader) // 20)
    for k, b in enumerate(it, 1):
        tokens += b
        if k == warm_at:  # 5 % of the epoch: the workers' own start-up allocations are done
            warm = total(pids)
    epoch_s = time.perf_counter() - t
    end = total(pids)  # the workers are still alive (persistent), the epoch is done
    done.set()
    del it, loader
    for k in peak:
        peak[k] = max(peak[k], end[k])
    return {"records": len(ds), "epoch": n, "build_s": build, "cold_s": cold, "warm": warm or end, "rss_before": before["Rss"], "rss": built["Rss"],
            "anon_built": built["Pss_Anon"], "start": start, "end": end, "peak": peak, "epoch_s": epoch_s,
            "tokens": tokens, "workers": workers}  # fmt: skip


def run_child(variant: str, path: Path, epoch: int | None, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--path", str(path), "--workers", str(workers)]
    if epoch is not None:
        cmd += ["--epoch", str(epoch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, r: dict) -> None:
    mb = 1e6
    grow = {k: (r["peak"][k] - r["start"][k]) / max(r["start"][k], 1) for k in ("Pss_Anon", "Private_Dirty")}
    cold = f" (first open, scanning: {r['cold_s']:.2f} s)" if r.get("cold_s") else ""
    print(f"{name}: {r['records']:,} records; build {r['build_s']:.2f} s{cold}; RSS {r['rss'] / mb:,.0f} MB "
          f"(+{(r['rss'] - r['rss_before']) / mb:,.0f} MB for the records; anonymous {r['anon_built'] / mb:,.0f} MB)")  # fmt: skip
    print(f"   epoch of text encoding over {r['epoch']:,} records ({r['epoch_s']:.0f} s, {r['tokens']:,} tokens), "
          f"rank + {r['workers']} workers:")  # fmt: skip
    for k in ("Pss_Anon", "Private_Dirty"):
        after = (r["peak"][k] - r["warm"][k]) / max(r["warm"][k], 1)
        print(f"   {k:<14} start {r['start'][k] / mb:8,.0f} MB  at 5 % {r['warm'][k] / mb:8,.0f} MB  "
              f"peak {r['peak'][k] / mb:8,.0f} MB  growth {grow[k] * 100:+6.1f} % (from 5 %: {after * 100:+6.1f} %)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=N_LOW + N_HIGH)
    ap.add_argument(
        "--baseline-records", type=int, default=None, help="records of the baseline's file (default --records)"
    )
    ap.add_argument("--epoch", type=int, default=None, help="records iterated (default: all, a full epoch)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--child", choices=("icmlab", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.epoch, args.workers)))
        return
    ours_path = generate(Path(f"/tmp/icmlab_bench_merged_{args.records}.json"), args.records)
    base_n = args.baseline_records or args.records
    base_path = generate(Path(f"/tmp/icmlab_bench_merged_{base_n}.json"), base_n)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    ours = run_child("icmlab", ours_path, args.epoch, args.workers)
    report("icmlab RecordStore", ours)
    base = run_child("baseline", base_path, args.epoch, args.workers)
    report("baseline json.load list of dicts", base)
    scale = ours["records"] / base["records"]
    per = {k: (r["rss"] - r["rss_before"]) / r["records"] for k, r in (("ours", ours), ("base", base))}
    g = {k: (r["peak"]["Pss_Anon"] - r["start"]["Pss_Anon"]) for k, r in (("ours", ours), ("base", base))}
    print(f"\nrecords' RSS per rank: {per['ours'] * ours['records'] / 1e6:+,.0f} MB vs {per['base'] * ours['records'] / 1e6:+,.0f} MB "
          f"(baseline per record x {ours['records']:,}); private (Pss_Anon) growth over the epoch: "
          f"{g['ours'] / 1e6:+.0f} MB vs {g['base'] / 1e6 * scale:+,.0f} MB (baseline scaled to {ours['records']:,} records), "
          f"{g['base'] * scale / max(g['ours'], 1):.0f}x less")  # fmt: skip
    ok_build, ok_rss = ours["build_s"] <= 5, ours["rss"] - ours["rss_before"] <= 300e6
    ok_grow = g["ours"] <= 0.10 * ours["start"]["Pss_Anon"]
    print(f"targets: build <= 5 s {'met' if ok_build else 'NOT met'}; records' RSS <= 300 MB per rank "
          f"{'met' if ok_rss else 'NOT met'}; "
          f"private growth <= 10 % {'met' if ok_grow else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
