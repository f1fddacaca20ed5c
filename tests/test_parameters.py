"""Every parameters file loads, documents itself, and reproduces the upstream scripts' hyperparameters.

The UPSTREAM table is transcribed from the upstream scripts (see
../shared/reference/upstream-recipes.md §1.4, §1.5, §2.4, §3.8): Q-Instruct
``scripts/llava_v1.5/*.sh`` and ``scripts/mplug_owl_2/*.sh``, ICM-Assistant ``training_scripts/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from icmlab.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "parameters").glob("*.yaml"))
# The CPU demos (demo.yaml, demo-<variant>.yaml) are not upstream recipes.
RECIPES = [f for f in FILES if not f.stem.startswith("demo")]

# Shared by every LLaVA-v1.5 / Q-Instruct / ICM script: zero3, 1 epoch, wd 0, warm-up 0.03, cosine,
# bf16 + tf32, max length 2048, gradient checkpointing, 4 workers, pad, 8 GPUs.
COMMON = dict(
    deepspeed="zero3",
    epochs=1.0,
    weight_decay=0.0,
    warmup_ratio=0.03,
    lr_scheduler="cosine",
    bf16=True,
    tf32=True,
    model_max_length=2048,
    gradient_checkpointing=True,
    dataloader_num_workers=4,
    image_aspect_ratio="pad",
    num_gpus=8,
    global_batch_size=128,
    save_total_limit=1,
    logging_steps=1,
)

UPSTREAM = {
    # file stem: (base, base_format, strategy, dataset, per_device_bs, grad_accum, lr, projector_lr,
    #             save_steps, group_by_modality, freeze_vision, lora, extra model fields)
    "llava15-7b__q-instruct__mix": (
        "llava-hf/llava-1.5-7b-hf",
        "hf",
        "mix",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        True,
        True,
        None,
        dict(
            llm="lmsys/vicuna-7b-v1.5",
            vision_tower="openai/clip-vit-large-patch14-336",
            mm_projector="liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
        ),
    ),
    "llava15-7b__q-instruct__after": (
        "liuhaotian/llava-v1.5-7b",
        "original",
        "after",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        False,
        True,
        None,
        {},
    ),
    "llava15-13b__q-instruct__mix": (
        "llava-hf/llava-1.5-13b-hf",
        "hf",
        "mix",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        True,
        True,
        None,
        dict(llm="lmsys/vicuna-13b-v1.5", mm_projector="liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5"),
    ),
    "llava15-13b__q-instruct__after": (
        "liuhaotian/llava-v1.5-13b",
        "original",
        "after",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        False,
        True,
        None,
        {},
    ),
    "llava15-7b__icm-instruct__mix": (
        "llava-hf/llava-1.5-7b-hf",
        "hf",
        "mix",
        "icm_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        True,
        True,
        None,
        dict(llm="lmsys/vicuna-7b-v1.5"),
    ),
    "llava15-7b__icm-instruct__after": (
        "liuhaotian/llava-v1.5-7b",
        "original",
        "after",
        "icm_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        True,
        True,
        None,
        {},
    ),
    "llava15-13b__icm-instruct__after": (
        "liuhaotian/llava-v1.5-13b",
        "original",
        "after",
        "icm_instruct",
        16,
        1,
        2e-5,
        None,
        50000,
        True,
        True,
        None,
        {},
    ),
    "llava15-13b__icm-instruct__after-lora": (
        "liuhaotian/llava-v1.5-13b",
        "original",
        "after",
        "icm_instruct",
        16,
        1,
        2e-4,
        2e-5,
        50000,
        True,
        True,
        (128, 256),
        {},
    ),
    "mplug-owl2-7b__q-instruct__mix": (
        "MAGAer13/mplug-owl2-llama2-7b",
        "original",
        "mix",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        800,
        True,
        False,
        None,
        {},
    ),
    "mplug-owl2-7b__q-instruct__after": (
        "MAGAer13/mplug-owl2-llama2-7b",
        "original",
        "after",
        "q_instruct",
        16,
        1,
        2e-5,
        None,
        800,
        True,
        False,
        None,
        {},
    ),
    "mplug-owl2-7b__icm-instruct__after": (
        "MAGAer13/mplug-owl2-llama2-7b",
        "original",
        "after",
        "icm_instruct",
        2,
        8,
        2e-5,
        None,
        10,
        True,
        True,
        None,
        {},
    ),
    "mplug-owl2-7b__icm-instruct__after-lora": (
        "MAGAer13/mplug-owl2-llama2-7b",
        "original",
        "after",
        "icm_instruct",
        2,
        8,
        1e-4,
        2e-5,
        10,
        True,
        True,
        (128, 256),
        {},
    ),
}


def test_every_recipe_is_in_the_upstream_table():
    assert {f.stem for f in RECIPES} == set(UPSTREAM), "add new recipe files to UPSTREAM (and vice versa)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_loads_and_documents_itself(path):
    cfg = load_run_config(path)
    text = path.read_text()
    assert text.startswith(f"# {path.stem}\n"), "each file begins with a comment naming it"
    header = text.split("\nrun_name:")[0]
    assert "icmlab run parameters/" in header and "papermill" in header
    assert "Hardware" in header or "hardware" in header.lower()
    assert cfg.run_name == path.stem
    if not path.stem.startswith("demo"):
        model, dataset, strategy = path.stem.split("__")
        assert model.startswith({"llava15": "llava15-", "mplug_owl2": "mplug-owl2-"}[cfg.model.family])
        assert dataset.replace("-", "_") in cfg.data.datasets
        assert strategy.split("-")[0] == cfg.train.strategy
        assert ("lora" in strategy) == cfg.train.lora.enabled


@pytest.mark.parametrize("stem", sorted(UPSTREAM))
def test_hyperparameters_equal_upstream(stem):
    cfg = load_run_config(ROOT / "parameters" / f"{stem}.yaml")
    (base, base_format, strategy, dataset, bs, ga, lr, proj_lr, save_steps, group, freeze_vision, lora, extra) = (
        UPSTREAM[stem]
    )
    t, d, h, m = cfg.train, cfg.data, cfg.hardware, cfg.model
    got = dict(
        # mPLUG-Owl2's recipes use its own ZeRO-3 JSON (upstream mPLUG-Owl2 scripts/zero3.json)
        deepspeed="zero3"
        if h.deepspeed == {"llava15": "zero3", "mplug_owl2": "zero3_mplug_owl2"}[m.family]
        else h.deepspeed,
        epochs=t.epochs,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        lr_scheduler=t.lr_scheduler,
        bf16=t.bf16,
        tf32=t.tf32,
        model_max_length=d.model_max_length,
        gradient_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=t.dataloader_num_workers,
        image_aspect_ratio=d.image_aspect_ratio,
        num_gpus=h.num_gpus,
        global_batch_size=t.global_batch_size,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
    )
    assert got == COMMON
    assert (m.base, m.base_format, t.strategy, d.datasets) == (base, base_format, strategy, [dataset])
    assert (t.per_device_batch_size, cfg.gradient_accumulation_steps) == (bs, ga)
    assert t.per_device_batch_size * cfg.gradient_accumulation_steps * h.num_gpus == 128
    assert t.lr == pytest.approx(lr) and t.projector_lr == (pytest.approx(proj_lr) if proj_lr else None)
    assert t.save_steps == save_steps and t.group_by_modality_length == group
    assert t.freeze_vision == freeze_vision and t.tune_projector is True
    assert t.lora.enabled == bool(lora)
    if lora:
        assert (t.lora.r, t.lora.alpha) == lora
    for key, value in extra.items():
        assert getattr(m, key) == value
    if m.family == "llava15":
        assert m.vision_tower == "openai/clip-vit-large-patch14-336"
    # Upstream: wandb (LLaVA) / tensorboard (mPLUG-Owl2). TensorBoard everywhere here (installed with
    # icmlab[train], no account); the LLaVA files keep upstream's wandb as a commented line.
    assert t.report_to == ["tensorboard"]
    if m.family == "llava15":
        assert "#   report_to: [wandb]" in (ROOT / "parameters" / f"{stem}.yaml").read_text()
    # upstream semantics: clipping from the DeepSpeed JSON, per-micro-batch loss mean
    assert t.max_grad_norm is None and t.loss_normalization == "micro_batch_mean"
