"""The evaluation protocols (icmlab.evaluate.protocol): upstream's exact prompt strings, pixel path and
budgets per family, hand-derived from Q-Instruct's eval scripts (tests/fixtures/eval/protocol_cases.json),
and the demo protocol encoding exactly as before (so the demo's numbers cannot move)."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import FIXTURES, TOKENIZER
from PIL import Image

from icmlab.config import load_run_config
from icmlab.evaluate.protocol import prepare_image, prompt_encoder, prompt_text, resolve_protocol
from icmlab.evaluate.scoring import qbench_prompt
from icmlab.inputs.encode import encode_prompt
from icmlab.inputs.images import CLIP_MEAN, CLIP_STD, build_image_processor
from icmlab.io import read_json

CASES = read_json(FIXTURES / "eval" / "protocol_cases.json")
RECIPES = {
    "llava15": "parameters/llava15-7b__q-instruct__after.yaml",
    "mplug_owl2": "parameters/mplug-owl2-7b__q-instruct__after.yaml",
}


@pytest.mark.parametrize("family", ["llava15", "mplug_owl2"])
def test_upstream_protocol_is_the_default_of_real_recipes_and_builds_the_scripts_prompt(family):
    cfg = load_run_config(RECIPES[family])
    proto = resolve_protocol(cfg)
    want = CASES["upstream"][family]
    assert proto.name == "upstream" and not proto.overrides
    assert proto.max_new_tokens == want["max_new_tokens"] and proto.preprocess == want["preprocess"]
    assert prompt_text(proto, qbench_prompt(CASES["item"], proto.qbench_style)) == want["prompt"]
    assert "upstream" in proto.describe() and str(want["max_new_tokens"]) in proto.describe()


def test_explicit_settings_override_upstream_and_are_named():
    cfg = load_run_config(RECIPES["llava15"], {"eval.max_new_tokens": 8, "eval.protocol": "upstream"})
    proto = resolve_protocol(cfg)
    assert proto.max_new_tokens == 8 and proto.overrides == ("max_new_tokens=8",)
    assert "overridden: max_new_tokens=8" in proto.describe()


def test_demo_protocol_encodes_as_the_demo_always_did():
    """The demo resolves to its own protocol, and its ids equal encode_prompt's (the pre-protocol path)."""
    from transformers import AutoTokenizer

    cfg = load_run_config("parameters/demo.yaml")
    proto = resolve_protocol(cfg)
    assert proto.name == "demo" and proto.preprocess == "pad" and proto.max_new_tokens == cfg.eval.max_new_tokens
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    question = qbench_prompt(CASES["item"], proto.qbench_style)
    ours = prompt_encoder(proto, tok, image_token_id=32000, num_image_tokens=5)(question)
    before = encode_prompt(
        question, tok, template=cfg.eval.template, dialect="llava15", image_token_id=32000, num_image_tokens=5
    ).input_ids
    assert ours == before


@pytest.mark.parametrize("family", ["llava15", "mplug_owl2"])
def test_upstream_ids_spell_the_prompt_with_the_image_run_in_place(family):
    from transformers import AutoTokenizer

    proto = resolve_protocol(load_run_config(RECIPES[family]))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    question = qbench_prompt(CASES["item"], proto.qbench_style)
    ids = prompt_encoder(proto, tok, image_token_id=32000, num_image_tokens=7)(question)
    assert ids[0] == tok.bos_token_id and ids.count(32000) == 7
    start = ids.index(32000)
    assert ids[start : start + 7] == [32000] * 7
    before, after = CASES["upstream"][family]["prompt"].split("<image>" if family == "llava15" else "<|image|>")
    assert tok.decode(ids[1:start]).strip() == before.strip()
    assert tok.decode(ids[start + 7 :]).strip() == after.strip()


def _band_image(p: dict) -> Image.Image:
    arr = np.zeros((p["height"], p["width"], 3), np.uint8)
    w = p["width"] // len(p["bands"])
    for i, colour in enumerate(p["bands"]):
        arr[:, i * w : (i + 1) * w] = colour
    return Image.fromarray(arr)


def _visible_bands(pixels, bands) -> list[int]:
    """Which bands' colours appear along the middle row of a normalised [3, S, S] tensor."""
    mean, std = np.array(CLIP_MEAN)[:, None], np.array(CLIP_STD)[:, None]
    row = (pixels[:, pixels.shape[1] // 2, :].numpy() * std + mean) * 255  # [3, S]
    seen = []
    for x in range(row.shape[1]):
        dists = [np.abs(row[:, x] - np.array(c)).max() for c in bands]
        k = int(np.argmin(dists))
        if dists[k] < 40 and k not in seen:
            seen.append(k)
    return seen


@pytest.mark.parametrize(
    ("params", "key"), [(RECIPES["llava15"], "visible_upstream"), ("parameters/demo.yaml", "visible_pad")]
)
def test_pixel_path_crops_upstream_and_pads_in_the_demo(params, key):
    p = CASES["pixels"]
    proto = resolve_protocol(load_run_config(params))
    processor = build_image_processor(p["side"])
    prepared = prepare_image(proto, _band_image(p), processor)
    pixels = processor(images=prepared, return_tensors="pt")["pixel_values"][0]
    assert tuple(pixels.shape) == (3, p["side"], p["side"])
    assert _visible_bands(pixels, p["bands"]) == p[key]
