"""Data-parallel evaluation: every rank answers a strided shard of the items; rank 0 gets them all back.

Launch the evaluate stage with torchrun (one rank per GPU, or several CPU ranks over gloo)::

    torchrun --nproc_per_node 8 -m icmlab evaluate parameters/X.yaml

:func:`init_from_env` joins the process group torchrun describes (``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; NCCL on CUDA, gloo on CPU) and pins each rank to its GPU. :func:`map_sharded` gives
rank ``r`` the items ``r, r + W, r + 2W, ...``, runs the answer function on them and all-gathers the
answers back into item order, so every rank ends with the full list and scores it identically; only
rank 0 writes files. Answers are independent per item (greedy decoding of left-padded batches equals
one-by-one decoding), hence W ranks give the answers of one rank; ``tests/test_eval_parallel.py``
proves it with 2 gloo ranks. Image controls are applied to the full list *before* sharding, so the
shuffled control pairs the same images whatever the rank count.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("icmlab.evaluate.parallel")
T = TypeVar("T")
R = TypeVar("R")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world()[0] == 0


def init_from_env(device: str) -> str:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 and return this rank's device.

    Args:
        device: ``cpu`` or ``cuda`` (the stage's choice).

    Returns:
        ``cpu`` or ``cuda:<LOCAL_RANK>``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        log.info("evaluation rank %d of %d (%s)", dist.get_rank(), size, device)
    return f"cuda:{local}" if device == "cuda" else "cpu"


def shard(n: int, rank: int, size: int) -> list[int]:
    """Indices of rank ``rank``'s strided shard of ``n`` items."""
    return list(range(rank, n, size))


def map_sharded(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` computed data-parallel: each rank maps its shard, the results are gathered.

    ``fn`` must map a list to a list of the same length, each result depending on its item only.
    """
    rank, size = world()
    if size == 1:
        return fn(items)
    mine = shard(len(items), rank, size)
    local = fn([items[i] for i in mine]) if mine else []
    gathered: list = [None] * size
    dist.all_gather_object(gathered, local)
    out: list = [None] * len(items)
    for r, results in enumerate(gathered):
        for i, value in zip(shard(len(items), r, size), results):
            out[i] = value
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()
