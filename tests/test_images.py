"""Image loading, pad-to-square and CLIP preprocessing against the original pipeline's pixels.

Oracle: tests/fixtures/image_pad (7 sources through the ORIGINAL LLaVA / mPLUG-Owl2 loader:
``convert('RGB')`` -> ``expand2square(mean colour)`` -> ``CLIPImageProcessor`` at 336 / 448 px).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icmlab.inputs.images import (
    CLIP_MEAN, CLIP_STD, build_image_processor, expand2square, load_and_preprocess, load_rgb, mean_background,
    preprocess_images,
)

FIX = Path(__file__).parent / "fixtures" / "image_pad"
INDEX = json.loads((FIX / "index.json").read_text())
NAMES = [im["name"] for im in INDEX["images"]]
RESOLUTIONS = {"llava_336": 336, "owl2_448": 448}


def _source(name: str) -> Path:
    return FIX / next(im["source_file"] for im in INDEX["images"] if im["name"] == name)


@pytest.fixture(scope="session")
def oracle() -> dict[str, dict[str, np.ndarray]]:
    """Rebuild the original float32 tensors from the stored uint8 pixels (see fixtures README)."""
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out: dict[str, dict[str, np.ndarray]] = {}
    for res in RESOLUTIONS:
        with np.load(FIX / f"{res}_uint8.npz") as z:
            out[res] = {}
            for name in NAMES:
                a = (z[name].transpose(1, 2, 0).astype(np.float64) * (1 / 255)).astype(np.float32)
                out[res][name] = np.ascontiguousarray(((a - mean) / std).transpose(2, 0, 1))
    return out


@pytest.fixture(scope="session")
def processors():
    return {res: build_image_processor(size) for res, size in RESOLUTIONS.items()}


def test_stored_oracle_is_lossless(oracle):
    """The rebuilt tensors hash to the original .npy contents recorded in index.json."""
    for im in INDEX["images"]:
        for res in RESOLUTIONS:
            digest = hashlib.sha256(oracle[res][im["name"]].tobytes()).hexdigest()
            assert digest == im[res]["tensor_sha256"], (res, im["name"])


@pytest.mark.parametrize("res", list(RESOLUTIONS))
@pytest.mark.parametrize("name", NAMES)
def test_pad_pipeline_equals_upstream(oracle, processors, res, name):
    pixels = load_and_preprocess([_source(name)], processors[res], "pad")
    size = RESOLUTIONS[res]
    assert pixels.shape == (1, 3, size, size) and pixels.dtype.is_floating_point
    diff = np.abs(pixels[0].numpy() - oracle[res][name]).max()
    assert diff <= 1e-5, f"{res}/{name}: max abs diff {diff}"


@pytest.mark.parametrize("name", NAMES)
def test_padded_square_equals_upstream(processors, name):
    bg = mean_background(processors["llava_336"])
    assert bg == tuple(INDEX["background_rgb"]) == (122, 116, 104)
    ours = expand2square(load_rgb(_source(name)), bg)
    theirs = Image.open(FIX / "padded" / f"{name}.png").convert("RGB")
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_expand2square_offsets():
    img = Image.new("RGB", (4, 1), (255, 0, 0))
    sq = np.asarray(expand2square(img, (0, 0, 255)))
    # side 4, margin 3 -> pasted at row (4 - 1) // 2 = 1; the odd pixel goes to the bottom.
    assert sq.shape == (4, 4, 3)
    assert sq[1].tolist() == [[255, 0, 0]] * 4
    assert sq[[0, 2, 3]].reshape(-1, 3).tolist() == [[0, 0, 255]] * 12
    square = Image.new("RGB", (3, 3))
    assert expand2square(square, (1, 2, 3)) is square


def test_aspect_modes():
    """crop == square == the processor's own path; resize keeps both ends of a wide image; pad != crop."""
    proc = build_image_processor(64)
    wide = Image.new("RGB", (128, 32), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 8, 32))  # red strip on the far left
    crop = preprocess_images([wide], proc, "crop")
    assert crop.shape == (1, 3, 64, 64)
    assert np.array_equal(crop.numpy(), preprocess_images([wide], proc, "square").numpy())
    assert np.array_equal(crop.numpy(), proc(images=[wide], return_tensors="pt")["pixel_values"].numpy())
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    resized = preprocess_images([wide], proc, "resize")
    assert resized.shape == (1, 3, 64, 64)
    assert abs(resized[0, 0, 32, 0].item() - red) < 1e-3  # the strip survives a plain resize
    assert crop[0, 0, 32, 0].item() < red - 1  # ... but the centre crop cuts it away
    padded = preprocess_images([wide], proc, "pad")
    bg = (mean_background(proc)[1] / 255 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert abs(padded[0, 1, 0, 32].item() - bg) < 1e-5  # the top rows are the mean-colour padding


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_rgb(bad)
    proc = build_image_processor(64)
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        preprocess_images([Image.new("RGB", (8, 8))], proc, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], proc)
    with pytest.raises(ValueError, match="positive"):
        build_image_processor(0)


def test_load_rgb_converts_modes():
    for name in ("rgba_320x200", "gray_L_300x180", "palette_160x240"):
        img = load_rgb(_source(name))
        assert img.mode == "RGB"
