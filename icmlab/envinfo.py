"""Environment checks and the environment record of a run (setup stage).

``check_environment(cfg)`` answers "can this machine run this recipe?": GPUs, CUDA, bf16, flash-attn,
DeepSpeed, versions and free disk, each row saying what is missing for the chosen recipe.
``environment_record()`` is what the runner saves as ``env.json`` in every run directory.

Notebook: ``00_setup.ipynb``; CLI: ``icmlab setup parameters/X.yaml``.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from icmlab.config import RunConfig

PACKAGES = ("torch", "transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "deepspeed",
            "flash-attn", "papermill", "jupyterlab", "ipywidgets", "matplotlib", "pillow", "numpy", "icmlab")


@dataclass
class CheckRow:
    """One line of the environment table."""

    item: str
    value: str
    ok: bool
    note: str = ""


@dataclass
class SetupResult:
    """Outcome of the setup stage."""

    rows: list[CheckRow] = field(default_factory=list)

    @property
    def problems(self) -> list[CheckRow]:
        """Rows that block the chosen recipe."""
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        """Plain-text table for the terminal and notebooks."""
        w = max(len(r.item) for r in self.rows)
        lines = [f"{'':4}{'item':<{w}}  value / note"]
        for r in self.rows:
            mark = "ok" if r.ok else "!!"
            lines.append(f"{mark:4}{r.item:<{w}}  {r.value}" + (f"  — {r.note}" if r.note else ""))
        return "\n".join(lines)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter (None when missing)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> list[dict]:
    """Visible CUDA devices with name, memory and compute capability (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}"})
    return gpus


def git_commit(root: Path | None = None) -> str | None:
    """Commit of the icmlab checkout (with ``-dirty`` when it has uncommitted changes), if any."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment_record() -> dict:
    """What ran: git commit, Python, platform, package versions and GPUs (saved as ``env.json``)."""
    import torch

    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": torch.version.cuda,
        "gpus": gpu_info(),
        "cpu_count": __import__("os").cpu_count(),
    }


def check_environment(cfg: RunConfig) -> SetupResult:
    """Check this machine against the recipe in ``cfg``.

    Returns:
        A :class:`SetupResult`; rows with ``ok=False`` name what is missing and the fix.
    """
    import torch

    rows: list[CheckRow] = []
    vers = package_versions()
    rows.append(CheckRow("python", sys.version.split()[0], sys.version_info >= (3, 10), ""))
    for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "papermill"):
        rows.append(CheckRow(name, vers[name] or "missing", vers[name] is not None,
                             "" if vers[name] else f"pip install {name}"))
    gpus = gpu_info()
    want_cuda = cfg.hardware.device == "cuda" or (cfg.hardware.device == "auto" and cfg.world_size > 1)
    gpu_text = ", ".join(f"{g['name']} {g['memory_gb']} GB (sm{g['capability']})" for g in gpus) or "none"
    need = cfg.world_size if cfg.hardware.device != "cpu" else 0
    per_node = cfg.hardware.num_gpus if cfg.hardware.device != "cpu" else 0
    rows.append(CheckRow("GPUs", f"{len(gpus)}: {gpu_text}", len(gpus) >= per_node or not want_cuda,
                         f"recipe asks {per_node} per node × {cfg.hardware.num_nodes} node(s); the global batch "
                         f"stays {cfg.train.global_batch_size} through gradient accumulation"
                         if need else "CPU run"))
    rows.append(CheckRow("CUDA", str(torch.version.cuda), bool(gpus) or not want_cuda,
                         "" if gpus or not want_cuda else "install a CUDA build of torch (environment.yml)"))
    bf16_ok = bool(gpus) and torch.cuda.is_bf16_supported()
    rows.append(CheckRow("bf16", "supported" if bf16_ok else "not available", bf16_ok or not cfg.train.bf16,
                         "train.bf16 needs an Ampere+ GPU" if cfg.train.bf16 and not bf16_ok else ""))
    has_flash = importlib.util.find_spec("flash_attn") is not None
    attn = cfg.hardware.attn_implementation
    rows.append(CheckRow("flash-attn", vers["flash-attn"] or "not installed",
                         has_flash or attn != "flash_attention_2",
                         "falls back to sdpa" if not has_flash and attn == "auto" else
                         ("pip install flash-attn --no-build-isolation (CUDA only)"
                          if not has_flash and attn == "flash_attention_2" else "")))
    needs_ds = cfg.hardware.deepspeed != "none" and cfg.world_size > 1 and cfg.hardware.device != "cpu"
    rows.append(CheckRow("deepspeed", vers["deepspeed"] or "not installed", bool(vers["deepspeed"]) or not needs_ds,
                         "pip install 'icmlab[train]'" if needs_ds and not vers["deepspeed"] else
                         f"config {cfg.hardware.deepspeed}"))
    root = cfg.data.root
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 2**30
    rows.append(CheckRow("disk free at data root", f"{free_gb:.1f} GB ({root})", free_gb >= cfg.download.min_free_gb,
                         f"download.min_free_gb = {cfg.download.min_free_gb}"))
    return SetupResult(rows)


def run(cfg: RunConfig) -> SetupResult:
    """Setup stage entry point: check the environment for ``cfg``'s recipe (never raises for problems)."""
    return check_environment(cfg)
