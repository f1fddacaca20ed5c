"""Several CPU ranks over gloo, started as a user starts them (``hardware.device: cpu``, ``num_processes: 2``).

Every run goes through ``icmlab.train.stage.run`` or ``python -m icmlab train``, which launch the
real ``deepspeed`` / ``torchrun`` launchers; the ranks are real processes talking over gloo. On the
tiny LLaVA and the tiny mPLUG-Owl2 (``tiny_train_setup``):

- 2 ranks × micro-batch 2 (ZeRO-2, ZeRO-3, torchrun/DDP) against 1 rank × 4 in-process: same
  global batch, same samples per optimizer step, same order; losses and final weights within the
  tolerance derived in :func:`_assert_equivalent`;
- the last step of the epoch gives rank 0 an image micro-batch and rank 1 a text-only one (the
  modality-grouped sampler's one mixed megabatch): under ZeRO-3 it must finish (issue 13, item 1);
- pre-emption: SIGTERM to the deepspeed launcher mid-run → every rank checkpoints → exit 143;
  then kill -9 of one worker mid-run; a rerun resumes each time and the whole loss sequence and
  the final weights equal the uninterrupted 2-rank run exactly;
- the grouped sampler gives the two ranks disjoint samples that cover the epoch.

Wall time on the shared 2-core machine: 7 min in all (load average 2-5 from other jobs; a launched
2-rank run costs 25-60 s, mostly the ranks' imports, ZeRO-3 the most; DeepSpeed JIT-compiles a small
CPU extension once, ~40 s, cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_train_setup as T
import torch
from safetensors.torch import load_file

from icmlab import paths
from icmlab.config import TrainConfig, save_resolved
from icmlab.io import read_jsonl
from icmlab.train.dataset import modality_length
from icmlab.train.stage import run
from icmlab.train.trainer import modality_length_grouped_indices

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
pytest.importorskip("deepspeed")

#: One epoch of 16 samples (10 with an image, 6 text-only) in global batches of 4: 4 steps, the
#: last of which is the sampler's mixed megabatch (2 image samples on rank 0, 2 text-only on rank 1).
N_IMAGE, N_TEXT, STEPS = 10, 6, 4
#: The pre-emption runs (and the ZeRO-2 comparison): 10 epochs, a checkpoint every 3 steps, cosine.
#: (Every 3 steps: the kill -9 resume then starts mid-epoch, where the sampler's epoch must be restored.)
#: 10 epochs so that a SIGTERM sent at step 5 stops the job well before its end: the signal reaches the
#: ranks through two launcher processes (deepspeed's runner, then launch.py), and on a loaded 2-core
#: machine a tiny job has run 7-8 more steps by then.
LONG_STEPS = 10 * STEPS
LONG = dict(max_steps=LONG_STEPS, save_steps=3, save_total_limit=1, lr_scheduler="cosine", warmup_steps=2)
LR = 1e-3
#: Same loss normalisation on both sides: the sum over the global batch's answer tokens / their count
#: (per-micro-batch means would weigh a 2-sample micro-batch's tokens differently from a 4-sample one's).
LOSS = (
    {"loss_normalization": "token_mean"}
    if "loss_normalization" in {f.name for f in dataclasses.fields(TrainConfig)}
    else {}
)
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("multirank")
    records = T.build_records(d / "data", n_image=N_IMAGE, n_text=N_TEXT)
    return {
        "dir": d,
        "llava15": T.build_llava_hf(d / "llava"),
        "mplug_owl2": T.build_mplug_owl2(d / "owl"),
        "records": {"llava15": records, "mplug_owl2": T.to_mplug_dialect(records)},
    }


def _cfg(tiny: dict, family: str, name: str, *, ranks: int, deepspeed: str = "none", launcher: str = "auto", **train):
    t = dict(max_steps=STEPS, per_device_batch_size=4 // ranks, global_batch_size=4, lr=LR, max_grad_norm=1.0, **LOSS)
    if family == "mplug_owl2":
        t["freeze_vision"] = False  # the Q-Instruct recipe trains the tower: its all-gathers matter too
    t.update(train)
    cfg = T.make_config(tiny["dir"], tiny[family], run_name=name, family=family, **t)
    cfg = dataclasses.replace(
        cfg,
        hardware=dataclasses.replace(
            cfg.hardware, deepspeed=deepspeed, launcher=launcher if ranks > 1 else "inprocess", num_processes=ranks
        ),
    )
    T.write_training_json(cfg, tiny["records"][family])
    return cfg


def _outcome(cfg) -> dict:
    return {
        "losses": [r["loss"] for r in read_jsonl(paths.metrics_jsonl(cfg))],
        "weights": load_file(paths.final_model_dir(cfg) / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def reference(tiny) -> dict:
    """1 rank × micro-batch 4, plain PyTorch in this process, per family (and LLaVA's long run)."""
    out = {}
    for family in ("llava15", "mplug_owl2"):
        cfg = _cfg(tiny, family, f"ref-{family}", ranks=1)
        run(cfg)
        out[family] = _outcome(cfg)
    cfg = _cfg(tiny, "llava15", "ref-long", ranks=1, **LONG)
    run(cfg)
    out["long"] = _outcome(cfg)
    return out


def _initial(tiny: dict, family: str) -> dict:
    return load_file(Path(tiny[family]) / "model.safetensors")


def _assert_equivalent(got: dict, ref: dict, initial: dict, steps: int = STEPS) -> dict:
    """Same training within float noise; returns the measured figures.

    Tolerance, derived: both sides compute the same fp32 sums over the same samples, in other
    groupings (a micro-batch of 2 is padded to another length than one of 4, so its matmuls have
    other shapes and round differently; gradients are summed over the ranks by gloo/ZeRO buckets
    and scaled by 1/world). Step 1 sees identical weights, so its loss differs by summation
    rounding only: rel 1e-5 (fp32 has ~6e-8 per operation; a few hundred terms). From then on AdamW
    divides by sqrt(v) + eps: where a gradient element is near zero, a last-bit difference moves its
    update by up to 2 × lr (Adam's step is bounded by lr per step), so no weight element may differ
    by more than ``2 × lr × steps``; the bulk must agree: the norm of the difference is at most
    1e-3 of how far training moved the weights (a lost or doubled step moves them by ~1/steps of
    that, a wrong gradient scale by O(1)). The losses follow the weights: rel 1e-4 (a 2-sample vs
    4-sample normalisation mistake, or another sample order, moves them by percents).
    """
    losses, ref_losses = got["losses"], ref["losses"]
    assert len(losses) == len(ref_losses) == steps
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert set(got["weights"]) == set(ref["weights"])
    bound = 2 * LR * steps
    max_diff = diff_sq = moved_sq = 0.0
    for key, value in ref["weights"].items():
        diff = (got["weights"][key].float() - value.float()).abs()
        max_diff = max(max_diff, diff.max().item())
        diff_sq += float(diff.double().pow(2).sum())
        if key in initial and initial[key].shape == value.shape:
            moved_sq += float((value.double() - initial[key].double()).pow(2).sum())
    assert max_diff <= bound, (max_diff, bound)
    assert moved_sq > 0
    assert diff_sq**0.5 <= 1e-3 * moved_sq**0.5, (diff_sq**0.5, moved_sq**0.5)
    figures = {
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        "max_weight_diff": max_diff,
        "rel_weight_diff": diff_sq**0.5 / moved_sq**0.5,
    }
    print("equivalence:", figures)
    return figures


def _mixed_last_step(records: list[dict]) -> None:
    """The sampler's last megabatch of the epoch: rank 0's 2 samples have images, rank 1's are text-only."""
    lengths = [modality_length(r) for r in records]
    order = modality_length_grouped_indices(lengths, 2, 2, torch.Generator().manual_seed(7))
    last = order[-4:]
    assert [lengths[i] > 0 for i in last] == [True, True, False, False]


@pytest.mark.parametrize(
    "family,deepspeed,launcher",
    [
        ("llava15", "zero3", "deepspeed"),
        ("llava15", "none", "torchrun"),
        ("mplug_owl2", "zero2", "torchrun"),
        ("mplug_owl2", "zero3", "deepspeed"),
        ("mplug_owl2", "none", "torchrun"),
    ],
)
def test_two_ranks_match_one_rank_with_twice_the_micro_batch(tiny, reference, family, deepspeed, launcher):
    _mixed_last_step(tiny["records"][family])
    cfg = _cfg(tiny, family, f"{family}-{deepspeed}-{launcher}", ranks=2, deepspeed=deepspeed, launcher=launcher)
    t0 = time.perf_counter()
    result = run(cfg)  # launches the real launcher; the mixed-modality last step must not hang
    print(f"{family} {deepspeed} {launcher}: {time.perf_counter() - t0:.1f} s")
    assert result.mode == launcher and result.global_step == STEPS and not result.interrupted
    _assert_equivalent(_outcome(cfg), reference[family], _initial(tiny, family))


# ------------------------------------------------------------------ pre-emption and kill -9
def _start(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "icmlab", "train", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _descendants(pid: int) -> list[tuple[int, str, bool]]:
    """(pid, cmdline, is a rank) of every process below ``pid``."""
    kids: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(e))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        out.append((p, cmd, b"\0LOCAL_RANK=" in b"\0" + env))
        todo.extend(kids.get(p, []))
    return out


def _ranks(pid: int) -> list[int]:
    procs = _descendants(pid)
    rank_pids = {p for p, _, is_rank in procs if is_rank}
    # a rank's own children (data loader workers) inherit LOCAL_RANK: keep the topmost
    return sorted(p for p in rank_pids if _ppid(p) not in rank_pids)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _steps_logged(cfg) -> int:
    f = paths.metrics_jsonl(cfg)
    return len(f.read_bytes().splitlines()) if f.exists() else 0


def _wait(proc: subprocess.Popen, cond, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc {proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("job did not reach the expected point in time")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tiny) -> dict:
    """The 2-rank ZeRO-2 run of the pre-emption test, never interrupted (10 epochs, 40 steps).

    It also carries the notebook's live plot: the stage polls it while the launched job runs, and
    it must have drawn the curves mid-run (not only at the end) from rank 0's metrics.jsonl.
    """
    from icmlab.train.live import LiveMetricsPlot

    cfg = _cfg(tiny, "llava15", "steady", ranks=2, deepspeed="zero2", launcher="deepspeed", **LONG)
    live = LiveMetricsPlot(paths.metrics_jsonl(cfg), every_s=0)
    t0 = time.perf_counter()
    run(cfg, callbacks=[live])
    print(f"uninterrupted 2-rank ZeRO-2 run: {time.perf_counter() - t0:.1f} s, live redraws at rows {live.drawn}")
    return {**_outcome(cfg), "drawn": live.drawn}


def test_zero2_two_ranks_match_one_rank_and_the_live_plot_follows(tiny, reference, uninterrupted):
    """LLaVA, ZeRO-2, 10 epochs (each ending in the mixed-modality step) against 1 rank × 4; the
    notebook's live plot drew mid-run pictures from the launched job's metrics.jsonl."""
    _mixed_last_step(tiny["records"]["llava15"])
    _assert_equivalent(uninterrupted, reference["long"], _initial(tiny, "llava15"), steps=LONG_STEPS)
    drawn = uninterrupted["drawn"]
    assert drawn[-1] == LONG_STEPS and any(0 < n < LONG_STEPS for n in drawn), drawn


def test_sigterm_to_the_launcher_then_kill9_of_a_worker_resume_the_same_run(tiny, uninterrupted):
    """SIGTERM to the deepspeed launcher process → every rank finishes its step, saves one complete
    checkpoint and the job exits 143 (interrupted); rerun → kill -9 of one worker after the next
    periodic checkpoint → the job fails; rerun → finishes. The metrics and weights are the
    uninterrupted run's (same ranks, same order: float-identical)."""
    cfg = _cfg(tiny, "llava15", "preempted", ranks=2, deepspeed="zero2", launcher="deepspeed", **LONG)
    config = save_resolved(cfg, tiny["dir"] / "preempted.yaml")
    ckdir = paths.checkpoints_dir(cfg)

    # 1. SIGTERM to the launcher (its "deepspeed" runner process), mid-run
    t0 = time.perf_counter()
    proc = _start(config)
    _wait(proc, lambda: _steps_logged(cfg) >= 5)
    launcher = next(p for p, cmd, is_rank in _descendants(proc.pid) if "deepspeed.launcher.runner" in cmd)
    os.kill(launcher, signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 143, out[-4000:]
    stopped = read_jsonl(paths.metrics_jsonl(cfg))[-1]["step"]
    saved = sorted(int(p.name.split("-")[1]) for p in ckdir.glob("checkpoint-*"))
    assert (
        stopped in saved
        and 5 <= stopped < LONG_STEPS - 4
        and (ckdir / f"checkpoint-{stopped}" / "trainer_state.json").exists()
    )
    assert not paths.final_model_dir(cfg).exists()
    print(f"SIGTERM stop at step {stopped}: {time.perf_counter() - t0:.1f} s")

    # 2. rerun; kill -9 one worker one step after the next periodic checkpoint
    proc = _start(config)
    target = (stopped // 3 + 1) * 3  # a periodic checkpoint (save_steps 3)
    done = ckdir / f"checkpoint-{target}" / "trainer_state.json"
    _wait(proc, lambda: done.exists() and _steps_logged(cfg) >= target + 1)
    ranks = _ranks(proc.pid)
    assert len(ranks) == 2, _descendants(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    rc, out = _finish(proc)
    assert rc not in (0, 143), out[-4000:]
    assert "resuming from" in out and f"checkpoint-{stopped}" in out
    assert not paths.final_model_dir(cfg).exists()

    # 3. rerun to the end
    rc, out = _finish(_start(config))
    assert rc == 0, out[-4000:]
    assert "resuming from" in out and f"checkpoint-{target}" in out
    got = _outcome(cfg)
    steps = [r["step"] for r in read_jsonl(paths.metrics_jsonl(cfg))]
    assert steps == list(range(1, LONG_STEPS + 1))
    assert got["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-6, abs=1e-7)
    max_diff = 0.0
    for key, value in uninterrupted["weights"].items():
        max_diff = max(max_diff, (got["weights"][key] - value).abs().max().item())
    print(
        f"pre-emption chain: max |Δloss| "
        f"{max(abs(a - b) for a, b in zip(got['losses'], uninterrupted['losses'])):.3g}, max |Δw| {max_diff:.3g}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    assert max_diff <= 1e-6


# ------------------------------------------------------------------ the grouped sampler over real ranks
SAMPLER_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from transformers import TrainingArguments
from icmlab.train.trainer import IcmTrainer

lengths = json.loads(sys.argv[1])
dist.init_process_group("gloo")
args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         use_cpu=True, seed=7, data_seed=7, remove_unused_columns=False, report_to="none")
trainer = IcmTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=list(range(len(lengths))),
                     data_collator=lambda batch: {"ids": batch}, modality_lengths=lengths,
                     group_by_modality_length=True)
seen = []
for epoch in range(2):
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    seen.append([i for batch in loader for i in batch["ids"]])
# one file per rank: lines two ranks print into the same pipe can run into each other or into
# torchrun's own output, and a lost line looked like a rank that saw nothing
os.makedirs(sys.argv[2], exist_ok=True)
with open(os.path.join(sys.argv[2], f"seen-{dist.get_rank()}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def test_grouped_sampler_gives_ranks_disjoint_samples_covering_the_epoch(tiny, tmp_path):
    """Two real gloo ranks iterate IcmTrainer's own train data loader (modality-grouped sampler,
    accelerate's sharding): per epoch, disjoint samples whose union is the epoch, each micro-batch a
    single modality except the one leftover megabatch, and a different order in epoch 2."""
    import json

    lengths = [modality_length(r) for r in tiny["records"]["llava15"]]
    script = tmp_path / "sampler.py"
    script.write_text(SAMPLER_WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            json.dumps(lengths),
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in (tmp_path / "out").glob("seen-*.json")}
    assert set(seen) == {0, 1}
    n = len(lengths)
    for epoch in range(2):
        a, b = seen[0][epoch], seen[1][epoch]
        assert not set(a) & set(b), "a sample reached both ranks"
        assert sorted(a + b) == list(range(n)), "the ranks together must cover the epoch exactly once"
        mixed = 0
        for k in range(0, len(a), 2):  # each rank's micro-batches of 2
            for batch in (a[k : k + 2], b[k : k + 2]):
                mixed += len({lengths[i] > 0 for i in batch}) > 1
        assert mixed <= 1
    assert seen[0][0] != seen[0][1]
