"""Compile the input pipeline's numba kernels once per installation, not in the first training run.

The record store's modality-length walk (:mod:`icmlab.inputs.recordstore_kernels`) and the bicubic
resize (:mod:`icmlab.inputs.bicubic_kernels`) are compiled on first use and cached next to their
source (numba ``cache=True``; where that folder is read-only, in numba's user cache). Compiling them
takes a few seconds (≈ 2.3 s for the record store's alone, on the 2-core CI machine), which a fresh
installation would otherwise pay inside its first open of a merged file or its first training
sample. :func:`compile_kernels` sends a tiny JSON file and a tiny JPEG through the same entry points
the stages use, so every specialisation they need is compiled and cached; ``make install`` runs it
(``python -m icmlab.inputs.kernels``) and so does the setup stage, where it costs a fraction of a
second once cached.

Usage::

    seconds = compile_kernels()     # None: numba is not installed (the Pillow / Python paths are used)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def compile_kernels() -> float | None:
    """Compile (or load from the cache) every kernel the stages call; the seconds it took, or None
    without numba."""
    from icmlab.inputs import bicubic

    if not bicubic.AVAILABLE:
        return None
    from PIL import Image

    from icmlab.inputs.images import ASPECT_RATIOS, LeanClip
    from icmlab.inputs.recordstore import RecordStore

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="icmlab-kernels-") as tmp:
        root = Path(tmp)
        records = root / "records.json"
        records.write_text(
            '[{"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nHi"},'
            ' {"from": "gpt", "value": "Yes."}]}, {"id": "b", "conversations": []}]'
        )
        RecordStore.open(records, cache=False)
        noise = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
        images = []  # wide and tall (pad: both canvases), as files and as PIL images
        for name, img in (("wide.jpg", noise), ("tall.jpg", np.ascontiguousarray(noise.transpose(1, 0, 2)))):
            Image.fromarray(img).save(root / name, "JPEG")
            images.append((root / name, Image.fromarray(img)))
        # CLIP's settings at 16 px (built directly: the processor class would import transformers)
        lut = np.zeros((3, 256), np.float32)
        for aspect in ASPECT_RATIOS:
            lean = LeanClip(16, (16, 16), int(Image.Resampling.BICUBIC), lut, aspect, (122, 116, 104))
            for path, pil in images:
                lean.from_file(path)  # libjpeg-turbo's RGBX layout
                lean(pil)  # Pillow's RGB layout
    return time.perf_counter() - t


def main() -> None:
    seconds = compile_kernels()
    if seconds is None:
        print("numba is not installed: the input pipeline uses its Pillow and Python paths")
    else:
        print(f"input pipeline kernels compiled (or loaded from numba's cache) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
