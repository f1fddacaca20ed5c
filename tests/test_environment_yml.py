"""environment.yml (GPU users, conda) agrees with pyproject.toml (pip users)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names of the packages pyproject knows under their PyPI names.
CONDA_TO_PYPI = {"pytorch-gpu": "torch", "pytorch": "torch"}


def _spec(s: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", s.strip())
    return m.group(1).lower(), m.group(2).strip()


def _lower_bound(spec: str) -> tuple[int, ...] | None:
    m = re.search(r">=\s*([0-9.]+)", spec) or re.search(r"^=?=?\s*([0-9][0-9.]*)", spec)
    return tuple(int(x) for x in m.group(1).split(".") if x) if m else None


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert env["channels"] == ["conda-forge"]
    conda = dict(_spec(d) for d in env["dependencies"] if isinstance(d, str))
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # python: 3.11 satisfies requires-python
    py = tuple(int(x) for x in conda["python"].lstrip("=").split("."))
    req_py = tuple(int(x) for x in proj["requires-python"].lstrip(">=").split("."))
    assert py >= req_py
    # the pip section installs this project with the GPU extras
    assert pip_section == ['-e ".[train,flash]"']
    assert {"train", "flash", "dev"} <= set(proj["optional-dependencies"])
    assert any(r.startswith("deepspeed") for r in proj["optional-dependencies"]["train"])
    assert any(r.startswith("flash-attn") for r in proj["optional-dependencies"]["flash"])
    # every conda package that pyproject also names has a compatible pin (lower bounds agree)
    deps = dict(_spec(r) for r in proj["dependencies"])
    shared = [(c, CONDA_TO_PYPI.get(c, c)) for c in conda if CONDA_TO_PYPI.get(c, c) in deps]
    assert shared, "environment.yml must pin the CUDA build of torch"
    for conda_name, pypi_name in shared:
        lo_conda, lo_pip = _lower_bound(conda[conda_name]), _lower_bound(deps[pypi_name])
        assert lo_conda is not None and lo_pip is not None
        assert lo_conda >= lo_pip, f"{conda_name} {conda[conda_name]} vs {pypi_name} {deps[pypi_name]}"
    assert "cuda-version" in conda and "pip" in conda
