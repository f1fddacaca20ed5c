"""Proof that the native mPLUG-Owl2 reproduces the ORIGINAL X-PLUG code.

The oracle (tests/fixtures/tiny_mplug_owl2, copied from the shared fixtures) was produced by running
the original code (transformers 4.31) on a tiny random model: its state dict with ORIGINAL key
names, its inputs in the original form (one ``-200`` marker per image) and what it computed.
We load that state dict through our original-checkpoint path, convert the inputs to our form
(each marker -> ``num_image_tokens`` placeholders) and compare. The 7B manifest checks every
name and shape of the real checkpoint on the meta device. Every expected value is read from the
oracle's files (``oracles.py``), so another oracle set of the same format drops in.
"""

from __future__ import annotations

import json
from pathlib import Path

import oracles as O
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from icmlab.models import mplug_owl2 as owl
from icmlab.models.mplug_owl2.abstractor import key_position_table, query_position_table

FIXTURE = O.TINY_OWL2
MANIFEST = O.MANIFESTS / "mplug_owl2_llama2_7b.tsv"
MANIFEST_NOTES = O.manifest_notes(O.MANIFEST_NOTES["mplug_owl2"])
RAW = O.tiny_config(FIXTURE)  # the original config.json
VISUAL, ABSTRACTOR = RAW["visual_config"]["visual_model"], RAW["visual_config"]["visual_abstractor"]
TOKENS_PER_IMAGE = O.tokens_per_image(FIXTURE)
TEXT_ONLY_ROWS = O.text_only_rows(FIXTURE)
TOL = 1e-5
MARKER = O.image_token_index()  # the original's one-per-image placeholder (-200)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def model() -> owl.MPLUGOwl2ForCausalLM:
    return owl.load_original(FIXTURE, dtype=torch.float32, attn_implementation="eager")


@pytest.fixture(scope="session")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "inputs.safetensors"))


@pytest.fixture(scope="session")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


def _native(model, ids, mask=None, labels=None, padding_side="right"):
    cfg = model.config
    return owl.expand_image_tokens(
        ids,
        num_image_tokens=cfg.num_image_tokens,
        image_token_index=cfg.image_token_index,
        attention_mask=mask,
        labels=labels,
        padding_side=padding_side,
    )


@pytest.fixture(scope="session")
def native_batch(model, inputs) -> dict[str, torch.Tensor]:
    batch = _native(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    # Our convention: only samples with an image take one (the original fed a dummy to the text-only row).
    has_image = (inputs["input_ids"] == MARKER).any(dim=1)
    batch["pixel_values"] = inputs["images"][has_image]
    return batch


@pytest.fixture(scope="session")
def outputs(model, native_batch):
    with torch.no_grad():
        return model(**native_batch, output_hidden_states=True)


# --------------------------------------------------------------------------- config
def test_original_config_translates(model, expected):
    cfg = model.config
    raw = RAW
    assert cfg.model_type == raw["model_type"] == "mplug_owl2"
    assert cfg.rms_norm_eps == raw["rms_norm_eps"] and cfg.vocab_size == raw["vocab_size"]
    assert cfg.vision_config.image_size == VISUAL["image_size"] and cfg.vision_config.patch_size == VISUAL["patch_size"]
    assert cfg.vision_config.layer_norm_eps == VISUAL["layer_norm_eps"]
    abstractor = cfg.abstractor_config
    assert abstractor.num_learnable_queries == ABSTRACTOR["num_learnable_queries"]
    assert abstractor.grid_size == ABSTRACTOR["grid_size"] == VISUAL["image_size"] // VISUAL["patch_size"]
    assert abstractor.layer_norm_eps == ABSTRACTOR["layer_norm_eps"]
    # the abstractor's queries plus the end token, as the original computed them
    assert cfg.num_image_tokens == TOKENS_PER_IMAGE == expected["image_features"].shape[1]
    assert cfg.num_image_tokens == ABSTRACTOR["num_learnable_queries"] + 1
    assert cfg.image_token_index == raw["vocab_size"]  # default: vocab_size, outside the embedding table
    # The Auto classes resolve the original directory through our registration.
    auto_cfg = AutoConfig.from_pretrained(FIXTURE)
    assert isinstance(auto_cfg, owl.MPLUGOwl2Config)
    for sub in ("vision_config", "abstractor_config"):
        ours, auto = getattr(cfg, sub).to_dict(), getattr(auto_cfg, sub).to_dict()
        assert {k: v for k, v in ours.items() if k != "dtype"} == {k: v for k, v in auto.items() if k != "dtype"}


def test_config_rejects_inconsistent_parts():
    with pytest.raises(ValueError, match="grid_size"):
        owl.MPLUGOwl2Config(abstractor_config={"grid_size": 16})
    with pytest.raises(ValueError, match="visual_config"):
        owl.MPLUGOwl2Config.from_original_dict({"model_type": "mplug_owl2", "vocab_size": 10})


# --------------------------------------------------------------------------- oracle: forward
def test_input_conversion_matches_original_splicing(native_batch, expected):
    # The original's expanded mask/labels (over the spliced sequence) equal ours position by position.
    assert torch.equal(native_batch["attention_mask"], expected["expanded_attention_mask"])
    assert torch.equal(native_batch["labels"], expected["expanded_labels"])


def test_vision_and_abstractor_match(model, inputs, expected):
    with torch.no_grad():
        vision = model.model.vision_model(inputs["images"])
        features = model.model.visual_abstractor(vision)
        features_api = model.get_image_features(inputs["images"])
    vdiff = (vision - expected["vision_last_hidden_state"]).abs().max().item()
    fdiff = (features - expected["image_features"]).abs().max().item()
    print(f"vision_last_hidden_state max|diff| = {vdiff:.3g}, image_features max|diff| = {fdiff:.3g}")
    assert vdiff <= TOL and fdiff <= TOL
    assert torch.equal(features, features_api)


def test_logits_match_every_sample(outputs, expected):
    valid = expected["expanded_attention_mask"].bool()
    assert outputs.logits.shape == expected["logits"].shape
    for b in range(valid.shape[0]):
        diff = (outputs.logits[b][valid[b]] - expected["logits"][b][valid[b]]).abs().max().item()
        print(f"sample {b}: logits max|diff| = {diff:.3g} over {int(valid[b].sum())} positions")
        assert diff <= TOL


def test_modality_and_embeddings_match(outputs, inputs, expected):
    valid = expected["expanded_attention_mask"].bool()
    assert torch.equal(outputs.modality_indicators[valid], expected["modality_indicators"][valid])
    # every image marker of the inputs became TOKENS_PER_IMAGE image positions
    n_images = int((inputs["input_ids"] == MARKER).sum())
    assert n_images > 0
    assert int(outputs.modality_indicators.sum()) == n_images * TOKENS_PER_IMAGE
    assert int(expected["modality_indicators"].sum()) == n_images * TOKENS_PER_IMAGE
    embeds = outputs.hidden_states[0]
    assert (embeds[valid] - expected["inputs_embeds"][valid]).abs().max().item() <= TOL


def test_loss_matches(outputs, expected):
    diff = abs(outputs.loss.item() - expected["loss"].item())
    print(f"loss {outputs.loss.item():.7f} vs original {expected['loss'].item():.7f} (|diff| {diff:.3g})")
    assert diff <= TOL


@pytest.mark.parametrize("row", TEXT_ONLY_ROWS)
def test_text_only_sample_alone_matches(model, inputs, expected, row):
    # The text-only row with no pixel_values at all equals the original's batched row.
    assert not (inputs["input_ids"][row] == MARKER).any()
    batch = _native(model, inputs["input_ids"][row : row + 1], inputs["attention_mask"][row : row + 1])
    with torch.no_grad():
        out = model(**batch)
    n = int(batch["attention_mask"].sum())
    assert n == int(expected["expanded_attention_mask"][row].sum())
    assert (out.logits[0, :n] - expected["logits"][row, :n]).abs().max().item() <= TOL
    assert int(out.modality_indicators.sum()) == 0


# --------------------------------------------------------------------------- oracle: generation
def test_greedy_generation_matches(model, inputs, expected):
    prompt = _native(model, inputs["gen_input_ids"])
    with torch.no_grad():
        gen = model.generate(
            **prompt,
            pixel_values=inputs["gen_images"],
            do_sample=False,
            max_new_tokens=expected["gen_tokens"].shape[1],
            output_scores=True,
            return_dict_in_generate=True,
        )
    new_tokens = gen.sequences[:, prompt["input_ids"].shape[1] :]
    assert torch.equal(new_tokens, expected["gen_tokens"])
    scores = torch.stack(gen.scores, dim=1)
    diff = (scores - expected["gen_scores"]).abs().max().item()
    print(f"gen_scores max|diff| = {diff:.3g}")
    assert diff <= TOL


def _image_prompt(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt cut from the first batch row with an image marker: up to two tokens past the marker."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    row = next(b for b in range(ids.shape[0]) if (ids[b] == MARKER).any())
    valid = int(mask[row].sum())
    marker = int((ids[row] == MARKER).nonzero()[0, 0])
    return ids[row, : min(valid, marker + 3)], inputs["images"][row]


def _text_prompt(inputs) -> torch.Tensor:
    """The first half of the first text-only row (so it is the shortest prompt of the batch)."""
    row = TEXT_ONLY_ROWS[0]
    valid = int(inputs["attention_mask"][row].sum())
    return inputs["input_ids"][row, : max(2, valid // 2)]


def test_batched_left_padded_generation_equals_single(model, inputs):
    image_ids, image = _image_prompt(inputs)
    prompts = [inputs["gen_input_ids"][0], image_ids, _text_prompt(inputs)]
    images = [inputs["gen_images"][0], image, None]
    singles = []
    for ids, image in zip(prompts, images):
        one = _native(model, ids[None])
        extra = {"pixel_values": image[None]} if image is not None else {}
        with torch.no_grad():
            out = model.generate(**one, **extra, do_sample=False, max_new_tokens=6)
        singles.append(out[0, one["input_ids"].shape[1] :])
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    batch = _native(model, ids, mask, padding_side="left")
    # rows shorter than the longest (expanded) prompt are left-padded -- at least the text-only one
    lengths = [int((p == MARKER).sum()) * (TOKENS_PER_IMAGE - 1) + len(p) for p in prompts]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["attention_mask"][:, 0].tolist() == [int(n == max(lengths)) for n in lengths]
    assert lengths[-1] < max(lengths)
    pixels = torch.stack([im for im in images if im is not None])
    with torch.no_grad():
        out = model.generate(**batch, pixel_values=pixels, do_sample=False, max_new_tokens=6)
    for b, single in enumerate(singles):
        assert torch.equal(out[b, batch["input_ids"].shape[1] :], single), f"row {b}"


def test_cached_decoding_equals_full_forward(model, inputs):
    prompt = _native(model, inputs["gen_input_ids"])
    with torch.no_grad():
        seq = model.generate(**prompt, pixel_values=inputs["gen_images"], do_sample=False, max_new_tokens=5)
        full = model(input_ids=seq, pixel_values=inputs["gen_images"])
    start = prompt["input_ids"].shape[1]
    # New tokens are text (modality 0) and each one is the argmax of the uncached forward pass.
    assert int(full.modality_indicators[0, start:].sum()) == 0
    assert torch.equal(full.logits[0, start - 1 : -1].argmax(-1), seq[0, start:])


# --------------------------------------------------------------------------- loading and saving
def test_bin_shards_load_like_safetensors(model, tmp_path, native_batch):
    state = load_file(str(FIXTURE / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    loaded = owl.load_original(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ref = model.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    raw = owl.read_original_state_dict(tmp_path)
    # the rotary_emb.inv_freq buffers (one per decoder layer) are dropped
    dropped = {k for k in state if k.endswith("rotary_emb.inv_freq")}
    assert len(dropped) == RAW["num_hidden_layers"]
    assert set(raw) == set(state) - dropped


def test_original_keys_load_without_renames(model):
    state = load_file(str(FIXTURE / "model.safetensors"))
    ours = model.state_dict()
    expected_keys = {k for k in state if not k.endswith("rotary_emb.inv_freq")}
    assert set(ours) == expected_keys
    assert all(torch.equal(ours[k], state[k]) for k in expected_keys)


def test_save_pretrained_round_trip(model, native_batch, outputs, tmp_path):
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mplug_owl2" and "visual_config" not in saved
    assert {"vision_config", "abstractor_config", "image_token_index"} <= set(saved)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())
    for reloaded in (
        owl.MPLUGOwl2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"),
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"),
    ):
        assert isinstance(reloaded, owl.MPLUGOwl2ForCausalLM)
        with torch.no_grad():
            again = reloaded(**native_batch)
        assert torch.equal(again.logits, outputs.logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        owl.load_original(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        owl.load_original(tmp_path)


def test_position_tables_are_recomputable(model):
    d, queries, grid = ABSTRACTOR["hidden_size"], ABSTRACTOR["num_learnable_queries"], ABSTRACTOR["grid_size"]
    state = load_file(str(FIXTURE / "model.safetensors"))
    for i, layer in enumerate(model.model.visual_abstractor.encoder.layers):
        attn = layer.crossattention.attention
        stored = f"model.visual_abstractor.encoder.layers.{i}.crossattention.attention."
        for ours, name in ((attn.q_pos_embed, "q_pos_embed"), (attn.k_pos_embed, "k_pos_embed")):
            assert torch.equal(ours, state[stored + name]), name  # the original's buffers, loaded
        assert (query_position_table(d, queries) - attn.q_pos_embed).abs().max().item() < 1e-6
        assert (key_position_table(d, grid) - attn.k_pos_embed).abs().max().item() < 1e-6
        assert torch.equal(attn.k_pos_embed[0], torch.zeros(d))  # the CLS row


# --------------------------------------------------------------------------- 7B layout
def test_full_size_matches_manifest():
    manifest = {}
    for line in MANIFEST.read_text().splitlines()[1:]:
        name, shape, _ = line.split("\t")
        if not name.endswith("rotary_emb.inv_freq"):
            manifest[name] = json.loads(shape)
    with torch.device("meta"):
        big = owl.MPLUGOwl2ForCausalLM(owl.MPLUGOwl2Config())
    ours = {k: list(v.shape) for k, v in big.state_dict().items()}
    assert set(ours) == set(manifest)
    assert ours == manifest
    n_params = sum(p.numel() for p in big.parameters())
    assert n_params == MANIFEST_NOTES["total_parameter_elements"]  # "8.20B"
    assert big.config.num_image_tokens == O.native_image_tokens("mplug_owl2")
    assert big.config.vision_config.image_size == O.native_image_size("mplug_owl2")


def test_module_groups_partition_parameters():
    tiny = owl.MPLUGOwl2ForCausalLM(owl.build_tiny_config(vocab_size=40, image_token_index=40))
    seen: dict[str, str] = {}
    for group, names in owl.MODULE_GROUPS.items():
        for name in names:
            for pname, _ in tiny.get_submodule(name).named_parameters(prefix=name):
                assert pname not in seen, f"{pname} in {seen.get(pname)} and {group}"
                seen[pname] = group
    assert set(seen) == {n for n, _ in tiny.named_parameters()}
    assert seen["model.visual_abstractor.visual_fc.weight"] == "projector"


# --------------------------------------------------------------------------- tiny random model
def _tiny_sample(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n, vocab = cfg.num_image_tokens, cfg.vocab_size
    ids = torch.cat(
        [torch.tensor([1, 5]), torch.full((n,), cfg.image_token_index), torch.randint(3, vocab, (6,), generator=gen)]
    )[None]
    labels = ids.clone()
    labels[:, : 2 + n] = -100
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=gen)}


def test_tiny_config_trains_all_parts():
    torch.manual_seed(0)
    cfg = owl.build_tiny_config(vocab_size=50, image_token_index=50, image_size=64)
    assert cfg.num_image_tokens == 17 and cfg.initializer_range == 0.1  # 16 queries + end token
    tiny = owl.MPLUGOwl2ForCausalLM(cfg).train()
    batch = _tiny_sample(cfg)
    out = tiny(**batch)
    assert out.cache is None  # no cache while training
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    for name in (
        "model.vision_model.embeddings.patch_embed.weight",
        "model.visual_abstractor.query_embeds",
        "model.layers.0.self_attn.k_proj.multiway.1.weight",
        "model.layers.1.input_layernorm.multiway.0.weight",
    ):
        assert grads[name].abs().sum() > 0, name
    # Activation checkpointing (every decoder, ViT and abstractor layer) gives the same gradients.
    tiny.zero_grad()
    tiny.activation_checkpointing_enable()
    layers = [m for m in tiny.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert len(layers) >= 6 and all(m.gradient_checkpointing for m in layers)
    tiny(**batch).loss.backward()
    for name, p in tiny.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


def test_tiny_model_learns_quickly():
    torch.manual_seed(0)
    cfg = owl.build_tiny_config(vocab_size=50, image_token_index=50, image_size=64)
    tiny = owl.MPLUGOwl2ForCausalLM(cfg).train()
    batch = _tiny_sample(cfg, seed=1)
    opt = torch.optim.AdamW(tiny.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = tiny(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_placeholder_mismatch_raises():
    cfg = owl.build_tiny_config(vocab_size=50, image_token_index=50)
    tiny = owl.MPLUGOwl2ForCausalLM(cfg).eval()
    ids = torch.cat([torch.tensor([1]), torch.full((cfg.num_image_tokens - 1,), 50), torch.tensor([2])])[None]
    with pytest.raises(ValueError, match="placeholders"):
        tiny(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny(input_ids=ids)


def test_sdpa_matches_eager(native_batch, outputs):
    sdpa = owl.load_original(FIXTURE, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        out = sdpa(**native_batch)
    valid = native_batch["attention_mask"].bool()
    assert (out.logits[valid] - outputs.logits[valid]).abs().max().item() <= TOL


# --------------------------------------------------------------------------- family adapter
TOKENIZER = O.TOKENIZER
_TOK_JSON = O.read_json(TOKENIZER / "tokenizer.json")
TOKENIZER_VOCAB = 1 + max(*_TOK_JSON["model"]["vocab"].values(), *(t["id"] for t in _TOK_JSON["added_tokens"]))
UNK_ID = next(t["id"] for t in _TOK_JSON["added_tokens"] if t["content"] == "<unk>")
BUNDLE_IMAGE = 64  # the in-process bundle's image size (not an oracle)


def _bundle_config():
    """The tiny bundle's config: the LLaMA-2 vocabulary, the image id just past it."""
    return owl.build_tiny_config(
        vocab_size=TOKENIZER_VOCAB, image_token_index=TOKENIZER_VOCAB, image_size=BUNDLE_IMAGE, hidden_size=32
    )


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """A tiny random mPLUG-Owl2 with the real LLaMA-2 tokenizer, saved in icmlab's layout."""
    from transformers import AutoTokenizer

    from icmlab.models import ModelBundle

    torch.manual_seed(0)
    cfg = _bundle_config()
    model = owl.MPLUGOwl2ForCausalLM(cfg)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.unk_token
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": BUNDLE_IMAGE}, crop_size={"height": BUNDLE_IMAGE, "width": BUNDLE_IMAGE}
    )
    bundle = ModelBundle(model, tokenizer, processor, cfg.image_token_index, cfg.num_image_tokens, owl.FAMILY)
    return owl.save_bundle(bundle, tmp_path_factory.mktemp("bundle") / "model")


def _run_config(base: Path, **train):
    from types import SimpleNamespace as NS

    train = {"freeze_vision": True, "tune_projector": True, "bf16": False, "lora": NS(enabled=False), **train}
    return NS(
        model=NS(base=str(base), base_format="hf", revision=None, dtype="auto"),
        train=NS(**train),
        hardware=NS(attn_implementation="eager"),
        data=NS(model_max_length=256),
    )


def test_adapter_round_trip(tiny_bundle_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json", "icmlab_bundle.json"} <= {
        p.name for p in tiny_bundle_dir.iterdir()
    }
    bundle = owl.load_for_inference(tiny_bundle_dir, dtype="fp32", attn_implementation="eager")
    assert bundle.family == "mplug_owl2" and bundle.num_image_tokens == _bundle_config().num_image_tokens
    assert bundle.image_token_id == TOKENIZER_VOCAB == len(bundle.tokenizer)
    assert bundle.tokenizer.padding_side == "left" and bundle.tokenizer.pad_token_id == UNK_ID
    assert bundle.image_processor.crop_size["height"] == BUNDLE_IMAGE
    assert not bundle.model.training


def test_adapter_training_groups(tiny_bundle_dir):
    bundle = owl.load_for_training(_run_config(tiny_bundle_dir))
    assert bundle.tokenizer.padding_side == "right" and bundle.model.config.use_cache is False
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vision_model.") for n in trainable)
    assert "model.visual_abstractor.visual_fc.weight" in trainable and "lm_head.weight" in trainable
    # Q-Instruct's mPLUG-Owl2 recipe trains the vision tower too.
    qi = owl.load_for_training(_run_config(tiny_bundle_dir, freeze_vision=False))
    assert all(p.requires_grad for p in qi.model.parameters())
    with pytest.raises(ValueError, match="base_format"):
        cfg = _run_config(tiny_bundle_dir)
        cfg.model.base_format = "original"
        owl.load_for_training(cfg)


def test_adapter_lora_targets_llm_only(tiny_bundle_dir):
    from types import SimpleNamespace as NS

    bundle = owl.load_for_training(_run_config(tiny_bundle_dir, lora=NS(enabled=True, r=4, alpha=8, dropout=0.0)))
    names = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert any(".k_proj.multiway.1.lora_A" in n for n in names) and any(".mlp.down_proj.lora_A" in n for n in names)
    assert not any("vision_model" in n or "visual_abstractor" in n or "lm_head" in n for n in names)
