"""Dry start of every parameters file: what the train and evaluate stages build, on tiny stand-in weights.

Each recipe keeps everything but its checkpoints (replaced by tiny models of the same family from
``tiny_train_setup``): TrainingArguments with its batch arithmetic, bf16, ZeRO config and loggers,
the Trainer with its callbacks, model/processor classes and optimizer groups, then the evaluate
stage's model. Real-size shapes are built on the meta device. A missing logger backend must fail
the dry start (and show in ``icmlab setup``) with the key and the install command.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import tiny_train_setup as T
import torch

from icmlab.config import load_run_config
from icmlab.envinfo import MissingPackageError, check_environment, missing_requirements
from icmlab.train.dry_start import dry_start, meta_model_report, with_stand_in_weights

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "parameters").glob("*.yaml"))
RECIPES = [f for f in FILES if not f.stem.startswith("demo")]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict:
    """Tiny checkpoints of both families, the LLaVA mix parts and a data root (built once)."""
    d = tmp_path_factory.mktemp("standins")
    return {
        "llava15": T.build_llava_hf(d / "llava"),
        "parts": T.build_mix_parts(d / "parts"),
        "mplug_owl2": T.build_mplug_owl2(d / "owl"),
        "data": d / "data",
        "records": T.build_records(d / "data"),
    }


def _stand_in_cfg(path: Path, stand_ins: dict, tmp_path: Path, **train):
    cfg = load_run_config(path)
    if train:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    weights = {"base": stand_ins[cfg.model.family]}
    if cfg.model.family == "llava15" and cfg.train.strategy == "mix":
        weights.update(stand_ins["parts"])
    cfg = with_stand_in_weights(cfg, weights, runs_root=tmp_path / "runs", data_root=stand_ins["data"])
    records = stand_ins["records"] if cfg.model.family == "llava15" else T.to_mplug_dialect(stand_ins["records"])
    return cfg, records


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dry_start_builds_every_recipe(path, stand_ins, tmp_path):
    cfg, records = _stand_in_cfg(path, stand_ins, tmp_path)
    report = dry_start(cfg, records)
    print(report.summary())
    a = report.args
    # the recipe's arithmetic and precision as the GPU run gets them
    assert a.per_device_train_batch_size == cfg.train.per_device_batch_size
    assert a.gradient_accumulation_steps == cfg.gradient_accumulation_steps
    assert a.bf16 == cfg.train.bf16 and a.gradient_checkpointing == cfg.train.gradient_checkpointing
    assert (report.deepspeed is None) == (cfg.hardware.deepspeed == "none")
    if report.deepspeed:
        stage = report.deepspeed["zero_optimization"]["stage"]
        assert stage == {"zero2": 2}.get(cfg.hardware.deepspeed, 3)
        assert report.deepspeed["gradient_clipping"] == 0.0 and report.max_grad_norm is None  # upstream: no clip
    # the loggers the recipe asks for really are attached
    loggers = {"tensorboard": "TensorBoardCallback", "wandb": "WandbCallback"}
    for rep in cfg.train.report_to:
        if rep in loggers:
            assert loggers[rep] in report.callbacks, report.callbacks
    assert {"MetricsJsonlCallback", "ProgressBarCallback"} <= set(report.callbacks)
    # model, processor, optimizer groups
    assert report.model_class == (
        "PeftModel"
        if cfg.train.lora.enabled
        else {"llava15": "LlavaForConditionalGeneration", "mplug_owl2": "MPLUGOwl2ForCausalLM"}[cfg.model.family]
    )
    assert report.inference_class in ("LlavaForConditionalGeneration", "MPLUGOwl2ForCausalLM")
    assert report.trainable > 0 and report.param_groups
    lrs = {g["lr"] for g in report.param_groups}
    expected = {cfg.train.lr} | ({cfg.train.projector_lr} if cfg.train.projector_lr else set())
    assert sorted(lrs) == pytest.approx(sorted(expected))


def test_dry_start_fails_when_a_logger_backend_is_missing(stand_ins, tmp_path, monkeypatch):
    path = ROOT / "parameters" / "llava15-7b__q-instruct__after.yaml"
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # uninstalled, as far as imports can tell
    cfg, records = _stand_in_cfg(path, stand_ins, tmp_path)
    with pytest.raises(MissingPackageError) as err:
        dry_start(cfg, records)
    msg = str(err.value)
    assert "train.report_to: tensorboard" in msg and "pip install 'icmlab[train]'" in msg
    assert "llava15-7b__q-instruct__after.yaml" in msg
    # setup shows the same problem, with the command, before anything is downloaded
    rows = {r.item: r for r in check_environment(cfg).rows}
    assert not rows["report_to tensorboard"].ok and "pip install" in rows["report_to tensorboard"].note


def test_wandb_is_opt_in_and_setup_names_the_install_command(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg, records = _stand_in_cfg(
        ROOT / "parameters" / "llava15-7b__q-instruct__mix.yaml", stand_ins, tmp_path, report_to=["wandb"]
    )
    missing = missing_requirements(cfg)
    assert [r.key for r in missing] == ["train.report_to: wandb"]
    assert "pip install wandb" in missing[0].install and "WANDB_MODE=offline" in missing[0].install
    row = {r.item: r for r in check_environment(cfg).rows}["report_to wandb"]
    assert not row.ok and "pip install wandb" in row.note
    with pytest.raises(MissingPackageError, match="train.report_to: wandb needs wandb"):
        dry_start(cfg, records)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_setup_reports_nothing_missing_for_the_recipe_packages(path):
    """Every real recipe's optional packages (tensorboard, deepspeed, peft) come with icmlab[train]."""
    cfg = load_run_config(path)
    assert missing_requirements(cfg) == [], [r.message() for r in missing_requirements(cfg)]


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["llava15-7b__icm-instruct__mix", "mplug-owl2-7b__icm-instruct__after-lora"])
def test_dry_start_runs_optimizer_steps_under_zero3_bf16(stem, stand_ins, tmp_path):
    """Two real optimizer steps in the recipe's precision and ZeRO config (bf16 autocast on this CPU)."""
    cfg, records = _stand_in_cfg(
        ROOT / "parameters" / f"{stem}.yaml",
        stand_ins,
        tmp_path,
        dataloader_num_workers=0,
        per_device_batch_size=4,
        global_batch_size=64,
    )
    report = dry_start(cfg, records, steps=2, inference=False)
    assert report.steps == 2 and report.loss is not None and report.loss == report.loss  # finite, not NaN


# Published sizes: llava-hf/llava-1.5-{7b,13b}-hf (7.06B, 13.35B); mPLUG-Owl2 "8.20B parameters"
# (X-PLUG/mPLUG-Owl#188); CLIP ViT-L/14-336 vision tower 303.5M.
SIZES = {("llava15", "7b"): 7.06e9, ("llava15", "13b"): 13.35e9, ("mplug_owl2", "7b"): 8.20e9}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_real_size_model_on_the_meta_device(path):
    cfg = load_run_config(path)
    rep = meta_model_report(cfg)
    assert rep["params"] == pytest.approx(SIZES[(cfg.model.family, cfg.model.size)], rel=0.01)
    vision_total, vision_trainable = rep["groups"]["vision_encoder"]
    assert (vision_trainable > 0) == (not cfg.train.freeze_vision)
    if cfg.model.family == "llava15":
        assert vision_total == pytest.approx(303.5e6, rel=0.01)
    if cfg.train.lora.enabled:
        assert rep["trainable"] < 0.1 * rep["params"]
    else:
        assert rep["trainable"] == rep["params"] - (0 if not cfg.train.freeze_vision else vision_total)
    assert rep["train_state_gib_per_gpu"] < 80, "does not fit the upstream 8-GPU hardware"


@pytest.mark.slow
def test_gpu_acceptance_tiny(tmp_path):
    """benchmarks/gpu_acceptance.py --tiny: the GPU script's own functions on the CPU (tiny models, fp32)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_acceptance

    out = tmp_path / "benchmarks.md"
    rc = gpu_acceptance.main(["--tiny", "--no-pytest", "--out", str(out)])
    text = out.read_text()
    assert rc == 0, text
    assert "## GPU acceptance" in text and "| FAIL |" not in text
    for family in ("llava15", "mplug_owl2"):
        assert f"| attention | {family} sdpa vs eager | ok |" in text
        assert f"| packing | {family} sdpa | ok |" in text
        for kind in ("padded", "packed"):
            assert re.search(
                rf"\| train \| {family} tiny, sdpa, ZeRO-3, grad-ckpt, micro-batch 2, {kind} \| ok \| "
                r"[\d,]+ tokens/s",
                text,
            ), text
        assert re.search(rf"{family} tiny.*largest micro-batch of 256-token samples \| ok \| [1-9]\d* fits", text)
