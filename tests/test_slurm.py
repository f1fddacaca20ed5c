"""``icmlab slurm``: the generated sbatch script, and a real submission to a real single-node SLURM.

The fast tests check the script's shape (one task per node, rendezvous from ``SLURM_*``,
``--signal=TERM@grace``) and the errors naming the option. The slow one brings up Debian's
``slurm-wlm`` + ``munge`` (slurmctld + slurmd on 127.0.0.1, all state in a temp folder) with
``tools/slurm/start.sh``, submits the generated script for 2 CPU ranks with ``icmlab slurm --submit``,
waits for the job, and checks the trained model and metrics. It skips, printing why, only where the
SLURM binaries are missing (``tools/slurm/install.sh`` installs them).
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_train_setup as T

from icmlab import paths
from icmlab.config import config_from_dict, save_resolved
from icmlab.io import read_jsonl
from icmlab.train import slurm

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools" / "slurm"
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "srun")


def _gpu_cfg(**hardware):
    return config_from_dict(
        {
            "run_name": "big",
            "train": {"per_device_batch_size": 4, "global_batch_size": 128},
            "hardware": {"device": "cuda", "num_gpus": 8, "deepspeed": "zero3", **hardware},
        }
    )


def test_sbatch_script_for_two_gpu_nodes(tmp_path):
    cfg = slurm.cluster_config(_gpu_cfg(), nodes=2, per_node=4)
    assert (cfg.hardware.num_nodes, cfg.hardware.num_gpus, cfg.hardware.launcher) == (2, 4, "torchrun")
    assert cfg.gradient_accumulation_steps == 4  # 128 = 4 per GPU × 8 ranks × 4
    text = slurm.render_sbatch(cfg, tmp_path / "c.yaml", partition="a100", time="12:00:00", grace_s=240)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=a100",
        "#SBATCH --time=12:00:00",
        "#SBATCH --signal=TERM@240",
        "#SBATCH --cpus-per-task=32",
    ):
        assert line in text.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert re.search(r"^srun .* -m icmlab train .*c\.yaml$", text, re.M)
    per_rank = slurm.render_sbatch(cfg, tmp_path / "c.yaml", srun_ranks=True)
    assert "#SBATCH --ntasks-per-node=4" in per_rank and "ICMLAB_SRUN_RANKS=1" in per_rank


def test_sbatch_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--time"):
        slurm.render_sbatch(_gpu_cfg(), tmp_path / "c.yaml", time="soon")
    with pytest.raises(ValueError, match="--nodes"):
        slurm.cluster_config(_gpu_cfg(), nodes=0)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        slurm.cluster_config(_gpu_cfg(), nodes=3)  # 128 is not a multiple of 4 × 8 × 3


def test_workers_read_their_rank_from_slurm_in_per_rank_mode(monkeypatch):
    from icmlab.train.launch import is_launched_worker

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "unset")  # recorded, so that monkeypatch restores the original (absent) state
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert not is_launched_worker()  # only in the script's per-rank mode
    monkeypatch.setenv("ICMLAB_SRUN_RANKS", "1")
    assert is_launched_worker()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"


# ------------------------------------------------------------------ a real SLURM
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        reason = f"SLURM binaries missing ({', '.join(missing)}); install them with tools/slurm/install.sh"
        print(reason)
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(TOOLS / "start.sh"), str(d)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    try:
        yield {"dir": d, "env": env}
    finally:
        # This private cluster's jobs (a failed test may leave one running), then its daemons.
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user", getpass.getuser()], env=env, timeout=30)
        end = time.monotonic() + 30
        while (
            time.monotonic() < end
            and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        ):
            time.sleep(0.5)
        subprocess.run(["bash", str(TOOLS / "stop.sh"), str(d)], timeout=60)


def _job_state(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", out))


def _wait_job(job: str, env: dict, timeout: float = 400) -> dict:
    end = time.monotonic() + timeout
    while True:
        state = _job_state(job, env)
        if state.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        assert time.monotonic() < end, f"job {job} still {state.get('JobState')}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_icmlab_slurm_submit_trains_with_two_cpu_ranks_and_survives_preemption(cluster, tmp_path):
    """``icmlab slurm --submit`` → a real job of 2 CPU ranks; SIGTERM to the job's tasks mid-run (what
    ``--signal=TERM@grace`` or a pre-emption sends) → every rank checkpoints, the job exits 143;
    resubmitting the same script resumes and finishes: model and metrics of all steps."""
    d = tmp_path
    base = T.build_llava_hf(d / "base")
    records = T.build_records(d / "data")
    steps = 12
    cfg = T.make_config(d, base, run_name="slurm", max_steps=steps, per_device_batch_size=2, global_batch_size=8)
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, deepspeed="zero2", launcher="auto"))
    T.write_training_json(cfg, records)
    params = save_resolved(cfg, d / "params.yaml")
    env = cluster["env"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "icmlab",
            "slurm",
            str(params),
            "--gpus-per-node",
            "2",
            "--time",
            "10",
            "--grace",
            "60",
            "--submit",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    script = cfg.run_dir / "slurm" / "train.sbatch"
    assert "#SBATCH --signal=TERM@60" in script.read_text() and "#SBATCH --ntasks-per-node=1" in script.read_text()

    metrics = paths.metrics_jsonl(cfg)
    end = time.monotonic() + 400
    while not (metrics.exists() and len(metrics.read_bytes().splitlines()) >= 2):
        assert _job_state(job, env).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _job_state(job, env)
        assert time.monotonic() < end, "the job logged no training step in time"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True, timeout=30)  # to the job's tasks
    state = _wait_job(job, env)
    log = next((cfg.run_dir / "slurm").glob(f"slurm-{job}.out")).read_text()
    assert state.get("ExitCode") == "143:0", (state, log[-4000:])
    assert "interrupted: checkpoint saved" in log
    stopped = read_jsonl(metrics)[-1]["step"]
    assert stopped < steps and (paths.checkpoints_dir(cfg) / f"checkpoint-{stopped}" / "trainer_state.json").exists()
    assert not paths.final_model_dir(cfg).exists()
    print(f"SLURM job {job}: SIGTERM stop at step {stopped} after {time.perf_counter() - t0:.1f} s")

    out = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job2 = out.stdout.strip().split(";")[0]
    state = _wait_job(job2, env)
    log = next((cfg.run_dir / "slurm").glob(f"slurm-{job2}.out")).read_text()
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, log[-4000:])
    print(f"SLURM jobs {job} + {job2}: {time.perf_counter() - t0:.1f} s")
    assert re.search(r"job \d+: 1 node\(s\), master \S+:\d+", log)
    assert "global batch 8 = 2 per device × 2 CPU process × 2 accumulation" in log
    assert f"resuming from {paths.checkpoints_dir(cfg) / f'checkpoint-{stopped}'}" in log
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    model = paths.final_model_dir(cfg)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(model)  # a plain transformers reload
