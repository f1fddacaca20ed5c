"""The lazy supervised dataset of the train stage: LLaVA-format JSON records → model inputs.

Like upstream's ``LazySupervisedDataset`` every sample is tokenized and its image decoded only when
the data loader asks for it. The records are a :class:`icmlab.inputs.recordstore.RecordStore`
(offsets into the memory-mapped JSON, one record decoded per access, modality lengths from the
byte scan), so ranks and their data-loader workers share the file's page cache instead of each
holding (and copying on write) gigabytes of Python objects. The pieces are the shared
ones, so training sees exactly what validation, inspection and the fixture proofs check:

- :func:`icmlab.inputs.encode.encode_conversation`: ``vicuna_v1`` template, labels on the answers
  only, the image token expanded into ``num_image_tokens`` placeholder ids, cut at
  ``model_max_length`` the way the family's upstream cuts;
- :func:`icmlab.inputs.images.load_and_preprocess`: PIL RGB + ``pad``/``square``/``resize`` + CLIP, from
  a path relative to ``cfg.data.root`` (the recipes' ``--image_folder``).

Text-only samples (no ``image`` key, or an image whose token is missing from the text) carry no
``pixel_values``; :class:`icmlab.train.trainer.IcmTrainer` runs the vision tower on a dummy image for
micro-batches without any image, so ZeRO-3 ranks never wait on each other.

With ``train.packing`` the collator packs each micro-batch into rows of at most
``model_max_length`` tokens (:mod:`icmlab.train.packing`): same samples and loss, no padding.

Usage::

    ds = SupervisedDataset.from_bundle(RecordStore.open(paths.training_json(cfg)), bundle, cfg)
    batch = TrainingCollator(bundle.tokenizer.pad_token_id)([ds[0], ds[1]])
    packed = TrainingCollator(bundle.tokenizer.pad_token_id, packing=True, max_length=2048)([ds[0], ds[1]])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from icmlab.inputs.collate import collate_for_training
from icmlab.inputs.conversation import image_token_for
from icmlab.inputs.encode import PieceEncoder, encode_conversation
from icmlab.inputs.image_guard import image_path
from icmlab.inputs.images import LeanClip, load_and_preprocess, processor_size
from icmlab.inputs.recordstore import RecordStore, modality_length
from icmlab.models.spec import family_spec
from icmlab.train.packing import pack_samples

log = logging.getLogger(__name__)

__all__ = ["SupervisedDataset", "TrainingCollator", "modality_length"]


class SupervisedDataset(Dataset):
    """Training samples built on access from LLaVA-format records.

    Args:
        records: the training records ``{id, image?, conversations}``: a
            :class:`~icmlab.inputs.recordstore.RecordStore`, or a list (stored compactly on entry).
        tokenizer: the model's tokenizer (needs ``bos_token_id``).
        image_processor: CLIP-style processor of the model.
        data_root: folder the records' ``image`` paths are relative to.
        family: ``llava15`` or ``mplug_owl2`` (image-token dialect and truncation rule).
        image_token_id: placeholder id of the native model.
        num_image_tokens: placeholders per image.
        model_max_length: sequence cut (image placeholders included).
        aspect_ratio: ``pad``, ``square`` or ``resize``.
        template: training chat template (``vicuna_v1`` for both families, as ``--version v1``).

    Raises:
        ValueError: ``records`` is not a list of mappings.
    """

    def __init__(
        self,
        records: RecordStore | Sequence[Mapping[str, Any]],
        *,
        tokenizer: Any,
        image_processor: Any,
        data_root: Path,
        family: str,
        image_token_id: int,
        num_image_tokens: int,
        model_max_length: int,
        aspect_ratio: str = "pad",
        template: str = "vicuna_v1",
    ) -> None:
        self.records = records if isinstance(records, RecordStore) else RecordStore.from_records(records)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.data_root = Path(data_root)
        self.family = family
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.model_max_length = model_max_length
        self.aspect_ratio = aspect_ratio
        self.template = template
        self.truncation = family_spec(family).truncation
        # One encoder for all records: building it compiles the special-token regex.
        self.encoder = PieceEncoder(tokenizer, dialect=family, literal=(image_token_for(family),))
        self.modality_lengths = self.records.modality_lengths
        self.lean = LeanClip.for_processor(image_processor, aspect_ratio)  # None: the processor call

    @classmethod
    def from_bundle(
        cls, records: RecordStore | Sequence[Mapping[str, Any]], bundle: Any, cfg: Any
    ) -> "SupervisedDataset":
        """Build the dataset for a loaded :class:`icmlab.models.ModelBundle` and a ``RunConfig``."""
        return cls(
            records,
            tokenizer=bundle.tokenizer,
            image_processor=bundle.image_processor,
            data_root=cfg.data.root,
            family=bundle.family,
            image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
            model_max_length=cfg.data.model_max_length,
            aspect_ratio=cfg.data.image_aspect_ratio,
        )

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, index: int) -> dict[str, Any]:
        """Tokenize record ``index`` (no image decoding): ``input_ids``, ``labels``, ``image_path``.

        Raises:
            ValueError: a malformed record, or a sample with several image tokens (one image per
                sample, as upstream); the message names the record.
        """
        rec = self.records[index]
        enc = encode_conversation(
            rec,
            self.tokenizer,
            template=self.template,
            dialect=self.family,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            model_max_length=self.model_max_length,
            truncation=self.truncation,
            encoder=self.encoder,
        )
        ids, labels, spans = enc.input_ids, enc.labels, enc.image_spans
        rid = rec.get("id", index)
        if len(spans) > 1:
            raise ValueError(
                f"record {rid}: {len(spans)} image tokens in the conversation but one image; keep one "
                f"{image_token_for(self.family)} (the validate stage reports these)"
            )
        if enc.image_truncated:
            # The cut went through the placeholder run: the native model needs all of them or none.
            start = spans[0][0] if spans else len(ids)  # no span left: the image lay past the cut
            log.warning("record %s: model_max_length cuts its image tokens; trained as text before the image", rid)
            ids, labels, spans = ids[:start], labels[:start], []
        image = rec.get("image") if spans else None
        return {"input_ids": ids, "labels": labels, "image_path": image, "id": rid}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.encode(index)
        image = sample.pop("image_path")
        if image is None:
            sample["pixel_values"] = None
        elif self.lean is not None:
            sample["pixel_values"] = self.lean.from_file(image_path(self.data_root, image))
        else:
            sample["pixel_values"] = load_and_preprocess(
                [image_path(self.data_root, image)], self.image_processor, self.aspect_ratio
            )[0]
        return sample

    def dummy_pixel_values(self) -> torch.Tensor:
        """A ``[1, 3, H, W]`` zero image of the processor's size (upstream's text-only stand-in)."""
        h, w = processor_size(self.image_processor)
        return torch.zeros(1, 3, h, w)


class TrainingCollator:
    """Right-pad ids/labels (shared :func:`collate_for_training`) and stack the images present.

    ``pixel_values`` holds one image per sample that has one, in batch order (the order of the
    placeholder runs), and is omitted when no sample of the batch has an image. ``use_cache`` is
    always ``False`` (no KV cache is built during training).

    With ``packing`` the micro-batch is packed instead (:func:`icmlab.train.packing.pack_samples`):
    rows of at most ``max_length`` tokens, ``position_ids`` restarting per sample, no
    ``attention_mask``, ``use_cache=False``, the first label of every sample masked, images in
    placeholder-run order.

    Args:
        pad_token_id: padding id of the tokenizer.
        packing: pack the micro-batch (``train.packing``).
        max_length: row capacity when packing (``data.model_max_length``).
        flatten: when packing, put all rows into one unpadded row; needed for flash-attention 2,
            which reads packed segments from position ids only for a batch of one row.

    Raises:
        ValueError: no pad token, or ``packing`` without a positive ``max_length``.
    """

    def __init__(
        self, pad_token_id: int, *, packing: bool = False, max_length: int | None = None, flatten: bool = False
    ) -> None:
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; LLaVA training pads with <unk>/<pad>")
        if packing and (max_length is None or max_length < 1):
            raise ValueError(f"train.packing needs a positive data.model_max_length (the row length), got {max_length}")
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.max_length = max_length
        self.flatten = flatten

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if self.packing:
            return pack_samples(
                samples, pad_token_id=self.pad_token_id, max_length=self.max_length, flatten=self.flatten
            )
        batch: dict[str, Any] = dict(collate_for_training(samples, pad_token_id=self.pad_token_id))
        images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        # LLaVA's inner LlamaModel reads use_cache from text_config (True in every checkpoint) and
        # would build a KV cache in each training forward; training never reads it back.
        batch["use_cache"] = False
        return batch
