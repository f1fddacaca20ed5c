"""``icmlab slurm P``: an sbatch script that trains the run on a SLURM cluster, and its submission.

The script (``<run_dir>/slurm/train.sbatch``) asks for ``--nodes N`` with one task per node and
``--signal=TERM@<grace>``; each task runs ``icmlab train <run_dir>/config.resolved.yaml``, which
starts the node's ranks through the same launcher code as everywhere (torchrun/deepspeed,
:mod:`icmlab.train.launch`), with the rendezvous taken from ``SLURM_*``: node count
``SLURM_JOB_NUM_NODES``, node rank ``SLURM_NODEID``, ``MASTER_ADDR`` = the first host of
``SLURM_JOB_NODELIST`` (``scontrol show hostnames``). Pre-emption and the time limit go through
SIGTERM: SLURM signals the tasks ``grace`` seconds before the end, every rank checkpoints and the
task exits 143; resubmitting the same script resumes from that checkpoint.

``--srun-ranks`` writes the other layout, one ``srun`` task per rank: each worker then reads its
rank, local rank and world size from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``.

Usage::

    icmlab slurm parameters/llava15-7b__q-instruct__mix.yaml --nodes 2 --gpus-per-node 8 --partition a100 \\
        --time 12:00:00 --submit
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from icmlab.config import RunConfig, find_project_root, save_resolved, validate
from icmlab.io import atomic_write_text

#: Seconds between SLURM's SIGTERM and the end of the allocation: time to finish a step and save.
DEFAULT_GRACE_S = 300
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class SlurmJob:
    """What :func:`write_sbatch` wrote (and :func:`submit` submitted).

    Attributes:
        script: the sbatch script.
        config: the resolved config the tasks train from.
        job_id: the SLURM job id once submitted.
    """

    script: Path
    config: Path
    job_id: str | None = None

    def summary(self) -> str:
        """Lines for the terminal."""
        lines = [f"sbatch script: {self.script}", f"config:        {self.config}"]
        lines.append(
            f"submitted job {self.job_id} (squeue -j {self.job_id})"
            if self.job_id
            else f"submit with:   sbatch {self.script}"
        )
        return "\n".join(lines)


def cluster_config(cfg: RunConfig, *, nodes: int | None = None, per_node: int | None = None) -> RunConfig:
    """``cfg`` with the allocation's shape: ``hardware.num_nodes`` and the ranks per node.

    Ranks per node are ``hardware.num_gpus`` on GPUs and ``hardware.num_processes`` with
    ``hardware.device: cpu``. Several nodes use torchrun per node (the ZeRO config still applies).

    Raises:
        ValueError: a count below 1 or a config that no longer validates (the message names the key).
    """
    h = cfg.hardware
    nodes = h.num_nodes if nodes is None else nodes
    if nodes < 1 or (per_node is not None and per_node < 1):
        raise ValueError(f"--nodes / --gpus-per-node: must be >= 1, got {nodes} / {per_node}")
    changes: dict = {"num_nodes": nodes}
    if per_node is not None:
        changes["num_processes" if h.device == "cpu" else "num_gpus"] = per_node
    if nodes > 1:
        changes["launcher"] = "torchrun"
    out = dataclasses.replace(cfg, hardware=dataclasses.replace(h, **changes))
    problems = [p for p in validate(out) if not p.startswith("hardware.hostfile")]
    if problems:
        raise ValueError("; ".join(problems))
    return out


def render_sbatch(
    cfg: RunConfig,
    config_path: Path,
    *,
    partition: str | None = None,
    time: str | None = None,
    grace_s: int = DEFAULT_GRACE_S,
    cpus_per_task: int | None = None,
    srun_ranks: bool = False,
    python: str | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """The sbatch script text for ``cfg`` (already shaped by :func:`cluster_config`).

    Args:
        cfg: the run config.
        config_path: the resolved config the tasks load.
        partition: ``#SBATCH --partition``.
        time: ``#SBATCH --time`` (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``...).
        grace_s: ``--signal=TERM@grace_s``: SIGTERM this long before the time limit.
        cpus_per_task: CPUs per task (default: the ranks of a node on CPU, 8 per GPU on GPUs).
        srun_ranks: one srun task per rank instead of one per node.
        python: the interpreter (default: this one).
        extra: more ``#SBATCH`` lines (``"--account=x"``).

    Raises:
        ValueError: an impossible ``time`` or ``grace_s``.
    """
    h = cfg.hardware
    if time is not None and not _TIME.match(time):
        raise ValueError(f"--time: {time!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    if grace_s < 1:
        raise ValueError(f"--grace: must be >= 1 second, got {grace_s}")
    cpu = h.device == "cpu"
    per_node = h.num_processes if cpu else h.num_gpus
    tasks = per_node if srun_ranks else 1
    if cpus_per_task is None:
        cpus_per_task = (1 if srun_ranks else per_node) if cpu else 8 * (1 if srun_ranks else per_node)
    py = shlex.quote(python or sys.executable)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=icmlab-{cfg.run_name}",
        f"#SBATCH --nodes={h.num_nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if not cpu:
        lines.append(f"#SBATCH --gpus-per-node={h.num_gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    lines += [
        f"#SBATCH --signal=TERM@{grace_s}",
        f"#SBATCH --output={cfg.run_dir / 'slurm' / 'slurm-%j.out'}",
        "#SBATCH --open-mode=append",
    ]
    lines += [f"#SBATCH {x}" for x in extra]
    threads = "1" if srun_ranks or not cpu else str(max(1, cpus_per_task // max(1, per_node)))
    lines += [
        "",
        f"# Generated by `icmlab slurm` for run {cfg.run_name!r}. Resubmit after a pre-emption or time-out:",
        "# SLURM sends SIGTERM --signal seconds before the end, every rank saves a checkpoint, the task exits",
        "# 143, and the next job resumes from that checkpoint.",
        "set -uo pipefail",
        f"cd {shlex.quote(str(find_project_root()))}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{threads}}}"',
        "export PYTHONUNBUFFERED=1",
    ]
    if srun_ranks:
        lines.append("export ICMLAB_SRUN_RANKS=1  # each task is one rank (RANK from SLURM_PROCID)")
    lines += [
        'echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"',
        f"srun --kill-on-bad-exit=0 {py} -m icmlab train {shlex.quote(str(config_path))}",
        "rc=$?",
        'if [ "$rc" -eq 143 ]; then echo "interrupted: checkpoint saved; resubmit this script to resume"; fi',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def write_sbatch(cfg: RunConfig, **kwargs) -> SlurmJob:
    """Save the resolved config and ``<run_dir>/slurm/train.sbatch``; kwargs as :func:`render_sbatch`."""
    config = save_resolved(cfg)
    script = cfg.run_dir / "slurm" / "train.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, render_sbatch(cfg, config, **kwargs))
    os.chmod(script, 0o755)
    return SlurmJob(script=script, config=config)


def submit(job: SlurmJob) -> SlurmJob:
    """``sbatch --parsable`` the script; sets ``job.job_id``.

    Raises:
        RuntimeError: ``sbatch`` is missing or refused the script (its message is included).
    """
    try:
        out = subprocess.run(["sbatch", "--parsable", str(job.script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(
            "sbatch not found: run on a SLURM login node (or tools/slurm/start.sh for a local one)"
        ) from None
    if out.returncode != 0:
        raise RuntimeError(f"sbatch refused {job.script}: {out.stderr.strip() or out.stdout.strip()}")
    job.job_id = out.stdout.strip().split(";")[0]
    return job
