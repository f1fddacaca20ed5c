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
