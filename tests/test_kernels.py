"""Install-time compilation of the input pipeline's numba kernels (icmlab.inputs.kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icmlab.inputs import bicubic

pytestmark = pytest.mark.skipif(not bicubic.AVAILABLE, reason="numba not installed")

ROOT = Path(__file__).resolve().parent.parent

USE = """
import sys
from pathlib import Path
from PIL import Image
from icmlab.inputs.images import LeanClip, build_image_processor
from icmlab.inputs.recordstore import RecordStore
data = Path(sys.argv[1])
RecordStore.open(data / "train.json", cache=False)
for aspect in ("pad", "square", "resize"):
    lean = LeanClip.for_processor(build_image_processor(336), aspect)
    for name in ("wide.jpg", "tall.jpg", "wide.png"):
        lean.from_file(data / name)
"""


@pytest.mark.slow
def test_what_install_compiles_is_all_the_stages_need(tmp_path):
    """After ``python -m icmlab.inputs.kernels`` (run by ``make install``) into an empty cache, opening a
    merged file and preprocessing JPEG and PNG images of real sizes compile nothing more."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_DEBUG_CACHE": "1"}
    first = subprocess.run(
        [sys.executable, "-m", "icmlab.inputs.kernels"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "compiled" in first.stdout and "data saved" in first.stdout + first.stderr  # it did compile
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(
        '[{"id": "1", "image": "wide.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ?"},'
        ' {"from": "gpt", "value": "A."}]}, {"id": "2", "conversations": [{"from": "human", "value": "x"}]}]'
    )
    noise = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "wide.jpg")
    Image.fromarray(np.ascontiguousarray(noise.transpose(1, 0, 2))).save(data / "tall.jpg")
    Image.fromarray(noise).save(data / "wide.png")
    second = subprocess.run([sys.executable, "-c", USE, str(data)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    compiled = [line for line in (second.stdout + second.stderr).splitlines() if "data saved" in line]
    assert not compiled, compiled


FAIL = """
from numba.core import dispatcher
from icmlab.envinfo import kernels_row

def compile(self, sig):  # what numba does when LLVM cannot build a kernel on this machine
    raise RuntimeError("LLVM ERROR: no target")

dispatcher.Dispatcher.compile = compile
row = kernels_row()
print(row.ok, row.value, "|", row.note)
"""


def test_setup_reports_a_compile_failure_as_a_problem_row():
    """The setup stage never raises for a problem: numba failing to build (or load) a kernel in a fresh
    process is a failed row that names the error and the fix."""
    out = subprocess.run([sys.executable, "-c", FAIL], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ok, _, rest = out.stdout.partition(" ")
    assert ok == "False" and rest.startswith("failed") and "LLVM ERROR" in rest and "reinstall" in rest
