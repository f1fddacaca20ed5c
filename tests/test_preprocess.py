"""Tokenization, label masking and collation against the ORIGINAL LLaVA-v1.5 / mPLUG-Owl2 code.

The oracle is tests/fixtures/preprocess/*_v1_preprocess.jsonl (40 cases per family, produced by the
upstream ``LazySupervisedDataset`` + collator); the tokenizer is the real LLaMA-2 one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icmlab.inputs.conversation import (
    TEMPLATES, move_image_token_to_front, render_conversation, render_prompt, turns_from_record,
)
from icmlab.inputs.collate import collate_for_generation, collate_for_training
from icmlab.inputs.encode import (
    IGNORE_INDEX, PieceEncoder, encode_conversation, encode_prompt, segments_for_display, to_original_layout, truncate,
)

FIX = Path(__file__).parent / "fixtures"
TOK_DIR = FIX / "llama2-tokenizer"
FAMILIES = {"llava15": "llava_v1_preprocess.jsonl", "mplug_owl2": "mplug_owl2_v1_preprocess.jsonl"}
NATIVE_N = {"llava15": 576, "mplug_owl2": 65}  # image tokens at full size
IMG_ID = 32000  # any id outside the text ids works as the expanded placeholder


def _cases(family: str) -> list[dict]:
    with open(FIX / "preprocess" / FAMILIES[family], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


CASES = {fam: _cases(fam) for fam in FAMILIES}
ALL = [(fam, c["id"]) for fam in FAMILIES for c in CASES[fam]]
LONG = [(fam, c["id"]) for fam in FAMILIES for c in CASES[fam] if c["collated"] is not None]


def _case(fam: str, cid: str) -> dict:
    return next(c for c in CASES[fam] if c["id"] == cid)


@pytest.fixture(scope="session")
def llama_tok():
    """The LLaMA-2 tokenizer as a plain fast tokenizer (how tests and the benchmark build it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOK_DIR / "tokenizer.json"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
    )


@pytest.fixture(scope="session")
def llama_auto_tok():
    """The same files through AutoTokenizer (transformers 5 ``LlamaTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="session")
def demo_tok():
    """A tiny byte-level BPE like the demo's, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "A chat between a curious user and an artificial intelligence assistant.",
        "USER: What is the quality of this image? ASSISTANT: The image is blurry and dark.",
        "USER: Is it noisy? ASSISTANT: Yes, there is visible noise in the sky.",
    ] * 20
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _encode(case, tok, fam, *, rule=None, n=NATIVE_N, truncation="expanded", max_len="fixture"):
    m = case["model_max_length"] if max_len == "fixture" else max_len
    return encode_conversation(
        case["record"], tok, template="vicuna_v1", dialect=fam, image_token_id=IMG_ID,
        num_image_tokens=n[fam] if isinstance(n, dict) else n, model_max_length=m,
        has_image=case["has_image"], rule=rule, truncation=truncation,
    )


def _expand(ids, labels, n):
    """Expand the original's -200 placeholder into n image ids (labels -100 there)."""
    out_i, out_l = [], []
    for i, lab in zip(ids, labels):
        out_i += [IMG_ID] * n if i == -200 else [i]
        out_l += [IGNORE_INDEX] * n if i == -200 else [lab]
    return out_i, out_l


# --- the oracle: ids and labels of all 80 cases -------------------------------------------------


@pytest.mark.parametrize("fam,cid", ALL)
def test_ids_and_labels_equal_upstream(llama_tok, fam, cid):
    """Default rule of each family: ids == upstream ids, labels == labels_correct (image collapsed)."""
    case = _case(fam, cid)
    # The image path is not truncated by upstream's preprocess (the collator cuts it later).
    enc = _encode(case, llama_tok, fam, max_len=None if case["has_image"] else case["model_max_length"])
    ids, labels = to_original_layout(enc)
    assert ids == case["input_ids"]
    assert labels == case["labels_correct"]
    assert enc.num_supervised == sum(x != IGNORE_INDEX for x in case["labels_correct"])
    assert len(enc.image_spans) == case["input_ids"].count(-200)
    assert all(n == NATIVE_N[fam] for _, n in enc.image_spans)


@pytest.mark.parametrize("fam,cid", ALL)
def test_legacy_true_variant(llama_tok, fam, cid):
    """Rule sp_legacy reproduces the tokenizer-loaded-with-legacy=True oracle of both families."""
    case = _case(fam, cid)
    enc = _encode(case, llama_tok, fam, rule="sp_legacy", n=1,
                  max_len=None if case["has_image"] else case["model_max_length"])
    ids, labels = to_original_layout(enc)
    assert ids == case["variant_legacy_true"]["input_ids"]
    assert labels == case["variant_legacy_true"]["labels_correct"]


def test_auto_tokenizer_gives_same_ids(llama_tok, llama_auto_tok):
    """transformers 5's LlamaTokenizer (AutoTokenizer) and the plain fast tokenizer agree on every case."""
    for fam in FAMILIES:
        for case in CASES[fam]:
            a = _encode(case, llama_tok, fam)
            b = _encode(case, llama_auto_tok, fam)
            assert (a.input_ids, a.labels) == (b.input_ids, b.labels), case["id"]


def test_family_difference_is_only_the_tokenizer_rule(llama_tok):
    """mPLUG records under LLaVA's rule give LLaVA's ids, and vice versa: the families differ by
    transformers version only (``</s>USER``), and the rules are not interchangeable."""
    differs = 0
    for lc, mc in zip(CASES["llava15"], CASES["mplug_owl2"]):
        m_as_l = _encode(mc, llama_tok, "mplug_owl2", rule="sp_nonlegacy", n=1, max_len=None)
        l_as_m = _encode(lc, llama_tok, "llava15", rule="sp_nonlegacy_431", n=1, max_len=None)
        assert to_original_layout(m_as_l)[0][: len(lc["input_ids"])] == lc["input_ids"]
        assert to_original_layout(l_as_m)[0][: len(mc["input_ids"])] == mc["input_ids"]
        differs += lc["input_ids"] != mc["input_ids"]
    assert differs >= 10  # the multi-turn cases really distinguish the two rules


@pytest.mark.parametrize("fam,cid", ALL)
def test_rendered_prompt_equals_upstream(fam, cid):
    case = _case(fam, cid)
    token = "<image>" if fam == "llava15" else "<|image|>"
    turns = turns_from_record(case["record"]["conversations"], image_token=token if case["has_image"] else None)
    assert render_conversation(TEMPLATES["vicuna_v1"], turns) == case["prompt"]
    if case["sources_after_preprocess_multimodal"] is not None:
        moved = [move_image_token_to_front(m["value"], token) for m in case["record"]["conversations"]]
        assert moved == [m["value"] for m in case["sources_after_preprocess_multimodal"]]


# --- over-long samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("fam,cid", LONG)
def test_overlong_equals_collated_then_spliced(llama_tok, fam, cid):
    """LLaVA: the collator cuts the -200 form at M, the model splices N features and cuts at M again.
    Our expanded sequence cut at M must be that sequence."""
    case = _case(fam, cid)
    m, n = case["model_max_length"], NATIVE_N[fam]
    col = case["collated"]
    row = lambda k: col[k][0] if isinstance(col[k][0], list) else col[k]  # noqa: E731
    exp_ids, exp_labels = _expand(row("input_ids"), row("labels"), n)
    enc = _encode(case, llama_tok, fam, truncation="expanded")
    assert enc.input_ids == exp_ids[:m] and enc.labels == exp_labels[:m]
    assert enc.truncated and enc.num_tokens == m
    # At M=256 the 576 LLaVA features themselves are cut (upstream trains such a sample on nothing).
    start = row("input_ids").index(-200)
    assert enc.image_truncated == (start + n > m)
    assert enc.num_supervised == sum(x != IGNORE_INDEX for x in exp_labels[:m])
    batch = collate_for_training([enc], pad_token_id=0)
    assert batch["attention_mask"].sum().item() == m == sum(row("attention_mask"))
    # mPLUG-Owl2 upstream does not cut after splicing: 'collapsed' keeps M - 1 + N positions.
    full = _encode(case, llama_tok, fam, truncation="collapsed")
    assert full.input_ids == exp_ids and full.labels == exp_labels and full.num_tokens == m - 1 + n


def test_text_only_overlong_is_cut_at_m(llama_tok):
    for fam in FAMILIES:
        for case in CASES[fam]:
            if not case["has_image"] and case["kind"].startswith("long"):
                enc = _encode(case, llama_tok, fam)
                assert enc.truncated and enc.num_tokens == case["model_max_length"] == len(case["input_ids"])
                assert enc.num_tokens_untruncated > enc.num_tokens


def test_truncate_flags_a_cut_image():
    ids = [1, 2] + [9] * 5 + [3, 4]
    labels = [IGNORE_INDEX] * 7 + [3, 4]
    out_ids, _, spans, image_cut = truncate(ids, labels, [(2, 5)], 4, "expanded")
    assert out_ids == [1, 2, 9, 9] and spans == [(2, 2)] and image_cut
    out_ids, _, spans, image_cut = truncate(ids, labels, [(2, 5)], 4, "collapsed")
    assert out_ids == ids[:8] and spans == [(2, 5)] and not image_cut
    with pytest.raises(ValueError, match="truncation mode"):
        truncate(ids, labels, [], 4, "middle")  # type: ignore[arg-type]


# --- inference prompts ------------------------------------------------------------------------


def test_inference_prompt_strings():
    assert render_prompt(TEMPLATES["llava_hf"], "Rate it.", image_token="<image>") == "USER: <image>\nRate it. ASSISTANT:"
    assert render_prompt(TEMPLATES["mplug_owl2"], "Rate it.", image_token="<|image|>") == (
        "USER: <|image|>\nRate it. ASSISTANT:")
    p = render_prompt(TEMPLATES["llava_v1"], "And now?", history=[("Q1 <image>", "A1")], image_token="<image>")
    assert p.startswith("A chat between a curious human")
    assert p.endswith("USER: <image>\nQ1 ASSISTANT: A1</s>USER: And now? ASSISTANT:")


def test_prompt_ids_are_the_training_prefix(llama_tok):
    """Inference ids (vicuna_v1) equal the training ids up to the first trained token."""
    case = _case("llava15", "icm-0001")
    train = _encode(case, llama_tok, "llava15")
    question = case["record"]["conversations"][0]["value"]
    prompt = encode_prompt(question, llama_tok, template="vicuna_v1", dialect="llava15",
                           image_token_id=IMG_ID, num_image_tokens=576)
    first_trained = next(i for i, x in enumerate(train.labels) if x != IGNORE_INDEX)
    assert prompt.input_ids == train.input_ids[:first_trained]
    assert prompt.num_supervised == 0 and prompt.image_spans == train.image_spans


# --- a non-SentencePiece tokenizer (the demo's byte-level BPE) --------------------------------------


def test_byte_level_round_trip_and_answer_labels(demo_tok):
    record = {"id": "d1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "What is the quality of this image?\n<image>"},
        {"from": "gpt", "value": "The image is blurry and dark."},
        {"from": "human", "value": "Is it noisy?"},
        {"from": "gpt", "value": "Yes, there is visible noise."},
    ]}
    img_id = demo_tok.convert_tokens_to_ids("<image>")
    enc = encode_conversation(record, demo_tok, dialect="llava15", image_token_id=img_id, num_image_tokens=4,
                              model_max_length=None)
    prompt = render_conversation(TEMPLATES["vicuna_v1"], turns_from_record(record["conversations"], image_token="<image>"))
    decoded = demo_tok.decode(enc.input_ids, skip_special_tokens=False)
    assert decoded == "<s>" + prompt.replace("<image>", "<image>" * 4)
    trained_runs, cur = [], []
    for tid, lab in zip(enc.input_ids + [0], enc.labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            trained_runs.append(demo_tok.decode(cur, skip_special_tokens=False))
            cur = []
    assert trained_runs == [" The image is blurry and dark.</s>", " Yes, there is visible noise.</s>"]
    # Text-only: the by-construction ids equal a whole-string tokenization of the prompt.
    convs = [dict(m, value=m["value"].replace("\n<image>", "")) for m in record["conversations"]]
    enc2 = encode_conversation({"id": "d2", "conversations": convs}, demo_tok, image_token_id=img_id,
                               num_image_tokens=4, model_max_length=None)
    prompt2 = render_conversation(TEMPLATES["vicuna_v1"], turns_from_record(convs))
    assert enc2.input_ids == demo_tok(prompt2)["input_ids"]
    # A literal image token in a text-only record stays text.
    enc3 = encode_conversation({k: v for k, v in record.items() if k != "image"}, demo_tok,
                               image_token_id=img_id, num_image_tokens=4, model_max_length=None)
    assert img_id not in enc3.input_ids and not enc3.image_spans


def test_sentencepiece_rule_rejected_for_byte_level(demo_tok):
    with pytest.raises(ValueError, match="SentencePiece"):
        PieceEncoder(demo_tok, "sp_nonlegacy")
    assert PieceEncoder(demo_tok).rule == "plain"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,match", [
    ({"id": "r1"}, "r1: 'conversations'"),
    ({"id": "r2", "conversations": [{"from": "bot", "value": "x"}]}, "r2: conversations\\[0\\] has from='bot'"),
    ({"id": "r3", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "r3: turns must alternate"),
    ({"id": "r4", "conversations": [{"from": "human", "value": 3}]}, "r4: conversations\\[0\\].value"),
])
def test_bad_records_raise(llama_tok, record, match):
    with pytest.raises(ValueError, match=match):
        encode_conversation(record, llama_tok, image_token_id=IMG_ID, num_image_tokens=1, model_max_length=None)


def test_bad_options_raise(llama_tok):
    rec = _case("llava15", "icm-0001")["record"]
    for kwargs, match in [({"template": "nope"}, "chat template"), ({"dialect": "nope"}, "dialect"),
                          ({"rule": "nope"}, "tokenization rule")]:
        with pytest.raises(ValueError, match=match):
            encode_conversation(rec, llama_tok, image_token_id=IMG_ID, num_image_tokens=1, model_max_length=None, **kwargs)


# --- collation and display -------------------------------------------------------------------------


def test_collators(llama_tok):
    a = _encode(_case("llava15", "icm-0001"), llama_tok, "llava15", n=3)
    b = _encode(_case("llava15", "sg-0001"), llama_tok, "llava15", n=3)
    batch = collate_for_training([a, b], pad_token_id=0)
    length = max(a.num_tokens, b.num_tokens)
    assert batch["input_ids"].shape == (2, length)
    assert batch["input_ids"][1, b.num_tokens:].eq(0).all()
    assert batch["labels"][1, b.num_tokens:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [a.num_tokens, b.num_tokens]
    assert batch["labels"][0].tolist() == a.labels + [IGNORE_INDEX] * (length - a.num_tokens)
    gen = collate_for_generation([[1, 5, 6], [1, 7]], pad_token_id=0)
    assert gen["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert gen["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    with pytest.raises(ValueError):
        collate_for_training([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_segments_for_display(llama_tok):
    case = _case("llava15", "inst-0001")
    enc = _encode(case, llama_tok, "llava15")
    segs = segments_for_display(enc, llama_tok)
    kinds = [k for _, k in segs]
    assert kinds.count("image") == 1 and ("<image ×576>", "image") in segs
    answers = [m["value"] for m in case["record"]["conversations"] if m["from"] == "gpt"]
    assert [t for t, k in segs if k == "trained"] == [" " + a + "</s>" for a in answers]
    text = "".join(t for t, k in segs if k != "image")
    assert text == llama_tok.decode([i for i in enc.input_ids if i != IMG_ID], skip_special_tokens=False)
