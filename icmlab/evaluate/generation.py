"""Batched greedy answering for native LLaVA-family models, with image controls and a logit fast path.

Used by the evaluate stage (and notebooks) to turn (question text, image) pairs into answer strings::

    from icmlab.evaluate.generation import generate_answers, choice_logits_answer
    from icmlab.evaluate.scoring import qbench_prompt, score_qbench
    questions = [qbench_prompt(it, style="llava") for it in items]
    outputs = generate_answers(model, processor, None, questions, images, batch_size=8,
                               max_new_tokens=16, device="cuda")
    scores = score_qbench(items, outputs)

What it does:

- The chat template lives behind ``PromptFormat`` (``PROMPT_FORMATS["llava15"]``: the llava-hf
  inference form ``"USER: <image>\\n{q} ASSISTANT:"`` without a system prompt;
  ``PROMPT_FORMATS["mplug_owl2"]``: ``"USER: <|image|>{q} ASSISTANT:"`` as the Q-Instruct mPLUG-Owl2
  script builds it). Any model whose ``generate``/``forward`` takes ``input_ids``,
  ``attention_mask`` and ``pixel_values`` plugs in with its own format.
- Inputs are encoded one sample at a time (a ``LlavaProcessor`` expands ``<image>`` itself; a bare
  tokenizer + image processor gets the image token replaced by ``num_image_tokens`` copies of
  ``image_token_id``, tokenizing the text around it piecewise as upstream's ``tokenizer_image_token``
  does) and then LEFT-padded into batches, so every row's last position is its real last token and
  batched greedy decoding gives the same answers as one-by-one decoding.
- ``control="blank"`` replaces every image by a uniform grey image of the same size;
  ``control="shuffled"`` gives every question another question's image (a seeded derangement).
  A model that reads pixels drops towards chance under both; one that guesses from text does not.
- ``choice_logits_answer`` is the fast path for closed questions: one forward pass per batch and
  the argmax over the logits of each option's first answer token (" A", " B", … or " Yes"/" No")
  at the position right after ``ASSISTANT:`` (after any token all options share, e.g. a lone
  space in a small BPE vocabulary). It never produces an unparseable answer, so it
  measures what the model prefers rather than whether it follows the answer format; greedy
  ``generate_answers`` is the number comparable with the paper.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from PIL import Image

from icmlab.models.spec import FAMILY_SPECS
from icmlab.progress import batch_starts

Control = Literal["none", "blank", "shuffled", "shuffle"]
_CONTROL_ALIASES = {"none": "none", "blank": "blank", "shuffled": "shuffled", "shuffle": "shuffled"}


def normalize_control(control: str) -> str:
    """``"none"``, ``"blank"`` or ``"shuffled"`` (``"shuffle"``, as ``cfg.eval.controls`` spells it, is
    accepted).

    Raises:
        ValueError: on anything else.
    """
    if control not in _CONTROL_ALIASES:
        raise ValueError(f"unknown image control {control!r}; use 'none', 'blank' or 'shuffled'")
    return _CONTROL_ALIASES[control]


# --------------------------------------------------------------------------- prompt formats
@dataclass(frozen=True)
class PromptFormat:
    """How one model family wraps a user question for inference.

    Attributes:
        build: question text -> full prompt text containing ``image_token`` once.
        image_token: the image tag the prompt uses (``<image>`` / ``<|image|>``).
        encode: optional question text -> prompt ids (image placeholders already expanded). When
            set it replaces ``build`` + tokenization, so evaluation can reuse the exact encoder the
            training data went through, e.g. ``lambda q: icmlab.inputs.encode.encode_prompt(q, tok,
            template="llava_v1", dialect="llava15", image_token_id=..., num_image_tokens=...).input_ids``.
            ``build`` still names the template tail (``... ASSISTANT:``) for the logit fast path.
    """

    build: Callable[[str], str]
    image_token: str
    encode: Callable[[str], Sequence[int]] | None = None


def _plain_prompt(template: str) -> Callable[[str], str]:
    def build(question: str) -> str:
        return template.format(question=question)

    build.__doc__ = f"The family's plain inference prompt: ``{template!r}``."
    return build


#: Each family's plain inference prompt (:attr:`icmlab.models.spec.FamilySpec.inference_prompt`).
PROMPT_FORMATS: dict[str, PromptFormat] = {
    name: PromptFormat(_plain_prompt(s.inference_prompt), s.image_token) for name, s in FAMILY_SPECS.items()
}


def _resolve_format(prompt_format: str | PromptFormat) -> PromptFormat:
    if isinstance(prompt_format, PromptFormat):
        return prompt_format
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; allowed: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[prompt_format]


# --------------------------------------------------------------------------- image controls
def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Return an RGB PIL image from an image or a path.

    Raises:
        FileNotFoundError: if a path does not exist.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found (check cfg.data.root / the item's img_path)")
    with Image.open(path) as im:
        return im.convert("RGB")


def derangement(n: int, seed: int) -> list[int]:
    """A seeded random permutation of ``range(n)`` with no fixed point (Sattolo's algorithm).

    Sattolo's shuffle yields a single n-cycle, so no question keeps its own image; n < 2 has no
    derangement and returns the identity.
    """
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i (not <= i) is what makes it one cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def apply_image_control(
    images: Sequence[Image.Image], control: Control = "none", seed: int = 0, grey: int = 128
) -> list[Image.Image]:
    """Replace images for a control run.

    Args:
        images: RGB images, one per question.
        control: ``"none"`` (unchanged), ``"blank"`` (uniform grey of the same size) or
            ``"shuffled"``/``"shuffle"`` (question i gets image ``derangement(n, seed)[i]``).
        seed: seed of the shuffle.
        grey: grey level of the blank images.

    Returns:
        The new list (the inputs are not modified).

    Raises:
        ValueError: on an unknown control.
    """
    control = normalize_control(control)
    if control == "blank":
        return [Image.new("RGB", im.size, (grey, grey, grey)) for im in images]
    if control == "shuffled":
        return [images[j] for j in derangement(len(images), seed)]
    return list(images)


# --------------------------------------------------------------------------- encoding
def _is_processor(obj: Any) -> bool:
    return hasattr(obj, "tokenizer") and hasattr(obj, "image_processor")


def _tokenizer_of(obj: Any) -> Any:
    return obj.tokenizer if _is_processor(obj) else obj


def encode_sample(
    processor_or_tokenizer: Any,
    image_processor: Any,
    text: str,
    image: Image.Image,
    *,
    image_token: str,
    image_token_id: int | None = None,
    num_image_tokens: int | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Encode one prompt (with exactly one image tag) and its image.

    With a processor (``LlavaProcessor``) the processor expands the tag and ``image_processor`` is
    ignored. With a bare tokenizer, the text is split on ``image_token``; the first piece is
    tokenized with special tokens (BOS), the second without, and ``num_image_tokens`` copies of
    ``image_token_id`` go between them.

    Returns:
        ``(input_ids, pixel_values[C, H, W])``.

    Raises:
        ValueError: if the prompt does not hold exactly one image tag, or the tokenizer path lacks
            ``image_processor``/``image_token_id``/``num_image_tokens``.
    """
    if text.count(image_token) != 1:
        raise ValueError(f"prompt must contain {image_token!r} exactly once: {text[:120]!r}")
    if _is_processor(processor_or_tokenizer):
        out = processor_or_tokenizer(images=[image], text=text, return_tensors="pt")
        return out["input_ids"][0].tolist(), out["pixel_values"][0]
    if image_processor is None or image_token_id is None or num_image_tokens is None:
        raise ValueError(
            "a bare tokenizer needs image_processor, image_token_id and num_image_tokens "
            "(take them from the ModelBundle)"
        )
    tok = processor_or_tokenizer
    before, after = text.split(image_token)
    ids = list(tok(before).input_ids) + [image_token_id] * num_image_tokens
    ids += list(tok(after, add_special_tokens=False).input_ids)
    return ids, pixel_values(tok, image_processor, image)


def pixel_values(processor_or_tokenizer: Any, image_processor: Any, image: Image.Image) -> torch.Tensor:
    """``[C, H, W]`` pixels from ``image_processor``, else from the processor's own image processor.

    Raises:
        ValueError: if neither is available.
    """
    proc = image_processor
    if proc is None and _is_processor(processor_or_tokenizer):
        proc = processor_or_tokenizer.image_processor
    if proc is None:
        raise ValueError("no image processor: pass image_processor (ModelBundle.image_processor)")
    return proc(images=image, return_tensors="pt")["pixel_values"][0]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)`` of shape [B, max_len]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids, mask


def _pad_id(tok: Any) -> int:
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has no pad, unk or eos token to pad with; set tokenizer.pad_token")


def _model_device_dtype(model: Any, device: str | torch.device | None) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dev = torch.device(device) if device is not None else param.device
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    return dev, dtype


def _batches(
    model: Any,
    processor_or_tokenizer: Any,
    image_processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    batch_size: int,
    device: str | torch.device | None,
    prompt_format: str | PromptFormat,
    control: Control,
    seed: int,
    image_token_id: int | None,
    num_image_tokens: int | None,
    suffixes: Sequence[Sequence[int]] | None = None,
):
    """Yield ``(start, batch_dict)`` of left-padded model inputs on the device.

    ``suffixes`` (one id list per prompt) are appended after the encoded prompt.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fmt = _resolve_format(prompt_format)
    control = normalize_control(control)
    # images are opened batch by batch (a benchmark's decoded images need not fit in memory);
    # the shuffled control only changes which source index each question reads
    source = derangement(len(images), seed) if control == "shuffled" else list(range(len(images)))
    dev, dtype = _model_device_dtype(model, device)
    pad = _pad_id(_tokenizer_of(processor_or_tokenizer))
    for start in batch_starts(len(prompts), batch_size, "evaluate"):
        stop = start + batch_size
        imgs = [load_image(images[j]) for j in source[start:stop]]
        if control == "blank":
            imgs = apply_image_control(imgs, "blank")
        if fmt.encode is not None:
            encoded = [
                (list(fmt.encode(q)), pixel_values(processor_or_tokenizer, image_processor, im))
                for q, im in zip(prompts[start:stop], imgs)
            ]
        else:
            encoded = [
                encode_sample(
                    processor_or_tokenizer,
                    image_processor,
                    fmt.build(q),
                    im,
                    image_token=fmt.image_token,
                    image_token_id=image_token_id,
                    num_image_tokens=num_image_tokens,
                )
                for q, im in zip(prompts[start:stop], imgs)
            ]
        seqs = [e[0] for e in encoded]
        if suffixes is not None:
            seqs = [s + list(x) for s, x in zip(seqs, suffixes[start:stop])]
        ids, mask = left_pad(seqs, pad)
        pixels = torch.stack([e[1] for e in encoded]).to(dev, dtype)
        yield start, {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "pixel_values": pixels}


# --------------------------------------------------------------------------- generation
def generate_answers(
    model: Any,
    processor_or_tokenizer: Any,
    image_processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image | str | Path],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str | torch.device | None = None,
    *,
    prompt_format: str | PromptFormat = "llava15",
    control: Control = "none",
    seed: int = 0,
    image_token_id: int | None = None,
    num_image_tokens: int | None = None,
) -> list[str]:
    """Greedy-decode one answer per (question, image) pair in left-padded batches.

    Args:
        model: a native model with ``generate(input_ids=, attention_mask=, pixel_values=)``
            (``LlavaForConditionalGeneration``, our mPLUG-Owl2), already on ``device``.
        processor_or_tokenizer: a ``LlavaProcessor`` or a bare tokenizer.
        image_processor: CLIP-style image processor (only used with a bare tokenizer).
        prompts: user questions *without* the chat template (e.g. ``qbench_prompt(item)``).
        images: PIL images or paths, one per prompt.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: decoding budget (upstream uses 1024/512; a letter needs ~3).
        device: where the inputs go; default the model's device.
        prompt_format: ``"llava15"``, ``"mplug_owl2"`` or a ``PromptFormat``.
        control: ``"none"``, ``"blank"`` or ``"shuffled"`` (see ``apply_image_control``).
        seed: seed of the shuffled control.
        image_token_id, num_image_tokens: needed with a bare tokenizer.

    Returns:
        Decoded answers (special tokens skipped, whitespace stripped), in input order.

    Raises:
        ValueError: on mismatched lengths, bad batch size, unknown format/control.
        FileNotFoundError: on a missing image path.
    """
    tok = _tokenizer_of(processor_or_tokenizer)
    pad, eos = _pad_id(tok), getattr(tok, "eos_token_id", None)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for _, batch in _batches(
            model,
            processor_or_tokenizer,
            image_processor,
            prompts,
            images,
            batch_size,
            device,
            prompt_format,
            control,
            seed,
            image_token_id,
            num_image_tokens,
        ):
            with torch.inference_mode():
                out = model.generate(
                    **batch,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            # decoder-only generate returns prompt + continuation; drop the (padded) prompt columns
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


# --------------------------------------------------------------------------- logit fast path
@dataclass
class ChoiceResult:
    """Answer picked from the first-token logits.

    Attributes:
        answer: the winning choice string (e.g. "B" or "Yes").
        logits: choice -> logit of its first answer token at the answer position.
    """

    answer: str
    logits: dict[str, float]


def answer_token_plan(tokenizer: Any, prefix: str, choices: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Which token separates the choices when the model answers right after ``prefix``.

    Each choice's continuation is the ids of ``prefix + " " + choice`` past the ids of ``prefix``
    (right for sentencepiece "▁B" and byte-level BPE "Ġ" + "B" alike). Tokens that all choices
    share at the start (a lone space token in small BPE vocabularies) are returned as ``common``:
    they are appended to the prompt, and the choices are compared at the next position.

    Returns:
        ``(common_ids, {choice: distinguishing token id})``.

    Raises:
        ValueError: if the prefix's own tokens change (a merge across the boundary), a choice adds
            no token, or two choices cannot be told apart by one token.
    """
    base = list(tokenizer(prefix, add_special_tokens=False).input_ids)
    conts = {}
    for c in choices:
        full = list(tokenizer(prefix + " " + c, add_special_tokens=False).input_ids)
        if full[: len(base)] != base or len(full) <= len(base):
            raise ValueError(f"answer {c!r} does not tokenize as a clean continuation of {prefix[-20:]!r}")
        conts[c] = full[len(base) :]
    common: list[int] = []
    seqs = list(conts.values())
    while all(len(s) > len(common) + 1 for s in seqs) and len({s[len(common)] for s in seqs}) == 1:
        common.append(seqs[0][len(common)])
    tokens = {c: s[len(common)] for c, s in conts.items()}
    if len(set(tokens.values())) != len(tokens):
        raise ValueError(
            f"choices {list(choices)} are not told apart by one token after their common "
            "prefix; the logit fast path cannot separate them (use generate_answers)"
        )
    return common, tokens


def choice_logits_answer(
    model: Any,
    processor_or_tokenizer: Any,
    image_processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image | str | Path],
    choices: Sequence[str] | Sequence[Sequence[str]],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    *,
    prompt_format: str | PromptFormat = "llava15",
    control: Control = "none",
    seed: int = 0,
    image_token_id: int | None = None,
    num_image_tokens: int | None = None,
) -> list[ChoiceResult]:
    """Pick each answer by comparing the choices' first-token logits after ``ASSISTANT:``.

    Faster than generation (one forward pass, no decoding loop) and immune to format drift; use it
    as a second opinion beside ``generate_answers``, not as the paper's number.

    Args:
        choices: one list for all prompts (``["A", "B", "C", "D"]``, ``["Yes", "No"]``) or one
            list per prompt (Q-Bench items have 2–4 options).
        Other arguments: as in ``generate_answers``.

    Returns:
        One ChoiceResult per prompt.

    Raises:
        ValueError: as ``generate_answers``; also if one token cannot tell the choices apart.
    """
    if choices and isinstance(choices[0], str):
        per_prompt = [list(choices)] * len(prompts)
    else:
        per_prompt = [list(c) for c in choices]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} choice lists")
    fmt = _resolve_format(prompt_format)
    tok = _tokenizer_of(processor_or_tokenizer)
    prefix = fmt.build("").split(fmt.image_token)[-1]  # template tail ending in "ASSISTANT:"
    plans: dict[tuple[str, ...], tuple[list[int], dict[str, int]]] = {}
    for cs in per_prompt:
        if tuple(cs) not in plans:
            plans[tuple(cs)] = answer_token_plan(tok, prefix, cs)
    suffixes = [plans[tuple(cs)][0] for cs in per_prompt]
    results: list[ChoiceResult] = []
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        for start, batch in _batches(
            model,
            processor_or_tokenizer,
            image_processor,
            prompts,
            images,
            batch_size,
            device,
            prompt_format,
            control,
            seed,
            image_token_id,
            num_image_tokens,
            suffixes,
        ):
            inputs = dict(batch)
            if accepts_positions:
                # generate() derives positions from the mask; whether a bare forward does is up to
                # the model (mPLUG-Owl2 ports may not), and without it left-padded rows shift
                mask = batch["attention_mask"]
                inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                last = model(**inputs).logits[:, -1, :].float().cpu()  # left padding: last column is real
            for row in range(last.shape[0]):
                cs = per_prompt[start + row]
                token_of = plans[tuple(cs)][1]
                scores = {c: float(last[row, token_of[c]]) for c in cs}
                results.append(ChoiceResult(answer=max(cs, key=scores.__getitem__), logits=scores))
    finally:
        model.train(was_training)
    return results
