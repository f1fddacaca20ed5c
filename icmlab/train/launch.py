"""How the train stage runs: in this process (CPU, one GPU) or as a ``deepspeed``/``torchrun`` job.

Several GPUs (or several CPU ranks, ``hardware.num_processes``) need one process per rank, which a
notebook kernel cannot host. For those runs the stage saves ``<run_dir>/config.resolved.yaml`` and
starts, as a subprocess::

    deepspeed [--hostfile H --num_nodes M] --num_gpus N --master_port P --no_local_rank --module icmlab train <cfg>
    torchrun --standalone --nproc-per-node N -m icmlab train <cfg>          # one node
    torchrun --nnodes M --node-rank R --rdzv-endpoint A:P --nproc-per-node N -m icmlab train <cfg>  # SLURM

streaming its output into the notebook cell or terminal, and following ``metrics.jsonl`` for a live
view (:func:`run_launched`'s ``on_poll``). Each worker runs the same ``icmlab.train.stage.run``
in-process (it sees ``LOCAL_RANK``/``WORLD_SIZE`` and never launches again), so the CLI, the
notebook and the workers share one code path. On CPU the ranks talk over gloo (DeepSpeed's CPU
accelerator falls back to it without oneCCL) with ``OMP_NUM_THREADS`` = cores / ranks.

**Pre-emption keeps the work.** The ``deepspeed`` and torch-elastic launchers answer SIGTERM by
terminating their workers and SIGKILL them 30 s later, which can cut a checkpoint in half. So the
launcher is started with SIGTERM *blocked* (it is inherited, and a blocked signal stays pending
even after the launcher installs its own handler); the workers unblock it first thing. A SIGTERM
to this process, to the launcher (seen in its pending set by :func:`run_launched`'s poll loop), or
to any worker reaches every worker; they agree at the end of the current optimizer step (an
all-reduce), save one complete checkpoint, meet at a barrier and exit; rank 0 leaves
``<run_dir>/interrupted.json``. The job then counts as interrupted (exit status 143), not failed,
and a rerun resumes from that checkpoint.

Usage::

    from icmlab.train.launch import launch_mode, build_launch_command, run_launched
    if launch_mode(cfg) != "inprocess":
        run_launched(build_launch_command(cfg, config_path), cwd=project_root)
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from icmlab.config import RunConfig

#: Exit status of a training process that SIGTERM stopped after saving a checkpoint (128 + 15).
STOPPED_BY_SIGTERM = 143
#: Set in the environment of jobs started by :func:`run_launched`: its workers exit 0 after a
#: SIGTERM checkpoint (so the launcher does not tear the others down) and leave the verdict to
#: ``interrupted.json``.
LAUNCHED_ENV = "ICMLAB_LAUNCHED"
# Environment variables that mark a process started by a distributed launcher.
_WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def is_launched_worker() -> bool:
    """True inside a process started by deepspeed/torchrun, or by ``srun`` as one task per rank.

    ``srun`` tasks of a job step whose task count is the world size (``SLURM_NTASKS`` > 1, and no
    launcher variables yet) get ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` from ``SLURM_PROCID``,
    ``SLURM_LOCALID`` and ``SLURM_NTASKS`` (see :func:`adopt_slurm_rank`).
    """
    adopt_slurm_rank()
    return all(k in os.environ for k in _WORKER_ENV)


def adopt_slurm_rank() -> bool:
    """Set the torch.distributed variables from ``SLURM_*`` in an ``srun`` task per rank.

    Only when ``ICMLAB_SRUN_RANKS=1`` is set (the generated sbatch script's per-rank mode) and no
    launcher variables are present. ``MASTER_ADDR`` must come from the script (first host of the
    node list); ``MASTER_PORT`` from ``ICMLAB_MASTER_PORT`` or 29500.

    Returns:
        True when the variables were set.
    """
    env = os.environ
    if env.get("ICMLAB_SRUN_RANKS") != "1" or "SLURM_PROCID" not in env or "LOCAL_RANK" in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0]
    env.setdefault("MASTER_PORT", env.get("ICMLAB_MASTER_PORT", "29500"))
    return True


def procs_per_node(cfg: RunConfig) -> int:
    """Ranks on each node: ``hardware.num_processes`` on CPU, ``hardware.num_gpus`` on GPUs."""
    h = cfg.hardware
    return h.num_processes if h.device == "cpu" else h.num_gpus


def launch_mode(cfg: RunConfig) -> str:
    """Decide how to run: ``"inprocess"``, ``"deepspeed"`` or ``"torchrun"``.

    ``auto`` trains in-process on CPU or one GPU and launches ``deepspeed`` (when a ZeRO config is
    chosen) or ``torchrun`` for several GPUs, nodes or CPU ranks (``hardware.num_processes``).

    Raises:
        ValueError: ``hardware.launcher: inprocess`` with several ranks, ``torchrun`` across nodes
            outside SLURM, or ``deepspeed`` without a ZeRO config.
    """
    h = cfg.hardware
    if is_launched_worker():
        return "inprocess"
    world = cfg.world_size
    if h.launcher == "inprocess" or (h.launcher == "auto" and world == 1):
        if world > 1:
            what = (
                f"{h.num_processes} CPU processes" if h.device == "cpu" else f"{h.num_gpus} GPUs"
            ) + f" × {h.num_nodes} nodes"
            raise ValueError(
                f"hardware.launcher: inprocess drives one rank but hardware asks for {world} ({what}); "
                "use launcher: auto, deepspeed or torchrun"
            )
        return "inprocess"
    mode = h.launcher if h.launcher != "auto" else ("deepspeed" if h.deepspeed != "none" else "torchrun")
    if mode == "torchrun" and h.num_nodes > 1 and "SLURM_JOB_ID" not in os.environ:
        raise ValueError(
            "hardware.launcher: torchrun cannot start processes on other nodes from here; use "
            "launcher: deepspeed with hardware.hostfile for multi-node runs, or `icmlab slurm` on a SLURM cluster"
        )
    if mode == "deepspeed" and h.deepspeed == "none":
        raise ValueError("hardware.launcher: deepspeed needs a ZeRO config; set hardware.deepspeed (zero2/zero3)")
    return mode


def free_port() -> int:
    """A TCP port free on this host right now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_rendezvous() -> dict[str, str] | None:
    """Node count, node rank and master address of a SLURM job step (None outside SLURM).

    ``MASTER_ADDR`` is taken from the environment (the generated script exports the first host of
    ``SLURM_JOB_NODELIST`` from ``scontrol show hostnames``) or, failing that, asks ``scontrol``.
    """
    env = os.environ
    if "SLURM_JOB_ID" not in env or "SLURM_NODEID" not in env:
        return None
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        addr = (out.stdout.split() or ["127.0.0.1"])[0]
    return {
        "nnodes": env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")),
        "node_rank": env["SLURM_NODEID"],
        "master_addr": addr,
        "master_port": env.get("MASTER_PORT", env.get("ICMLAB_MASTER_PORT", "29500")),
    }


def build_launch_command(cfg: RunConfig, config_path: Path, mode: str | None = None) -> list[str]:
    """The launcher command line for a multi-process run.

    Inside a SLURM job step (one ``icmlab train`` task per node), ``torchrun`` gets the node count,
    this node's rank and the rendezvous address from ``SLURM_*`` (:func:`slurm_rendezvous`).

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
    nproc = str(procs_per_node(cfg))
    slurm = slurm_rendezvous()
    if mode == "deepspeed" and not (slurm and h.num_nodes > 1):
        exe = shutil.which("deepspeed")
        cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
        if h.hostfile:
            if not Path(h.hostfile).is_file():
                raise ValueError(f"hardware.hostfile: {h.hostfile} does not exist (lines: 'host slots=N')")
            cmd += ["--hostfile", str(h.hostfile), "--num_nodes", str(h.num_nodes)]
        else:
            # Single node: a free port, so that two jobs (or tests) on one machine do not collide on 29500.
            cmd += ["--master_port", str(free_port())]
        # --no_local_rank: the launcher would put --local_rank=N before the subcommand, which the CLI
        # parser rejects; workers read LOCAL_RANK from the environment instead.
        return cmd + ["--num_gpus", nproc, "--no_local_rank", "--module", *worker]
    if mode in ("torchrun", "deepspeed"):
        # deepspeed across SLURM nodes: torchrun starts the ranks of this node (the workers still use
        # the ZeRO config; DeepSpeed reads RANK/WORLD_SIZE like any torch.distributed program).
        base = [sys.executable, "-m", "torch.distributed.run"]
        if slurm and int(slurm["nnodes"]) > 1:
            return base + [
                "--nnodes",
                slurm["nnodes"],
                "--node-rank",
                slurm["node_rank"],
                "--rdzv-backend",
                "static",
                "--master-addr",
                slurm["master_addr"],
                "--master-port",
                slurm["master_port"],
                "--nproc-per-node",
                nproc,
                "-m",
                *worker,
            ]
        return base + ["--standalone", "--nproc-per-node", nproc, "-m", *worker]
    raise ValueError(f"no launcher command for mode {mode!r}")


def launch_env(cfg: RunConfig | None = None) -> dict[str, str]:
    """Environment of a launched job: unbuffered output, :data:`LAUNCHED_ENV`, one BLAS thread pool per rank."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LAUNCHED_ENV] = "1"
    if cfg is not None and "OMP_NUM_THREADS" not in os.environ:
        ranks = procs_per_node(cfg)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks)) if cfg.hardware.device == "cpu" else "1"
    return env


#: Blocks SIGTERM, then becomes the launcher (exec keeps the mask). A tiny interpreter instead of a
#: ``preexec_fn``, which is unsafe in a process with threads (a notebook kernel).
_BLOCK_SIGTERM_THEN_EXEC = (
    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def unblock_sigterm() -> None:
    """Undo the launcher's blocked SIGTERM in a worker (a pending one is delivered now)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def run_launched(
    cmd: list[str],
    cwd: Path | None = None,
    grace_s: float = 600.0,
    *,
    env: dict[str, str] | None = None,
    interrupted_marker: Path | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 1.0,
) -> int:
    """Run a launcher command, streaming its output live, and turn interruptions into a checkpoint.

    The launcher runs in its own session with SIGTERM blocked (see the module docstring). SIGTERM to
    this process, Ctrl-C / the notebook's stop button, or a SIGTERM pending at the launcher send
    SIGTERM to the job's process group: the workers checkpoint and exit. After ``grace_s`` seconds
    without an exit, the group is SIGKILLed.

    Args:
        cmd: from :func:`build_launch_command`.
        cwd: working directory (the project root, so relative paths resolve as in the notebook).
        grace_s: how long to wait for the checkpoint after an interruption before killing the job.
        env: the job's environment (default :func:`launch_env`).
        interrupted_marker: ``<run_dir>/interrupted.json``: when the job leaves it, the run was
            interrupted after a complete checkpoint, whatever the launcher's exit status.
        on_poll: called about every ``poll_s`` seconds while the job runs (the live metrics view).
        poll_s: the poll period.

    Returns:
        The exit status: 0 when done, :data:`STOPPED_BY_SIGTERM` when the job was stopped from outside
        after saving a checkpoint.

    Raises:
        KeyboardInterrupt: re-raised after the job has saved its checkpoint and stopped.
        RuntimeError: the job failed (any other exit status).
    """
    print("launching:", " ".join(cmd), flush=True)
    if interrupted_marker is not None:
        Path(interrupted_marker).unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCK_SIGTERM_THEN_EXEC, *cmd],
        cwd=cwd,
        env=env or launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    interrupted = False
    stopping: list[float] = []  # time the stop was requested (at most once)

    def stop(*_: object) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            print("\nSIGTERM: asking every rank to checkpoint and stop ...", flush=True)
        _terminate_group(proc)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no forwarding, the job still ends with us
        previous = None
    try:
        while True:
            try:
                _stream(proc, on_poll=on_poll, poll_s=poll_s, on_tick=lambda: _watch(proc, stopping, stop, grace_s))
                break
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: asking the job to checkpoint and stop ...", flush=True)
                stop()
        rc = proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted_marker is not None and Path(interrupted_marker).exists():
        rc = STOPPED_BY_SIGTERM
    if interrupted:
        raise KeyboardInterrupt(f"training job stopped (exit status {rc}); rerun to resume")
    if rc not in (0, STOPPED_BY_SIGTERM):
        raise RuntimeError(f"training job failed with exit status {rc}: {' '.join(cmd)} (output above)")
    return rc


def _watch(proc: subprocess.Popen, stopping: list[float], stop: Callable[[], None], grace_s: float) -> None:
    """Once per poll: forward a SIGTERM pending at a launcher process; SIGKILL after the grace."""
    if not stopping and any(_sigterm_pending(pid) for pid in _launcher_pids(proc.pid)):
        stop()
    if stopping and time.monotonic() - stopping[0] > grace_s and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launcher_pids(root: int) -> list[int]:
    """``root`` and its descendants that are launchers (not ranks: no ``LOCAL_RANK`` in their environment)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            is_rank = b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if not is_rank:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def _sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM is pending (blocked) at process ``pid`` (Linux ``/proc/<pid>/status``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (signal.SIGTERM - 1)
    for line in status.splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def _stream(
    proc: subprocess.Popen,
    *,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 1.0,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Copy the job's output to ours as it comes, chunk-wise (keeps tqdm's carriage returns)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    next_poll = time.monotonic() + poll_s
    while True:
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + poll_s
            if on_tick is not None:
                on_tick()
            if on_poll is not None:
                try:
                    on_poll()
                except Exception as err:  # a broken live view must not kill the job
                    print(f"live view: {err}", file=sys.stderr)
                    on_poll = None


def _terminate_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
