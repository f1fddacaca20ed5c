"""Resume proof: a training process killed mid-run and restarted reproduces the uninterrupted run.

Every run here is a real ``python`` subprocess of the train stage on a tiny LLaVA (12 optimizer
steps = 3 epochs of 32 samples, cosine schedule with warm-up, gradient accumulation 2, the
modality-grouped sampler, a checkpoint every 4 steps keeping only the last). The loss and lr
sequences in ``metrics.jsonl`` and the final weights are compared with an uninterrupted run:

- SIGKILL after a checkpoint (the process gets no chance to save anything) → rerun resumes;
- SIGTERM mid-run → the stage saves a checkpoint at the end of the step and exits with 143 → rerun;
- the transformers-5 pitfall (a naive ``Trainer`` resume keeps the initial weights) is avoided.
"""

from __future__ import annotations

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
from transformers import LlavaForConditionalGeneration, Trainer

from icmlab import paths
from icmlab.config import save_resolved
from icmlab.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# The worker: the train stage with an optional pause per step (so the test can hit it mid-run).
WORKER = """
import sys, time
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from icmlab.config import load_run_config
from icmlab.train.stage import run

class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(float(sys.argv[2]))

result = run(load_run_config(sys.argv[1]), callbacks=[Pause()])
sys.exit(143 if result.interrupted else 0)
"""
TRAIN = dict(max_steps=12, save_steps=4, save_total_limit=1, lr=2e-3, lr_scheduler="cosine", warmup_steps=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("resume")
    model = T.build_llava_hf(d / "base")
    records = T.build_records(d / "data")
    script = d / "worker.py"
    script.write_text(WORKER)
    return {"dir": d, "model": model, "records": records, "script": script}


def _config(setup: dict, name: str) -> tuple[object, Path]:
    cfg = T.make_config(setup["dir"], setup["model"], run_name=name, **TRAIN)
    T.write_training_json(cfg, setup["records"])
    return cfg, save_resolved(cfg, setup["dir"] / f"{name}.yaml")


def _start(setup: dict, config: Path, pause: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(setup["script"]), str(config), str(pause)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _steps_logged(cfg) -> int:
    f = paths.metrics_jsonl(cfg)
    return len(f.read_bytes().splitlines()) if f.exists() else 0


def _wait(proc: subprocess.Popen, cond, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("worker did not reach the expected point in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """The uninterrupted run: its metrics rows and final weights."""
    cfg, config = _config(setup, "reference")
    rc, out = _finish(_start(setup, config, 0.0))
    assert rc == 0, out[-3000:]
    return {
        "rows": read_jsonl(paths.metrics_jsonl(cfg)),
        "weights": load_file(paths.final_model_dir(cfg) / "model.safetensors"),
    }


def _assert_same_run(cfg, reference: dict) -> None:
    rows = read_jsonl(paths.metrics_jsonl(cfg))
    ref = reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, 13)) == [r["step"] for r in ref]
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    losses, ref_losses = [r["loss"] for r in rows], [r["loss"] for r in ref]
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7), list(zip(losses, ref_losses))
    assert len(set(round(x, 4) for x in ref_losses)) > 6  # the sequence really varies step to step
    weights = load_file(paths.final_model_dir(cfg) / "model.safetensors")
    for key, value in reference["weights"].items():
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-7), key


def test_sigkill_after_checkpoint_then_rerun_reproduces_the_run(setup, reference):
    cfg, config = _config(setup, "killed")
    proc = _start(setup, config, 0.4)
    ck4 = paths.checkpoints_dir(cfg) / "checkpoint-4" / "trainer_state.json"
    _wait(proc, lambda: ck4.exists() and _steps_logged(cfg) >= 5)  # one step past the checkpoint
    proc.send_signal(signal.SIGKILL)
    rc, _ = _finish(proc)
    assert rc == -signal.SIGKILL and not paths.final_model_dir(cfg).exists()
    assert _steps_logged(cfg) >= 5  # the killed process had logged steps the rerun must replace
    rc, out = _finish(_start(setup, config, 0.0))
    assert rc == 0, out[-3000:]
    assert "resuming from" in out and "checkpoint-4" in out
    _assert_same_run(cfg, reference)


def test_sigterm_saves_a_checkpoint_then_rerun_reproduces_the_run(setup, reference):
    cfg, config = _config(setup, "terminated")
    proc = _start(setup, config, 0.4)
    _wait(proc, lambda: _steps_logged(cfg) >= 6)  # past the periodic checkpoint-4
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 143, out[-3000:]
    saved = sorted(int(p.name.split("-")[1]) for p in paths.checkpoints_dir(cfg).glob("checkpoint-*"))
    stopped = read_jsonl(paths.metrics_jsonl(cfg))[-1]["step"]
    assert saved == [stopped] and 6 <= stopped < 12 and stopped % 4  # saved on SIGTERM, not periodically
    assert not paths.final_model_dir(cfg).exists()
    rc, out = _finish(_start(setup, config, 0.0))
    assert rc == 0 and f"checkpoint-{stopped}" in out, out[-3000:]
    _assert_same_run(cfg, reference)


def test_resume_restores_weights_that_a_naive_trainer_resume_drops(setup, tmp_path):
    from icmlab.models import get_family
    from icmlab.train.stage import build_training_args, resolve_device, run
    from icmlab.train.trainer import IcmTrainer

    cfg = T.make_config(tmp_path, setup["model"], run_name="pitfall", max_steps=2, save_steps=2)
    tmp_path.joinpath("data").symlink_to(setup["dir"] / "data")
    T.write_training_json(cfg, setup["records"])
    run(cfg)
    ckpt = paths.checkpoints_dir(cfg) / "checkpoint-2"
    want = LlavaForConditionalGeneration.from_pretrained(ckpt).state_dict()
    args = build_training_args(resolve_device(cfg))

    def fresh() -> IcmTrainer:
        return IcmTrainer(model=get_family("llava15").load_for_training(cfg).model, args=args)

    naive = fresh()
    initial = {k: v.clone() for k, v in naive.model.state_dict().items()}
    Trainer._load_from_checkpoint(naive, str(ckpt))  # what transformers does on its own
    kept_initial = all(torch.equal(v, initial[k]) for k, v in naive.model.state_dict().items())
    assert kept_initial, "transformers now restores LLaVA checkpoints itself; IcmTrainer's override may go"

    ours = fresh()
    ours._load_from_checkpoint(str(ckpt))
    got = ours.model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert any(not torch.equal(got[k], initial[k]) for k in got)


def test_lora_resume_continues_the_same_run(setup, tmp_path):
    """LoRA (adapters + projector as PEFT modules_to_save): 2 steps + resume + 2 steps == 4 steps."""
    import dataclasses

    from icmlab.train.stage import run

    tmp_path.joinpath("data").symlink_to(setup["dir"] / "data")
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}

    def cfg_for(name: str, steps: int):
        cfg = T.make_config(
            tmp_path, setup["model"], run_name=name, max_steps=steps, save_steps=2, lora=lora, projector_lr=5e-3
        )
        T.write_training_json(cfg, setup["records"])
        return cfg

    straight = cfg_for("straight", 4)
    run(straight)
    split = cfg_for("split", 2)
    run(split)
    assert (paths.checkpoints_dir(split) / "checkpoint-2" / "adapter_model.safetensors").is_file()
    result = run(dataclasses.replace(split, train=dataclasses.replace(split.train, max_steps=4)))
    assert result.resumed_from == paths.checkpoints_dir(split) / "checkpoint-2"
    got = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(split))]
    want = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(straight))]
    assert got == pytest.approx(want, rel=1e-6)
    a = load_file(paths.final_model_dir(split) / "model.safetensors")  # merged LoRA weights
    b = load_file(paths.final_model_dir(straight) / "model.safetensors")
    for key, value in b.items():
        assert torch.allclose(a[key], value, rtol=1e-5, atol=1e-7), key
    # the adapter alone is kept beside the merged model (the export stage ships it)
    adapter = load_file(paths.adapter_dir(straight) / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and (paths.adapter_dir(straight) / "adapter_config.json").is_file()


def test_sigterm_to_icmlab_run_reaches_the_kernel_then_rerun_resumes(setup, tmp_path):
    """``icmlab run`` (papermill) forwards SIGTERM to the notebook kernel, which runs in a session of
    its own: the in-process training saves a checkpoint at the end of its step, ``icmlab run`` exits
    143 without marking the stage done, and a rerun resumes to the uninterrupted run's losses."""
    from icmlab.train.stage import run

    steps = dict(TRAIN, max_steps=40, save_steps=100)
    ref = T.make_config(setup["dir"], setup["model"], run_name="run-reference", **steps)
    T.write_training_json(ref, setup["records"])
    run(ref)
    cfg = T.make_config(setup["dir"], setup["model"], run_name="run-sigterm", **steps)
    T.write_training_json(cfg, setup["records"])
    config = save_resolved(cfg, setup["dir"] / "run-sigterm.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "icmlab", "run", str(config), "--only", "train"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    _wait(proc, lambda: _steps_logged(cfg) >= 3)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 143, out[-3000:]
    assert "interrupted" in out and not (paths.markers_dir(cfg) / "train.json").exists()
    stopped = read_jsonl(paths.metrics_jsonl(cfg))[-1]["step"]
    assert stopped < 40 and (paths.checkpoints_dir(cfg) / f"checkpoint-{stopped}" / "trainer_state.json").exists()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (paths.markers_dir(cfg) / "train.json").exists()
    got = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(cfg))]
    want = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(ref))]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
