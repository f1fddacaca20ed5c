"""RunConfig loading: one loader, every mistake named with its key, resolved config saved."""

from __future__ import annotations

import pytest
import yaml

from icmlab.config import ConfigError, RunConfig, config_from_dict, load_notebook_config, load_run_config, save_resolved


def _write(tmp_path, text: str):
    p = tmp_path / "parameters" / "x.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_demo_loads_with_resolved_paths(project_root):
    cfg = load_run_config("parameters/demo.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.run_dir == project_root / "runs" / "demo"
    assert cfg.data.root == project_root / "data" / "demo"
    assert cfg.model.base == str(project_root / "data/demo/models/llava-tiny-hf")
    moved = load_run_config("parameters/demo.yaml", {"data.root": "/tmp/elsewhere"})
    assert moved.model.base == "/tmp/elsewhere/models/llava-tiny-hf"
    assert cfg.train.strategy == "after" and cfg.hardware.device == "cpu"


def test_misspelt_key_is_named_with_suggestion(tmp_path):
    p = _write(tmp_path, "run_name: x\ntrain:\n  learning_rate: 1.0e-5\n  strategy: after\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.learning_rate: unknown key" in msg
    assert "allowed keys here" in msg


def test_suggestion_for_close_typo(tmp_path):
    p = _write(tmp_path, "modle:\n  family: llava15\n")
    with pytest.raises(ConfigError, match=r"modle: unknown key \(did you mean model\?\)"):
        load_run_config(p)


def test_wrong_type_and_value_listed_together(tmp_path):
    p = _write(tmp_path, "train:\n  lr: fast\n  bf16: 3\nhardware:\n  deepspeed: zero4\nmodel:\n  family: blip\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "train.lr: expected a number, got 'fast'" in msg
    assert "train.bf16: expected true/false" in msg
    assert "hardware.deepspeed: 'zero4' is not allowed; allowed values: none, zero2, zero3, zero3_offload" in msg
    assert "model.family: 'blip' is not allowed; allowed values: llava15, mplug_owl2" in msg


def test_strategy_aliases_msft_csft():
    base = {"hardware": {"device": "cpu"}, "train": {"bf16": False, "global_batch_size": 16}}
    cfg = config_from_dict({**base, "train": {**base["train"], "strategy": "CSFT"}})
    assert cfg.train.strategy == "after"
    with pytest.raises(ConfigError, match="model.llm: required for LLaVA-v1.5 'mix'"):
        config_from_dict({**base, "train": {**base["train"], "strategy": "msft"}})


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"train": {"global_batch_size": 100}}, "train.global_batch_size: 100 is not a multiple"),
        ({"data": {"datasets": ["custom"]}}, "data.custom_json: required"),
        ({"data": {"datasets": ["laion"]}}, "data.datasets: unknown dataset 'laion'"),
        (
            {"hardware": {"device": "cpu", "attn_implementation": "flash_attention_2"}, "train": {"bf16": False}},
            "flash_attention_2 needs CUDA",
        ),
        ({"hardware": {"device": "cpu"}}, "train.bf16: bfloat16 training needs"),
        ({"hardware": {"num_nodes": 2}}, "hardware.hostfile: required"),
        ({"train": {"strategy": "mix"}, "data": {"high_level": None}}, "data.high_level: the 'mix' strategy"),
        ({"eval": {"benchmarks": ["mmlu"]}}, "eval.benchmarks: unknown benchmark 'mmlu'"),
        ({"run_name": "a/b"}, "run_name:"),
    ],
)
def test_impossible_combinations(raw, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert needle in str(e.value)


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = load_run_config("parameters/demo.yaml", {"train.lr": "1e-4", "train.max_steps": "5", "run_name": "t"})
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.max_steps == 5 and cfg.run_name == "t"
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_run_config("parameters/demo.yaml", {"train.nope": 1})


def test_gradient_accumulation_keeps_global_batch():
    raw = {"train": {"per_device_batch_size": 16, "global_batch_size": 128}, "hardware": {"num_gpus": 4}}
    assert config_from_dict(raw).gradient_accumulation_steps == 2
    raw["hardware"]["num_gpus"] = 8
    assert config_from_dict(raw).gradient_accumulation_steps == 1


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config("parameters/demo.yaml", {"runs_root": str(tmp_path)})
    path = save_resolved(cfg)
    assert path == tmp_path / "demo" / "config.resolved.yaml"
    again = load_run_config(path)
    assert again.to_dict() | {"source_file": None} == cfg.to_dict() | {"source_file": None}


def test_papermill_f_sections_use_the_same_loader(project_root):
    raw = yaml.safe_load((project_root / "parameters/demo.yaml").read_text())
    cfg = load_notebook_config("ignored.yaml", {}, dict(raw))
    assert cfg.run_name == "demo" and cfg.data.root == project_root / "data" / "demo"
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_notebook_config("ignored.yaml", {}, {**raw, "train": {**raw["train"], "lrr": 1}})
