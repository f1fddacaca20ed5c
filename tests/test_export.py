"""The export stage: llava-hf that plain transformers reloads (same tokens as icmlab), the LoRA adapter
alone and merged, the ORIGINAL mPLUG-Owl2 layout proven on the shared fixtures, the model card, the
serving handoff and the push to a loopback hub.

Models are the tiny ones of ``tiny_train_setup`` (LLaVA: 32 px, 16 image tokens) and the tiny
original mPLUG-Owl2 of ``tests/fixtures/tiny_mplug_owl2``; expected values come from those files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import oracles as O
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_train_setup import build_llava_hf

from icmlab import export, paths
from icmlab.config import load_run_config
from icmlab.evaluate.generation import pixel_values
from icmlab.evaluate.protocol import prepare_image, resolve_protocol
from icmlab.evaluate.stage import prompt_format
from icmlab.export.serving import serving_problems
from icmlab.io import atomic_write_json
from icmlab.models import get_family
from icmlab.models import mplug_owl2 as owl
from icmlab.models.mplug_owl2.original import original_config_dict, original_state_dict, save_original

torch.set_num_threads(1)
QUESTION = "Is this image bright?"
LLAVA_HUB_MANIFEST = O.MANIFESTS / "llava_15_7b_hf.tsv"
OWL2_MANIFEST = O.MANIFESTS / "mplug_owl2_llama2_7b.tsv"
OWL2_NOTES = O.manifest_notes(O.MANIFEST_NOTES["mplug_owl2"])


def run_config(tmp: Path, base: Path, **overrides):
    return load_run_config(
        "parameters/demo.yaml",
        {"runs_root": str(tmp / "runs"), "data.root": str(tmp / "data"), "model.base": str(base), **overrides},
    )


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory) -> Path:
    return build_llava_hf(tmp_path_factory.mktemp("llava") / "base", seed=3)


def trained_run(tmp: Path, base: Path, **overrides):
    """A run whose final model is the tiny base with shifted weights, saved as the train stage saves it."""
    cfg = run_config(tmp, base, **overrides)
    family = get_family("llava15")
    bundle = family.load_for_inference(base, dtype="float32")
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    family.save_bundle(bundle, paths.final_model_dir(cfg))
    return cfg


def image(tmp: Path) -> Path:
    path = tmp / "img.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(20, 36, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


# --------------------------------------------------------------------------- LLaVA
@pytest.mark.slow
def test_llava_export_reloads_with_plain_transformers_and_generates_icmlab_tokens(tmp_path, llava_base):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    cfg = trained_run(tmp_path, llava_base)
    res = export.run(cfg)
    hf = res.layouts["hf"]
    assert set(res.layouts) == {"hf"}
    processor = AutoProcessor.from_pretrained(hf)
    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    img = Image.open(image(tmp_path)).convert("RGB")
    # icmlab's evaluation input: its prompt encoder and its square padding before the processor
    bundle = get_family("llava15").load_for_inference(paths.final_model_dir(cfg), dtype="float32")
    protocol = resolve_protocol(cfg)
    ours_ids = prompt_format(protocol, bundle).encode(QUESTION)
    padded = prepare_image(protocol, img, bundle.image_processor)
    plain = processor(images=img, text=prompt, return_tensors="pt")  # the unpadded image
    assert plain["input_ids"][0].tolist() == ours_ids  # the chat template renders the evaluation prompt
    ours_px = pixel_values(bundle.tokenizer, bundle.image_processor, padded)
    assert torch.equal(plain["pixel_values"][0], ours_px)  # the exported processor pads as training did
    with torch.no_grad():
        theirs = model.generate(**plain, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        ids = torch.tensor([ours_ids])
        ours = bundle.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ours_px[None], max_new_tokens=8,
            min_new_tokens=8, do_sample=False,
        )  # fmt: skip
    assert theirs[0, ids.shape[1] :].tolist() == ours[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_llava_export_is_what_serving_engines_read(tmp_path, llava_base, capsys):
    from transformers import AutoProcessor

    from icmlab.__main__ import main
    from icmlab.config import save_resolved

    cfg = trained_run(tmp_path, llava_base)
    res = export.run(cfg)
    hf = res.layouts["hf"]
    assert serving_problems(hf, "llava15") == []
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    # weights under the llava-hf hub names (the 7B llava-hf repo's manifest, layer numbers aside)
    hub = {_pattern(line.split("\t")[0]) for line in LLAVA_HUB_MANIFEST.read_text().splitlines()[1:]}
    ours = {_pattern(k) for k in load_file(str(hf / "model.safetensors"))}
    assert ours == hub
    pre = json.loads((hf / "preprocessor_config.json").read_text())  # what transformers-4 engines read
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"] is True
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] is not None
    assert gen["max_new_tokens"] == cfg.playground.max_new_tokens
    for line in res.serving.splitlines():
        if not line.startswith("#"):
            assert str(hf) in line
    assert any(line.startswith("vllm serve ") for line in res.serving.splitlines())
    assert any("sglang.launch_server" in line for line in res.serving.splitlines())
    assert "vllm serve" in res.summary()
    # the chat endpoint's messages (OpenAI parts, image after text, a system turn) render the trained prompt
    processor = AutoProcessor.from_pretrained(hf)
    user = {"type": "text", "text": QUESTION}
    first = [{"role": "user", "content": [{"type": "image"}, user]}]
    later = [{"role": "user", "content": [user, {"type": "image"}]}]
    assert processor.apply_chat_template(first, add_generation_prompt=True) == processor.apply_chat_template(
        later, add_generation_prompt=True
    )
    system = [{"role": "system", "content": "Be brief."}, *first]
    assert processor.apply_chat_template(system, add_generation_prompt=True).startswith("Be brief. USER: <image>\n")
    # `icmlab export P` prints the same handoff
    params = save_resolved(cfg, tmp_path / "params.yaml")
    assert main(["export", str(params)]) == 0
    assert "vllm serve" in capsys.readouterr().out
    # a broken folder is named, not served
    (hf / "generation_config.json").unlink()
    assert serving_problems(hf, "llava15") == [f"{hf / 'generation_config.json'}: missing"]


@pytest.mark.slow
def test_model_card_names_base_data_licences_recipe_eval_and_commit(tmp_path, llava_base):
    from icmlab.envinfo import git_commit
    from icmlab.evaluate.scoring import EvaluationResult, score_moderation

    cfg = trained_run(tmp_path, llava_base)
    items = [{"label": "yes", "category": "a"}, {"label": "no", "category": "b"}, {"label": "no", "category": "b"}]
    scores = {"baseline": EvaluationResult(moderation=score_moderation(items, ["Yes", "Yes", "No"])).to_dict()}
    atomic_write_json(paths.eval_dir(cfg) / "scores.json", scores)
    res = export.run(cfg)
    card = (res.layouts["hf"] / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {cfg.model.base}" in front
    assert "q-future/Q-Instruct-DB" in front
    assert "non-commercial" in card.lower() and "Q-Instruct" in card
    assert f"| learning rate | {cfg.train.lr} |" in card
    assert f"| global batch size | {cfg.train.global_batch_size} |" in card
    acc = EvaluationResult.from_dict(scores["baseline"]).moderation.accuracy
    assert f"| baseline | - | - | {100 * acc:.1f} |" in card
    assert f"icmlab commit: `{git_commit()}`" in card
    assert "vllm serve" in card


def test_export_errors_name_the_missing_source(tmp_path):
    cfg = run_config(tmp_path, tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        export.run(cfg)
    cfg.export.source = "checkpoint-7"
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        export.run(cfg)


# --------------------------------------------------------------------------- LoRA
@pytest.mark.slow
def test_lora_adapter_alone_and_merged_both_reload(tmp_path, llava_base):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    cfg = run_config(
        tmp_path, llava_base, **{"train.lora.enabled": "true", "train.lora.r": "4", "train.lora.alpha": "8"}
    )
    family = get_family("llava15")
    bundle = family.load_for_inference(llava_base, dtype="float32")
    peft_model = family.apply_lora(bundle.model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    checkpoint = paths.checkpoints_dir(cfg) / "checkpoint-5"
    peft_model.save_pretrained(checkpoint)  # what the Trainer writes for a LoRA run
    cfg.export.source = "checkpoint-5"
    res = export.run(cfg)
    assert set(res.layouts) == {"adapter", "hf"}
    adapter_cfg = json.loads((res.layouts["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == cfg.model.base
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base = LlavaForConditionalGeneration.from_pretrained(adapter_cfg["base_model_name_or_path"]).eval()
        before = base(input_ids=ids).logits  # PeftModel wraps the base in place
        again = PeftModel.from_pretrained(base, res.layouts["adapter"]).eval()(input_ids=ids).logits
        merged = LlavaForConditionalGeneration.from_pretrained(res.layouts["hf"]).eval()(input_ids=ids).logits
    assert torch.allclose(again, expected, atol=1e-6)
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(expected, before, atol=1e-3)  # the adapter changes the model
    assert "lora" in (res.layouts["adapter"] / "README.md").read_text()
    # the playground loads the LoRA checkpoint as its adapter on the base
    from icmlab import playground

    with torch.no_grad():
        assert torch.allclose(
            playground.load_model(cfg, "checkpoint-5").model(input_ids=ids).logits, expected, atol=1e-6
        )


# --------------------------------------------------------------------------- mPLUG-Owl2 original layout
@pytest.fixture(scope="module")
def owl_model():
    return owl.load_original(O.TINY_OWL2, dtype=torch.float32, attn_implementation="eager")


def test_owl2_original_layout_has_the_original_keys_values_and_config(tmp_path, owl_model):
    out = save_original(owl_model, tmp_path / "original")
    theirs = load_file(str(O.TINY_OWL2 / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(theirs)  # multiway.0/1, fused query_key_value, abstractor buffers, inv_freq
    for key, tensor in theirs.items():
        assert ours[key].shape == tensor.shape and torch.allclose(ours[key], tensor, atol=1e-7), key
    raw, fixture = json.loads((out / "config.json").read_text()), O.tiny_config(O.TINY_OWL2)
    for key, value in raw.items():
        if key not in ("visual_config", "architectures", "torch_dtype"):
            assert fixture[key] == value, key
    for block in ("visual_model", "visual_abstractor"):
        for key, value in raw["visual_config"][block].items():
            if key != "projection_dim":  # read by no forward pass; the 7B default is written
                assert fixture["visual_config"][block][key] == value, (block, key)
    reloaded = owl.load_original(out, dtype=torch.float32, attn_implementation="eager")
    inputs = load_file(str(O.TINY_OWL2 / "inputs.safetensors"))
    batch = owl.expand_image_tokens(
        inputs["gen_input_ids"],
        num_image_tokens=owl_model.config.num_image_tokens,
        image_token_index=owl_model.config.image_token_index,
    )
    with torch.no_grad():
        a = owl_model(**batch, pixel_values=inputs["gen_images"]).logits
        b = reloaded(**batch, pixel_values=inputs["gen_images"]).logits
    assert torch.equal(a, b)


def test_owl2_original_layout_at_full_size_matches_the_manifest():
    with torch.device("meta"):
        big = owl.MPLUGOwl2ForCausalLM(owl.MPLUGOwl2Config())
    ours = {k: list(v.shape) for k, v in original_state_dict(big).items()}
    manifest = {}
    for line in OWL2_MANIFEST.read_text().splitlines()[1:]:
        name, shape, _ = line.split("\t")
        manifest[name] = json.loads(shape)
    assert ours == manifest
    raw = original_config_dict(big.config)
    for key, value in OWL2_NOTES["text_config"].items():
        assert raw[key] == value, key
    for block, notes in (("visual_model", "visual_model_config"), ("visual_abstractor", "visual_abstractor_config")):
        for key, value in OWL2_NOTES[notes].items():
            assert raw["visual_config"][block][key] == value, (block, key)


@pytest.mark.slow
def test_owl2_export_stage_writes_hf_and_original(tmp_path, owl_model):
    from tiny_train_setup import build_mplug_owl2

    base = build_mplug_owl2(tmp_path / "owl-base", seed=1)
    cfg = load_run_config(
        "parameters/demo-mplug-owl2.yaml",
        {"runs_root": str(tmp_path / "runs"), "data.root": str(tmp_path / "data"), "model.base": str(base)},
    )
    family = get_family("mplug_owl2")
    family.save_bundle(family.load_for_inference(base, dtype="float32"), paths.final_model_dir(cfg))
    res = export.run(cfg)
    assert set(res.layouts) == {"hf", "original"} and res.serving is None
    hf_model = family.load_for_inference(res.layouts["hf"], dtype="float32").model
    original = owl.load_original(res.layouts["original"], dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(hf_model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert "mPLUG-Owl2" in (res.layouts["original"] / "README.md").read_text()


# --------------------------------------------------------------------------- hub push
@pytest.mark.slow
def test_push_to_the_loopback_hub(tmp_path, llava_base, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from fakeservers import FakeHub, FileServer

    secret = "hf_export_test_token_1234"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", secret)
    with FileServer() as cdn, FakeHub(cdn) as hub:
        cfg = trained_run(
            tmp_path, llava_base, **{"export.repo_id": "lab/icm-llava-tiny", "download.endpoint": hub.base}
        )
        res = export.run(cfg)
        repo = hub.repos[("model", "lab/icm-llava-tiny")]
        local = {p.name for p in res.layouts["hf"].iterdir()}
        assert set(repo.files) == local and "README.md" in local
        assert repo.files["README.md"] == (res.layouts["hf"] / "README.md").read_bytes()
        assert repo.files["model.safetensors"] == (res.layouts["hf"] / "model.safetensors").read_bytes()
        assert res.pushed.endswith(repo.commit)
        assert hub.commits[-1]["summary"] == f"icmlab export of run {cfg.run_name}"
        assert {r["auth"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {secret}"}
    for path in paths.export_dir(cfg).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_push_rejects_a_malformed_repo_id_before_any_work(tmp_path):
    cfg = run_config(tmp_path, tmp_path / "base", **{"export.repo_id": "not a repo"})
    with pytest.raises(ValueError, match="org/name"):
        export.run(cfg)  # no trained model either: the repo id is checked first
    assert not paths.export_dir(cfg).exists()
