"""Evaluation protocols: how a question becomes model inputs (prompt, pixels, decoding budget).

A paper's number is only comparable with ours when the model sees what the paper's evaluation script
gave it. Two protocols exist, and every report names the one it used:

- ``upstream`` (the default for real recipes) reproduces Q-Instruct's
  ``eval_scripts/{llava_v1.5,mplug_owl_2}/eval_qbench_mcq.py`` per family, from the facts in
  :mod:`icmlab.models.spec` (G16):

  - pixels: the raw RGB image straight into the CLIP processor (shortest edge resized, centre
    crop), as both scripts call ``image_processor.preprocess(image)``; not training's ``pad``;
  - prompt: the family's eval template (``llava_v1`` with the "curious human" system prompt,
    ``mplug_owl2`` without one) around ``eval_image_prefix + question`` — LLaVA
    ``"<image>\\n" + q``, mPLUG-Owl2 ``"<|image|>" + q`` with *no* newline;
  - Q-Bench question text: the family's script layout (:func:`icmlab.evaluate.scoring.qbench_prompt`
    ``llava`` / ``mplug``);
  - decoding: greedy, ``max_new_tokens`` 1024 (LLaVA) / 512 (mPLUG-Owl2).

- ``demo`` keeps the embedded demo's own choices (the run's ``eval.template``/``eval.qbench_style``,
  ``data.image_aspect_ratio`` padding as in training, a 16-token budget unless set): the tiny
  synthetic model is trained on that layout, and its numbers stay what they were.

``eval.protocol: auto`` picks ``demo`` for the embedded demo (``demo.enabled``) and ``upstream``
otherwise. Explicit ``eval.template``/``eval.qbench_style``/``eval.max_new_tokens`` values override
a protocol's choice (and the report lists the overrides).

Usage::

    from icmlab.evaluate.protocol import resolve_protocol, prompt_text
    proto = resolve_protocol(cfg)
    proto.name, proto.max_new_tokens                  # "upstream", 1024
    prompt_text(proto, "Is it blurry?")               # the exact string the model is given
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from PIL import Image

from icmlab.config import RunConfig
from icmlab.inputs.conversation import Turn, conversation_segments, get_template, prompt_turns
from icmlab.inputs.encode import PieceEncoder, encode_segments
from icmlab.inputs.images import expand2square, mean_background
from icmlab.models.spec import family_spec

DEMO_MAX_NEW_TOKENS = 16
"""The demo protocol's decoding budget when ``eval.max_new_tokens`` is not set."""


@dataclass(frozen=True)
class EvalProtocol:
    """One resolved protocol.

    Attributes:
        name: ``upstream`` or ``demo``.
        family: model family (``llava15``, ``mplug_owl2``).
        template: chat template name (:data:`icmlab.inputs.conversation.TEMPLATES`).
        qbench_style: Q-Bench question layout (``llava``, ``mplug``, ``options_first``).
        image_prefix: text put before the question in the user turn (the image token plus what
            upstream writes after it), or None to place the token as training does (front + ``\\n``).
        preprocess: ``resize_crop`` (raw image into the processor) or ``pad`` (expand to square first).
        max_new_tokens: greedy decoding budget.
        overrides: protocol fields replaced by explicit ``eval.*`` settings.
    """

    name: str
    family: str
    template: str
    qbench_style: str
    image_prefix: str | None
    preprocess: str
    max_new_tokens: int
    overrides: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready facts for ``scores.json`` and the report."""
        return asdict(self)

    def describe(self) -> str:
        """One line for captions and logs."""
        origin = family_spec(self.family).eval_script if self.name == "upstream" else "the embedded demo's own"
        text = (
            f"protocol {self.name} ({origin}): template {self.template}, Q-Bench layout {self.qbench_style}, "
            f"images {'resized + centre-cropped' if self.preprocess == 'resize_crop' else 'padded to square'}, "
            f"greedy, max_new_tokens {self.max_new_tokens}"
        )
        return text + (f"; overridden: {', '.join(self.overrides)}" if self.overrides else "")


def protocol_name(cfg: RunConfig) -> str:
    """``eval.protocol`` resolved: ``auto`` = ``demo`` for the embedded demo, else ``upstream``."""
    if cfg.eval.protocol != "auto":
        return cfg.eval.protocol
    return "demo" if cfg.demo.enabled else "upstream"


def resolve_protocol(cfg: RunConfig) -> EvalProtocol:
    """The run's protocol, with explicit ``eval.*`` settings applied on top."""
    spec = family_spec(cfg.model.family)
    name = protocol_name(cfg)
    if name == "upstream":
        base = dict(
            template=spec.eval_template,
            qbench_style=spec.qbench_style,
            image_prefix=spec.eval_image_prefix,
            preprocess=spec.eval_preprocess,
            max_new_tokens=spec.eval_max_new_tokens,
        )
    else:
        base = dict(
            template=spec.eval_template,
            qbench_style=spec.qbench_style,
            image_prefix=None,
            preprocess="pad" if cfg.data.image_aspect_ratio == "pad" else "resize_crop",
            max_new_tokens=DEMO_MAX_NEW_TOKENS,
        )
    explicit = {
        "template": cfg.eval.template if cfg.eval.template != "auto" else None,
        "qbench_style": cfg.eval.qbench_style if cfg.eval.qbench_style != "auto" else None,
        "max_new_tokens": cfg.eval.max_new_tokens,
    }
    overrides = []
    for key, value in explicit.items():
        if value is not None and value != base[key]:
            overrides.append(f"{key}={value}" if name == "upstream" else key)
            base[key] = value
    # the demo protocol is *defined* by the run's settings, so only upstream reports overrides
    return EvalProtocol(name, cfg.model.family, overrides=tuple(overrides) if name == "upstream" else (), **base)


def user_turn(protocol: EvalProtocol, question: str) -> str:
    """The user message with the image placed as the protocol says."""
    if protocol.image_prefix is None:
        return prompt_turns(question, image_token=family_spec(protocol.family).image_token)[0].text
    return protocol.image_prefix + question


def prompt_text(protocol: EvalProtocol, question: str) -> str:
    """The exact prompt string (before tokenization), ending in ``ASSISTANT:``."""
    turns = [Turn("user", user_turn(protocol, question))]
    return "".join(
        s.text for s in conversation_segments(get_template(protocol.template), turns, add_generation_prompt=True)
    )


def prompt_encoder(
    protocol: EvalProtocol, tokenizer: Any, image_token_id: int, num_image_tokens: int
) -> Callable[[str], list[int]]:
    """question -> prompt ids (image placeholders expanded), tokenized piecewise with the family's
    training rule (:class:`icmlab.inputs.encode.PieceEncoder`) as upstream's ``tokenizer_image_token``."""
    template = get_template(protocol.template)
    image_token = family_spec(protocol.family).image_token
    encoder = PieceEncoder(tokenizer, dialect=protocol.family)

    def encode(question: str) -> list[int]:
        segments = conversation_segments(
            template, [Turn("user", user_turn(protocol, question))], add_generation_prompt=True
        )
        ids, _, _ = encode_segments(
            segments,
            encoder,
            image_token=image_token,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            bos_token_id=tokenizer.bos_token_id,
        )
        return ids

    return encode


def prepare_image(protocol: EvalProtocol, image: Image.Image, image_processor: Any) -> Image.Image:
    """The image the processor receives: padded to square on the processor mean (``pad``), or
    unchanged so the processor resizes and centre-crops it (``resize_crop``)."""
    if protocol.preprocess == "pad":
        return expand2square(image, mean_background(image_processor))
    return image
