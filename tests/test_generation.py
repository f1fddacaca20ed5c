"""Tests for icmlab.evaluate.generation on a tiny native LLaVA-1.5 built in-process (no network, CPU).

The tiny model follows environment-notes "Tiny LLaVA-1.5, fully offline": a byte-level BPE tokenizer
trained with ``tokenizers``, a 32 px / patch 8 CLIP tower (16 image tokens) and a 2-layer Llama,
wrapped by a ``LlavaProcessor`` with ``num_additional_image_tokens=1``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from icmlab.evaluate.generation import (
    PROMPT_FORMATS,
    PromptFormat,
    answer_token_plan,
    apply_image_control,
    choice_logits_answer,
    derangement,
    encode_sample,
    generate_answers,
    left_pad,
)

llava_hf_prompt = PROMPT_FORMATS["llava15"].build
mplug_owl2_prompt = PROMPT_FORMATS["mplug_owl2"].build

QUESTIONS = [
    "Is this image blurry?",
    "What distortion does this image have?\nA. blur\nB. noise\nC. overexposure\nD. underexposure\n"
    "Answer with the option's letter from the given choices directly.",
    "Is the image clear?",
    "How is the lighting of this image?\nA. good\nB. poor\nAnswer with the option's letter from the given choices directly.",
    "Does this image contain the forbidden symbol?",
]


@pytest.fixture(scope="module")
def tiny():
    """(model, processor, tokenizer, image_processor, image_token_id) of a ~150k-parameter LLaVA."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    from icmlab.models.llava15.tiny import build_tiny_config

    torch.set_num_threads(1)
    answers = (" Yes.", " No.", " A.", " B.", " C.", " D.")
    # the answers are repeated so that BPE merges each into one token, as in the real vocabulary
    corpus = [llava_hf_prompt(q) + a for q in QUESTIONS for a in answers] + ["".join(answers)] * 40
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = build_tiny_config(
        len(tok),
        image_token_id,
        text={"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor, tok, image_processor, image_token_id


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(40, 32), (32, 32), (50, 45), (33, 60), (32, 48)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_prompt_formats():
    assert llava_hf_prompt("Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert mplug_owl2_prompt("Q?") == "USER: <|image|>Q? ASSISTANT:"
    assert PROMPT_FORMATS["mplug_owl2"].image_token == "<|image|>"


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_left_padded_equals_unbatched(tiny, images):
    model, processor, *_ = tiny
    one = generate_answers(model, processor, None, QUESTIONS, images, batch_size=1, max_new_tokens=6)
    three = generate_answers(model, processor, None, QUESTIONS, images, batch_size=3, max_new_tokens=6)
    full = generate_answers(model, processor, None, QUESTIONS, images, batch_size=8, max_new_tokens=6)
    assert one == three == full
    assert len(one) == len(QUESTIONS) and any(one)


def test_bare_tokenizer_path_matches_processor(tiny, images):
    model, processor, tok, image_processor, image_token_id = tiny
    text = llava_hf_prompt(QUESTIONS[1])
    ids_p, px_p = encode_sample(processor, None, text, images[0], image_token="<image>")
    ids_t, px_t = encode_sample(
        tok, image_processor, text, images[0], image_token="<image>", image_token_id=image_token_id, num_image_tokens=16
    )
    assert ids_p == ids_t
    assert ids_p.count(image_token_id) == 16 and ids_p[0] == tok.bos_token_id
    assert torch.equal(px_p, px_t)
    # a family with its own template/tag plugs in through PromptFormat + a bare tokenizer
    fmt = PromptFormat(build=lambda q: f"USER: <|image|>{q} ASSISTANT:", image_token="<|image|>")
    a = generate_answers(
        model,
        tok,
        image_processor,
        QUESTIONS[:3],
        images[:3],
        batch_size=2,
        max_new_tokens=4,
        prompt_format=fmt,
        image_token_id=image_token_id,
        num_image_tokens=16,
    )
    assert len(a) == 3
    with pytest.raises(ValueError, match="image_token_id"):
        encode_sample(tok, image_processor, text, images[0], image_token="<image>")
    with pytest.raises(ValueError, match="exactly once"):
        encode_sample(processor, None, "no tag here", images[0], image_token="<image>")


def test_encode_hook_replaces_template_and_tokenization(tiny, images):
    model, processor, tok, image_processor, image_token_id = tiny
    grey = Image.new("RGB", (32, 32))

    def encode(q):  # stands in for icmlab.inputs.encode.encode_prompt (the training-side encoder)
        return processor(images=[grey], text=llava_hf_prompt(q), return_tensors="pt")["input_ids"][0].tolist()

    hooked = PromptFormat(build=llava_hf_prompt, image_token="<image>", encode=encode)
    plain = generate_answers(model, processor, None, QUESTIONS, images, batch_size=2, max_new_tokens=5)
    assert (
        generate_answers(
            model, processor, None, QUESTIONS, images, batch_size=2, max_new_tokens=5, prompt_format=hooked
        )
        == plain
    )
    assert (
        generate_answers(
            model, tok, image_processor, QUESTIONS, images, batch_size=3, max_new_tokens=5, prompt_format=hooked
        )
        == plain
    )
    a = choice_logits_answer(model, tok, image_processor, QUESTIONS, images, ["A", "B"], prompt_format=hooked)
    b = choice_logits_answer(model, processor, None, QUESTIONS, images, ["A", "B"])
    assert [r.answer for r in a] == [r.answer for r in b]
    with pytest.raises(ValueError, match="no image processor"):
        generate_answers(model, tok, None, QUESTIONS[:1], images[:1], prompt_format=hooked)


def test_derangement_and_controls(images):
    perm = derangement(7, seed=3)
    assert sorted(perm) == list(range(7)) and all(p != i for i, p in enumerate(perm))
    assert perm == derangement(7, seed=3) and perm != derangement(7, seed=4)
    blank = apply_image_control(images, "blank")
    assert [b.size for b in blank] == [im.size for im in images]
    assert all(np.all(np.asarray(b) == 128) for b in blank)
    shuffled = apply_image_control(images, "shuffled", seed=1)
    assert [id(s) for s in shuffled] == [id(images[j]) for j in derangement(len(images), 1)]
    assert apply_image_control(images, "none") == images
    assert apply_image_control(images, "shuffle", seed=1) == shuffled  # cfg.eval.controls spelling
    with pytest.raises(ValueError, match="unknown image control"):
        apply_image_control(images, "noise")


def test_control_modes_feed_the_replaced_images(tiny, images):
    model, processor, *_ = tiny
    blank = generate_answers(model, processor, None, QUESTIONS, images, batch_size=2, max_new_tokens=5, control="blank")
    grey = [Image.new("RGB", im.size, (128, 128, 128)) for im in images]
    assert blank == generate_answers(model, processor, None, QUESTIONS, grey, batch_size=2, max_new_tokens=5)
    shuffled = generate_answers(
        model, processor, None, QUESTIONS, images, batch_size=2, max_new_tokens=5, control="shuffled", seed=5
    )
    permuted = [images[j] for j in derangement(len(images), 5)]
    assert shuffled == generate_answers(model, processor, None, QUESTIONS, permuted, batch_size=2, max_new_tokens=5)


def test_choice_logits_batched_matches_single_forward(tiny, images):
    model, processor, tok, *_ = tiny
    choices = ["A", "B", "C", "D"]
    batched = choice_logits_answer(model, processor, None, QUESTIONS, images, choices, batch_size=5)
    single = choice_logits_answer(model, processor, None, QUESTIONS, images, choices, batch_size=1)
    for b, s in zip(batched, single):
        assert b.answer == s.answer
        assert np.allclose(list(b.logits.values()), list(s.logits.values()), atol=1e-4)
    # the reported logits are the unpadded model's logits at the answer position
    common, token_of = answer_token_plan(tok, " ASSISTANT:", choices)
    out = processor(images=[images[2]], text=llava_hf_prompt(QUESTIONS[2]), return_tensors="pt")
    ids = torch.cat([out["input_ids"], torch.tensor([common], dtype=torch.long)], dim=1)
    with torch.inference_mode():
        last = model(input_ids=ids, pixel_values=out["pixel_values"]).logits[0, -1]
    assert abs(batched[2].logits["B"] - float(last[token_of["B"]])) < 1e-4
    assert batched[2].answer == max(choices, key=lambda c: float(last[token_of[c]]))


def test_choice_logits_per_prompt_choices_and_errors(tiny, images):
    model, processor, tok, *_ = tiny
    per = [["Yes", "No"], ["A", "B", "C", "D"], ["Yes", "No"], ["A", "B"], ["Yes", "No"]]
    res = choice_logits_answer(model, processor, None, QUESTIONS, images, per, batch_size=2)
    assert [sorted(r.logits) for r in res] == [sorted(c) for c in per]
    assert all(r.answer in c for r, c in zip(res, per))
    with pytest.raises(ValueError, match="not told apart"):
        choice_logits_answer(model, processor, None, QUESTIONS[:1], images[:1], ["Yes", "Yes!"])
    # the plan reproduces how a training-style answer " ASSISTANT: Yes." is tokenized
    common, token_of = answer_token_plan(tok, " ASSISTANT:", ["Yes", "No"])
    base = tok(" ASSISTANT:", add_special_tokens=False).input_ids
    full = tok(" ASSISTANT: Yes.", add_special_tokens=False).input_ids
    assert full[len(base) : len(base) + len(common) + 1] == common + [token_of["Yes"]]


def test_input_errors(tiny, images, tmp_path):
    model, processor, *_ = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        generate_answers(model, processor, None, QUESTIONS[:2], images[:1])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        generate_answers(model, processor, None, QUESTIONS[:1], [tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="unknown prompt_format"):
        generate_answers(model, processor, None, QUESTIONS[:1], images[:1], prompt_format="qwen")
    with pytest.raises(ValueError, match="unknown image control"):
        generate_answers(model, processor, None, QUESTIONS[:1], images[:1], control="noise")
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, processor, None, QUESTIONS[:1], images[:1], batch_size=0)


def test_image_paths_are_loaded(tiny, images, tmp_path):
    model, processor, *_ = tiny
    path = tmp_path / "im.png"
    images[0].convert("L").save(path)  # grayscale on disk -> RGB in memory
    from_path = generate_answers(model, processor, None, QUESTIONS[:1], [path], max_new_tokens=4)
    from_image = generate_answers(
        model, processor, None, QUESTIONS[:1], [images[0].convert("L").convert("RGB")], max_new_tokens=4
    )
    assert from_path == from_image


class CharTokenizer:
    """One token per character (id = code point), BOS = 1: choices " A"/" B" become [" ", "A"]."""

    pad_token_id, eos_token_id, bos_token_id = 3, 2, 1

    def __call__(self, text, add_special_tokens=True):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [ord(c) for c in text]
        return SimpleNamespace(input_ids=ids)


def test_answer_token_plan_skips_shared_leading_tokens():
    tok = CharTokenizer()
    common, token_of = answer_token_plan(tok, " ASSISTANT:", ["A", "B", "C"])
    assert common == [ord(" ")] and token_of == {"A": ord("A"), "B": ord("B"), "C": ord("C")}
    common, token_of = answer_token_plan(tok, " ASSISTANT:", ["Yes", "Yellow"])
    assert common == [ord(c) for c in " Ye"] and token_of == {"Yes": ord("s"), "Yellow": ord("l")}
    with pytest.raises(ValueError, match="not told apart"):
        answer_token_plan(tok, " ASSISTANT:", ["Yes", "Yes!"])


def test_choice_logits_appends_the_shared_prefix(tiny, images):
    model, _, _, image_processor, image_token_id = tiny
    tok = CharTokenizer()
    kw = dict(image_token_id=image_token_id, num_image_tokens=16)
    res = choice_logits_answer(model, tok, image_processor, QUESTIONS[:3], images[:3], ["A", "B"], batch_size=3, **kw)
    ids, pixels = encode_sample(
        tok, image_processor, llava_hf_prompt(QUESTIONS[1]), images[1], image_token="<image>", **kw
    )
    with torch.inference_mode():
        last = model(input_ids=torch.tensor([ids + [ord(" ")]]), pixel_values=pixels[None]).logits[0, -1]
    assert abs(res[1].logits["A"] - float(last[ord("A")])) < 1e-4
    assert abs(res[1].logits["B"] - float(last[ord("B")])) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_equals_unbatched_on_gpu(tiny, images):
    model, processor, *_ = tiny
    gpu_model = type(model)(model.config).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.to("cuda")
    one = generate_answers(gpu_model, processor, None, QUESTIONS, images, batch_size=1, max_new_tokens=6, device="cuda")
    many = generate_answers(
        gpu_model, processor, None, QUESTIONS, images, batch_size=5, max_new_tokens=6, device="cuda"
    )
    cpu = generate_answers(model, processor, None, QUESTIONS, images, batch_size=5, max_new_tokens=6)
    assert one == many == cpu
