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
  then stop", and saves every ``train.save_every_minutes`` of wall time as well. With several ranks
  both flags are all-reduced (MAX) once per step, so every rank saves at the same step whichever rank
  got the signal; the time flag is rank 0's clock. :func:`install_sigterm_flag` catches SIGTERM from
  the start of a worker (before the model is loaded), the callback reads the flag.
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


# A plain flag, not a threading.Event: a second SIGTERM arriving while the handler runs would
# re-enter Event.set and deadlock on its (non-reentrant) lock.
_SIGTERM = [False]
_INSTALLED: list[Any] = []  # the handler that was there before install_sigterm_flag


def _on_sigterm(signum: int, frame: Any) -> None:
    if _SIGTERM[0]:
        return  # a repeat (the job's group and the scheduler both signal): nothing more to do
    _SIGTERM[0] = True
    log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")


def install_sigterm_flag() -> bool:
    """Make SIGTERM set a flag instead of killing the process (main thread only).

    Returns:
        True when installed (False outside the main thread, where signals cannot be caught).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _INSTALLED[:] = [previous]
    return True


def uninstall_sigterm_flag() -> None:
    """Restore the handler that :func:`install_sigterm_flag` replaced and clear the flag."""
    if _INSTALLED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _INSTALLED.pop())
    _SIGTERM[0] = False


def sigterm_received() -> bool:
    """Whether this process got SIGTERM since :func:`install_sigterm_flag`."""
    return _SIGTERM[0]


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, save a checkpoint, stop training.

    Also requests a save every ``save_every_minutes`` of wall time (None = never). The SIGTERM
    handler is installed at train begin unless :func:`install_sigterm_flag` already runs, and the
    previous one is restored at train end. ``stopped_at`` holds the step saved, or None.

    Args:
        save_every_minutes: wall-time checkpoint period (``train.save_every_minutes``).
    """

    def __init__(self, save_every_minutes: float | None = None) -> None:
        self.stopped_at: int | None = None
        self.save_every_s = save_every_minutes * 60.0 if save_every_minutes else None
        self._owns_handler = False
        self._last_save = time.monotonic()

    @property
    def requested(self) -> bool:
        """SIGTERM seen by this process."""
        return sigterm_received()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not _INSTALLED:
            self._owns_handler = install_sigterm_flag()
        self._last_save = time.monotonic()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_save = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        due = (
            self.save_every_s is not None
            and state.is_world_process_zero
            and time.monotonic() - self._last_save >= self.save_every_s
        )
        stop, save = self._agree(args, self.requested, due)
        if save:
            control.should_save = True
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._owns_handler:
            uninstall_sigterm_flag()
            self._owns_handler = False

    def _agree(self, args: Any, stop: bool, save: bool) -> tuple[bool, bool]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return stop, save
        # Ranks may get the signal a few steps apart; deciding together keeps their saves collective.
        flag = torch.tensor([float(stop), float(save)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag[0].item() > 0), bool(flag[1].item() > 0)
