"""Image loading, pad-to-square and CLIP preprocessing against the original pipeline's pixels.

Oracle: tests/fixtures/image_pad (sources through the ORIGINAL LLaVA / mPLUG-Owl2 loader:
``convert('RGB')`` -> ``expand2square(mean colour)`` -> ``CLIPImageProcessor`` at 336 / 448 px).
Images, processors, sizes, the background colour, CLIP mean/std and hashes are all read from
``index.json``, so any oracle set of the same format drops in.
"""

from __future__ import annotations

import hashlib

import numpy as np
import oracles as O
import pytest
import torch
from PIL import Image

from icmlab.inputs.images import (
    CLIP_MEAN,
    CLIP_STD,
    build_image_processor,
    expand2square,
    load_and_preprocess,
    load_rgb,
    mean_background,
    preprocess_images,
)

FIX = O.IMAGE_PAD
INDEX = O.image_index()
IMAGES = INDEX["images"]
RESOLUTIONS = O.image_resolutions()  # processor name -> crop size (e.g. llava_336 -> 336)
IMAGE_PARAMS = [pytest.param(im, id=im["name"]) for im in IMAGES]


def _config(res: str) -> dict:
    return INDEX["processors"][res]["preprocessor_config_json"]


@pytest.fixture(scope="session")
def oracle() -> dict[str, dict[str, np.ndarray]]:
    """Rebuild the original float32 tensors from the stored uint8 pixels (see fixtures README),
    with the mean/std the original processor was configured with."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for res in RESOLUTIONS:
        mean, std = np.array(_config(res)["image_mean"], np.float32), np.array(_config(res)["image_std"], np.float32)
        with np.load(FIX / f"{res}_uint8.npz") as z:
            out[res] = {}
            for im in IMAGES:
                a = (z[im["name"]].transpose(1, 2, 0).astype(np.float64) * (1 / 255)).astype(np.float32)
                out[res][im["name"]] = np.ascontiguousarray(((a - mean) / std).transpose(2, 0, 1))
    return out


@pytest.fixture(scope="session")
def processors():
    return {res: build_image_processor(size) for res, size in RESOLUTIONS.items()}


def test_stored_oracle_is_lossless(oracle):
    """The rebuilt tensors hash to the original .npy contents recorded in index.json."""
    for im in IMAGES:
        for res in RESOLUTIONS:
            t = im[res]
            assert list(oracle[res][im["name"]].shape) == t["tensor_shape"] and t["tensor_dtype"] == "float32"
            digest = hashlib.sha256(oracle[res][im["name"]].tobytes()).hexdigest()
            assert digest == t["tensor_sha256"], (res, im["name"])


def test_processors_are_configured_like_upstream(processors):
    """Our CLIP processor is configured as the original's (the oracle records its settings)."""
    for res, proc in processors.items():
        cfg, eff = _config(res), INDEX["processors"][res]["effective"]
        assert np.allclose(proc.image_mean, cfg["image_mean"]) and np.allclose(proc.image_std, cfg["image_std"])
        assert int(proc.resample) == eff["resample"] and proc.rescale_factor == eff["rescale_factor"]
        assert proc.size.shortest_edge == eff["size"]["shortest_edge"]
        assert (proc.crop_size.height, proc.crop_size.width) == (eff["crop_size"]["height"], eff["crop_size"]["width"])
        assert np.allclose(CLIP_MEAN, cfg["image_mean"]) and np.allclose(CLIP_STD, cfg["image_std"])


@pytest.mark.parametrize("res", list(RESOLUTIONS))
@pytest.mark.parametrize("im", IMAGE_PARAMS)
def test_pad_pipeline_equals_upstream(oracle, processors, res, im):
    pixels = load_and_preprocess([FIX / im["source_file"]], processors[res], "pad")
    assert list(pixels.shape) == [1, *im[res]["tensor_shape"]] and pixels.dtype.is_floating_point
    assert pixels.shape[-2:] == (RESOLUTIONS[res], RESOLUTIONS[res])
    diff = np.abs(pixels[0].numpy() - oracle[res][im["name"]]).max()
    assert diff <= 1e-5, f"{res}/{im['name']}: max abs diff {diff}"


@pytest.mark.parametrize("res", list(RESOLUTIONS))
@pytest.mark.parametrize("im", IMAGE_PARAMS)
def test_padded_square_equals_upstream(processors, res, im):
    bg = mean_background(processors[res])
    assert bg == tuple(INDEX["background_rgb"])
    src = load_rgb(FIX / im["source_file"])
    assert list(src.size) == im["source_size_wh"]
    ours = expand2square(src, bg)
    theirs = Image.open(FIX / im["padded_file"]).convert("RGB")
    assert list(ours.size) == im["padded_size_wh"] == list(theirs.size)
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
    other_modes = [im for im in IMAGES if im["source_mode"] != "RGB"]
    assert other_modes, "the oracle has no non-RGB source"
    for im in other_modes:
        assert Image.open(FIX / im["source_file"]).mode == im["source_mode"]
        img = load_rgb(FIX / im["source_file"])
        assert img.mode == im["padded_mode"] == "RGB"


@pytest.mark.slow
@pytest.mark.parametrize("res", list(RESOLUTIONS))
def test_lean_path_is_bit_identical_to_the_processor_call(processors, res):
    """LeanClip (what training uses) equals the generic processor call exactly, for every aspect mode,
    on the oracle's sources and on odd sizes (wide, tall, square, smaller than the output)."""
    from icmlab.inputs.images import LeanClip

    proc = processors[res]
    rng = np.random.default_rng(0)
    odd = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((37, 301), (301, 37), (64, 64), (500, 333))
    ]
    sources = [load_rgb(FIX / im["source_file"]) for im in IMAGES[:2]] + odd
    for aspect in ("pad", "square", "crop", "resize"):
        lean = LeanClip.for_processor(proc, aspect)
        assert lean is not None
        for img in sources:
            generic = proc(
                images=[expand2square(img, mean_background(proc)) if aspect == "pad" else img], return_tensors="pt"
            )
            if aspect == "resize":
                h, w = RESOLUTIONS[res], RESOLUTIONS[res]
                generic = proc(
                    images=[img.resize((w, h), resample=proc.resample)],
                    do_resize=False,
                    do_center_crop=False,
                    return_tensors="pt",
                )
            assert torch.equal(lean(img), generic["pixel_values"][0].float()), (aspect, img.size)
    # Against the original pipeline's tensors: test_pad_pipeline_equals_upstream (preprocess_images runs LeanClip).


def test_lean_path_declines_what_it_does_not_cover():
    from icmlab.inputs.images import LeanClip

    proc = build_image_processor(64)
    assert LeanClip.for_processor(proc, "pad") is not None
    proc.do_center_crop = False
    assert LeanClip.for_processor(proc, "pad") is None  # the processor call handles it
    proc = build_image_processor(64)
    proc.crop_size = {"height": 80, "width": 80}  # a crop larger than the resize
    assert LeanClip.for_processor(proc, "pad") is None
