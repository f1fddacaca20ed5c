"""What the train stage builds before it trains, shared with the dry start (:mod:`icmlab.train.dry_start`).

- :func:`build_collator`: right padding, or packing (``train.packing``);
- :func:`build_trainer`: the :class:`~icmlab.train.trainer.IcmTrainer` with the stage's callbacks,
  projector learning-rate groups, modality-grouped sampler and the dummy image of text-only batches;
- :func:`single_process_group`: the one-member process group an in-process DeepSpeed engine needs,
  with the environment restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Sequence

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.models import get_family
from icmlab.train.args import projector_parameters

log = logging.getLogger("icmlab.train.build")


def build_collator(cfg: RunConfig, bundle: Any) -> Any:
    """The micro-batch collator: right padding, or packing into ``data.model_max_length`` rows (``train.packing``).

    flash-attention 2 reads packed segments from position ids only for a one-row batch, so its
    packed rows are flattened into one (see :mod:`icmlab.train.packing`); sdpa/eager keep the rows.
    """
    from icmlab.train.dataset import TrainingCollator

    if not cfg.train.packing:
        return TrainingCollator(bundle.tokenizer.pad_token_id)
    attn = bundle.extra.get("attn_implementation") or getattr(bundle.model.config, "_attn_implementation", None)
    flatten = attn == "flash_attention_2"
    log.info(
        "packing each micro-batch of %d samples into rows of <= %d tokens (%s attention%s)",
        cfg.train.per_device_batch_size,
        cfg.data.model_max_length,
        attn,
        ", rows flattened into one varlen row" if flatten else ", block-diagonal mask from position ids",
    )
    return TrainingCollator(
        bundle.tokenizer.pad_token_id, packing=True, max_length=cfg.data.model_max_length, flatten=flatten
    )


@contextlib.contextmanager
def single_process_group(cfg: RunConfig) -> Iterator[None]:
    """The one-member process group an in-process DeepSpeed engine needs (as the train stage sets it up),
    undone afterwards together with the global ZeRO config.

    The whole environment is restored on exit: DeepSpeed and accelerate write rank variables (and
    ``ACCELERATE_USE_DEEPSPEED``) into ``os.environ`` and never remove them, which would make a later
    run in this process look like a launched worker or a DeepSpeed run.
    """
    saved = dict(os.environ)
    if cfg.hardware.deepspeed != "none":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(port)),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
        ):
            os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)
        if cfg.hardware.deepspeed != "none":
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def build_trainer(cfg: RunConfig, bundle: Any, dataset: Any, args: Any, callbacks: Sequence[Any] = ()) -> Any:
    """The train stage's :class:`~icmlab.train.trainer.IcmTrainer` (callbacks, projector lr groups, sampler, collator).

    Args:
        cfg: the run config.
        bundle: from the family's ``load_for_training``.
        dataset: the :class:`~icmlab.train.dataset.SupervisedDataset`.
        args: from :func:`~icmlab.train.args.build_training_args`.
        callbacks: extra callbacks (the stage adds its graceful-stop callback here).

    Returns:
        The trainer, with the Trainer's printer/progress callbacks replaced by ours.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from icmlab.train.callbacks import MetricsJsonlCallback, ProgressBarCallback
    from icmlab.train.trainer import IcmTrainer

    family = get_family(cfg.model.family)
    trainer = IcmTrainer(
        model=bundle.model,
        args=args,
        train_dataset=dataset,
        data_collator=build_collator(cfg, bundle),
        processing_class=bundle.tokenizer,
        callbacks=[
            MetricsJsonlCallback(paths.metrics_jsonl(cfg), cfg.train.global_batch_size),
            ProgressBarCallback(),
            *callbacks,
        ],
        projector_parameters=projector_parameters(bundle.model, family.MODULE_GROUPS["projector"]),
        projector_lr=cfg.train.projector_lr,
        modality_lengths=dataset.modality_lengths,
        group_by_modality_length=cfg.train.group_by_modality_length,
        dummy_pixel_values=dataset.dummy_pixel_values(),
        vision_module=family.MODULE_GROUPS["vision_encoder"][0],
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer
