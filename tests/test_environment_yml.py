"""environment.yml (GPU users, conda) installs what the locks pin, in steps pip can build.

conda brings Python and pip; its pip step installs the CUDA build of the locked torch, then the project
with the train extra under requirements/lock-gpu.txt as constraints. flash-attn is a separate step.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_section(env: dict) -> list[str]:
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return [str(x).strip() for x in pip]


def _conda_deps(env: dict) -> dict[str, str]:
    out = {}
    for d in env["dependencies"]:
        if isinstance(d, str):
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", d.strip())
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def _lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if m := PIN.match(line):
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _makefile_default(var: str) -> str:
    m = re.search(rf"^{var}\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no default for {var}"
    return m.group(1)


def _options(lines: list[str], flag: str) -> list[str]:
    return [x.split(None, 1)[1].strip().strip("\"'") for x in lines if x.split(None, 1)[0] == flag]


def _editable_extras(lines: list[str]) -> set[str]:
    """The extras of the one editable install, which must be this project (`-e .` or `-e .[a,b]`)."""
    (editable,) = _options(lines, "-e")
    m = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", editable)
    assert m, f"-e {editable}: expected this project, -e .[extras]"
    return {e.strip() for e in (m.group(1) or "").split(",") if e.strip()}


def test_conda_brings_python_and_pip_only():
    env = _env()
    assert env["channels"] == ["conda-forge"]
    conda = _conda_deps(env)
    # torch comes from pip (the locked release, CUDA build), so conda must not bring a second one
    assert set(conda) == {"python", "pip"}, conda
    py = SpecifierSet(conda["python"])
    lock_py = _makefile_default("LOCK_PYTHON")  # the locks are resolved for this CPython and newer 3.11.x
    assert lock_py in py and "3.12.0" not in py
    assert not any(v in py for v in ("3.11.0", "3.11.4")), "allows a 3.11 older than the locks were resolved for"
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert lock_py in SpecifierSet(proj["requires-python"])


def test_pip_step_installs_the_cuda_torch_of_the_lock_then_the_project():
    lines = _pip_section(_env())
    # the CUDA build of the very torch release the CPU lock pins, from its PyTorch index
    (torch,) = [Requirement(x) for x in lines if not x.startswith("-") and Requirement(x).name == "torch"]
    (spec,) = torch.specifier
    assert spec.operator == "=="
    version, _, cuda = spec.version.partition("+")
    assert version == _lock("lock-cpu.txt")["torch"].partition("+")[0]
    assert re.fullmatch(r"cu\d{3}", cuda), spec
    assert _options(lines, "--extra-index-url") == [f"https://download.pytorch.org/whl/{cuda}"]
    # the same build `make install-gpu` installs by default
    assert cuda == _makefile_default("TORCH_CUDA")
    # torch is the only requirement named here; everything else is resolved under the GPU lock
    assert [x for x in lines if not x.startswith("-")] == [str(torch)]
    assert _options(lines, "-c") == ["requirements/lock-gpu.txt"]
    assert (ROOT / "requirements" / "lock-gpu.txt").is_file()
    extras = _editable_extras(lines)
    assert "train" in extras
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(optional)


def test_pip_step_does_not_build_flash_attn():
    """flash-attn imports torch in its setup.py: under pip's build isolation (this step) it cannot build."""
    lines = _pip_section(_env())
    assert not any("flash" in x.lower() for x in lines), lines
    text = (ROOT / "environment.yml").read_text()
    # the separate step is documented, with the flag it needs
    assert "--no-build-isolation" in text and "make flash-attn" in text
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(Requirement(r).name == "flash-attn" for r in optional["flash"])
    assert any(Requirement(r).name == "deepspeed" for r in optional["train"])


def _closure(root: str, extras: set[str]) -> set[str]:
    """Names of the distributions `pip install root[extras]` pulls, walked through installed metadata."""
    env = default_environment()
    seen: set[str] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, ex = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in md.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (ex or {""})):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return seen


def test_every_package_of_the_pip_step_is_pinned_by_the_gpu_lock():
    """`-e .[train]` under `-c lock-gpu.txt`: all it resolves is pinned there, torch (and its CUDA wheels) aside."""
    try:
        md.distribution("icmlab")
    except md.PackageNotFoundError:
        pytest.skip("icmlab is not installed here")
    extras = _editable_extras(_pip_section(_env()))
    try:
        needed = _closure("icmlab", extras) - {"icmlab"}
    except md.PackageNotFoundError as e:
        pytest.skip(f"not a full install here: {e}")
    torch_stack = _closure("torch", set())  # what the torch line brings (its own pins)
    gpu = _lock("lock-gpu.txt")
    missing = needed - set(gpu) - torch_stack
    assert not missing, f"not pinned by requirements/lock-gpu.txt: {sorted(missing)}"
    # and the pins agree with what the tests here run on
    cpu = _lock("lock-cpu.txt")
    assert all(gpu[n] == cpu[n] for n in needed if n in gpu and n in cpu)
