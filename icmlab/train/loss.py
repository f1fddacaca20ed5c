"""How the loss of one optimizer step is averaged: upstream's per-micro-batch mean or transformers 5's token mean.

``train.loss_normalization`` picks one (default ``micro_batch_mean``, as upstream):

- ``micro_batch_mean`` — upstream (transformers 4.31/4.37 under LLaVA and mPLUG-Owl2): every
  micro-batch's loss is the mean cross-entropy over *its* answer tokens; the Trainer divides it by
  the accumulation steps and DeepSpeed/DDP average the ranks' gradients, so the step's loss is the
  plain mean of the micro-batch means. A micro-batch with 3 answer tokens weighs as much as one
  with 300.
- ``token_mean`` — transformers >= 4.46 (the "gradient accumulation fix"): the Trainer counts the
  answer tokens of the whole global batch (all accumulation steps, all ranks) and the model divides
  its summed cross-entropy by that count, so every answer token weighs the same.

The two differ whenever micro-batches hold different numbers of answer tokens (always, with
Q-Instruct's one-letter and paragraph answers). The switch needs no code in the trainer: the family
adapters call :func:`icmlab.models.set_loss_normalization` (re-exported here), which sets the
model's ``accepts_loss_kwargs``, the attribute the HF Trainer reads to decide whether it passes
``num_items_in_batch`` to the model (token mean) or divides per-micro-batch means by the
accumulation steps (micro-batch mean); :func:`icmlab.train.args.build_training_args` sets
``average_tokens_across_devices`` to match.

:func:`step_loss` is the reference arithmetic (used by the tests and the docs)::

    from icmlab.train.loss import step_loss
    step_loss(sums=[6.0, 4.0], counts=[3, 1], mode="micro_batch_mean")   # (6/3 + 4/1) / 2 = 3.0
    step_loss(sums=[6.0, 4.0], counts=[3, 1], mode="token_mean")         # (6 + 4) / (3 + 1) = 2.5
"""

from __future__ import annotations

from typing import Sequence

import torch

from icmlab.models import LOSS_NORMALIZATIONS, set_loss_normalization  # noqa: F401  (re-exported)

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a causal LM micro-batch and its number of answer tokens.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]``, ``-100`` where nothing is trained (prompt, image, padding).

    Returns:
        ``(sum of the per-token losses, number of trained tokens)`` with the usual shift
        (position ``i`` predicts label ``i + 1``).
    """
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[..., 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int(shift_labels.ne(IGNORE_INDEX).sum())


def step_loss(sums: Sequence[torch.Tensor | float], counts: Sequence[int], mode: str) -> torch.Tensor:
    """The loss of one optimizer step from its micro-batches (every accumulation step of every rank).

    Args:
        sums: per micro-batch, the summed token cross-entropy (:func:`token_losses`).
        counts: per micro-batch, the number of trained tokens.
        mode: ``micro_batch_mean`` (upstream: mean of ``sum / count``) or ``token_mean``
            (``sum of sums / sum of counts``).

    Returns:
        A scalar tensor; differentiable when ``sums`` are.

    Raises:
        ValueError: unknown mode, no micro-batch, or mismatched lengths.
    """
    if mode not in LOSS_NORMALIZATIONS:
        raise ValueError(f"train.loss_normalization: {mode!r}; allowed: {', '.join(LOSS_NORMALIZATIONS)}")
    if not sums or len(sums) != len(counts):
        raise ValueError(f"step_loss: {len(sums)} sums for {len(counts)} counts (one of each per micro-batch)")
    values = [s if isinstance(s, torch.Tensor) else torch.tensor(float(s)) for s in sums]
    if mode == "micro_batch_mean":
        # An all-masked micro-batch gives NaN here, exactly as the mean cross-entropy of upstream does.
        return torch.stack([v / c if c else v * float("nan") for v, c in zip(values, counts)]).mean()
    return torch.stack(values).sum() / sum(counts)
