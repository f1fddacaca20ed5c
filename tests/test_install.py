"""Locked installs: requirements/lock-*.txt cover pyproject.toml, and the Makefile installs exactly them.

The Makefile checks run `make -n` / `make -q` against a throwaway VENV, so nothing is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(\s+#.*)?$")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def lock_pins(path: Path) -> dict[str, str]:
    """name -> version of a lock file; every line is a comment or an exact pin."""
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def in_requirements(path: Path) -> list[Requirement]:
    return [Requirement(s) for s in (x.split("#")[0].strip() for x in path.read_text().splitlines()) if s]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def torch_version() -> str:
    """The torch release the CPU lock is built around (requirements/cpu.in: torch==X+cpu)."""
    (torch,) = [r for r in in_requirements(REQ / "cpu.in") if r.name == "torch"]
    (spec,) = torch.specifier
    assert spec.operator == "==" and spec.version.endswith("+cpu"), torch
    return spec.version.removesuffix("+cpu")


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check
    )


def line_index(lines: list[str], *needles: str) -> int:
    hits = [i for i, line in enumerate(lines) if all(n in line for n in needles)]
    assert hits, f"no line with {needles} in:\n" + "\n".join(lines)
    return hits[0]


# ---------------------------------------------------------------------------------------------- lock files


def test_lock_cpu_pins_every_requirement_of_pyproject():
    proj = pyproject()
    pins = lock_pins(REQ / "lock-cpu.txt")
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in ("train", "dev"):
        reqs += [Requirement(r) for r in proj["optional-dependencies"][extra]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in lock-cpu.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock-cpu.txt {name}=={pins[name]} vs {req}"
    # the CPU build of the torch that cpu.in names, and the linter of `make lint`
    assert pins["torch"] == f"{torch_version()}+cpu"
    assert any(Requirement(r).name == "ruff" for r in proj["optional-dependencies"]["dev"])
    assert "ruff" in pins
    # flash-attn builds against torch (no build isolation) and is never locked
    assert "flash-attn" not in pins


def test_lock_gpu_is_the_cpu_lock_without_torch_plus_flash_attn_build_tools():
    cpu, gpu = lock_pins(REQ / "lock-cpu.txt"), lock_pins(REQ / "lock-gpu.txt")
    assert "torch" not in gpu, "the CUDA torch comes from the PyTorch index, not lock-gpu.txt"
    assert {k: v for k, v in cpu.items() if k != "torch"} == {k: v for k, v in gpu.items() if k in cpu}
    tools = {canonicalize_name(r.name) for r in in_requirements(REQ / "gpu.in")}
    assert tools >= {"setuptools", "wheel", "packaging", "ninja", "psutil"}
    assert set(gpu) - set(cpu) <= tools
    assert tools <= set(gpu)


def test_this_venv_is_exactly_the_lock():
    """After `make install` (stamp in the venv) every locked version is installed."""
    prefix = Path(sys.prefix)
    if (prefix / ".icmlab-installed").exists():
        pins, expect_torch = lock_pins(REQ / "lock-cpu.txt"), None
    elif (prefix / ".icmlab-installed-gpu").exists():
        pins, expect_torch = lock_pins(REQ / "lock-gpu.txt"), torch_version()
    else:
        pytest.skip("not a venv made by `make install` / `make install-gpu`")
    # The venv's own site-packages only: once a test has imported setuptools, its vendored
    # packaging/platformdirs dist-infos are on sys.path too and are not what the venv installed.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions(path=site)}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"venv differs from the lock (name: (locked, installed)): {wrong}; run make install"
    # Packages beyond the lock (an opted-in wandb, say) are the user's business: `make install`
    # (uv --exact) removes them again, so CI's venv is the lock and nothing else.
    if expect_torch is not None:
        assert Version(installed["torch"]).public == expect_torch


# ---------------------------------------------------------------------------------------------- Makefile


@needs_make
def test_make_install_takes_torch_first_then_exactly_the_lock(tmp_path):
    v = torch_version()
    # a local wheel where pip finds one (PIP_FIND_LINKS / pip.conf find-links): offline, from that folder
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / f"torch-{v}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    out = make("-n", "install", f"VENV={tmp_path}/venv", f"TORCH_WHEELS={wheels}").stdout.splitlines()
    t = line_index(out, f'"torch=={v}+cpu"', "--no-deps", f"--no-index --find-links {wheels}/")
    lock = line_index(out, "--exact", "--no-deps", "-r requirements/lock-cpu.txt", "-e .")
    assert t < lock < line_index(out, "pip check")
    assert "DS_BUILD_OPS=0" in out[lock]
    # none: the PyTorch CPU index (a user's CPU machine); TORCH_INDEX overrides it
    out = make("-n", "install", f"VENV={tmp_path}/venv", "TORCH_WHEELS=").stdout.splitlines()
    line_index(out, f'"torch=={v}+cpu"', "--index-url https://download.pytorch.org/whl/cpu")
    out = make("-n", "install", f"VENV={tmp_path}/venv", "TORCH_WHEELS=", "TORCH_INDEX=http://mirror/cpu")
    line_index(out.stdout.splitlines(), f'"torch=={v}+cpu"', "--index-url http://mirror/cpu")


@needs_make
def test_install_stamp_depends_on_pyproject_and_lock(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".icmlab-installed"
    stamp.touch()
    later = time.time() + 3600
    os.utime(stamp, (later, later))
    args = ("-q", "install", f"VENV={venv}", "TORCH_WHEELS=")
    assert make(*args, check=False).returncode == 0  # up to date: `make install` does nothing
    for changed in ("requirements/lock-cpu.txt", "pyproject.toml"):
        assert make("-W", changed, *args, check=False).returncode == 1, f"{changed} does not retrigger the install"


@needs_make
def test_make_install_gpu_order(tmp_path):
    v = torch_version()
    out = make("-n", "install-gpu", f"VENV={tmp_path}/venv").stdout.splitlines()
    t = line_index(out, f'"torch=={v}+cu128"', "--extra-index-url https://download.pytorch.org/whl/cu128")
    assert "-c requirements/lock-gpu.txt" in out[t - 1] + out[t]  # torch's own requirements at the locked versions
    lock = line_index(out, "-r requirements/lock-gpu.txt", "-e .")
    assert "--exact" not in out[lock], "an exact sync would remove the CUDA wheels torch brought"
    flash = line_index(out, "--no-build-isolation", "flash-attn==")
    assert t < lock < flash
    assert line_index(out, "-r requirements/gpu.in") < flash  # its build tools first
    assert "sdpa" in "\n".join(out[flash:])
    out = make("-n", "install-gpu", f"VENV={tmp_path}/venv", "TORCH_CUDA=cu130").stdout
    assert f'"torch=={v}+cu130"' in out and "whl/cu130" in out


@needs_make
def test_flash_attn_failure_does_not_fail_the_install(tmp_path):
    """No CUDA, no nvcc, no network: flash-attn cannot install; the target says so and exits 0."""
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    fake = bin_ / "python"  # every pip call fails, as a failed build would
    fake.write_text("#!/bin/sh\necho fake pip failed >&2\nexit 1\n")
    fake.chmod(0o755)
    res = make("flash-attn", f"VENV={tmp_path / 'venv'}", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "falls back to PyTorch sdpa attention" in res.stdout


@needs_make
def test_lint_format_and_fast_test_targets(tmp_path):
    stamp_args = (f"VENV={tmp_path}/venv", "TORCH_WHEELS=")
    out = make("-n", "lint", *stamp_args).stdout
    assert "ruff check icmlab tests benchmarks tools" in out
    assert "ruff format --check icmlab tests benchmarks tools" in out
    out = make("-n", "format", *stamp_args).stdout
    assert "ruff check --fix icmlab tests benchmarks tools" in out and "ruff format icmlab" in out
    out = make("-n", "test-fast", *stamp_args).stdout
    assert '-m "not slow and not multiprocess"' in out
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in markers} >= {"slow", "multiprocess", "gpu"}


def test_ci_installs_lints_then_runs_the_full_suite():
    lines = [x.strip() for x in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in lines
    steps = [x for x in lines if x.startswith("make ")]
    assert steps == ["make install", "make lint", "make test"]
