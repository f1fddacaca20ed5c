"""Token lengths as the trainer builds them: the tokenizer setup and per-record counts.

The validate and inspect stages measure records with the trainer's own encoding
(:func:`icmlab.inputs.encode.encode_conversation`, template ``vicuna_v1``, image tokens expanded to
the model's count), so "truncated at ``model_max_length``" means what it will mean in training.

- :func:`length_setup_for` loads the model's tokenizer and image-token count from local files
  only (never downloads); it answers ``(None, reason)`` when they are not there yet.
- :func:`record_length` counts one record exactly; :func:`length_bound` is a cheap upper bound
  that decides which records need the exact count.

Usage::

    from icmlab.inputs.lengths import length_setup_for, record_length
    setup, reason = length_setup_for(cfg)
    if setup is not None:
        record_length(record, setup)   # {tokens, untruncated, supervised, truncated, image_cut}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from icmlab.config import RunConfig
from icmlab.models.spec import DIALECTS, family_spec


@dataclass
class LengthSetup:
    """How the trainer tokenizes: what the length check needs.

    Attributes:
        tokenizer: the model's tokenizer (fast).
        family: ``llava15`` or ``mplug_owl2`` (dialect, tokenization rule, truncation rule).
        num_image_tokens: placeholders per image (576 LLaVA-336, 65 mPLUG-Owl2, 64 demo).
        model_max_length: the cut length.
        source: where the tokenizer and the image-token count came from (for the report).
        template: training template (``vicuna_v1`` for both families, ``--version v1``).
    """

    tokenizer: Any
    family: str
    num_image_tokens: int
    model_max_length: int
    source: str = ""
    template: str = "vicuna_v1"
    _encoder: Any = field(default=None, repr=False)

    def encoder(self) -> Any:
        """The trainer's :class:`icmlab.inputs.encode.PieceEncoder` (built once)."""
        if self._encoder is None:
            from icmlab.inputs.encode import PieceEncoder

            self._encoder = PieceEncoder(self.tokenizer, dialect=self.family, literal=(DIALECTS[self.family],))
        return self._encoder

    def __getstate__(self) -> dict:  # the encoder holds a compiled regex: rebuild it in workers
        return {**self.__dict__, "_encoder": None}

    def encode(self, record: dict) -> Any:
        """The record's :class:`~icmlab.inputs.encode.EncodedSample` exactly as the trainer builds it
        (placeholder image id ``-200``, the family's truncation rule)."""
        from icmlab.inputs.encode import encode_conversation

        return encode_conversation(
            record,
            self.tokenizer,
            template=self.template,
            dialect=self.family,
            image_token_id=-200,
            num_image_tokens=self.num_image_tokens,
            model_max_length=self.model_max_length,
            truncation=family_spec(self.family).truncation,
            encoder=self.encoder(),
        )


def record_length(record: dict, setup: LengthSetup) -> dict:
    """Token counts of one (schema-valid) record exactly as the trainer builds it.

    Returns:
        ``{tokens, untruncated, supervised, truncated, image_cut}``.
    """
    enc = setup.encode(record)
    return {
        "tokens": enc.num_tokens,
        "untruncated": enc.num_tokens_untruncated,
        "supervised": enc.num_supervised,
        "truncated": enc.truncated,
        "image_cut": enc.image_truncated,
    }


def length_bound(record: dict, num_image_tokens: int) -> int:
    """An upper bound on the token count (every token covers at least one byte, plus template overhead)."""
    text = sum(len(t["value"].encode()) for t in record["conversations"])
    return text + 32 * len(record["conversations"]) + 300 + (num_image_tokens if "image" in record else 0)


def length_setup_for(cfg: RunConfig) -> tuple[LengthSetup | None, str]:
    """Load the model's tokenizer and image-token count from local files only.

    The tokenizer comes from ``cfg.model.llm`` for LLaVA ``mix`` (Vicuna + CLIP + projector) and
    from ``cfg.model.base`` otherwise; the image-token count from the checkpoint's config
    (``image_seq_length``, the vision tower's grid, or mPLUG-Owl2's abstractor queries + 1).

    Returns:
        ``(setup, "")``, or ``(None, reason)`` when the tokenizer is not available locally.
    """
    m = cfg.model
    name = getattr(m, family_spec(m.family).tokenizer_source(cfg.train.strategy))
    if not name:
        return None, "no tokenizer source configured (model.base / model.llm)"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, revision=m.revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"; the reason is reported
        return (
            None,
            f"tokenizer of {name} not available locally ({type(e).__name__}: {str(e)[:160]}); run download first",
        )
    n, how = _num_image_tokens(cfg)
    return LengthSetup(
        tok, m.family, n, cfg.data.model_max_length, source=f"tokenizer {name}; {n} image tokens ({how})"
    ), ""


def _num_image_tokens(cfg: RunConfig) -> tuple[int, str]:
    m = cfg.model
    default = family_spec(m.family).num_image_tokens

    def config(where: str | None) -> dict:
        if not where:
            return {}
        p = Path(where) / "config.json"
        if not p.is_file():  # a hub id: its config only if it is in the local cache (never downloaded here)
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(where, "config.json", revision=m.revision)
            except ValueError:  # not a valid repo id
                cached = None
            p = Path(cached) if isinstance(cached, str) else p
        return orjson.loads(p.read_bytes()) if p.is_file() else {}

    c = config(m.base)
    if m.family == "mplug_owl2":
        q = (c.get("abstractor_config") or c.get("visual_abstractor") or {}).get("num_learnable_queries")
        return (q + 1, f"{m.base} abstractor queries + 1") if q else (default, "mPLUG-Owl2 default")
    if cfg.train.strategy != "mix" and c.get("image_seq_length"):
        return int(c["image_seq_length"]), f"{m.base} image_seq_length"
    vision = c.get("vision_config") if cfg.train.strategy != "mix" else None
    vision = vision or config(m.vision_tower).get("vision_config") or config(m.vision_tower)
    if vision.get("image_size") and vision.get("patch_size"):
        return (vision["image_size"] // vision["patch_size"]) ** 2, "vision tower grid"
    tower = str(c.get("mm_vision_tower") or m.vision_tower or "")
    if tower.endswith("336"):
        return 576, f"{tower}: 24x24 patches"
    return default, "LLaVA-v1.5 default (config not found)"
