"""How the train stage runs: in this process (CPU, one GPU) or as a ``deepspeed``/``torchrun`` job.

Several GPUs need one process per GPU, which a notebook kernel cannot host. For those runs the
stage saves ``<run_dir>/config.resolved.yaml`` and starts, as a subprocess::

    deepspeed [--hostfile H --num_nodes M] --num_gpus N --no_local_rank --module icmlab train <run_dir>/config.resolved.yaml
    torchrun --standalone --nproc-per-node N -m icmlab train <run_dir>/config.resolved.yaml

streaming its output into the notebook cell or terminal. Each worker runs the same
``icmlab.train.stage.run`` in-process (it sees ``LOCAL_RANK``/``WORLD_SIZE`` and never launches again),
so the CLI, the notebook and the workers share one code path. Interrupting the cell (or SIGTERM to
this process) sends SIGTERM to the whole job: the workers save a checkpoint at the end of their
current step and exit, and a rerun resumes from it.

Usage::

    from icmlab.train.launch import launch_mode, build_launch_command, run_launched
    if launch_mode(cfg) != "inprocess":
        run_launched(build_launch_command(cfg, config_path), cwd=project_root)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from icmlab.config import RunConfig

#: Exit status of a training process that SIGTERM stopped after saving a checkpoint (128 + 15).
STOPPED_BY_SIGTERM = 143
# Environment variables that mark a process started by a distributed launcher.
_WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def is_launched_worker() -> bool:
    """True inside a process started by deepspeed/torchrun (it must train, not launch again)."""
    return all(k in os.environ for k in _WORKER_ENV)


def launch_mode(cfg: RunConfig) -> str:
    """Decide how to run: ``"inprocess"``, ``"deepspeed"`` or ``"torchrun"``.

    ``auto`` trains in-process on CPU or one GPU and launches ``deepspeed`` (when a ZeRO config is
    chosen) or ``torchrun`` for several GPUs or nodes.

    Raises:
        ValueError: ``hardware.launcher: inprocess`` with several devices, or ``torchrun`` across nodes.
    """
    h = cfg.hardware
    if is_launched_worker():
        return "inprocess"
    world = cfg.world_size
    if h.launcher == "inprocess" or (h.launcher == "auto" and world == 1):
        if world > 1:
            raise ValueError(
                f"hardware.launcher: inprocess drives one device but hardware asks for {world} "
                f"({h.num_gpus} GPUs × {h.num_nodes} nodes); use launcher: auto, deepspeed or torchrun"
            )
        return "inprocess"
    mode = h.launcher if h.launcher != "auto" else ("deepspeed" if h.deepspeed != "none" else "torchrun")
    if mode == "torchrun" and h.num_nodes > 1:
        raise ValueError(
            "hardware.launcher: torchrun cannot start processes on other nodes from here; use "
            "launcher: deepspeed with hardware.hostfile for multi-node runs"
        )
    if mode == "deepspeed" and h.deepspeed == "none":
        raise ValueError("hardware.launcher: deepspeed needs a ZeRO config; set hardware.deepspeed (zero2/zero3)")
    return mode


def build_launch_command(cfg: RunConfig, config_path: Path, mode: str | None = None) -> list[str]:
    """The launcher command line for a multi-process run.

    Args:
        cfg: the run config (hardware section).
        config_path: the resolved config the workers load.
        mode: ``"deepspeed"`` or ``"torchrun"`` (default: :func:`launch_mode`).

    Returns:
        The argument vector.

    Raises:
        ValueError: for ``mode == "inprocess"`` or a hostfile that does not exist.
    """
    h = cfg.hardware
    mode = mode or launch_mode(cfg)
    worker = ["icmlab", "train", str(config_path)]
    if mode == "deepspeed":
        exe = shutil.which("deepspeed")
        cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
        if h.hostfile:
            if not Path(h.hostfile).is_file():
                raise ValueError(f"hardware.hostfile: {h.hostfile} does not exist (lines: 'host slots=N')")
            cmd += ["--hostfile", str(h.hostfile), "--num_nodes", str(h.num_nodes)]
        # --no_local_rank: the launcher would put --local_rank=N before the subcommand, which the CLI
        # parser rejects; workers read LOCAL_RANK from the environment instead.
        return cmd + ["--num_gpus", str(h.num_gpus), "--no_local_rank", "--module", *worker]
    if mode == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(h.num_gpus), "-m", *worker]
    raise ValueError(f"no launcher command for mode {mode!r}")


def run_launched(cmd: list[str], cwd: Path | None = None, grace_s: float = 600.0) -> int:
    """Run a launcher command, streaming its output live, and forward interruptions as SIGTERM.

    Args:
        cmd: from :func:`build_launch_command`.
        cwd: working directory (the project root, so relative paths resolve as in the notebook).
        grace_s: how long to wait for the checkpoint after an interruption before killing the job.

    Returns:
        The exit status: 0 when done, :data:`STOPPED_BY_SIGTERM` when the job was stopped from outside
        after saving a checkpoint.

    Raises:
        KeyboardInterrupt: re-raised after the job has saved its checkpoint and stopped.
        RuntimeError: the job failed (any other exit status).
    """
    print("launching:", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Own session: the whole job (launcher + workers) can be signalled as one group.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)
    stop = lambda *_: _terminate_group(proc)  # noqa: E731 - tiny forwarding handler
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no forwarding, the job still ends with us
        previous = None
    try:
        while True:
            try:
                _stream(proc)
                break
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: asking the job to checkpoint and stop ...", flush=True)
                _terminate_group(proc)
                deadline = time.monotonic() + grace_s
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.5)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted:
        raise KeyboardInterrupt(f"training job stopped (exit status {rc}); rerun to resume")
    if rc not in (0, STOPPED_BY_SIGTERM):
        raise RuntimeError(f"training job failed with exit status {rc}: {' '.join(cmd)} (output above)")
    return rc


def _stream(proc: subprocess.Popen) -> None:
    """Copy the job's output to ours as it comes, chunk-wise (keeps tqdm's carriage returns)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def _terminate_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
