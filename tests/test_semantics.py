"""Upstream semantics by default, switches to change them (docs/semantics.md).

- gradient clipping: none under upstream's zero2/zero3 JSONs (a step with a large gradient reaches the
  optimizer unclipped), clipped with ``train.max_grad_norm``;
- loss normalisation: per-micro-batch mean (upstream) vs. token mean over the global batch
  (``train.loss_normalization: token_mean``), checked against a hand computation on micro-batches
  with uneven answer lengths, through the real train stage;
- mPLUG-Owl2's own ZeRO-3 JSON; fp32 master weights for bf16 without DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import tiny_train_setup as T
import torch

from icmlab import paths
from icmlab.config import ConfigError, config_from_dict, load_run_config
from icmlab.io import read_jsonl
from icmlab.models import get_family
from icmlab.models.llava15.adapter import training_dtype
from icmlab.train.args import build_training_args, deepspeed_config, effective_max_grad_norm
from icmlab.train.dataset import SupervisedDataset, TrainingCollator
from icmlab.train.loss import step_loss, token_losses
from icmlab.train.stage import run

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
ANSWERS = [
    "Yes.",
    "No, the picture is dark and the colours are dull and grey.",
    "No, dark.",
    "Describe the image quality. It is bright, yes, bright and not dark at all.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("semantics")
    records = [r for r in T.build_records(d / "data") if "image" in r][:4]
    for r, answer in zip(records, ANSWERS):  # uneven answer lengths: 2 to ~20 trained tokens
        r["conversations"][1]["value"] = answer
    return {"dir": d, "hf": T.build_llava_hf(d / "base"), "records": records}


def _cfg(tiny: dict, tmp_path: Path, deepspeed: str = "none", **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tmp_path.joinpath("data").symlink_to(tiny["dir"] / "data")
    cfg = T.make_config(
        tmp_path,
        tiny["hf"],
        **{
            "max_steps": 1,
            "per_device_batch_size": 1,
            "global_batch_size": 4,
            "group_by_modality_length": False,
            **train,
        },
    )
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, deepspeed=deepspeed))
    T.write_training_json(cfg, tiny["records"])
    return cfg


# ------------------------------------------------------------------ config keys
def test_defaults_are_upstream_and_bad_values_name_the_key():
    cfg = config_from_dict({})
    assert cfg.train.max_grad_norm is None and cfg.train.loss_normalization == "micro_batch_mean"
    with pytest.raises(ConfigError, match=r"train\.max_grad_norm: must be >= 0"):
        config_from_dict({"train": {"max_grad_norm": -1}})
    with pytest.raises(ConfigError, match=r"train\.loss_normalization.*micro_batch_mean, token_mean"):
        config_from_dict({"train": {"loss_normalization": "sum"}})


# ------------------------------------------------------------------ clipping
def test_clipping_follows_the_deepspeed_json_unless_set():
    def norm(ds: str, value=None) -> float | None:
        return effective_max_grad_norm(
            config_from_dict({"hardware": {"deepspeed": ds}, "train": {"max_grad_norm": value}})
        )

    # upstream's JSONs: zero2/zero3 (LLaVA) and mPLUG-Owl2's zero3 have no gradient_clipping; offload says auto
    for ds in ("zero2", "zero3", "zero3_mplug_owl2"):
        assert norm(ds) is None and "gradient_clipping" not in json.loads(
            (ROOT / "parameters" / "deepspeed" / f"{ds}.json").read_text()
        )
        # ... which must reach DeepSpeed as an explicit 0: DeepSpeed 0.19 reads a missing key as 1.0
        assert deepspeed_config(config_from_dict({"hardware": {"deepspeed": ds}}))["gradient_clipping"] == 0.0
        assert (
            norm(ds, 0.5) == 0.5
            and deepspeed_config(config_from_dict({"hardware": {"deepspeed": ds}, "train": {"max_grad_norm": 0.5}}))[
                "gradient_clipping"
            ]
            == 0.5
        )
    assert norm("zero3_offload") == 1.0 and norm("none") == 1.0  # "auto" / the HF Trainer's default
    assert norm("none", 0.0) is None and norm("zero3", 0.0) is None


class _OptimizerSees:
    """Records the gradient norm every optimizer step receives (after any clipping), whatever wraps it."""

    def __enter__(self):
        self.norms: list[float] = []

        def hook(optimizer, args, kwargs):
            sq = sum(
                float(p.grad.float().pow(2).sum())
                for g in optimizer.param_groups
                for p in g["params"]
                if p.grad is not None
            )
            self.norms.append(math.sqrt(sq))

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def norm(self) -> float:
        return math.sqrt(sum(n * n for n in self.norms))  # ZeRO may step once per parameter sub-group


def _step_grad_norms(cfg) -> tuple[float, float]:
    with _OptimizerSees() as seen:
        run(cfg)
    logged = read_jsonl(paths.metrics_jsonl(cfg))[0]["grad_norm"]  # the pre-clip norm
    return logged, seen.norm


def test_without_deepspeed_the_trainer_clips_at_1_or_the_switch(tiny, tmp_path):
    logged, seen = _step_grad_norms(_cfg(tiny, tmp_path / "a"))
    assert logged > 5 and seen == pytest.approx(1.0, rel=1e-3)  # HF's default, as upstream's train.py
    logged, seen = _step_grad_norms(_cfg(tiny, tmp_path / "b", max_grad_norm=0.0))
    assert seen == pytest.approx(logged, rel=1e-4)


@pytest.mark.slow
def test_zero3_does_not_clip_a_large_gradient_by_default_and_clips_with_the_switch(tiny, tmp_path, monkeypatch):
    # accelerate sets ACCELERATE_USE_DEEPSPEED=true for the process and never unsets it: later non-DeepSpeed
    # Trainers in this process would build a DeepSpeed engine. monkeypatch removes it again afterwards.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    logged, seen = _step_grad_norms(_cfg(tiny, tmp_path / "default", deepspeed="zero3"))
    assert logged > 5, "the test needs a gradient larger than any clipping norm in play"
    assert seen == pytest.approx(logged, rel=1e-3), "upstream's zero3.json does not clip"
    logged2, seen2 = _step_grad_norms(_cfg(tiny, tmp_path / "switch", deepspeed="zero3", max_grad_norm=0.5))
    assert logged2 == pytest.approx(logged, rel=1e-3) and seen2 == pytest.approx(0.5, rel=1e-3)


# ------------------------------------------------------------------ loss normalisation
def test_step_loss_by_hand():
    sums, counts = [6.0, 4.0], [3, 1]
    assert float(step_loss(sums, counts, "micro_batch_mean")) == pytest.approx((6 / 3 + 4 / 1) / 2)  # 3.0
    assert float(step_loss(sums, counts, "token_mean")) == pytest.approx((6 + 4) / (3 + 1))  # 2.5
    with pytest.raises(ValueError, match="train.loss_normalization"):
        step_loss(sums, counts, "sum")
    logits = torch.zeros(1, 3, 4)  # uniform: every token costs log(4)
    total, n = token_losses(logits, torch.tensor([[-100, 2, 1]]))
    assert n == 2 and float(total) == pytest.approx(2 * math.log(4))


def _hand(cfg, records, mode: str) -> tuple[float, float]:
    """The step's loss and gradient norm computed here from the starting model, micro-batch by micro-batch."""
    bundle = get_family("llava15").load_for_training(cfg)
    dataset = SupervisedDataset.from_bundle(records, bundle, cfg)
    collate = TrainingCollator(bundle.tokenizer.pad_token_id)
    sums, counts = [], []
    for i in range(len(dataset)):  # micro-batch = 1 sample: the split does not depend on the sampler order
        batch = collate([dataset[i]])
        labels = batch.pop("labels")
        s, c = token_losses(bundle.model(**batch).logits, labels)
        sums.append(s)
        counts.append(c)
    assert len(set(counts)) == len(counts), f"answer lengths must differ: {counts}"
    loss = step_loss(sums, counts, mode)
    loss.backward()
    grads = [p.grad for p in bundle.model.parameters() if p.requires_grad and p.grad is not None]
    return float(loss), math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


@pytest.mark.parametrize("mode", ["micro_batch_mean", "token_mean"])
def test_trainer_loss_and_gradient_equal_the_hand_computation(tiny, tmp_path, mode):
    cfg = _cfg(tiny, tmp_path, loss_normalization=mode, max_grad_norm=0.0)
    run(cfg)
    row = read_jsonl(paths.metrics_jsonl(cfg))[0]
    loss, grad_norm = _hand(cfg, tiny["records"], mode)
    other, _ = _hand(cfg, tiny["records"], "token_mean" if mode == "micro_batch_mean" else "micro_batch_mean")
    assert abs(loss - other) > 0.05, "the two normalisations must differ on this batch for the test to mean anything"
    assert row["loss"] == pytest.approx(loss, rel=1e-4)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)


# ------------------------------------------------------------------ mPLUG-Owl2's ZeRO-3, fp32 masters
def test_mplug_owl2_recipes_use_its_own_zero3():
    mine = json.loads((ROOT / "parameters" / "deepspeed" / "zero3_mplug_owl2.json").read_text())
    llava = json.loads((ROOT / "parameters" / "deepspeed" / "zero3.json").read_text())
    z = mine["zero_optimization"]
    assert (z["stage3_max_live_parameters"], z["stage3_max_reuse_distance"], z["stage3_prefetch_bucket_size"]) == (
        0,
        0,
        0,
    )
    differ = {k for k in z if z[k] != llava["zero_optimization"].get(k)}
    assert differ == {"stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size"}
    assert {k: v for k, v in mine.items() if k != "zero_optimization"} == {
        k: v for k, v in llava.items() if k != "zero_optimization"
    }
    for path in sorted((ROOT / "parameters").glob("mplug-owl2-*.yaml")):
        cfg = load_run_config(path)
        assert cfg.hardware.deepspeed == "zero3_mplug_owl2", path.name
        assert deepspeed_config(cfg)["zero_optimization"]["stage3_max_live_parameters"] == 0


def test_bf16_without_deepspeed_keeps_fp32_master_weights(tiny, tmp_path):
    def dtype(**over):
        raw = {"train": {"bf16": True}, "hardware": {"device": "cuda", "deepspeed": "none"}}
        for key, value in over.items():
            section, name = key.split("__")
            raw.setdefault(section, {})[name] = value
        return training_dtype(config_from_dict(raw))

    assert dtype() == torch.float32  # bf16 autocast over fp32 masters
    assert dtype(hardware__deepspeed="zero3") == torch.bfloat16  # ZeRO holds the fp32 masters
    assert dtype(model__dtype="bfloat16") == torch.bfloat16  # the switch: pure bf16
    # the arguments really ask the Trainer for bf16 autocast over those fp32 weights, and a step runs
    from icmlab.train.dry_start import dry_start

    cfg = _cfg(tiny, tmp_path)  # a CPU config refuses bf16; the GPU run's config is built beside it
    cfg = dataclasses.replace(
        cfg,
        hardware=dataclasses.replace(cfg.hardware, device="cuda"),
        train=dataclasses.replace(cfg.train, bf16=True),
        model=dataclasses.replace(cfg.model, dtype="auto"),
    )
    report = dry_start(cfg, tiny["records"], steps=1, inference=False)
    assert report.args.bf16 and report.weights_dtype == "float32" and math.isfinite(report.loss)
    assert build_training_args(cfg, cpu_stand_in=True).bf16
