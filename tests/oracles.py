"""Readers for the upstream oracles in ``tests/fixtures`` (formats: ``/work/shared/fixtures/README.md``).

Every expected value the parity tests compare against is read here, from the fixture files
themselves (the case's own fields, ``README.json``, ``config.json``, ``hf/conversion.json``,
``index.json``, the 7B manifests' ``.notes.json``), never copied into the tests. Any oracle set
produced the same way -- other cases, other ids, other order, another tiny model -- drops in.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
PREPROCESS = FIXTURES / "preprocess"
TINY_LLAVA = FIXTURES / "tiny_llava_v15"
TINY_OWL2 = FIXTURES / "tiny_mplug_owl2"
IMAGE_PAD = FIXTURES / "image_pad"
MANIFESTS = FIXTURES / "manifests"
TOKENIZER = FIXTURES / "llama2-tokenizer"

FAMILIES = ("llava15", "mplug_owl2")
PREPROCESS_FILES = {"llava15": "llava_v1_preprocess.jsonl", "mplug_owl2": "mplug_owl2_v1_preprocess.jsonl"}
TINY_DIRS = {"llava15": TINY_LLAVA, "mplug_owl2": TINY_OWL2}
# The full-size original checkpoints' notes (config used to build the manifests).
MANIFEST_NOTES = {"llava15": "llava_v15_7b_original.notes.json", "mplug_owl2": "mplug_owl2_llama2_7b.notes.json"}


@cache
def _json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json(path: Path) -> Any:
    """A fresh copy of a fixture JSON file (callers may mutate it)."""
    return json.loads(json.dumps(_json(Path(path))))


# ------------------------------------------------------------------ tiny models: README.json / config.json


def readme(fixture_dir: Path) -> dict:
    return _json(Path(fixture_dir) / "README.json")


def conventions(fixture_dir: Path) -> dict:
    return readme(fixture_dir)["conventions"]


def tiny_config(fixture_dir: Path) -> dict:
    return _json(Path(fixture_dir) / "config.json")


def _one(values: dict[str, Any], what: str) -> Any:
    distinct = set(values.values())
    assert len(distinct) == 1, f"the oracles disagree on {what}: {values}"
    return distinct.pop()


def image_token_index() -> int:
    """The original code's image placeholder in ``input_ids`` (``IMAGE_TOKEN_INDEX``), as recorded."""
    return _one({f: conventions(d)["image_token_index"] for f, d in TINY_DIRS.items()}, "image_token_index")


def ignore_index() -> int:
    return _one({f: conventions(d)["ignore_index"] for f, d in TINY_DIRS.items()}, "ignore_index")


def tokens_per_image(fixture_dir: Path) -> int:
    return conventions(fixture_dir)["tokens_per_image"]


def text_only_rows(fixture_dir: Path) -> list[int]:
    return list(readme(fixture_dir)["checks"]["text_only_rows"])


def llava_conversion() -> dict:
    """``tiny_llava_v15/hf/conversion.json``."""
    return _json(TINY_LLAVA / "hf" / "conversion.json")


def llava_conversion_results(attn: str = "eager") -> dict:
    """The native-model results recorded for the stack that produced the stored ``hf/`` files."""
    conv = llava_conversion()
    run = conv["results_by_transformers_version"][conv["transformers"]]
    assert run["legacy_single_image_token_inputs"] == conv["legacy_single_image_token_inputs"]
    return run["results"][attn]


# CLIP feature selection: LLaVA's mm_vision_select_feature -> transformers' vision_feature_select_strategy.
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}


def llava_tower_prefix() -> str:
    """The original checkpoint's CLIP prefix (``model.vision_tower.vision_tower.vision_model.``)."""
    prefixes = set()
    for original, hub in llava_conversion()["rename_table"].items():
        if hub.startswith("vision_tower.vision_model."):
            tail = hub.removeprefix("vision_tower.vision_model.")
            assert original.endswith(tail), (original, hub)
            prefixes.add(original[: len(original) - len(tail)])
    assert len(prefixes) == 1, prefixes
    return prefixes.pop()


# ------------------------------------------------------------------ full-size manifests


def manifest_notes(name: str) -> dict:
    return _json(MANIFESTS / name)


def native_image_tokens(family: str) -> int:
    """Image tokens per image of the full-size model, from the config its manifest was built with."""
    notes = manifest_notes(MANIFEST_NOTES[family])
    if family == "llava15":
        vision, config = notes["vision_config"], notes["config"]
        per_side = vision["image_size"] // vision["patch_size"]
        assert config["mm_vision_select_feature"] == "patch"  # CLS dropped
        return per_side * per_side
    # mPLUG-Owl2: the abstractor's learnable queries plus the appended vit_eos token
    return notes["visual_abstractor_config"]["num_learnable_queries"] + 1


def native_image_size(family: str) -> int:
    notes = manifest_notes(MANIFEST_NOTES[family])
    return (notes["vision_config"] if family == "llava15" else notes["visual_model_config"])["image_size"]


# ------------------------------------------------------------------ preprocessing oracle


@cache
def _cases(family: str) -> tuple[dict, ...]:
    with open(PREPROCESS / PREPROCESS_FILES[family], encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def preprocess_cases(family: str) -> list[dict]:
    return list(_cases(family))


def case_label(family: str, case: dict) -> str:
    return f"{family}:{case['id']}"


# upstream's DEFAULT_IMAGE_TOKEN per family (the records spell it so; the README: "the same cases
# with <|image|>"); the cases do not record it as a field.
IMAGE_TOKEN_TEXT = {"llava15": "<image>", "mplug_owl2": "<|image|>"}


def image_token_text(family: str) -> str:
    return IMAGE_TOKEN_TEXT[family]


def vicuna_v1_system() -> str:
    """The vicuna_v1 system prompt, as every rendered upstream prompt starts with it."""
    heads = {c["prompt"].split(" USER: ", 1)[0] for fam in FAMILIES for c in _cases(fam) if " USER: " in c["prompt"]}
    assert len(heads) == 1, heads
    return heads.pop()


def turns(case: dict) -> list[dict]:
    return case["record"]["conversations"]


def answers(case: dict) -> list[str]:
    return [m["value"] for m in turns(case) if m["from"] == "gpt"]


def num_placeholders(case: dict) -> int:
    return case["input_ids"].count(image_token_index())


def trained_count(labels: list[int]) -> int:
    return sum(x != ignore_index() for x in labels)


def is_plain_dialogue(case: dict) -> bool:
    """human/gpt alternation starting with human and ending with a non-empty, unpadded answer each."""
    ts = turns(case)
    if not ts or len(ts) % 2:
        return False
    if any(m["from"] != ("human" if i % 2 == 0 else "gpt") for i, m in enumerate(ts)):
        return False
    return all(a and a == a.strip() for a in answers(case))


def fits(case: dict) -> bool:
    """The sample fits in model_max_length (upstream neither truncated nor collated it)."""
    return case["collated"] is None and len(case["input_ids"]) < case["model_max_length"]


def upstream_truncated_text(case: dict) -> bool:
    """Text-only case cut by upstream's tokenizer (``truncation=True, max_length=M``)."""
    return not case["has_image"] and len(case["input_ids"]) == case["model_max_length"]


def record_key(family: str, case: dict) -> str:
    """The case's input, independent of its id and of the family's image-token spelling."""
    rec = {k: v for k, v in case["record"].items() if k != "id"}
    text = json.dumps([rec, case["has_image"], case["model_max_length"]], sort_keys=True, ensure_ascii=False)
    return text.replace(json.dumps(image_token_text(family))[1:-1], "\0IMAGE\0")


# ------------------------------------------------------------------ image_pad oracle


def image_index() -> dict:
    return _json(IMAGE_PAD / "index.json")


def image_resolutions() -> dict[str, int]:
    """Processor name (``llava_336`` ...) -> crop size, from index.json."""
    out = {}
    for name, proc in image_index()["processors"].items():
        crop = proc["effective"]["crop_size"]
        assert crop["height"] == crop["width"] == proc["effective"]["size"]["shortest_edge"], name
        out[name] = crop["height"]
    return out
