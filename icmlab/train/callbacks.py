"""Trainer callbacks of the train stage: metrics JSONL, a compact progress bar, and SIGTERM → checkpoint.

- :class:`MetricsJsonlCallback` appends one JSON object per logging step to ``<run_dir>/metrics.jsonl``:
  ``step, epoch, loss, lr, grad_norm, samples_per_s, tokens_per_s, elapsed_s, eta_s`` (the notebook
  plots it live; tests compare loss sequences with it). On resume, lines past the checkpoint's step
  (written by the interrupted process after its last checkpoint) are dropped first, so the file
  always describes one consistent run.
- :class:`ProgressBarCallback` is a ``tqdm.auto`` bar (terminal or notebook widget) with loss, lr and
  throughput in its postfix; it replaces the Trainer's bar, which restarts at 0 on resume.
- :class:`GracefulStopCallback` turns SIGTERM (cluster pre-emption, ``kill``, the notebook's stop
  button sends SIGINT and is left alone) into "save a checkpoint at the end of this optimizer step,
  then stop". With several ranks the flag is all-reduced so every rank saves at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import torch
from transformers import TrainerCallback

from icmlab.io import write_jsonl

log = logging.getLogger(__name__)


class MetricsJsonlCallback(TrainerCallback):
    """Write training metrics to a JSONL file (main process only).

    Args:
        path: the metrics file (``paths.metrics_jsonl(cfg)``).
        global_batch_size: samples per optimizer step (all devices × accumulation).
    """

    def __init__(self, path: Path, global_batch_size: int) -> None:
        self.path = Path(path)
        self.global_batch_size = global_batch_size
        self._t0 = self._t_last = 0.0
        self._step0 = self._step_last = 0
        self._tokens_last = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._step0 = self._step_last = state.global_step
        self._tokens_last = state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        if state.global_step == 0:
            self.path.unlink(missing_ok=True)  # a fresh run starts a fresh file
        elif self.path.exists():
            write_jsonl(self.path, [r for r in _read_rows(self.path) if r.get("step", 0) <= state.global_step])

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the final train summary (train_runtime, ...) is not a step record
        now = time.perf_counter()
        steps = state.global_step - self._step_last
        dt = max(now - self._t_last, 1e-9)
        tokens = state.num_input_tokens_seen - self._tokens_last
        done = state.global_step - self._step0
        per_step = (now - self._t0) / done if done else float("nan")
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 6),
            "loss": logs.get("loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "samples_per_s": steps * self.global_batch_size / dt,
            "tokens_per_s": tokens / dt if tokens else None,
            "elapsed_s": now - self._t0,
            "eta_s": per_step * (state.max_steps - state.global_step) if done else None,
            "time": time.time(),
        }
        self._t_last, self._step_last, self._tokens_last = now, state.global_step, state.num_input_tokens_seen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:  # one short append per step: a crash loses at most this line
            f.write(orjson.dumps(row) + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _read_rows(path: Path) -> list[dict]:
    """Rows of a metrics file; a line cut by a killed process (only ever the last one) is skipped."""
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            log.warning("%s: skipping a truncated line (the previous process was killed while writing)", path)
    return rows


class ProgressBarCallback(TrainerCallback):
    """A tqdm progress bar over optimizer steps (continues from the resumed step)."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, save a checkpoint, stop training.

    The handler is installed at train begin (main thread only; elsewhere signals cannot be caught)
    and the previous handler is restored at train end. ``stopped_at`` holds the step saved, or None.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._any_rank_requested(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _any_rank_requested(self, args: Any) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        # Ranks may get the signal a few steps apart; deciding together keeps their saves collective.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)
