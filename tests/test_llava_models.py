"""LLaVA-v1.5 adapter: conversion against the upstream oracles, MSFT assembly, training flags, save/load, shapes.

Oracles: ``tests/fixtures/tiny_llava_v15`` (original layout and outputs from haotian-liu/LLaVA, plus
its llava-hf conversion under ``hf/``) and ``tests/fixtures/manifests/llava_*`` (every tensor of
the real 7B checkpoints). Tiny parts for the MSFT path are built in-process. Every expected value
taken from an oracle is read from its files (``oracles.py``), so another oracle set of the same
format drops in.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import oracles as O
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from icmlab.io import read_json
from icmlab.models import get_family
from icmlab.models.llava15 import adapter as L
from icmlab.models.llava15 import convert as C
from icmlab.models.llava15.tiny import tiny_text_config, tiny_vision_config

FIX = O.TINY_LLAVA
MANIFESTS = O.MANIFESTS
ORIG_CONFIG = O.tiny_config(FIX)
OLD_VOCAB = ORIG_CONFIG["vocab_size"]  # rows of the original embedding
CONVERSION = O.llava_conversion()  # hf/conversion.json: the native ids and vocabulary
IGNORE = O.ignore_index()
TOKENS_PER_IMAGE = O.tokens_per_image(FIX)
VOCAB_MULTIPLE = 64  # convert_llava_weights_to_hf.py pads the grown vocabulary to a multiple of 64
# the in-process MSFT parts (not an oracle): vocabulary, CLIP image and patch size
PARTS_VOCAB, PARTS_IMAGE, PARTS_PATCH = 300, 32, 8


def _grown_vocab(n: int) -> int:
    """Rows after adding <image> and <pad> and padding to the multiple."""
    return -(-(n + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


torch.set_num_threads(1)


def make_tokenizer(n: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``n`` tokens (``<unk> <s> </s> w3 .. w{n-1}``)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def original_dir(tmp_path_factory) -> Path:
    """The fixture's original checkpoint plus the tokenizer it lacks (as many tokens as its embedding)."""
    d = tmp_path_factory.mktemp("orig")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIX / name, d / name)
    make_tokenizer(OLD_VOCAB).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def converted() -> LlavaForConditionalGeneration:
    return C.load_original_checkpoint(FIX, attn_implementation="eager")


@pytest.fixture(scope="session")
def hf_inputs() -> dict:
    return load_file(FIX / "hf" / "inputs_hf.safetensors")


def _forward(model, inp):
    with torch.no_grad():
        return model(
            input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"]
        ).logits


# ------------------------------------------------------------------ original checkpoint -> native


def test_converted_state_dict_equals_fixture_conversion(converted):
    ref = load_file(FIX / "hf" / "model.safetensors")
    sd = {k: v for k, v in converted.state_dict().items() if not k.endswith("position_ids")}
    assert {C.native_to_hub_key(k) for k in sd} == set(ref)
    for key, value in sd.items():
        r = ref[C.native_to_hub_key(key)]
        assert value.shape == r.shape, key
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(value[:OLD_VOCAB], r[:OLD_VOCAB]), key
            # same N(mu, 1e-5 Sigma) draws as the fixture (seed 0), up to float rounding
            assert (value[OLD_VOCAB:] - r[OLD_VOCAB:]).abs().max() < 1e-6, key
        else:
            assert torch.equal(value, r), key
    cfg = converted.config
    assert (cfg.image_token_id, cfg.pad_token_id, cfg.text_config.vocab_size) == (
        CONVERSION["image_token_index"],
        CONVERSION["pad_token_id"],
        CONVERSION["vocab_size_hf"],
    )
    assert CONVERSION["vocab_size_hf"] == _grown_vocab(OLD_VOCAB)
    assert CONVERSION["tokens_per_image"] == TOKENS_PER_IMAGE
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (
        ORIG_CONFIG["mm_vision_select_layer"],
        O.SELECT_STRATEGY[ORIG_CONFIG["mm_vision_select_feature"]],
        TOKENS_PER_IMAGE,
    )


def test_rename_table_matches_fixture():
    table = read_json(FIX / "hf" / "conversion.json")["rename_table"]
    for original, hub in table.items():
        assert C.native_to_hub_key(C.rename_original_key(original)) == hub
    assert C.rename_original_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_converted_logits_loss_and_greedy_match_oracles(converted, hf_inputs):
    exp_hf = load_file(FIX / "hf" / "expected_hf.safetensors")["logits"]
    exp = load_file(FIX / "expected.safetensors")
    logits = _forward(converted, hf_inputs)
    valid = hf_inputs["attention_mask"].bool()
    assert (logits - exp_hf)[valid].abs().max() <= 1e-5
    orig_valid = exp["expanded_attention_mask"].bool()
    assert (logits[..., :OLD_VOCAB] - exp["logits"])[orig_valid].abs().max() <= 1e-5
    # loss over the original columns equals the original loss (added rows join the full softmax)
    recorded = O.llava_conversion_results("eager")
    labels = hf_inputs["labels"][:, 1:]
    restricted = torch.nn.functional.cross_entropy(
        logits[:, :-1, :OLD_VOCAB].reshape(-1, OLD_VOCAB), labels.reshape(-1), ignore_index=IGNORE
    )
    assert abs(restricted.item() - exp["loss"].item()) <= 1e-5
    assert abs(restricted.item() - recorded["loss_native_restricted_to_original_vocab"]) <= 1e-5
    with torch.no_grad():
        out = converted(**{k: hf_inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    assert abs(out.loss.item() - recorded["loss_native"]) <= 1e-5
    gen = converted.generate(
        input_ids=hf_inputs["gen_input_ids"],
        pixel_values=hf_inputs["gen_pixel_values"],
        max_new_tokens=exp["gen_tokens"].shape[1],
        do_sample=False,
    )
    assert torch.equal(gen[:, hf_inputs["gen_input_ids"].shape[1] :], exp["gen_tokens"])


def test_sdpa_close_to_eager(converted, hf_inputs):
    sdpa = C.load_original_checkpoint(FIX, attn_implementation="sdpa")
    valid = hf_inputs["attention_mask"].bool()
    assert (_forward(sdpa, hf_inputs) - _forward(converted, hf_inputs))[valid].abs().max() <= 1e-5


def test_tower_from_separate_clip_checkpoint_and_bin_shards(tmp_path, converted, hf_inputs):
    sd = load_file(FIX / "model.safetensors")
    tower = O.llava_tower_prefix()  # model.vision_tower.vision_tower.vision_model.
    ckpt, clip = tmp_path / "ckpt", tmp_path / "clip"
    ckpt.mkdir(), clip.mkdir()
    shutil.copy(FIX / "config.json", ckpt / "config.json")
    rest = {k: v for k, v in sd.items() if not k.startswith(tower)}
    names = sorted(rest)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        torch.save({k: rest[k] for k in keys}, ckpt / shard)
    (ckpt / "pytorch_model.bin.index.json").write_text(
        '{"weight_map": {' + ", ".join(f'"{k}": "{s}"' for s, ks in shards.items() for k in ks) + "}}"
    )
    assert set(C.read_state_dict(ckpt)) == set(rest)
    # a CLIPModel-style checkpoint: vision_model.* plus text parts that must be ignored
    clip_sd = {"vision_model." + k[len(tower) :]: v for k, v in sd.items() if k.startswith(tower)}
    clip_sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())})
    save_file(clip_sd, clip / "model.safetensors")
    vcfg = read_json(FIX / "config.json")["vision_config"]
    (clip / "config.json").write_text('{"model_type": "clip", "vision_config": ' + str(vcfg).replace("'", '"') + "}")
    with pytest.raises(ValueError, match="vision_source"):
        C.convert_original_state_dict(rest)
    model = C.load_original_checkpoint(ckpt, vision_source=clip, attn_implementation="eager")
    assert torch.equal(_forward(model, hf_inputs), _forward(converted, hf_inputs))


def test_conversion_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="unexpected tensor"):
        C.rename_original_key("model.vision_resampler.weight")
    cfg = read_json(FIX / "config.json")
    for key, bad in (("mm_projector_type", "linear"), ("mm_use_im_start_end", True)):
        with pytest.raises(ValueError, match=key):
            C.check_original_config({**cfg, key: bad}, FIX)
    with pytest.raises(ValueError, match="mm_vision_tower"):
        C.check_original_config({"model_type": "llama"}, FIX)


# ------------------------------------------------------------------ MSFT assembly from parts


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> SimpleNamespace:
    """Tiny Vicuna-like LLM + CLIP tower + stage-1 projector, saved as upstream ships them."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("parts")
    llm = LlamaForCausalLM(
        tiny_text_config(PARTS_VOCAB, hidden_size=48, intermediate_size=96, max_position_embeddings=128)
    )
    llm.save_pretrained(d / "vicuna")
    make_tokenizer(PARTS_VOCAB).save_pretrained(d / "vicuna")
    clip = CLIPVisionModel(tiny_vision_config(PARTS_IMAGE, PARTS_PATCH, num_hidden_layers=3))
    clip.save_pretrained(d / "clip")
    projector = {
        "model.mm_projector.0.weight": torch.randn(48, 32),
        "model.mm_projector.0.bias": torch.randn(48),
        "model.mm_projector.2.weight": torch.randn(48, 48),
        "model.mm_projector.2.bias": torch.randn(48),
    }
    torch.save(projector, d / "mm_projector.bin")
    return SimpleNamespace(dir=d, llm=llm.state_dict(), clip=clip.state_dict(), projector=projector)


def test_assemble_from_parts_keeps_every_weight(parts):
    model = C.assemble_from_parts(parts.dir / "vicuna", parts.dir / "clip", parts.dir / "mm_projector.bin")
    sd = model.state_dict()
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for kind in ("weight", "bias"):
            want = parts.projector[f"model.mm_projector.{i}.{kind}"]
            assert torch.equal(sd[f"model.multi_modal_projector.{name}.{kind}"], want)
    for key, value in parts.llm.items():
        native = C.rename_original_key(key)
        got = sd[native][:PARTS_VOCAB] if key in ("model.embed_tokens.weight", "lm_head.weight") else sd[native]
        assert torch.equal(got, value), key
    for key, value in parts.clip.items():
        if not key.endswith("position_ids"):
            assert torch.equal(sd[f"model.vision_tower.{key}"], value), key
    cfg = model.config
    assert (cfg.image_token_id, cfg.pad_token_id, cfg.text_config.vocab_size) == (
        PARTS_VOCAB,
        PARTS_VOCAB + 1,
        _grown_vocab(PARTS_VOCAB),
    )
    # the LLaVA-1.5 recipe (as the original checkpoint's config records it): layer -2, patch tokens only
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (
        ORIG_CONFIG["mm_vision_select_layer"],
        O.SELECT_STRATEGY[ORIG_CONFIG["mm_vision_select_feature"]],
        (PARTS_IMAGE // PARTS_PATCH) ** 2,
    )


def test_assemble_rejects_mismatched_projector(parts, tmp_path):
    bad = {k: v for k, v in parts.projector.items()}
    bad["model.mm_projector.0.weight"] = torch.zeros(48, 16)
    torch.save(bad, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="mm_projector.0.weight"):
        C.assemble_from_parts(parts.dir / "vicuna", parts.dir / "clip", tmp_path / "mm_projector.bin")


def _cfg(strategy: str = "after", lora: bool = False, **model) -> SimpleNamespace:
    """A duck-typed RunConfig with the fields the adapter reads."""
    return SimpleNamespace(
        model=SimpleNamespace(
            **{
                "base": None,
                "base_format": "hf",
                "llm": None,
                "vision_tower": None,
                "mm_projector": None,
                "revision": None,
                "dtype": "float32",
                **model,
            }
        ),
        train=SimpleNamespace(
            strategy=strategy,
            bf16=False,
            freeze_vision=True,
            tune_projector=True,
            lora=SimpleNamespace(enabled=lora, r=4, alpha=8, dropout=0.0),
        ),
        hardware=SimpleNamespace(attn_implementation="eager"),
        data=SimpleNamespace(model_max_length=64),
    )


def test_load_for_training_mix_freezes_vision(parts):
    cfg = _cfg(
        "mix",
        llm=str(parts.dir / "vicuna"),
        vision_tower=str(parts.dir / "clip"),
        mm_projector=str(parts.dir / "mm_projector.bin"),
    )
    bundle = L.load_for_training(cfg)
    # <image> and <pad> are appended after the LLM's vocabulary; CLIP gives (image / patch)^2 tokens
    assert bundle.family == "llava15" and bundle.image_token_id == PARTS_VOCAB
    assert bundle.num_image_tokens == (PARTS_IMAGE // PARTS_PATCH) ** 2
    assert bundle.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [PARTS_VOCAB, PARTS_VOCAB + 1]
    assert bundle.tokenizer.padding_side == "right"
    assert bundle.tokenizer.model_max_length == cfg.data.model_max_length
    flags = {n: p.requires_grad for n, p in bundle.model.named_parameters()}
    assert not any(v for n, v in flags.items() if n.startswith("model.vision_tower."))
    assert all(v for n, v in flags.items() if not n.startswith("model.vision_tower."))
    assert bundle.image_processor.crop_size == {"height": PARTS_IMAGE, "width": PARTS_IMAGE}
    cfg.model.mm_projector = None
    with pytest.raises(ValueError, match="model.mm_projector"):
        L.load_for_training(cfg)


# ------------------------------------------------------------------ training flags


def _train_steps(model, inp, params, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(**{k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_full_finetune_changes_trainable_and_keeps_frozen(hf_inputs):
    model = C.load_original_checkpoint(FIX, attn_implementation="eager")
    counts = L.apply_trainable(model)
    assert counts["vision_encoder"] == 0 and counts["projector"] > 0 and counts["llm"] > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    _train_steps(model, hf_inputs, trainable)
    for name, param in model.named_parameters():
        if name.startswith("model.vision_tower."):
            assert not param.requires_grad and torch.equal(param, before[name]), name
        else:
            assert not torch.equal(param, before[name]), name
    with pytest.raises(ValueError, match="unknown module group"):
        L.apply_trainable(model, {"vision": True})


def test_lora_trains_adapters_and_projector_only(hf_inputs):
    model = C.load_original_checkpoint(FIX, attn_implementation="eager")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = L.apply_lora(model, r=4, alpha=8, dropout=0.0)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    # q k v o gate up down in each decoder layer of the checkpoint
    assert len(lora_modules) == ORIG_CONFIG["num_hidden_layers"] * 7
    assert all(".language_model.layers." in n for n in lora_modules)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _train_steps(peft_model, hf_inputs, [p for p in peft_model.parameters() if p.requires_grad])
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert "lora_" in name or "modules_to_save" in name, name
            if "lora_" in name or "modules_to_save" in name:
                assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    # frozen base weights (LLM, vision tower, original projector copy) are the pre-LoRA ones
    frozen = {}
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
            frozen[plain] = param
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[n], base[n]) for n in base)


# ------------------------------------------------------------------ bundles: save / load


def test_original_bundle_saves_llava_hf_layout(original_dir, tmp_path, converted, hf_inputs):
    bundle = L.load_for_inference(original_dir, dtype="float32", attn_implementation="eager")
    assert bundle.tokenizer.padding_side == "left" and bundle.extra["format"] == "original"
    bundle.image_processor.image_mean = [0.25, 0.5, 0.75]  # must survive the save (not rebuilt from defaults)
    out = L.save_bundle(bundle, tmp_path / "saved")
    model = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(out)
    ref = converted.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # on disk: the llava-hf (legacy) names, which a raw load_state_dict -- the Trainer's resume -- misses
    on_disk = set(load_file(out / "model.safetensors"))
    assert on_disk == {C.native_to_hub_key(k) for k in ref if not k.endswith("position_ids")}
    assert not on_disk & set(ref)
    image = Image.new("RGB", (70, 40), (200, 30, 90))
    batch = processor(text="USER: <image>\nw5 w6 ASSISTANT:", images=image, return_tensors="pt")
    size = ORIG_CONFIG["vision_config"]["image_size"]
    assert int((batch["input_ids"] == CONVERSION["image_token_index"]).sum()) == TOKENS_PER_IMAGE
    assert tuple(batch["pixel_values"].shape) == (1, 3, size, size)
    with torch.no_grad():
        a = model(**batch).logits
        b = converted(**batch).logits
    assert torch.equal(a, b)
    prompt = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate it."}]},
            {"role": "assistant", "content": "Good."},
            {"role": "user", "content": "Why?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert L.VICUNA_V1_SYSTEM == O.vicuna_v1_system()  # what upstream's v1 template renders
    assert prompt == f"{O.vicuna_v1_system()} USER: <image>\nRate it. ASSISTANT: Good.</s>USER: Why? ASSISTANT:"
    # an hf-format start from the saved bundle reproduces the weights
    cfg = _cfg(base=str(out))
    again = L.load_for_training(cfg)
    assert again.extra["format"] == "hf" and torch.equal(_forward(again.model, hf_inputs), _forward(model, hf_inputs))
    assert list(again.image_processor.image_mean) == [0.25, 0.5, 0.75]
    cfg.model.base_format = "original"
    with pytest.raises(ValueError, match="base_format"):
        L.load_for_training(cfg)


def test_lora_bundle_saves_merged_weights(original_dir, tmp_path, hf_inputs):
    cfg = _cfg(base=str(original_dir), base_format="original", lora=True)
    bundle = L.load_for_training(cfg)
    assert bundle.extra["lora"] and hasattr(bundle.model, "peft_config")
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    _train_steps(bundle.model, hf_inputs, params)
    bundle.model.eval()
    expected = _forward(bundle.model, hf_inputs)
    out = L.save_bundle(bundle, tmp_path / "lora")
    model = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    valid = hf_inputs["attention_mask"].bool()
    assert (_forward(model, hf_inputs) - expected)[valid].abs().max() <= 1e-5


def test_tokenizer_size_must_match_checkpoint(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIX / name, tmp_path / name)
    wrong = OLD_VOCAB - 12
    make_tokenizer(wrong).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{wrong} tokens"):
        L.load_for_inference(tmp_path, dtype="float32", attn_implementation="eager")


# ------------------------------------------------------------------ hardware choices, sources, registry


def test_resolve_attn_implementation(monkeypatch):
    monkeypatch.setattr(L, "is_flash_attn_2_available", lambda: False)
    assert L.resolve_attn_implementation("auto") == "sdpa"
    assert L.resolve_attn_implementation("eager") == "eager"
    with pytest.raises(RuntimeError, match="flash-attn"):
        L.resolve_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation"):
        L.resolve_attn_implementation("flash")
    monkeypatch.setattr(L, "is_flash_attn_2_available", lambda: True)
    assert L.resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert L.resolve_attn_implementation("auto", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="float16/bfloat16"):
        L.resolve_attn_implementation("flash_attention_2", torch.float32)


def test_resolve_source_prefers_local_then_hub(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, revision=None: calls.append((repo, revision)) or str(tmp_path),
    )
    assert C.resolve_source(tmp_path) == tmp_path and not calls
    assert C.resolve_source("llava-hf/llava-1.5-7b-hf", revision="abc") == tmp_path
    assert calls == [("llava-hf/llava-1.5-7b-hf", "abc")]
    with pytest.raises(FileNotFoundError, match="no such file"):
        C.resolve_source("./missing/dir")

    def offline(repo, revision=None):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="hub snapshot could not be fetched"):
        C.resolve_source("owner/model")


def test_registry_exposes_family():
    module = get_family("llava15")
    assert module.DIALECT == "<image>"
    assert set(module.MODULE_GROUPS) == {"vision_encoder", "projector", "llm"}


# ------------------------------------------------------------------ full-size shapes (meta device)


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    rows = (MANIFESTS / name).read_text().splitlines()[1:]
    return {n: tuple(int(x) for x in s.strip("[]").split(", ") if x) for n, s, _ in (r.split("\t") for r in rows)}


def _meta_model(size: str) -> LlavaForConditionalGeneration:
    with torch.device("meta"):
        return LlavaForConditionalGeneration(L.real_config(size))


def test_real_7b_matches_manifests():
    model = _meta_model("7b")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    native = _manifest("llava_15_7b_hf_transformers5.tsv")
    assert shapes == native
    assert {C.native_to_hub_key(k): v for k, v in shapes.items()} == _manifest("llava_15_7b_hf.tsv")
    total = sum(p.numel() for p in model.parameters())
    assert total == read_json(MANIFESTS / "llava_15_7b_hf_transformers5.notes.json")["total_parameter_elements"]
    original = _manifest("llava_v15_7b_original.tsv")
    orig_cfg = read_json(MANIFESTS / "llava_v15_7b_original.notes.json")["config"]
    hf_vocab = read_json(MANIFESTS / "llava_15_7b_hf_transformers5.notes.json")["text_config"]["vocab_size"]
    assert hf_vocab == _grown_vocab(orig_cfg["vocab_size"])
    for name, shape in original.items():
        target = C.rename_original_key(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # +<image> +<pad>, padded to the multiple
            assert shape == (orig_cfg["vocab_size"], orig_cfg["hidden_size"])
            assert native[target] == (hf_vocab, orig_cfg["hidden_size"])
        else:
            assert native[target] == shape, name
    meta_sd = {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in original.items()}
    converted = C.convert_original_state_dict(meta_sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == native


def test_real_13b_parameter_count():
    total = sum(p.numel() for p in _meta_model("13b").parameters())
    assert 13.30e9 < total < 13.40e9, total
    with pytest.raises(ValueError, match="model.size"):
        L.real_config("34b")
