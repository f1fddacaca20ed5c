"""Every model-family fact, in one torch-free table.

Config validation, the download catalog, the input pipeline (templates, encoding, lengths,
images), the stages and the family adapters read these facts here; none keeps its own copy.
Adding a family means one row in :data:`FAMILY_SPECS` and one folder under ``icmlab/models/``.

Usage::

    from icmlab.models.spec import family_spec
    spec = family_spec("llava15")
    spec.image_token, spec.image_size, spec.num_image_tokens     # "<image>", 336, 576
    spec.required_parts("mix")                                   # ("llm", "vision_tower", "mm_projector")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

Truncation = Literal["expanded", "collapsed"]
Strategy = Literal["mix", "after"]


@dataclass(frozen=True)
class FamilySpec:
    """What icmlab knows about one model family.

    Attributes:
        name: registry key (``model.family``).
        title: human name.
        adapter: module implementing the adapter API (load, save, groups) of :mod:`icmlab.models`.
        image_token: the image tag of the family's JSON dialect.
        image_size: side of the square image the vision tower sees (px).
        num_image_tokens: placeholders one image expands into at full size.
        truncation: how upstream cuts a sample at ``model_max_length``: ``expanded`` (LLaVA: the
            image tokens count, the cut falls after expansion) or ``collapsed`` (mPLUG-Owl2: the
            text is cut with one placeholder per image, then expanded).
        tokenization_rule: the piece-encoder rule reproducing the family's original training ids
            (see :data:`icmlab.inputs.encode.TOKENIZATION_RULES`).
        train_template: chat template of training (upstream ``--version v1``).
        eval_template: chat template of upstream's evaluation scripts.
        qbench_style: Q-Bench prompt layout of upstream's evaluation script.
        inference_prompt: the plain single-turn inference prompt (``{question}`` is filled in): the
            llava-hf template for LLaVA, ``conv_mplug_owl2`` without its system prompt for mPLUG-Owl2.
        parts: per ``train.strategy``, the ``model.*`` keys the run starts from.
        tokenizer_part: per strategy, the ``model.*`` key whose folder holds the tokenizer.
        trains_vision: whether any upstream recipe of the family trains the vision encoder
            (False: ``train.freeze_vision`` must stay true).
        always_needs_base: the family always starts from ``model.base`` (no assembled start).
        eval_image_prefix: what upstream's Q-Bench script puts before the question in the user turn
            (LLaVA ``DEFAULT_IMAGE_TOKEN + "\\n"``, mPLUG-Owl2 the bare ``<|image|>``); used by the
            ``upstream`` eval protocol (:mod:`icmlab.evaluate.protocol`).
        eval_max_new_tokens: upstream's Q-Bench decoding budget (greedy in both scripts).
        eval_script: the upstream Q-Bench evaluation script these eval facts come from.
        eval_preprocess: upstream's eval image path: ``resize_crop`` = the raw image straight into
            the CLIP processor (shortest edge resized, centre crop), not the training ``pad``.
        serving_architecture: the transformers class name vLLM and SGLang serve the exported ``hf``
            folder as (None: no serving engine reads the family).
        original_layout: the export stage also writes the family's ORIGINAL checkpoint layout
            (the adapter's ``save_original``), for code that reads only that.
    """

    name: str
    title: str
    adapter: str
    image_token: str
    image_size: int
    num_image_tokens: int
    truncation: Truncation
    tokenization_rule: str
    train_template: str
    eval_template: str
    qbench_style: str
    inference_prompt: str
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tokenizer_part: Mapping[str, str] = field(default_factory=dict)
    trains_vision: bool = False
    always_needs_base: bool = False
    eval_image_prefix: str = ""
    eval_max_new_tokens: int = 16
    eval_preprocess: str = "resize_crop"
    eval_script: str = ""
    serving_architecture: str | None = None
    original_layout: bool = False

    def required_parts(self, strategy: str) -> tuple[str, ...]:
        """``model.*`` keys a run of ``strategy`` needs (``("base",)`` when it starts from one checkpoint)."""
        return self.parts.get(strategy, ("base",))

    def assembles(self, strategy: str) -> bool:
        """True when ``strategy`` assembles the model from parts instead of one checkpoint."""
        return self.required_parts(strategy) != ("base",)

    def tokenizer_source(self, strategy: str) -> str:
        """``model.*`` key whose folder holds the tokenizer for ``strategy``."""
        return self.tokenizer_part.get(strategy, "base")


FAMILY_SPECS: dict[str, FamilySpec] = {
    "llava15": FamilySpec(
        name="llava15",
        title="LLaVA-v1.5",
        adapter="icmlab.models.llava15",
        image_token="<image>",
        image_size=336,
        num_image_tokens=576,
        truncation="expanded",
        tokenization_rule="sp_nonlegacy",
        train_template="vicuna_v1",
        eval_template="llava_v1",
        qbench_style="llava",
        inference_prompt="USER: <image>\n{question} ASSISTANT:",
        # MSFT / "mix": Vicuna + CLIP + the stage-1 projector, as LLaVA's own finetune script starts.
        parts={"mix": ("llm", "vision_tower", "mm_projector")},
        tokenizer_part={"mix": "llm"},
        trains_vision=False,
        # eval_scripts/llava_v1.5/eval_qbench_mcq.py: qs = DEFAULT_IMAGE_TOKEN + "\n" + qs; max_new_tokens=1024
        eval_image_prefix="<image>\n",
        eval_max_new_tokens=1024,
        eval_script="Q-Instruct eval_scripts/llava_v1.5/eval_qbench_mcq.py",
        serving_architecture="LlavaForConditionalGeneration",
    ),
    "mplug_owl2": FamilySpec(
        name="mplug_owl2",
        title="mPLUG-Owl2",
        adapter="icmlab.models.mplug_owl2",
        image_token="<|image|>",
        image_size=448,
        num_image_tokens=65,
        truncation="collapsed",
        tokenization_rule="sp_nonlegacy_431",
        train_template="vicuna_v1",
        eval_template="mplug_owl2",
        qbench_style="mplug",
        inference_prompt="USER: <|image|>{question} ASSISTANT:",
        trains_vision=True,
        always_needs_base=True,
        # eval_scripts/mplug_owl_2/eval_qbench_mcq.py: inp = DEFAULT_IMAGE_TOKEN + inp; --max-new-tokens 512
        eval_image_prefix="<|image|>",
        eval_max_new_tokens=512,
        eval_script="Q-Instruct eval_scripts/mplug_owl_2/eval_qbench_mcq.py",
        original_layout=True,
    ),
}

#: The image token of each family's JSON dialect.
DIALECTS: dict[str, str] = {name: s.image_token for name, s in FAMILY_SPECS.items()}


def family_spec(name: str) -> FamilySpec:
    """The spec of a family.

    Raises:
        ValueError: for an unknown family, naming the allowed ones.
    """
    try:
        return FAMILY_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; allowed: {sorted(FAMILY_SPECS)}") from None
