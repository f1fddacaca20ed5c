"""Tokenization, label masking and collation against the ORIGINAL LLaVA-v1.5 / mPLUG-Owl2 code.

The oracle is tests/fixtures/preprocess/*_v1_preprocess.jsonl (one case per line, produced by the
upstream ``LazySupervisedDataset`` + collator); the tokenizer is the real LLaMA-2 one. Every expected
value, and which cases a test uses, is read from the fixture files (see ``oracles.py``): any oracle
set of the same format -- other cases, ids, order or count -- drops in.
"""

from __future__ import annotations

import oracles as O
import pytest

from icmlab.inputs.collate import collate_for_generation, collate_for_training
from icmlab.inputs.conversation import (
    TEMPLATES,
    move_image_token_to_front,
    render_conversation,
    render_prompt,
    turns_from_record,
)
from icmlab.inputs.encode import (
    IGNORE_INDEX,
    PieceEncoder,
    encode_conversation,
    encode_prompt,
    segments_for_display,
    to_original_layout,
    truncate,
)

TOK_DIR = O.TOKENIZER
FAMILIES = O.FAMILIES
# image tokens per image at full size, from the configs the 7B manifests were built with (576 / 65)
NATIVE_N = {fam: O.native_image_tokens(fam) for fam in FAMILIES}
IMAGE_INDEX = O.image_token_index()  # the original's one-per-image placeholder in input_ids (-200)
# any id outside the text ids works as the expanded placeholder: the first one past the vocabulary
_TOK_JSON = O.read_json(TOK_DIR / "tokenizer.json")
IMG_ID = 1 + max(*_TOK_JSON["model"]["vocab"].values(), *(t["id"] for t in _TOK_JSON["added_tokens"]))
CASES = {fam: O.preprocess_cases(fam) for fam in FAMILIES}


def _params(keep=lambda case: True) -> list:
    """One pytest param (family, case) per selected case, named after the case's own id."""
    return [
        pytest.param(fam, case, id=O.case_label(fam, case)) for fam in FAMILIES for case in CASES[fam] if keep(case)
    ]


def _single_image(case: dict) -> bool:
    return case["has_image"] and O.num_placeholders(case) == 1


def _image_question(fam: str, case: dict) -> bool:
    """The first turn is the question and carries the family's image token exactly once."""
    ts = O.turns(case)
    return bool(ts) and ts[0]["from"] == "human" and ts[0]["value"].count(O.image_token_text(fam)) == 1


ALL = _params()
LONG = _params(lambda c: c["collated"] is not None)
# a plain single-image dialogue that fits: the inference prompt is its prefix, its display is clean
PROMPT_CASES = [
    p
    for p in _params(lambda c: _single_image(c) and O.fits(c) and O.is_plain_dialogue(c))
    if _image_question(*p.values)
]
DISPLAY_CASES = _params(
    lambda c: (
        _single_image(c) and O.fits(c) and O.is_plain_dialogue(c) and not c.get("labels_correct_straddling_tokens")
    )
)


@pytest.fixture(scope="session")
def llama_tok():
    """The LLaMA-2 tokenizer as a plain fast tokenizer (how tests and the benchmark build it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOK_DIR / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
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
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _encode(case, tok, fam, *, rule=None, n=NATIVE_N, truncation="expanded", max_len="fixture"):
    m = case["model_max_length"] if max_len == "fixture" else max_len
    return encode_conversation(
        case["record"],
        tok,
        template="vicuna_v1",
        dialect=fam,
        image_token_id=IMG_ID,
        num_image_tokens=n[fam] if isinstance(n, dict) else n,
        model_max_length=m,
        has_image=case["has_image"],
        rule=rule,
        truncation=truncation,
    )


def _expand(ids, labels, n):
    """Expand the original's placeholder into n image ids (labels ignored there)."""
    out_i, out_l = [], []
    for i, lab in zip(ids, labels):
        out_i += [IMG_ID] * n if i == IMAGE_INDEX else [i]
        out_l += [IGNORE_INDEX] * n if i == IMAGE_INDEX else [lab]
    return out_i, out_l


def test_oracle_covers_every_selection():
    """The selections below are made from the cases' own fields; each must find cases."""
    for name, sel in {"ALL": ALL, "LONG": LONG, "PROMPT_CASES": PROMPT_CASES, "DISPLAY_CASES": DISPLAY_CASES}.items():
        assert sel, f"no oracle case for {name}"
    assert all(c["collated"] is None or c["has_image"] for fam in FAMILIES for c in CASES[fam])


def test_native_n_is_for_the_oracles_image_size():
    """NATIVE_N comes from the full-size configs; those take the image size the oracle's cases used."""
    for fam in FAMILIES:
        shapes = {tuple(c["image_tensor_shape"]) for c in CASES[fam] if c["has_image"]}
        size = O.native_image_size(fam)
        assert shapes == {(3, size, size)}, (fam, shapes)


def test_ignore_index_is_upstreams():
    assert IGNORE_INDEX == O.ignore_index()
    assert IMG_ID not in {i for fam in FAMILIES for c in CASES[fam] for i in c["input_ids"]}


# --- the oracle: ids and labels of every case ---------------------------------------------------


@pytest.mark.parametrize("fam,case", ALL)
def test_ids_and_labels_equal_upstream(llama_tok, fam, case):
    """Default rule of each family: ids == upstream ids, labels == labels_correct (image collapsed)."""
    # The image path is not truncated by upstream's preprocess (the collator cuts it later).
    enc = _encode(case, llama_tok, fam, max_len=None if case["has_image"] else case["model_max_length"])
    ids, labels = to_original_layout(enc, IMAGE_INDEX)
    assert ids == case["input_ids"]
    assert labels == case["labels_correct"]
    assert enc.num_supervised == O.trained_count(case["labels_correct"])
    assert len(enc.image_spans) == O.num_placeholders(case)
    assert all(n == NATIVE_N[fam] for _, n in enc.image_spans)


@pytest.mark.parametrize("fam,case", ALL)
def test_legacy_true_variant(llama_tok, fam, case):
    """Rule sp_legacy reproduces the tokenizer-loaded-with-legacy=True oracle of both families."""
    enc = _encode(
        case, llama_tok, fam, rule="sp_legacy", n=1, max_len=None if case["has_image"] else case["model_max_length"]
    )
    ids, labels = to_original_layout(enc, IMAGE_INDEX)
    assert ids == case["variant_legacy_true"]["input_ids"]
    assert labels == case["variant_legacy_true"]["labels_correct"]


def test_auto_tokenizer_gives_same_ids(llama_tok, llama_auto_tok):
    """transformers 5's LlamaTokenizer (AutoTokenizer) and the plain fast tokenizer agree on every case."""
    for fam in FAMILIES:
        for case in CASES[fam]:
            a = _encode(case, llama_tok, fam)
            b = _encode(case, llama_auto_tok, fam)
            assert (a.input_ids, a.labels) == (b.input_ids, b.labels), O.case_label(fam, case)


def _family_pairs() -> list[tuple[dict, dict]]:
    """(LLaVA case, mPLUG-Owl2 case) with the same input, matched by content (not by id or line)."""
    owl2 = {O.record_key("mplug_owl2", c): c for c in CASES["mplug_owl2"]}
    return [(lc, owl2[k]) for lc in CASES["llava15"] if (k := O.record_key("llava15", lc)) in owl2]


def test_family_difference_is_only_the_tokenizer_rule(llama_tok):
    """mPLUG records under LLaVA's rule give LLaVA's ids, and vice versa: the families differ by
    transformers version only (``</s>USER``), and the rules are not interchangeable."""
    pairs = _family_pairs()
    assert pairs, "the two preprocess oracles share no case"
    differs = 0
    for lc, mc in pairs:
        m_as_l = _encode(mc, llama_tok, "mplug_owl2", rule="sp_nonlegacy", n=1, max_len=None)
        l_as_m = _encode(lc, llama_tok, "llava15", rule="sp_nonlegacy_431", n=1, max_len=None)
        assert to_original_layout(m_as_l, IMAGE_INDEX)[0][: len(lc["input_ids"])] == lc["input_ids"], lc["id"]
        assert to_original_layout(l_as_m, IMAGE_INDEX)[0][: len(mc["input_ids"])] == mc["input_ids"], mc["id"]
        differs += lc["input_ids"] != mc["input_ids"]
    assert differs > 0  # the multi-round cases really distinguish the two rules


@pytest.mark.parametrize("fam,case", ALL)
def test_rendered_prompt_equals_upstream(fam, case):
    token = O.image_token_text(fam)
    turns = turns_from_record(case["record"]["conversations"], image_token=token if case["has_image"] else None)
    assert render_conversation(TEMPLATES["vicuna_v1"], turns) == case["prompt"]
    if case["sources_after_preprocess_multimodal"] is not None:
        moved = [move_image_token_to_front(m["value"], token) for m in case["record"]["conversations"]]
        assert moved == [m["value"] for m in case["sources_after_preprocess_multimodal"]]


# --- over-long samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("fam,case", LONG)
def test_overlong_equals_collated_then_spliced(llama_tok, fam, case):
    """LLaVA: the collator cuts the -200 form at M, the model splices N features and cuts at M again.
    Our expanded sequence cut at M must be that sequence."""
    m, n = case["model_max_length"], NATIVE_N[fam]
    col = case["collated"]
    row = lambda k: col[k][0] if isinstance(col[k][0], list) else col[k]  # noqa: E731
    exp_ids, exp_labels = _expand(row("input_ids"), row("labels"), n)
    enc = _encode(case, llama_tok, fam, truncation="expanded")
    assert enc.input_ids == exp_ids[:m] and enc.labels == exp_labels[:m]
    assert enc.truncated and enc.num_tokens == m
    # At small M the LLaVA features themselves are cut (upstream trains such a sample on nothing).
    start = row("input_ids").index(IMAGE_INDEX)
    assert enc.image_truncated == (start + n > m)
    assert enc.num_supervised == sum(x != IGNORE_INDEX for x in exp_labels[:m])
    batch = collate_for_training([enc], pad_token_id=0)
    assert batch["attention_mask"].sum().item() == m == sum(row("attention_mask"))
    # mPLUG-Owl2 upstream does not cut after splicing: 'collapsed' keeps M - k + k*N positions (k images).
    full = _encode(case, llama_tok, fam, truncation="collapsed")
    k = row("input_ids").count(IMAGE_INDEX)
    assert full.input_ids == exp_ids and full.labels == exp_labels and full.num_tokens == m - k + k * n


def test_text_only_overlong_is_cut_at_m(llama_tok):
    """Upstream's text path is cut at M by the tokenizer; ours too, and only those cases are cut."""
    cut = 0
    for fam in FAMILIES:
        for case in CASES[fam]:
            if case["has_image"]:
                continue
            enc = _encode(case, llama_tok, fam)
            assert enc.num_tokens == len(case["input_ids"]), O.case_label(fam, case)
            if O.upstream_truncated_text(case):
                cut += 1
                assert enc.truncated and enc.num_tokens == case["model_max_length"]
                assert enc.num_tokens_untruncated > enc.num_tokens
            else:
                assert not enc.truncated and enc.num_tokens_untruncated == enc.num_tokens
    assert cut, "the oracle has no over-long text-only case"


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
    assert (
        render_prompt(TEMPLATES["llava_hf"], "Rate it.", image_token="<image>") == "USER: <image>\nRate it. ASSISTANT:"
    )
    assert render_prompt(TEMPLATES["mplug_owl2"], "Rate it.", image_token="<|image|>") == (
        "USER: <|image|>\nRate it. ASSISTANT:"
    )
    p = render_prompt(TEMPLATES["llava_v1"], "And now?", history=[("Q1 <image>", "A1")], image_token="<image>")
    assert p.startswith("A chat between a curious human")
    assert p.endswith("USER: <image>\nQ1 ASSISTANT: A1</s>USER: And now? ASSISTANT:")


@pytest.mark.parametrize("fam,case", PROMPT_CASES)
def test_prompt_ids_are_the_training_prefix(llama_tok, fam, case):
    """Inference ids (vicuna_v1) equal the training ids up to the first trained token."""
    train = _encode(case, llama_tok, fam)
    question = O.turns(case)[0]["value"]
    prompt = encode_prompt(
        question, llama_tok, template="vicuna_v1", dialect=fam, image_token_id=IMG_ID, num_image_tokens=NATIVE_N[fam]
    )
    first_trained = next(i for i, x in enumerate(train.labels) if x != IGNORE_INDEX)
    assert prompt.input_ids == train.input_ids[:first_trained]
    assert prompt.num_supervised == 0 and prompt.image_spans == train.image_spans


# --- a non-SentencePiece tokenizer (the demo's byte-level BPE) --------------------------------------


def test_byte_level_round_trip_and_answer_labels(demo_tok):
    record = {
        "id": "d1",
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "What is the quality of this image?\n<image>"},
            {"from": "gpt", "value": "The image is blurry and dark."},
            {"from": "human", "value": "Is it noisy?"},
            {"from": "gpt", "value": "Yes, there is visible noise."},
        ],
    }
    img_id = demo_tok.convert_tokens_to_ids("<image>")
    enc = encode_conversation(
        record, demo_tok, dialect="llava15", image_token_id=img_id, num_image_tokens=4, model_max_length=None
    )
    prompt = render_conversation(
        TEMPLATES["vicuna_v1"], turns_from_record(record["conversations"], image_token="<image>")
    )
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
    enc2 = encode_conversation(
        {"id": "d2", "conversations": convs}, demo_tok, image_token_id=img_id, num_image_tokens=4, model_max_length=None
    )
    prompt2 = render_conversation(TEMPLATES["vicuna_v1"], turns_from_record(convs))
    assert enc2.input_ids == demo_tok(prompt2)["input_ids"]
    # A literal image token in a text-only record stays text.
    enc3 = encode_conversation(
        {k: v for k, v in record.items() if k != "image"},
        demo_tok,
        image_token_id=img_id,
        num_image_tokens=4,
        model_max_length=None,
    )
    assert img_id not in enc3.input_ids and not enc3.image_spans


def test_sentencepiece_rule_rejected_for_byte_level(demo_tok):
    with pytest.raises(ValueError, match="SentencePiece"):
        PieceEncoder(demo_tok, "sp_nonlegacy")
    assert PieceEncoder(demo_tok).rule == "plain"


def _chunk_ids(enc: PieceEncoder, texts: list[str]) -> list[list[int]]:
    return [enc.encode(t, ctx) for t in texts for ctx in (0, 1, 2)]


def test_memo_gives_the_unmemoised_ids_and_stays_bounded(llama_tok, monkeypatch):
    import icmlab.inputs.encode as E

    texts = [t["value"] for fam in FAMILIES for c in CASES[fam] for t in c["record"]["conversations"]]
    texts += [" USER:", "ASSISTANT:", " Yes", "\n", "x" * E.MEMO_MAX_CHARS]
    for rule in ("sp_nonlegacy", "sp_nonlegacy_431", "sp_legacy"):
        enc = PieceEncoder(llama_tok, rule)
        first = _chunk_ids(enc, texts)
        for ids in first:
            ids.append(-1)  # callers may extend the lists they get: the memo keeps its own
        again = _chunk_ids(enc, texts)
        assert again == [ids[:-1] for ids in first]
        monkeypatch.setattr(E, "MEMO_MAX_CHARS", 0)  # every chunk through the tokenizer
        assert _chunk_ids(PieceEncoder(llama_tok, rule), texts) == again
        monkeypatch.undo()
    monkeypatch.setattr(E, "MEMO_ENTRIES", 8)
    enc = PieceEncoder(llama_tok)
    for i in range(50):
        enc.encode(f"word{i}", 2)
        assert len(enc._memo) <= 8


def test_encoder_in_a_forked_worker_gives_the_same_ids(llama_tok):
    """A data-loader worker (fork) gets the parent's encoder with its memo; its first call drops the
    tokenizers model cache of its copy and starts its own memo: the ids must not change."""
    import multiprocessing as mp

    texts = [t["value"] for fam in FAMILIES for c in CASES[fam] for t in c["record"]["conversations"]]
    enc = PieceEncoder(llama_tok)
    want = _chunk_ids(enc, texts)  # the parent's memo is filled
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=lambda: child.send(_chunk_ids(enc, texts)))  # forked: nothing is pickled
    proc.start()
    got = parent.recv()
    proc.join(60)
    assert got == want
    with ctx.Pool(1) as pool:  # pickled into the worker (the spawn way)
        assert pool.apply(_chunk_ids, (enc, texts)) == want
    assert _chunk_ids(enc, texts) == want  # the parent's copy is untouched


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record,match",
    [
        ({"id": "r1"}, "r1: 'conversations'"),
        ({"id": "r2", "conversations": [{"from": "bot", "value": "x"}]}, "r2: conversations\\[0\\] has from='bot'"),
        (
            {"id": "r3", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "r3: turns must alternate",
        ),
        ({"id": "r4", "conversations": [{"from": "human", "value": 3}]}, "r4: conversations\\[0\\].value"),
    ],
)
def test_bad_records_raise(llama_tok, record, match):
    with pytest.raises(ValueError, match=match):
        encode_conversation(record, llama_tok, image_token_id=IMG_ID, num_image_tokens=1, model_max_length=None)


def test_bad_options_raise(llama_tok):
    rec = next(c for c in CASES["llava15"] if c["has_image"])["record"]
    for kwargs, match in [
        ({"template": "nope"}, "chat template"),
        ({"dialect": "nope"}, "dialect"),
        ({"rule": "nope"}, "tokenization rule"),
    ]:
        with pytest.raises(ValueError, match=match):
            encode_conversation(
                rec, llama_tok, image_token_id=IMG_ID, num_image_tokens=1, model_max_length=None, **kwargs
            )


# --- collation and display -------------------------------------------------------------------------


def test_collators(llama_tok):
    # the longest fitting image sample and the shortest fitting text-only one, so one row is padded
    fits = [c for c in CASES["llava15"] if O.fits(c)]
    image = [_encode(c, llama_tok, "llava15", n=3) for c in fits if _single_image(c)]
    text = [_encode(c, llama_tok, "llava15", n=3) for c in fits if not c["has_image"]]
    assert image and text, "the oracle lacks a fitting image or text-only case"
    a, b = max(image, key=lambda e: e.num_tokens), min(text, key=lambda e: e.num_tokens)
    assert a.num_tokens != b.num_tokens
    batch = collate_for_training([a, b], pad_token_id=0)
    length = max(a.num_tokens, b.num_tokens)
    assert batch["input_ids"].shape == (2, length)
    assert batch["attention_mask"].sum(1).tolist() == [a.num_tokens, b.num_tokens]
    for r, enc in enumerate((a, b)):
        pad = length - enc.num_tokens
        assert batch["input_ids"][r].tolist() == enc.input_ids + [0] * pad
        assert batch["labels"][r].tolist() == enc.labels + [IGNORE_INDEX] * pad
        assert batch["attention_mask"][r].tolist() == [1] * enc.num_tokens + [0] * pad
    gen = collate_for_generation([[1, 5, 6], [1, 7]], pad_token_id=0)
    assert gen["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert gen["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    with pytest.raises(ValueError):
        collate_for_training([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


@pytest.mark.parametrize("fam,case", DISPLAY_CASES)
def test_segments_for_display(llama_tok, fam, case):
    enc = _encode(case, llama_tok, fam)
    segs = segments_for_display(enc, llama_tok)
    kinds = [k for _, k in segs]
    assert kinds.count("image") == 1 and (f"<image ×{NATIVE_N[fam]}>", "image") in segs
    # the labels_correct rule: each answer is trained as " " + answer + "</s>"
    assert [t for t, k in segs if k == "trained"] == [" " + a + "</s>" for a in O.answers(case)]
    text = "".join(t for t, k in segs if k != "image")
    assert text == llama_tok.decode([i for i in enc.input_ids if i != IMG_ID], skip_special_tokens=False)
