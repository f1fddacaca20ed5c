"""Train stage on tiny LLaVA models (CPU, seconds): both strategies, lr groups, batch arithmetic, sampler, launch.

The smoke runs go through ``icmlab.train.stage.run`` exactly as the notebook and CLI do, then check the
weights the stage saved against the weights it started from: trained groups changed, the frozen
vision tower is bit-identical, and the saved model reloads with plain transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import tiny_train_setup as T
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

from icmlab import paths
from icmlab.config import config_from_dict
from icmlab.io import read_jsonl
from icmlab.train.launch import build_launch_command, launch_mode
from icmlab.train.stage import batch_message, build_training_args, deepspeed_config_path, resolve_device, run
from icmlab.train.trainer import modality_length_grouped_indices

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The tiny llava-hf checkpoint, the MSFT parts and a data root (built once)."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "dir": d,
        "hf": T.build_llava_hf(d / "base"),
        "parts": T.build_mix_parts(d / "parts"),
        "records": T.build_records(d / "data"),
    }


def _setup(tiny: dict, tmp_path: Path, model: str = "hf", **train) -> object:
    tmp_path.joinpath("data").symlink_to(tiny["dir"] / "data")
    cfg = T.make_config(tmp_path, tiny[model], **train)
    T.write_training_json(cfg, tiny["records"])
    return cfg


def _split(state: dict) -> dict[str, dict]:
    groups = {"vision": {}, "projector": {}, "llm": {}}
    for k, v in state.items():
        key = (
            "vision" if k.startswith("model.vision_tower.") else "projector" if "multi_modal_projector" in k else "llm"
        )
        groups[key][k] = v
    return groups


def _assert_trained(before: dict, after: dict) -> None:
    b, a = _split(before), _split(after)
    for k, v in b["vision"].items():
        assert torch.equal(v, a["vision"][k]), f"frozen {k} changed"
    for group in ("projector", "llm"):
        changed = [k for k, v in b[group].items() if not torch.equal(v, a[group][k])]
        # every trained weight matrix moves (rows of unused vocabulary may stay)
        matrices = [k for k, v in b[group].items() if v.ndim == 2 and "embed_tokens" not in k and "lm_head" not in k]
        assert set(matrices) <= set(changed), f"{group}: unchanged {sorted(set(matrices) - set(changed))[:3]}"


def test_smoke_after_strategy(tiny, tmp_path):
    cfg = _setup(tiny, tmp_path, max_steps=3, save_steps=2)
    result = run(cfg)
    assert result.global_step == 3 and not result.interrupted and result.model_dir == paths.final_model_dir(cfg)
    before = LlavaForConditionalGeneration.from_pretrained(tiny["hf"]).state_dict()
    model = LlavaForConditionalGeneration.from_pretrained(result.model_dir)  # plain transformers reload
    AutoProcessor.from_pretrained(result.model_dir)
    _assert_trained(before, model.state_dict())
    # run directory: resolved config, metrics with the documented fields, checkpoint, final model
    assert (cfg.run_dir / "config.resolved.yaml").is_file()
    rows = read_jsonl(paths.metrics_jsonl(cfg))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "eta_s", "elapsed_s"):
        assert rows[-1][key] is not None, key
    assert rows[0]["lr"] == pytest.approx(1e-3)
    assert (paths.checkpoints_dir(cfg) / "checkpoint-2" / "trainer_state.json").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in result.model_dir.iterdir()}
    assert "3 steps" in result.summary()


def test_finished_run_is_not_retrained_unless_asked(tiny, tmp_path, monkeypatch):
    """A rerun of a finished train returns its result and says how to retrain (it used to add a step);
    ICMLAB_RETRAIN=1 (``icmlab train --force``) retrains with the old outputs moved aside, not deleted."""
    cfg = _setup(tiny, tmp_path, max_steps=1, save_steps=1)
    run(cfg)
    weights = paths.final_model_dir(cfg) / "model.safetensors"
    stamp, first = weights.stat().st_mtime_ns, weights.read_bytes()
    again = run(cfg)
    assert again.already_trained and again.global_step == 1 and "--force" in again.summary()
    assert weights.stat().st_mtime_ns == stamp and len(read_jsonl(paths.metrics_jsonl(cfg))) == 1
    assert sorted(p.name for p in paths.checkpoints_dir(cfg).iterdir()) == ["checkpoint-1"]
    monkeypatch.setenv("ICMLAB_RETRAIN", "1")
    fresh = run(cfg)
    assert not fresh.already_trained and fresh.global_step == 1 and fresh.resumed_from is None
    (aside,) = (cfg.run_dir / "previous").iterdir()
    assert (aside / "model" / "model.safetensors").read_bytes() == first
    assert {"checkpoints", "metrics.jsonl", "trained.json"} <= {p.name for p in aside.iterdir()}
    assert json.loads((cfg.run_dir / "trained.json").read_text())["global_step"] == 1


def test_smoke_mix_strategy(tiny, tmp_path):
    cfg = _setup(tiny, tmp_path, model="parts", max_steps=2)
    result = run(cfg)
    after = LlavaForConditionalGeneration.from_pretrained(result.model_dir).state_dict()
    # frozen CLIP tower == the tower the run was assembled from, bit for bit
    clip = CLIPVisionModel.from_pretrained(tiny["parts"]["vision_tower"]).state_dict()
    for k, v in clip.items():
        if not k.endswith("position_ids"):
            assert torch.equal(after[f"model.vision_tower.{k}"], v), k
    proj = torch.load(tiny["parts"]["mm_projector"], weights_only=True)
    assert not torch.equal(after["model.multi_modal_projector.linear_1.weight"], proj["model.mm_projector.0.weight"])
    vicuna = load_file(Path(tiny["parts"]["llm"]) / "model.safetensors")
    changed = [
        k
        for k, v in vicuna.items()
        if k.endswith("proj.weight") and not torch.equal(after[k.replace("model.", "model.language_model.", 1)], v)
    ]
    assert changed and len(changed) == sum(k.endswith("proj.weight") for k in vicuna), "LLM layers must train"


@pytest.mark.parametrize("freeze_vision,tune_projector", [(False, True), (True, False)])
def test_smoke_mplug_owl2_trainable_groups(tiny, tmp_path, freeze_vision, tune_projector):
    """mPLUG-Owl2: vision tower trained (Q-Instruct recipe) or frozen, abstractor per tune_projector."""
    from icmlab.models.mplug_owl2 import MPLUGOwl2ForCausalLM

    base = T.build_mplug_owl2(tmp_path / "owl")
    tmp_path.joinpath("data").symlink_to(tiny["dir"] / "data")
    cfg = T.make_config(
        tmp_path, base, family="mplug_owl2", max_steps=2, freeze_vision=freeze_vision, tune_projector=tune_projector
    )
    T.write_training_json(cfg, T.to_mplug_dialect(tiny["records"]))
    result = run(cfg)
    before = dict(MPLUGOwl2ForCausalLM.from_pretrained(base).named_parameters())  # parameters, not sin-cos buffers
    after = dict(MPLUGOwl2ForCausalLM.from_pretrained(result.model_dir).named_parameters())
    trains = {
        "model.vision_model.": not freeze_vision,
        "model.visual_abstractor.": tune_projector,
        "model.layers.": True,
    }
    for prefix, trained in trains.items():
        keys = [k for k in before if k.startswith(prefix) and before[k].ndim == 2]
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        assert keys and (changed == keys if trained else not changed), (prefix, trained, len(changed), len(keys))


def test_projector_lr_really_applies(tiny, tmp_path):
    """One AdamW step moves each weight by about lr (|m̂/√v̂| = 1 on the first step): 5e-3 vs 1e-3."""
    cfg = _setup(
        tiny, tmp_path, max_steps=1, projector_lr=5e-3, lr=1e-3, max_grad_norm=0.0, group_by_modality_length=False
    )
    result = run(cfg)
    before = _split(LlavaForConditionalGeneration.from_pretrained(tiny["hf"]).state_dict())
    after = _split(LlavaForConditionalGeneration.from_pretrained(result.model_dir).state_dict())

    def step_size(group: str, name: str) -> float:
        delta = (after[group][name] - before[group][name]).abs()
        return float(delta[delta > 0].median())

    assert step_size("projector", "model.multi_modal_projector.linear_1.weight") == pytest.approx(5e-3, rel=0.05)
    assert step_size("llm", "model.language_model.layers.0.mlp.up_proj.weight") == pytest.approx(1e-3, rel=0.05)


def test_optimizer_groups_with_lora(tiny, tmp_path):
    """LoRA: projector (PEFT modules_to_save copy) at projector_lr, adapters at lr, base weights frozen."""
    from icmlab.models import get_family
    from icmlab.train.stage import projector_parameters
    from icmlab.train.trainer import IcmTrainer

    cfg = _setup(tiny, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, projector_lr=2e-5, lr=2e-4)
    fam = get_family("llava15")
    bundle = fam.load_for_training(cfg)
    proj = projector_parameters(bundle.model, fam.MODULE_GROUPS["projector"])
    trainer = IcmTrainer(
        model=bundle.model, args=build_training_args(resolve_device(cfg)), projector_parameters=proj, projector_lr=2e-5
    )
    opt = trainer.create_optimizer()
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and set(lrs) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        want = 2e-5 if "multi_modal_projector" in name else 2e-4
        assert lrs[id(p)] == want, name
        assert "lora_" in name or "multi_modal_projector.modules_to_save" in name, name


def test_text_only_batch_runs_the_vision_tower(tiny, tmp_path):
    """A micro-batch without images still runs tower + projector (ZeRO-3 safety) and adds exactly 0 to the loss."""
    from icmlab.models import get_family
    from icmlab.train.dataset import SupervisedDataset, TrainingCollator
    from icmlab.train.trainer import IcmTrainer

    cfg = _setup(tiny, tmp_path)
    fam = get_family("llava15")
    bundle = fam.load_for_training(cfg)
    ds = SupervisedDataset.from_bundle(tiny["records"], bundle, cfg)
    text = [i for i, r in enumerate(tiny["records"]) if "image" not in r][:2]
    assert all(ds[i]["pixel_values"] is None for i in text) and ds.modality_lengths[text[0]] < 0
    batch = TrainingCollator(bundle.tokenizer.pad_token_id)([ds[i] for i in text])
    assert "pixel_values" not in batch
    calls = []
    bundle.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    trainer = IcmTrainer(
        model=bundle.model,
        args=build_training_args(resolve_device(cfg)),
        dummy_pixel_values=ds.dummy_pixel_values(),
        vision_module="model.vision_tower",
    )
    bundle.model.train()
    loss = trainer.compute_loss(bundle.model, dict(batch))
    plain = bundle.model(**batch).loss
    assert calls and torch.equal(loss.detach(), plain.detach())
    loss.backward()
    grad = bundle.model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


#: Modules whose first call marks the order of one forward: vision tower, projector, embeddings, first LLM layer.
ORDER_MODULES = {
    "llava15": {
        "model.vision_tower": "vision",
        "model.multi_modal_projector": "projector",
        "model.language_model.embed_tokens": "embed",
        "model.language_model.layers.0": "llm",
    },
    "mplug_owl2": {
        "model.vision_model": "vision",
        "model.visual_abstractor": "projector",
        "model.embed_tokens": "embed",
        "model.layers.0": "llm",
    },
}


@pytest.mark.parametrize(
    "family,packing", [("llava15", False), ("llava15", True), ("mplug_owl2", False), ("mplug_owl2", True)]
)
def test_text_only_batch_calls_the_modules_in_the_image_batch_order(tiny, tmp_path, family, packing):
    """The ZeRO-3 collective order (issue 13): a text-only micro-batch goes through vision tower and
    projector exactly where an image micro-batch does (before the LLM), with an unchanged loss and
    zero gradients on the vision path; the order is recorded by forward pre-hooks on the real modules."""
    from icmlab.models import get_family
    from icmlab.train.dataset import SupervisedDataset, TrainingCollator
    from icmlab.train.trainer import IcmTrainer

    records = tiny["records"]
    if family == "mplug_owl2":
        base = T.build_mplug_owl2(tmp_path / "owl")
        tmp_path.joinpath("data").symlink_to(tiny["dir"] / "data")
        cfg = T.make_config(tmp_path, base, family=family, freeze_vision=False)
        records = T.to_mplug_dialect(records)
    else:
        cfg = _setup(tiny, tmp_path)
    fam = get_family(family)
    bundle = fam.load_for_training(cfg)
    ds = SupervisedDataset.from_bundle(records, bundle, cfg)
    collate = TrainingCollator(bundle.tokenizer.pad_token_id, packing=packing, max_length=256)
    text = collate([ds[i] for i, r in enumerate(records) if "image" not in r][:2])
    image = collate([ds[i] for i, r in enumerate(records) if "image" in r][:2])
    calls: list[str] = []
    for name, tag in ORDER_MODULES[family].items():
        bundle.model.get_submodule(name).register_forward_pre_hook(lambda *a, tag=tag: calls.append(tag))
    trainer = IcmTrainer(
        model=bundle.model,
        args=build_training_args(resolve_device(cfg)),
        dummy_pixel_values=ds.dummy_pixel_values(),
        vision_module=fam.MODULE_GROUPS["vision_encoder"][0],
    )
    bundle.model.train()

    def order(batch: dict) -> tuple[list[str], torch.Tensor]:
        calls.clear()
        loss = trainer.compute_loss(bundle.model, dict(batch))
        return list(calls), loss

    image_order, _ = order(image)
    text_order, loss = order(text)
    assert image_order.index("vision") < image_order.index("llm")
    assert text_order == image_order, (text_order, image_order)
    plain = bundle.model(**text).loss  # no dummy image at all
    assert torch.equal(loss.detach(), plain.detach())
    bundle.model.zero_grad()
    loss.backward()
    proj = next(p for p in bundle.model.get_submodule(fam.MODULE_GROUPS["projector"][0]).parameters())
    assert proj.grad is not None and torch.count_nonzero(proj.grad) == 0


# ------------------------------------------------------------------ batch arithmetic and arguments
def _hw_cfg(num_gpus: int, num_nodes: int = 1, device: str = "cuda", per_device: int = 16, global_batch: int = 128):
    return config_from_dict(
        {
            "train": {"per_device_batch_size": per_device, "global_batch_size": global_batch, "bf16": device == "cuda"},
            "hardware": {
                "device": device,
                "num_gpus": num_gpus,
                "num_nodes": num_nodes,
                "hostfile": "hosts" if num_nodes > 1 else None,
                "deepspeed": "zero3",
            },
        }
    )


@pytest.mark.parametrize("gpus,nodes,accum", [(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (4, 2, 1)])
def test_gradient_accumulation_keeps_global_batch(gpus, nodes, accum):
    cfg = _hw_cfg(gpus, nodes)
    assert cfg.gradient_accumulation_steps == accum
    assert cfg.train.per_device_batch_size * cfg.world_size * cfg.gradient_accumulation_steps == 128
    unit = "GPU" if gpus * nodes == 1 else "GPUs"
    assert batch_message(cfg) == f"global batch 128 = 16 per device × {gpus * nodes} {unit} × {accum} accumulation"


def test_training_arguments_from_config(tiny, tmp_path):
    cfg = resolve_device(
        _setup(
            tiny,
            tmp_path,
            per_device_batch_size=2,
            global_batch_size=8,
            lr=3e-5,
            lr_scheduler="cosine",
            warmup_ratio=0.03,
            weight_decay=0.1,
            adam_beta2=0.95,
        )
    )
    args = build_training_args(cfg)
    assert args.gradient_accumulation_steps == 4 and args.per_device_train_batch_size == 2
    assert (args.learning_rate, args.weight_decay, args.adam_beta2) == (3e-5, 0.1, 0.95)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == pytest.approx(0.03)
    assert args.remove_unused_columns is False and args.use_cpu and args.deepspeed is None
    assert Path(args.output_dir) == paths.checkpoints_dir(cfg) and args.seed == 7


def test_bf16_on_cpu_is_rejected_with_the_key(tiny, tmp_path):
    cfg = _setup(tiny, tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=True))
    with pytest.raises(ValueError, match="train.bf16"):
        run(cfg)


def test_deepspeed_configs_leave_trainer_values_auto():
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        cfg = config_from_dict({"hardware": {"deepspeed": name}})
        data = json.loads(Path(deepspeed_config_path(cfg)).read_text())
        assert data["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
            assert data[key] == "auto", (name, key)
        assert data["bf16"]["enabled"] == "auto" and "scheduler" not in data and "optimizer" not in data
    offload = json.loads(
        Path(deepspeed_config_path(config_from_dict({"hardware": {"deepspeed": "zero3_offload"}}))).read_text()
    )
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert deepspeed_config_path(config_from_dict({"hardware": {"deepspeed": "none"}})) is None


# ------------------------------------------------------------------ sampler
def _megabatches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_modality_grouped_order():
    lengths = [5, -3, 7, -2, 9, 4, -8, 6, 3, -1, 2, 8, -4, 5]  # 9 with image, 5 text-only
    order = modality_length_grouped_indices(
        lengths, batch_size=2, world_size=2, generator=torch.Generator().manual_seed(0)
    )
    assert sorted(order) == list(range(len(lengths)))
    n_full = 9 // 4 + 5 // 4
    for mb in _megabatches(order[: 4 * n_full], 4):
        assert len({lengths[i] > 0 for i in mb}) == 1, "a full megabatch mixes modalities"
        assert abs(lengths[mb[0]]) == max(abs(lengths[i]) for i in mb)  # longest first
    tail = order[4 * n_full :]  # the two modalities' leftovers, last (as upstream)
    assert sorted(lengths[i] > 0 for i in tail) == [False, True]
    assert modality_length_grouped_indices(lengths, 2, 2, torch.Generator().manual_seed(0)) == order  # replayable
    assert modality_length_grouped_indices(lengths, 2, 2, torch.Generator().manual_seed(1)) != order


def test_single_modality_falls_back_to_length_grouping_and_zero_is_rejected():
    lengths = [3, 9, 1, 7, 5, 2, 8, 4]
    order = modality_length_grouped_indices(lengths, 2, 2, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(8))
    for mb in _megabatches(order, 4):
        assert lengths[mb[0]] == max(lengths[i] for i in mb)
        # the two rank batches of a megabatch hold similar total lengths (longest paired with shortest)
        a, b = sum(lengths[i] for i in mb[:2]), sum(lengths[i] for i in mb[2:])
        assert abs(a - b) <= max(lengths[i] for i in mb) - min(lengths[i] for i in mb)
    with pytest.raises(ValueError, match="sample 1"):
        modality_length_grouped_indices([3, 0, 2], 1, 1, torch.Generator())


# ------------------------------------------------------------------ launch
def test_launch_decisions_and_commands(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (
        launch_mode(config_from_dict({"hardware": {"device": "cpu", "deepspeed": "none"}, "train": {"bf16": False}}))
        == "inprocess"
    )
    assert launch_mode(_hw_cfg(1)) == "inprocess"
    cfg = _hw_cfg(8)
    cmd = build_launch_command(cfg, tmp_path / "config.resolved.yaml")
    assert launch_mode(cfg) == "deepspeed" and cmd[-4:] == [
        "--module",
        "icmlab",
        "train",
        str(tmp_path / "config.resolved.yaml"),
    ]
    assert cmd[cmd.index("--num_gpus") + 1] == "8" and "--no_local_rank" in cmd and "--hostfile" not in cmd
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=4\nnode2 slots=4\n")
    multi = _hw_cfg(4, 2)
    multi.hardware.hostfile = str(hosts)
    cmd = build_launch_command(multi, tmp_path / "c.yaml")
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and cmd[cmd.index("--num_nodes") + 1] == "2"
    tr = _hw_cfg(2)
    tr.hardware.launcher = "torchrun"
    cmd = build_launch_command(tr, tmp_path / "c.yaml")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    tr.hardware.num_nodes = 2
    with pytest.raises(ValueError, match="torchrun"):
        launch_mode(tr)
    one = _hw_cfg(2)
    one.hardware.launcher = "inprocess"
    with pytest.raises(ValueError, match="hardware.launcher"):
        launch_mode(one)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launch_mode(cfg) == "inprocess"  # a launched worker trains, it never launches again


# ------------------------------------------------------------------ DeepSpeed ZeRO-3 (one CPU process)
@pytest.mark.slow
def test_zero3_inprocess_matches_plain_training_and_resumes(tiny, tmp_path):
    """ZeRO-3 (partitioned weights, DeepSpeed checkpoints, gathered final save) trains exactly like plain
    PyTorch, writes the same llava-hf layout, and a rerun resumes from its DeepSpeed checkpoint.

    The DeepSpeed runs go through ``python -m icmlab train`` (the launched workers' command) so that
    no DeepSpeed state stays in this test process.

    Tolerance: both runs are fp32 AdamW on the same samples, but ZeRO-3 sums and averages gradients
    in its own flat, partitioned buffers, so a gradient element may differ in its last bits (another
    reduction order). Adam divides by sqrt(v) + eps: where a gradient element is near zero, a
    last-bit change of g moves the update by up to lr * |dg| / eps, and a sign flip by 2 * lr. So
    no element may move more than ``2 * lr * steps`` apart (Adam's bounded step), and the bulk must
    agree: the difference is at most 1e-4 of how far training moved the weights (a wrong lr, a
    missed group or a lost step moves them by O(1) of that).
    """
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    from icmlab.config import save_resolved

    # Both clip at 1.0 (train.max_grad_norm: null would leave zero3.json's "no clipping" to DeepSpeed
    # but the HF Trainer's 1.0 to the plain run).
    plain = _setup(tiny, tmp_path, max_steps=3, max_grad_norm=1.0)
    run(plain)
    ref = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(plain))]
    ref_weights = load_file(paths.final_model_dir(plain) / "model.safetensors")

    ds_cfg = T.make_config(tmp_path, tiny["hf"], run_name="zero3", max_steps=3, save_steps=2, max_grad_norm=1.0)
    ds_cfg = dataclasses.replace(ds_cfg, hardware=dataclasses.replace(ds_cfg.hardware, deepspeed="zero3"))
    T.write_training_json(ds_cfg, tiny["records"])
    config = save_resolved(ds_cfg, tmp_path / "zero3.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for steps in (2, 3):  # stop after the step-2 checkpoint, then resume to 3
        proc = subprocess.run(
            [sys.executable, "-m", "icmlab", "train", str(config), "--set", f"train.max_steps={steps}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    assert (paths.checkpoints_dir(ds_cfg) / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own format
    losses = [r["loss"] for r in read_jsonl(paths.metrics_jsonl(ds_cfg))]
    assert losses == pytest.approx(ref, rel=1e-5)
    weights = load_file(paths.final_model_dir(ds_cfg) / "model.safetensors")  # gathered, full-size tensors
    assert set(weights) == set(ref_weights)
    initial = load_file(Path(tiny["hf"]) / "model.safetensors")
    bound = 2 * ds_cfg.train.lr * 3
    diff_sq = moved_sq = 0.0
    for key, value in ref_weights.items():
        diff = (weights[key] - value).abs()
        assert diff.max().item() <= bound, (key, diff.max().item())
        diff_sq += float(diff.double().pow(2).sum())
        if key in initial and initial[key].shape == value.shape:
            moved_sq += float((value.double() - initial[key].double()).pow(2).sum())
    assert moved_sq > 0, "no weight moved in plain training"
    assert diff_sq**0.5 <= 1e-4 * moved_sq**0.5, (diff_sq**0.5, moved_sq**0.5)


def test_run_launched_streams_and_maps_exit_status(capfd):
    import sys

    from icmlab.train.launch import STOPPED_BY_SIGTERM, run_launched

    assert run_launched([sys.executable, "-c", "print('step 1'); print('step 2')"]) == 0
    assert "step 1\nstep 2" in capfd.readouterr().out
    assert run_launched([sys.executable, "-c", f"raise SystemExit({STOPPED_BY_SIGTERM})"]) == STOPPED_BY_SIGTERM
    with pytest.raises(RuntimeError, match="exit status 3"):
        run_launched([sys.executable, "-c", "raise SystemExit(3)"])


def test_launcher_starts_with_sigterm_blocked_and_pending_sigterm_is_forwarded(capfd, tmp_path):
    """The launcher cannot act on SIGTERM (so it cannot SIGKILL ranks mid-save); a SIGTERM sent to it
    stays pending, run_launched sees it and signals the job's group, whose ranks unblock and handle it."""
    import sys

    from icmlab.train.launch import STOPPED_BY_SIGTERM, run_launched

    marker = tmp_path / "interrupted.json"
    # a "launcher" that SIGTERMs itself (blocked: pending), then starts a "rank" that unblocks and
    # handles SIGTERM by writing the marker, as a real rank does after its checkpoint
    rank = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).write_text('{}'), sys.exit(0)))\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
        "print('rank up', flush=True)\n"
        "time.sleep(30)\n"
    )
    launcher = (
        "import os, signal, subprocess, sys\n"
        "print('blocked', signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []), flush=True)\n"
        f"p = subprocess.Popen([sys.executable, '-c', {rank!r}, {str(marker)!r}], env=dict(os.environ, LOCAL_RANK='0'))\n"
        "import time; time.sleep(1.0); os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.exit(p.wait())\n"
    )
    rc = run_launched([sys.executable, "-c", launcher], interrupted_marker=marker, poll_s=0.2, grace_s=20)
    out = capfd.readouterr().out
    assert "blocked True" in out and "rank up" in out
    assert rc == STOPPED_BY_SIGTERM and marker.exists()


def test_save_every_minutes_checkpoints_on_wall_time(tiny, tmp_path):
    """``train.save_every_minutes``: a checkpoint whenever that much wall time passed since the last one
    (here 1 ms, so after every step), although ``save_steps`` (1000) would never save."""
    cfg = _setup(tiny, tmp_path, max_steps=3, save_steps=1000, save_total_limit=5, save_every_minutes=1e-5)
    run(cfg)
    saved = sorted(int(p.name.split("-")[1]) for p in paths.checkpoints_dir(cfg).glob("checkpoint-*"))
    assert saved == [1, 2, 3]
    with pytest.raises(ValueError, match="train.save_every_minutes"):
        config_from_dict({"train": {"save_every_minutes": 0}})


def test_packing_is_accepted(tiny, tmp_path):
    """``train.packing`` is a working option (proved in tests/test_packing.py); resolve_device keeps it."""
    cfg = _setup(tiny, tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=True))
    assert resolve_device(cfg).train.packing is True


@pytest.mark.gpu
def test_gpu_bf16_smoke(tiny, tmp_path):
    """On a CUDA machine: bf16 weights, sdpa/flash attention, 2 steps, frozen tower unchanged."""
    cfg = _setup(tiny, tmp_path, max_steps=2, bf16=True, tf32=True, gradient_checkpointing=True)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype="auto"),
        hardware=dataclasses.replace(cfg.hardware, device="cuda", attn_implementation="auto"),
    )
    result = run(cfg)
    before = LlavaForConditionalGeneration.from_pretrained(tiny["hf"], dtype=torch.bfloat16).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(result.model_dir, dtype=torch.bfloat16).state_dict()
    _assert_trained(before, after)


@pytest.mark.slow  # three real 2x2 figures: about 1 s idle, 5 s on a busy 2-core machine
def test_live_plot_draws_at_the_first_log_then_by_time(tmp_path, capsys):
    """The live curves appear at the first logged step (it used to wait for 10 logs, 100 demo steps)
    and are then redrawn when ``every_s`` has passed, whatever the number of steps in between."""
    import time

    from transformers import TrainerState

    from icmlab.io import write_jsonl
    from icmlab.train.live import LiveMetricsPlot

    path, state = tmp_path / "metrics.jsonl", TrainerState()
    live = LiveMetricsPlot(path, every_s=0.4)
    write_jsonl(path, [{"step": 10, "loss": 2.0}])
    live.on_log(None, state, None)
    write_jsonl(path, [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}])
    live.on_log(None, state, None)  # 0.4 s have not passed: no redraw
    time.sleep(0.45)
    write_jsonl(path, [{"step": s, "loss": 1.0} for s in (10, 20, 30)])
    live.on_log(None, state, None)
    live.on_train_end(None, state, None)
    assert live.drawn == [1, 3, 3]
