"""A tiny byte-level BPE tokenizer for the demo models, trained in about a second.

It is trained with ``tokenizers`` on the demo's own texts (every fixed question, option and
answer, sample descriptions and high-level chats) rendered in the vicuna_v1 template with its
system prompt, so demo prompts are short and the answers that scoring reads — " A" … " E",
" Yes", " No" — are single tokens (:func:`check_single_tokens` enforces it).

Layout of the ids, mirroring the real checkpoints: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then the
BPE vocabulary; the LLaVA variant appends ``<image>`` and ``<pad>`` after it (as llava-hf appends
them after vicuna's 32000 tokens), the vicuna variant has neither (model assembly adds the image
token, as upstream does), and an mPLUG-Owl2 variant can append ``<|image|>`` instead.

Usage::

    tok = demo_tokenizer(image_token="<image>", pad_token="<pad>")   # llava-hf
    tok = demo_tokenizer(image_token=None, pad_token=None)           # vicuna
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from . import texts as T
from .datasets import IMAGE_TOKEN, moderation_train, quality_train
from .highlevel import corpus_texts

BASE_SPECIALS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
BPE_VOCAB_SIZE = 768
"""Size of the trained part (specials included); the LLaVA variant adds 2 tokens → 770. A byte-level BPE spends 256 of them on the byte alphabet: 448 left ~190 merges and
prompts 40 % longer (batches padded to ≈200 instead of ≈145 tokens), which the CPU demo pays in every step."""
SINGLE_TOKEN_ANSWERS: tuple[str, ...] = (" A", " B", " C", " D", " E", " Yes", " No")


def _render(question: str, answer: str) -> str:
    """A vicuna_v1 round without the special tokens (the trainer must not see them as text)."""
    return f"{T.VICUNA_V1_SYSTEM} USER: {question} ASSISTANT: {answer}"


def training_corpus() -> list[str]:
    """The texts the BPE is trained on (independent of the demo seed: one tokenizer for all)."""
    corpus = T.tokenizer_corpus() + corpus_texts(seed=0)
    for ds in (quality_train(seed=0, n_images=150), moderation_train(seed=0, n_images=60, n_descriptions=1)):
        for rec in ds.payload:
            turns = [t["value"].replace(IMAGE_TOKEN, "").strip() for t in rec["conversations"]]
            corpus += [_render(q, a) for q, a in zip(turns[0::2], turns[1::2])]
    return corpus


@lru_cache(maxsize=1)
def _trained_json() -> str:
    """Train the BPE once per process and keep its JSON (copied for every variant)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(BASE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok.to_str()


def check_single_tokens(tok: PreTrainedTokenizerFast, answers: tuple[str, ...] = SINGLE_TOKEN_ANSWERS) -> None:
    """Raise if any of ``answers`` is not exactly one token.

    Raises:
        ValueError: naming the answers that split.
    """
    bad = {a: tok.tokenize(a) for a in answers if len(tok.tokenize(a)) != 1}
    if bad:
        raise ValueError(f"demo tokenizer splits answers {bad}; raise BPE_VOCAB_SIZE or weight them in the corpus")


def demo_tokenizer(
    image_token: str | None = IMAGE_TOKEN, pad_token: str | None = "<pad>", model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer.

    Args:
        image_token: appended special image token (``"<image>"`` for llava-hf, ``"<|image|>"`` for
            an mPLUG-Owl2-style placeholder, ``None`` for a text-only vicuna). It is exposed as
            ``tok.image_token`` (``extra_special_tokens``), which ``LlavaProcessor`` reads.
        pad_token: appended pad token, or ``None`` (vicuna has none; LLaVA training then pads
            with ``<unk>``).
        model_max_length: stored in the tokenizer config.

    Returns:
        A ``PreTrainedTokenizerFast`` whose post-processor prepends ``<s>``, right padding.
    """
    tok = Tokenizer.from_str(_trained_json())
    added = [t for t in (image_token, pad_token) if t]
    if added:
        tok.add_special_tokens(added)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    kwargs = {}
    if image_token:
        kwargs["extra_special_tokens"] = {"image_token": image_token}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad_token,
        padding_side="right",
        model_max_length=model_max_length,
        **kwargs,
    )
    check_single_tokens(fast)
    return fast
