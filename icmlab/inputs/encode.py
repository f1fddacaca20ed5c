"""Tokenization and label masking shared by train, validate, inspect and evaluate.

``encode_conversation`` turns one LLaVA-JSON record into ``input_ids`` and ``labels`` *by
construction*: the conversation is rendered as segments (:mod:`icmlab.inputs.conversation`), each segment
is tokenized on its own and the pieces are concatenated, so the trained span of every answer is
known exactly and no "tokenization mismatch" (upstream's whole-sample masking) can occur.

The ids equal those of the original code (fixtures ``*_v1_preprocess.jsonl``), because pieces are
cut only where the original tokenization has a boundary too: at special tokens (``</s>``), at the
image token (upstream tokenizes the text between images in separate calls) and between
``ASSISTANT:`` and ``" " + answer`` (no LLaMA vocabulary piece spans ``:`` and a following ``▁``).
What differs between tokenizer versions is only how a text chunk *starts*; see
:data:`TOKENIZATION_RULES`.

Usage::

    enc = encode_conversation(record, tokenizer, template="vicuna_v1", dialect="llava15",
                              image_token_id=32000, num_image_tokens=576, model_max_length=2048)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from icmlab.inputs.conversation import (
    DIALECTS,
    ChatTemplate,
    Segment,
    conversation_segments,
    get_template,
    image_token_for,
    prompt_turns,
    turns_from_record,
)
from icmlab.models.spec import FAMILY_SPECS

IGNORE_INDEX = -100
#: Placeholder id of one image in the original LLaVA / mPLUG-Owl2 input_ids.
ORIGINAL_IMAGE_INDEX = -200

#: How a text chunk is tokenized, relative to SentencePiece's "dummy prefix" (a ``▁`` put before
#: the text). All rules agree inside a chunk; they differ at the start of a tokenizer call (START)
#: and right after a special token such as ``</s>`` (AFTER_SPECIAL):
#:
#: - ``sp_nonlegacy``: slow ``LlamaTokenizer(legacy=False)`` of transformers >= 4.34 (LLaVA's pin
#:   4.37.2): prefix at START, none after a special token (``</s>USER`` -> ``</s> USER``).
#: - ``sp_nonlegacy_431``: ``legacy=False`` as transformers 4.31.0 (mPLUG-Owl2's pin) implements it:
#:   the chunk after a special token is encoded with the prefix and the ``▁`` is then cut off the
#:   first piece (``</s>USER`` -> ``</s> US ER``; a cut piece missing from the vocabulary becomes
#:   ``<unk>``, as it did there).
#: - ``sp_legacy``: ``legacy=True`` / the ``tokenizer.json`` fast path: prefix everywhere
#:   (``</s>USER`` -> ``</s> ▁US ER``).
#: - ``plain``: any other tokenizer (e.g. a byte-level BPE): each chunk goes through the tokenizer.
TOKENIZATION_RULES = ("sp_nonlegacy", "sp_nonlegacy_431", "sp_legacy", "plain")
#: Rule reproducing each family's original training data (matches the fixtures' main ``input_ids``).
DEFAULT_RULES: dict[str, str] = {name: s.tokenization_rule for name, s in FAMILY_SPECS.items()}

_START, _AFTER_SPECIAL, _CONTINUE = 0, 1, 2
_SPIECE = "\u2581"
#: :class:`PieceEncoder` keeps the ids of chunks shorter than this many characters (template pieces,
#: repeated questions and answers) ...
MEMO_MAX_CHARS = 256
#: ... up to this many of them per process; the memo is emptied when full (~1 MB: 4096 entries made
#: the private-memory growth of 4 workers over an epoch +8.0 % instead of +3.8 %, bench_dataset_memory).
MEMO_ENTRIES = 1024


def _is_sentencepiece_bpe(tokenizer: Any) -> bool:
    """True when the tokenizer is a SentencePiece-style BPE (LLaMA): ``▁`` marks word starts."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return type(model).__name__ == "BPE" and model.token_to_id(_SPIECE) is not None


class PieceEncoder:
    """Tokenizes text chunks under one :data:`TOKENIZATION_RULES` rule.

    SentencePiece rules call the tokenizer's BPE model directly (the ``tokenizers`` model equals
    sentencepiece's BPE on the LLaMA vocabulary) so that the dummy prefix is under our control;
    transformers 5 pre-tokenizers/normalizers would otherwise add or drop it differently.

    Args:
        tokenizer: a transformers fast tokenizer.
        rule: a rule name, or None for the family default (``dialect``) on SentencePiece
            tokenizers and ``plain`` otherwise.
        dialect: model family, used only to pick the default rule.
        literal: strings never treated as special tokens. Default: the image tokens of all
            dialects; the dialect's own token is cut out before (with an image) or is plain text
            (text-only records, as with upstream's LLaMA tokenizer that has no image token).

    Raises:
        ValueError: unknown rule, or a SentencePiece rule on a tokenizer that is not one.
    """

    def __init__(
        self,
        tokenizer: Any,
        rule: str | None = None,
        *,
        dialect: str = "llava15",
        literal: Sequence[str] = tuple(DIALECTS.values()),
    ) -> None:
        sp = _is_sentencepiece_bpe(tokenizer)
        if rule is None:
            rule = DEFAULT_RULES.get(dialect, "sp_nonlegacy") if sp else "plain"
        if rule not in TOKENIZATION_RULES:
            raise ValueError(f"unknown tokenization rule {rule!r}; choose one of {TOKENIZATION_RULES}")
        if rule != "plain" and not sp:
            raise ValueError(f"rule {rule!r} needs a SentencePiece-BPE tokenizer (LLaMA); use rule='plain'")
        self.tokenizer = tokenizer
        self.rule = rule
        self._model = tokenizer.backend_tokenizer.model if sp else None
        self._unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        self.specials = {t: i for t, i in tokenizer.get_added_vocab().items() if t not in set(literal)}
        # Longest first, so that e.g. "</s>" wins over a shorter overlapping token.
        alt = "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        self._split = re.compile(f"({alt})") if alt else None
        self._memo: dict[tuple[str, int], tuple[int, ...]] = {}
        self._pid = os.getpid()

    def chunks(self, text: str) -> list[str | int]:
        """Split text on special tokens: strings are plain text, ints are special-token ids."""
        if self._split is None:
            return [text] if text else []
        out: list[str | int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                out.append(self.specials[part])
            elif part:
                out.append(part)
        return out

    def _bpe(self, s: str) -> list[int]:
        return [t.id for t in self._model.tokenize(s)] if s else []

    def encode(self, text: str, context: int) -> list[int]:
        """Tokenize a chunk free of special tokens, given where it starts (START/AFTER_SPECIAL/CONTINUE).

        Short chunks are memoised (:data:`MEMO_MAX_CHARS`, :data:`MEMO_ENTRIES`). In a process other
        than the one that built the encoder (a data-loader worker), the first call also turns off
        the ``tokenizers`` BPE model's own cache in that process's copy of the tokenizer: it keeps
        up to 10,000 strings with their merge state (~4 KB each, never evicted), which made every
        worker's private memory grow by ~40 MB over an epoch (benchmarks/bench_dataset_memory.py);
        the memo does its work in a fraction of that.
        """
        if not text:
            return []
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._memo = {}
            _drop_model_cache(self.tokenizer)
        if len(text) >= MEMO_MAX_CHARS:
            return self._encode(text, context)
        key = (text, context)
        ids = self._memo.get(key)
        if ids is None:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            ids = self._memo[key] = tuple(self._encode(text, context))
        return list(ids)

    def _encode(self, text: str, context: int) -> list[int]:
        if self.rule == "plain":
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        s = text.replace(" ", _SPIECE)
        if context == _CONTINUE or (context == _AFTER_SPECIAL and self.rule == "sp_nonlegacy"):
            return self._bpe(s)
        if context == _AFTER_SPECIAL and self.rule == "sp_nonlegacy_431" and not text.startswith(" "):
            toks = self._model.tokenize(_SPIECE + s)
            ids, first = [t.id for t in toks], toks[0].value
            if first.startswith(_SPIECE):  # 4.31 cuts the "▁" off the first piece, keeping the rest
                tid = self._model.token_to_id(first[1:]) if len(first) > 1 else None
                ids = ids[1:] if len(first) == 1 else [tid if tid is not None else self._unk_id] + ids[1:]
            return ids
        return self._bpe(_SPIECE + s)


def _drop_model_cache(tokenizer: Any) -> None:
    """Set the ``tokenizers`` model's cache of this process to zero entries (where the model has one)."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    resize = getattr(model, "_resize_cache", None)
    if resize is not None:
        resize(0)


@dataclass(frozen=True)
class EncodedSample:
    """Token ids and labels of one sample.

    Attributes:
        input_ids: ids; each image is a run of ``image_token_id`` (length ``num_image_tokens``).
        labels: ``input_ids`` where trained, ``-100`` elsewhere.
        image_spans: ``(start, length)`` of every image run (after truncation; a cut run is short).
        num_supervised: number of trained labels.
        truncated: the sequence was cut at ``model_max_length``.
        image_truncated: an image run was cut (native models then cannot match its features).
        num_tokens: ``len(input_ids)``.
        num_tokens_untruncated: length before truncation.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    num_supervised: int
    truncated: bool
    image_truncated: bool
    num_tokens: int
    num_tokens_untruncated: int


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent segments of the same kind.

    Cuts must fall only where the original tokenization also has a boundary: a separator space
    ends a segment (``"questions. "``) but SentencePiece attaches a space to the *next* word, so
    masked text is tokenized as one run and pieces are cut only at masked/trained changes.
    """
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].trained == seg.trained:
            out[-1] = Segment(out[-1].text + seg.text, seg.trained)
        else:
            out.append(seg)
    return out


def encode_segments(
    segments: Sequence[Segment],
    encoder: PieceEncoder,
    *,
    image_token: str | None,
    image_token_id: int,
    num_image_tokens: int,
    bos_token_id: int | None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenize rendered segments into ``(input_ids, labels, image_spans)`` without truncation.

    Args:
        segments: output of :func:`icmlab.inputs.conversation.conversation_segments`.
        encoder: the piece encoder.
        image_token: image token string to expand, or None (text only: the token stays text).
        image_token_id: id repeated for each image (``-200`` reproduces the original layout).
        num_image_tokens: run length of one image.
        bos_token_id: id put first (masked), or None for tokenizers without BOS.

    Returns:
        The three lists (image positions are labelled ``-100``).
    """
    ids: list[int] = [] if bos_token_id is None else [bos_token_id]
    labels, spans, ctx = [IGNORE_INDEX] * len(ids), [], _START
    for text, trained in _merge(segments):
        parts = text.split(image_token) if image_token else [text]
        for k, part in enumerate(parts):
            if k:
                # Upstream tokenizes the text after an image in a fresh call: it starts a chunk anew.
                spans.append((len(ids), num_image_tokens))
                ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                ctx = _START
            for chunk in encoder.chunks(part):
                if isinstance(chunk, int):
                    piece, ctx = [chunk], _AFTER_SPECIAL
                else:
                    piece, ctx = encoder.encode(chunk, ctx), _CONTINUE
                ids.extend(piece)
                labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return ids, labels, spans


def truncate(
    ids: list[int],
    labels: list[int],
    spans: list[tuple[int, int]],
    max_length: int,
    mode: Literal["expanded", "collapsed"] = "expanded",
) -> tuple[list[int], list[int], list[tuple[int, int]], bool]:
    """Cut a sample to ``max_length``.

    ``expanded`` cuts the sequence with its image runs expanded (LLaVA-v1.5: the collator cuts
    the -200 form at M, then the model cuts the spliced sequence at M again, which equals one cut
    of the expanded form). ``collapsed`` counts each image as one position (mPLUG-Owl2: only the
    collator cuts, so the spliced sequence may reach ``M - 1 + N``).

    Returns:
        ``(ids, labels, spans, image_truncated)``.
    """
    if mode not in ("expanded", "collapsed"):
        raise ValueError(f"unknown truncation mode {mode!r}; use 'expanded' or 'collapsed'")
    cut = max_length
    if mode == "collapsed":
        extra = 0
        for start, length in spans:
            if start - extra >= max_length:
                break
            extra += length - 1
        cut = max_length + extra
    if len(ids) <= cut:
        return ids, labels, spans, False
    kept = [(s, min(n, cut - s)) for s, n in spans if s < cut]
    image_cut = len(kept) < len(spans) or any(n != m for (_, n), (_, m) in zip(kept, spans))
    return ids[:cut], labels[:cut], kept, image_cut


def _finish(ids, labels, spans, model_max_length, truncation) -> EncodedSample:
    total, image_cut = len(ids), False
    if model_max_length is not None:
        ids, labels, spans, image_cut = truncate(ids, labels, spans, model_max_length, truncation)
    return EncodedSample(
        input_ids=ids,
        labels=labels,
        image_spans=spans,
        num_supervised=sum(1 for x in labels if x != IGNORE_INDEX),
        truncated=len(ids) < total,
        image_truncated=image_cut,
        num_tokens=len(ids),
        num_tokens_untruncated=total,
    )


def _bos(tokenizer: Any) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has no bos_token; construct it with bos_token='<s>' (LLaMA) or set one")
    return tokenizer.bos_token_id


def encode_conversation(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    template: str | ChatTemplate = "vicuna_v1",
    dialect: str = "llava15",
    image_token_id: int,
    num_image_tokens: int,
    model_max_length: int | None,
    has_image: bool | None = None,
    rule: str | None = None,
    truncation: Literal["expanded", "collapsed"] = "expanded",
    encoder: PieceEncoder | None = None,
) -> EncodedSample:
    """Tokenize a LLaVA-JSON record for training, with labels on the answers only.

    Labels keep exactly the tokens of ``" " + answer + "</s>"`` of each non-empty assistant turn;
    BOS, system, user turns, ``ASSISTANT:``, images, empty answers and a trailing user turn are
    ``-100``. A leading assistant turn is dropped. With an image, every message has its image
    token moved to the front (upstream ``preprocess_multimodal``) and each token becomes a run of
    ``num_image_tokens`` ids ``image_token_id``; without one, the token string is plain text.

    Args:
        record: ``{"id", "conversations": [{"from", "value"}...], "image"?}``.
        tokenizer: transformers tokenizer (LLaMA SentencePiece-BPE or any fast tokenizer).
        template: chat template or its name (``vicuna_v1`` trains both families).
        dialect: ``llava15`` (``<image>``) or ``mplug_owl2`` (``<|image|>``); also picks the default rule.
        image_token_id: id of the image placeholder (``-200`` for the original layout).
        num_image_tokens: placeholders per image (576 LLaVA-336, 65 mPLUG-Owl2-448, 1 original layout).
        model_max_length: cut length, or None for no truncation.
        has_image: multimodal path; default ``"image" in record``.
        rule: tokenization rule (:data:`TOKENIZATION_RULES`); default per dialect.
        truncation: ``expanded`` (LLaVA, default) or ``collapsed`` (mPLUG-Owl2 upstream), see :func:`truncate`.
        encoder: a prebuilt :class:`PieceEncoder` to reuse across records (then ``rule`` is ignored).

    Returns:
        The :class:`EncodedSample`.

    Raises:
        ValueError: malformed record (names the record id), unknown template/dialect/rule.
    """
    rid = str(record.get("id", "?"))
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"record {rid}: 'conversations' must be a non-empty list of {{from, value}}")
    tmpl = get_template(template) if isinstance(template, str) else template
    image_token = image_token_for(dialect)
    has_image = "image" in record if has_image is None else has_image
    enc = encoder or PieceEncoder(tokenizer, rule, dialect=dialect)
    turns = turns_from_record(convs, record_id=rid, image_token=image_token if has_image else None)
    ids, labels, spans = encode_segments(
        conversation_segments(tmpl, turns),
        enc,
        image_token=image_token if has_image else None,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        bos_token_id=_bos(tokenizer),
    )
    return _finish(ids, labels, spans, model_max_length, truncation)


def encode_prompt(
    question: str,
    tokenizer: Any,
    *,
    template: str | ChatTemplate = "llava_v1",
    dialect: str = "llava15",
    image_token_id: int,
    num_image_tokens: int,
    has_image: bool = True,
    history: Sequence[tuple[str, str]] = (),
    rule: str | None = None,
    encoder: PieceEncoder | None = None,
) -> EncodedSample:
    """Tokenize an inference prompt ending with ``ASSISTANT:`` (all labels ``-100``).

    Args:
        question: user question; with ``has_image`` the image token is put at its front.
        tokenizer: as for :func:`encode_conversation`.
        template: inference template (``llava_v1``, ``mplug_owl2``, ``llava_hf``).
        dialect: image token dialect.
        image_token_id: image placeholder id.
        num_image_tokens: placeholders per image.
        has_image: whether the prompt carries an image.
        history: earlier ``(question, answer)`` pairs.
        rule: tokenization rule, default per dialect.
        encoder: prebuilt :class:`PieceEncoder` to reuse.

    Returns:
        The :class:`EncodedSample` (never truncated).
    """
    tmpl = get_template(template) if isinstance(template, str) else template
    image_token = image_token_for(dialect)
    enc = encoder or PieceEncoder(tokenizer, rule, dialect=dialect)
    turns = prompt_turns(question, history=history, image_token=image_token if has_image else None)
    ids, labels, spans = encode_segments(
        conversation_segments(tmpl, turns, add_generation_prompt=True),
        enc,
        image_token=image_token if has_image else None,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        bos_token_id=_bos(tokenizer),
    )
    return _finish(ids, labels, spans, None, "expanded")


def to_original_layout(sample: EncodedSample, placeholder: int = ORIGINAL_IMAGE_INDEX) -> tuple[list[int], list[int]]:
    """Collapse every image run back into one ``placeholder`` (the original -200 form).

    Returns:
        ``(input_ids, labels)``; the image position has label ``-100``.
    """
    ids, labels, pos = [], [], 0
    for start, length in sample.image_spans:
        ids += sample.input_ids[pos:start] + [placeholder]
        labels += sample.labels[pos:start] + [IGNORE_INDEX]
        pos = start + length
    return ids + sample.input_ids[pos:], labels + sample.labels[pos:]


def segments_for_display(sample: EncodedSample, tokenizer: Any) -> list[tuple[str, str]]:
    """Describe a sample as ``(text, kind)`` runs for the inspect notebook.

    ``kind`` is ``"trained"``, ``"masked"`` or ``"image"``; an image run is one segment
    ``"<image ×N>"``. Text is decoded with the whole prefix, so spaces that SentencePiece folds
    into the next token are shown where they belong.

    Args:
        sample: an encoded sample.
        tokenizer: the tokenizer that produced it.

    Returns:
        The runs, in order; joining the non-image texts gives the decoded sample.
    """
    image_at, pos = dict(sample.image_spans), 0
    runs: list[tuple[str, list[int]]] = []  # (kind, ids) with images as a one-element marker
    while pos < len(sample.input_ids):
        if pos in image_at:
            runs.append(("image", [image_at[pos]]))
            pos += image_at[pos]
            continue
        kind = "masked" if sample.labels[pos] == IGNORE_INDEX else "trained"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(sample.input_ids[pos])
        else:
            runs.append((kind, [sample.input_ids[pos]]))
        pos += 1
    out: list[tuple[str, str]] = []
    text_ids: list[int] = []
    shown = ""  # decoded text so far
    for kind, ids in runs:
        if kind == "image":
            out.append((f"<image ×{ids[0]}>", "image"))
            continue
        text_ids += ids
        full = tokenizer.decode(text_ids, skip_special_tokens=False)
        # A prefix decode normally extends the previous one; fall back to the run alone when a
        # cut splits a multi-byte character.
        piece = full[len(shown) :] if full.startswith(shown) else tokenizer.decode(ids, skip_special_tokens=False)
        shown = full
        out.append((piece, kind))
    return out
