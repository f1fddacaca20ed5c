"""``IcmTrainer``: the HF ``Trainer`` with the three behaviours the LLaVA recipes need, and a safe resume.

Used by :mod:`icmlab.train.stage` (the stage); nothing here knows about a model family:

- **Modality-length grouped sampling** (LLaVA's ``--group_by_modality_length``): megabatches of
  ``world_size × micro-batch × accumulation`` samples that are all multimodal or all text-only, sorted
  by length inside; plain length grouping when the data has a single modality
  (:func:`modality_length_grouped_indices`). Its epoch is set by :meth:`IcmTrainer._run_epoch`, so a
  multi-rank run resumed mid-epoch replays that epoch's order (accelerate alone would not reach it).
- **A separate projector learning rate** (``mm_projector_lr`` / ``visual_abstractor_lr``): the
  projector's parameters get their own optimizer groups, picked by identity (so LoRA/PEFT name
  prefixes do not matter). Unlike mPLUG-Owl2 upstream, whose name filter never matches, the groups
  really exist: ``trainer.optimizer.param_groups`` shows them.
- **Text-only batches still run the vision tower, where an image batch does**: a micro-batch without
  any image feeds one dummy (zero) image through the vision tower and projector and joins the graph
  with weight 0 *before* the LLM, at the point of the forward where an image batch computes its
  features (:meth:`IcmTrainer.compute_loss`). Upstream feeds a zero image for the same reason. Under
  ZeRO-3 every module's parameter all-gather is a collective: two ranks that call the modules in
  different orders (one text-only, one with images) would pair the wrong gathers and hang; and DDP
  would see unused parameters. The loss and every gradient are exactly those without the dummy.
- **Resume restores the weights**: transformers 5's ``Trainer._load_from_checkpoint`` loads the
  checkpoint's state dict raw, but ``save_pretrained`` wrote it in the legacy key layout, so every key
  misses and training silently continues from the *initial* weights. :meth:`IcmTrainer._load_from_checkpoint`
  loads through ``from_pretrained`` (which applies the key mapping) and fails loudly on any mismatch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sampler
def _split_balanced(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` (sorted longest first) into ``num_chunks`` equal-count chunks of similar total length."""
    if len(indices) % num_chunks:
        # An incomplete megabatch cannot be balanced by count; keep its order and cut it evenly.
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for idx in indices:
        # Give the next-longest sample to the open chunk with the least total length.
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        target = min(open_chunks, key=lambda c: totals[c])
        chunks[target].append(idx)
        totals[target] += lengths[idx]
    return chunks


def _length_grouped(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Random order, cut into megabatches of ``world_size × batch_size``, longest first inside, balanced over ranks.

    Returns the megabatches (each a flat list in rank-major order: the first ``batch_size`` indices go
    to rank 0's batch, the next to rank 1's, ...).
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = []
    for start in range(0, len(perm), size):
        mb = sorted(perm[start : start + size], key=lambda i: lengths[i], reverse=True)
        megabatches.append([i for chunk in _split_balanced(mb, lengths, world_size) for i in chunk])
    return megabatches


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """The sample order of LLaVA's modality-grouped sampler (re-derived from its documented behaviour).

    Args:
        lengths: one signed length per sample: ``> 0`` multimodal, ``< 0`` text-only (LLaVA's
            ``modality_lengths``).
        batch_size: micro-batch per device.
        world_size: number of batches that form one megabatch (devices × gradient accumulation).
        generator: seeded RNG (seed + epoch), so a resumed run replays the same order.

    Returns:
        A permutation of ``range(len(lengths))`` in which every megabatch of ``world_size × batch_size``
        consecutive indices holds a single modality (except one final mixed megabatch made of the two
        modalities' leftovers), longest samples first inside each megabatch.

    Raises:
        ValueError: if a length is 0 (its modality is undefined).
    """
    if any(length == 0 for length in lengths):
        bad = next(i for i, length in enumerate(lengths) if length == 0)
        raise ValueError(f"modality length of sample {bad} is 0: every sample needs at least one word")
    mm = [i for i, length in enumerate(lengths) if length > 0]
    text = [i for i, length in enumerate(lengths) if length < 0]
    if not mm or not text:
        # One modality only: plain length grouping, as upstream.
        abs_lengths = [abs(length) for length in lengths]
        return [i for mb in _length_grouped(abs_lengths, batch_size, world_size, generator) for i in mb]
    size = world_size * batch_size
    groups = []
    for subset in (mm, text):
        sub_lengths = [abs(lengths[i]) for i in subset]
        groups.append(
            [[subset[j] for j in mb] for mb in _length_grouped(sub_lengths, batch_size, world_size, generator)]
        )
    full = [mb for g in groups for mb in g if len(mb) == size]
    leftovers = [i for g in groups for mb in g if len(mb) < size for i in mb]
    order = torch.randperm(len(full), generator=generator).tolist()
    megabatches = [full[k] for k in order]
    if leftovers:
        megabatches.append(leftovers)  # last, like upstream: the only megabatch that mixes modalities
    return [i for mb in megabatches for i in mb]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Sampler over :func:`modality_length_grouped_indices`; reshuffled per epoch via ``set_epoch``.

    Args:
        lengths: signed modality lengths (see :func:`modality_length_grouped_indices`).
        batch_size: micro-batch per device.
        world_size: devices × gradient accumulation (the megabatch is ``world_size × batch_size``).
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next (called by accelerate at each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, g))


# --------------------------------------------------------------------------- vision touch
def _tensor_sum(obj: Any) -> torch.Tensor | None:
    """Sum of every floating tensor inside ``obj`` (tensor, sequence, dict or ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    total = None
    for item in items:
        s = _tensor_sum(item)
        if s is not None:
            total = s if total is None else total + s
    return total


def _base_model(model: nn.Module) -> nn.Module:
    """The native model under DeepSpeed/DDP and PEFT wrappers."""
    model = getattr(model, "module", model)  # DeepSpeedEngine / DDP
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def takes_images_without_placeholders(model: nn.Module) -> bool:
    """True when ``model``'s forward accepts ``pixel_values`` for a batch without image placeholders.

    mPLUG-Owl2's ``embed_multimodal`` encodes such images first (as for an image batch) and adds
    ``0 × features`` to the embeddings; transformers' LLaVA raises on the mismatch instead.
    """
    inner = getattr(model, "model", model)
    return callable(getattr(inner, "embed_multimodal", None))


# --------------------------------------------------------------------------- trainer
class IcmTrainer(Trainer):
    """HF ``Trainer`` with modality grouping, a projector lr, vision touch on text-only batches and a safe resume.

    Args:
        *args: as ``transformers.Trainer``.
        projector_parameters: the projector's parameters (identity decides the group).
        projector_lr: their learning rate; ``None`` = the main lr (no separate groups).
        modality_lengths: signed lengths per sample, for ``group_by_modality_length``.
        group_by_modality_length: use :class:`ModalityLengthGroupedSampler`.
        dummy_pixel_values: one image ``[1, 3, H, W]`` used to run the vision tower on text-only batches.
        vision_module: name of the vision encoder submodule (its dtype/device is used for the dummy image).
        **kwargs: as ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        projector_parameters: Sequence[nn.Parameter] = (),
        projector_lr: float | None = None,
        modality_lengths: Sequence[int] | None = None,
        group_by_modality_length: bool = False,
        dummy_pixel_values: torch.Tensor | None = None,
        vision_module: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector_param_ids = {id(p) for p in projector_parameters}
        self.projector_lr = projector_lr
        self.modality_lengths = list(modality_lengths) if modality_lengths is not None else None
        self.group_by_modality_length = group_by_modality_length
        self.dummy_pixel_values = dummy_pixel_values
        self.vision_module = vision_module

    # ---------------------------------------------------------------- data order
    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        if not self.group_by_modality_length or self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        # LLaVA: megabatch = micro-batch × (world size × accumulation).
        self._grouped_sampler = ModalityLengthGroupedSampler(
            self.modality_lengths,
            batch_size=self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        return self._grouped_sampler

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """Set the grouped sampler's epoch before each epoch, also when resuming mid-epoch on several ranks.

        accelerate forwards ``set_epoch`` two wrappers deep only; a resumed multi-rank epoch wraps
        the sampler in three (skip → rank shard → batch sampler), so without this the resumed
        epoch would replay epoch 0's order.
        """
        sampler = getattr(self, "_grouped_sampler", None)
        epoch = kwargs.get("epoch", args[1] if len(args) > 1 else None)
        if sampler is not None and isinstance(epoch, int):
            sampler.set_epoch(epoch)
        return super()._run_epoch(*args, **kwargs)

    # ---------------------------------------------------------------- optimizer
    def build_param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups: (decay, no decay) × (projector at ``projector_lr``, the rest at ``lr``).

        Args:
            model: the model whose trainable parameters are grouped.

        Returns:
            Non-empty groups; projector groups carry their own ``lr``.
        """
        decay = set(self.get_decay_parameter_names(model))
        separate = self.projector_lr is not None and self.projector_lr != self.args.learning_rate
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = (separate and id(p) in self.projector_param_ids, name in decay)
            groups.setdefault(key, []).append(p)
        out = []
        for (is_proj, has_decay), params in sorted(groups.items()):
            group = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if is_proj:
                group["lr"] = self.projector_lr
            out.append(group)
        return out

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW over :meth:`build_param_groups` (DeepSpeedCPUAdam when ZeRO offloads the optimizer)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = self.build_param_groups(opt_model)
        kwargs = {
            "lr": self.args.learning_rate,
            "betas": (self.args.adam_beta1, self.args.adam_beta2),
            "eps": self.args.adam_epsilon,
        }
        ds_cfg = getattr(self.args, "hf_deepspeed_config", None)
        if ds_cfg is not None and ds_cfg.is_offload():
            # ZeRO-Offload refuses client optimizers other than its vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(groups, **kwargs)
        return self.optimizer

    # ---------------------------------------------------------------- loss
    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Model loss; a text-only training micro-batch also runs the vision path on a dummy image (× 0).

        The dummy goes through the model's own order of modules, so that the ZeRO-3 all-gathers of
        every rank pair up whatever modality each rank's micro-batch has:

        - a model whose forward takes images without placeholders (mPLUG-Owl2: ``embed_multimodal``
          encodes them first and adds ``0 × features``) simply gets ``pixel_values`` = the dummy;
        - otherwise (transformers' LLaVA embeds the tokens, then encodes the images, then runs the
          LLM, and refuses images without placeholders), a forward hook on the input embeddings
          encodes the dummy right after the embedding lookup and adds ``0 × features`` to its output.
        """
        if self.dummy_pixel_values is None or not model.training or inputs.get("pixel_values") is not None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        base = _base_model(model)
        pixels = self._dummy_pixels(base)
        if takes_images_without_placeholders(base):
            return super().compute_loss(
                model,
                {**inputs, "pixel_values": pixels},
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

        def add_zero_image(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            total = _tensor_sum(base.get_image_features(pixel_values=pixels))
            if total is None:
                raise RuntimeError(f"{type(base).__name__}.get_image_features returned no tensor to attach")
            return output + 0.0 * total.to(output.dtype)

        handle = base.get_input_embeddings().register_forward_hook(add_zero_image)
        try:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            handle.remove()

    def _dummy_pixels(self, base: nn.Module) -> torch.Tensor:
        owner = base.get_submodule(self.vision_module) if self.vision_module else base
        ref = next(owner.parameters())
        return self.dummy_pixel_values.to(device=ref.device, dtype=ref.dtype)

    # ---------------------------------------------------------------- resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore weights through ``from_pretrained``'s key mapping (see the module docstring).

        Raises:
            RuntimeError: the checkpoint's keys do not match the model's (the silent-resume pitfall).
        """
        model = self.model if model is None else model
        ckpt = Path(resume_from_checkpoint)
        if hasattr(model, "get_base_model") or not (ckpt / "config.json").exists():
            # PEFT adapters and other layouts: the Trainer's own loader handles them correctly.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(model, ckpt)


def load_checkpoint_weights(model: nn.Module, checkpoint_dir: Path) -> None:
    """Copy the weights of a ``save_pretrained`` directory into ``model``, with transformers' key mapping.

    Args:
        model: the live model (its class must be a ``PreTrainedModel`` that can read the directory).
        checkpoint_dir: a checkpoint written by ``save_pretrained`` (e.g. ``checkpoint-N``).

    Raises:
        RuntimeError: keys missing or unexpected after the mapping.
    """
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(str(checkpoint_dir), dtype=dtype)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head ↔ embeddings) may legitimately be absent from one side.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"resume from {checkpoint_dir}: weights do not match the model (missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}); refusing to continue from partially restored weights"
        )
    log.info("restored %d weight tensors from %s", len(state), checkpoint_dir)
    del loaded, state
