"""Environment checks and the environment record of a run (setup stage).

``check_environment(cfg)`` answers "can this machine run this recipe?": GPUs, CUDA, bf16, flash-attn,
DeepSpeed, versions and free disk, each row saying what is missing for the chosen recipe.
``environment_record()`` is what the runner saves as ``env.json`` in every run directory.
``missing_requirements(cfg)`` lists the optional packages the recipe asks for that are not installed
(reporting backends, DeepSpeed, flash-attn, PEFT), each with the config key and the install command;
the setup table shows them before any download, and :func:`require` (called when the train stage
builds its arguments) turns them into one clear error.

W&B stays opt-in (``pip install wandb``, then ``wandb login`` or ``WANDB_API_KEY``; ``WANDB_MODE=offline``
logs locally and ``wandb sync`` uploads later); TensorBoard comes with ``pip install 'icmlab[train]'``.

Notebook: ``00_setup.ipynb``; CLI: ``icmlab setup parameters/X.yaml``.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import netrc
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from icmlab.config import RunConfig

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "accelerate",
    "peft",
    "deepspeed",
    "flash-attn",
    "tensorboard",
    "wandb",
    "papermill",
    "jupyterlab",
    "ipywidgets",
    "matplotlib",
    "pillow",
    "numpy",
    "icmlab",
)


class MissingPackageError(ModuleNotFoundError):
    """The recipe asks for packages that are not installed; the message names each key and install command."""


@dataclass(frozen=True)
class Requirement:
    """An optional package a recipe needs.

    Attributes:
        package: distribution name (``pip install`` name).
        module: import name checked with ``importlib.util.find_spec``.
        key: the config key (and value) that asks for it, e.g. ``train.report_to: wandb``.
        install: the command that installs it.
        alternative: the config change that removes the need.
    """

    package: str
    module: str
    key: str
    install: str
    alternative: str = ""

    @property
    def installed(self) -> bool:
        """Whether the module can be imported here."""
        return importlib.util.find_spec(self.module) is not None

    def message(self) -> str:
        """One line: key, package, command, alternative."""
        alt = f", or {self.alternative}" if self.alternative else ""
        return f"{self.key} needs {self.package}, which is not installed: {self.install}{alt}"


#: What each ``train.report_to`` logger needs. TensorBoard ships with the [train] extra; W&B is opt-in.
REPORT_BACKENDS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard", "pip install 'icmlab[train]' (or: pip install tensorboard)"),
    "wandb": ("wandb", "wandb", "pip install wandb, then `wandb login` (or WANDB_MODE=offline to log locally)"),
}


def recipe_requirements(cfg: RunConfig) -> list[Requirement]:
    """Every optional package ``cfg`` needs: reporting backends, DeepSpeed, flash-attn, PEFT (installed or not)."""
    out: list[Requirement] = []
    for rep in cfg.train.report_to:
        if rep in REPORT_BACKENDS:
            package, module, install = REPORT_BACKENDS[rep]
            out.append(
                Requirement(
                    package,
                    module,
                    f"train.report_to: {rep}",
                    install,
                    "remove it from train.report_to (metrics.jsonl is always written)",
                )
            )
    if cfg.hardware.deepspeed != "none":
        out.append(
            Requirement(
                "deepspeed",
                "deepspeed",
                f"hardware.deepspeed: {cfg.hardware.deepspeed}",
                "pip install 'icmlab[train]' (DS_BUILD_OPS=0 builds no CUDA ops at install)",
                "hardware.deepspeed: none",
            )
        )
    if cfg.hardware.attn_implementation == "flash_attention_2":
        out.append(
            Requirement(
                "flash-attn",
                "flash_attn",
                "hardware.attn_implementation: flash_attention_2",
                "pip install flash-attn --no-build-isolation (CUDA machines only)",
                "hardware.attn_implementation: sdpa",
            )
        )
    if cfg.train.lora.enabled:
        out.append(
            Requirement("peft", "peft", "train.lora.enabled: true", "pip install peft", "train.lora.enabled: false")
        )
    return out


def missing_requirements(cfg: RunConfig) -> list[Requirement]:
    """The :func:`recipe_requirements` that are not installed."""
    return [r for r in recipe_requirements(cfg) if not r.installed]


def require(cfg: RunConfig, keys: tuple[str, ...] | None = None) -> None:
    """Raise one :class:`MissingPackageError` listing every missing package (optionally only for ``keys`` prefixes).

    Raises:
        MissingPackageError: naming each config key, the package and its install command.
    """
    missing = [r for r in missing_requirements(cfg) if keys is None or r.key.startswith(keys)]
    if missing:
        where = f" ({cfg.source_file})" if cfg.source_file else ""
        raise MissingPackageError(
            "the recipe"
            + where
            + " needs packages that are not installed:\n  - "
            + "\n  - ".join(r.message() for r in missing)
            + "\n(`icmlab setup <parameters file>` lists everything the recipe needs)"
        )


def wandb_login_problem() -> str | None:
    """Why a W&B run would stop at start (no API key and not offline), or None when it can log."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get(
        "WANDB_DISABLED", ""
    ).lower() in ("1", "true"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (
        "W&B has no login on this machine: run `wandb login` (or set WANDB_API_KEY), or set "
        "WANDB_MODE=offline to log locally and `wandb sync` later"
    )


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
        gpus.append(
            {
                "index": i,
                "name": p.name,
                "memory_gb": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
            }
        )
    return gpus


def git_commit(root: Path | None = None) -> str | None:
    """Commit of the icmlab checkout (with ``-dirty`` when it has uncommitted changes), if any."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
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
        rows.append(
            CheckRow(name, vers[name] or "missing", vers[name] is not None, "" if vers[name] else f"pip install {name}")
        )
    gpus = gpu_info()
    want_cuda = cfg.hardware.device == "cuda" or (cfg.hardware.device == "auto" and cfg.world_size > 1)
    gpu_text = ", ".join(f"{g['name']} {g['memory_gb']} GB (sm{g['capability']})" for g in gpus) or "none"
    need = cfg.world_size if cfg.hardware.device != "cpu" else 0
    per_node = cfg.hardware.num_gpus if cfg.hardware.device != "cpu" else 0
    rows.append(
        CheckRow(
            "GPUs",
            f"{len(gpus)}: {gpu_text}",
            len(gpus) >= per_node or not want_cuda,
            f"recipe asks {per_node} per node × {cfg.hardware.num_nodes} node(s); the global batch "
            f"stays {cfg.train.global_batch_size} through gradient accumulation"
            if need
            else "CPU run",
        )
    )
    rows.append(
        CheckRow(
            "CUDA",
            str(torch.version.cuda),
            bool(gpus) or not want_cuda,
            "" if gpus or not want_cuda else "install a CUDA build of torch (environment.yml)",
        )
    )
    bf16_ok = bool(gpus) and torch.cuda.is_bf16_supported()
    rows.append(
        CheckRow(
            "bf16",
            "supported" if bf16_ok else "not available",
            bf16_ok or not cfg.train.bf16,
            "train.bf16 needs an Ampere+ GPU" if cfg.train.bf16 and not bf16_ok else "",
        )
    )
    has_flash = importlib.util.find_spec("flash_attn") is not None
    attn = cfg.hardware.attn_implementation
    rows.append(
        CheckRow(
            "flash-attn",
            vers["flash-attn"] or "not installed",
            has_flash or attn != "flash_attention_2",
            "falls back to sdpa"
            if not has_flash and attn == "auto"
            else (
                "pip install flash-attn --no-build-isolation (CUDA only)"
                if not has_flash and attn == "flash_attention_2"
                else ""
            ),
        )
    )
    needs_ds = cfg.hardware.deepspeed != "none"  # an in-process single-device ZeRO run needs it too
    rows.append(
        CheckRow(
            "deepspeed",
            vers["deepspeed"] or "not installed",
            bool(vers["deepspeed"]) or not needs_ds,
            "hardware.deepspeed: " + cfg.hardware.deepspeed + " needs it: pip install 'icmlab[train]'"
            if needs_ds and not vers["deepspeed"]
            else f"config {cfg.hardware.deepspeed}",
        )
    )
    for rep in cfg.train.report_to:
        if rep not in REPORT_BACKENDS:
            continue
        req = next(r for r in recipe_requirements(cfg) if r.key == f"train.report_to: {rep}")
        note = "" if req.installed else req.message()
        ok = req.installed
        if rep == "wandb" and req.installed:
            login = wandb_login_problem()
            ok, note = login is None, login or "W&B logs to your account (WANDB_MODE=offline: locally)"
        rows.append(CheckRow(f"report_to {rep}", vers.get(req.package) or "not installed", ok, note))
    if cfg.train.lora.enabled:
        rows.append(
            CheckRow(
                "peft",
                vers["peft"] or "not installed",
                bool(vers["peft"]),
                "" if vers["peft"] else "train.lora.enabled needs it: pip install peft",
            )
        )
    root = cfg.data.root
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 2**30
    rows.append(
        CheckRow(
            "disk free at data root",
            f"{free_gb:.1f} GB ({root})",
            free_gb >= cfg.download.min_free_gb,
            f"download.min_free_gb = {cfg.download.min_free_gb}",
        )
    )
    return SetupResult(rows)


def kernels_row() -> CheckRow:
    """Compile (or load from numba's cache) the input pipeline's kernels, so that the first open of a
    merged file and the first training sample do not pay for it (:mod:`icmlab.inputs.kernels`)."""
    from icmlab.inputs.kernels import compile_kernels

    try:
        seconds = compile_kernels()
    except Exception as e:  # a numba/LLVM failure on this machine: the stages would hit it at first use
        note = f"compiling failed ({type(e).__name__}: {str(e)[:200]}); reinstall numba/llvmlite from the lock"
        return CheckRow("input kernels", "failed", False, note)
    if seconds is None:
        return CheckRow("input kernels", "numba not installed", True, "Pillow / Python paths (slower loader)")
    return CheckRow("input kernels", f"ready in {seconds:.1f} s", True, "numba, cached after the first compile")


def run(cfg: RunConfig) -> SetupResult:
    """Setup stage entry point: check the environment for ``cfg``'s recipe (never raises for problems),
    and compile the input pipeline's kernels."""
    result = check_environment(cfg)
    result.rows.append(kernels_row())
    return result
