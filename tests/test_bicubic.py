"""The compiled bicubic resize (icmlab.inputs.bicubic) against the installed Pillow, byte for byte.

Every expected value is Pillow's own output (``Image.resize(..., BICUBIC)``, ``expand2square`` on a
real canvas) or the generic CLIP processor call; nothing is copied out of a run.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from icmlab.inputs import bicubic
from icmlab.inputs.images import ASPECT_RATIOS, LeanClip, build_image_processor, expand2square, mean_background

pytestmark = pytest.mark.skipif(not bicubic.AVAILABLE, reason="numba not installed")

RNG_GEOMETRIES = np.random.default_rng(20261202)
# (in_w, in_h, out_w, out_h): shrink, enlarge and mixed on each axis, sizes from 2 px up
GEOMETRIES = [(640, 640, 336, 336), (640, 480, 448, 336), (37, 5, 3, 11), (2, 2, 7, 3), (1000, 333, 336, 112)] + [
    tuple(int(v) for v in (*RNG_GEOMETRIES.integers(2, 900, 2), *RNG_GEOMETRIES.integers(2, 500, 2))) for _ in range(20)
]


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rgbx(arr: np.ndarray) -> np.ndarray:
    """The RGBX layout of the JPEG decoder's output (a 4th byte, noise here: it must be ignored)."""
    pad = np.random.default_rng(arr.size).integers(0, 256, arr.shape[:2] + (1,), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([arr, pad], axis=2))


def _pillow(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "%dx%d-%dx%d" % g)
def test_resize_and_crop_are_pillows_bytes(geometry):
    in_w, in_h, out_w, out_h = geometry
    arr = _noise(in_h, in_w, seed=in_w * 1000 + in_h)
    ref = _pillow(arr, (out_w, out_h))
    rng = np.random.default_rng(out_w * 1000 + out_h)
    top, left = int(rng.integers(0, out_h)), int(rng.integers(0, out_w))
    window = (top, left, int(rng.integers(1, out_h - top + 1)), int(rng.integers(1, out_w - left + 1)))
    for crop, src in itertools.product(((0, 0, out_h, out_w), window), (arr, _rgbx(arr))):
        got = bicubic.resize_crop(src, bicubic.Canvas(in_w, in_h, 0, 0, (0, 0, 0)), (out_w, out_h), crop)
        same_axis = in_w == out_w or in_h == out_h
        if got is None:  # the documented cases where Pillow is used instead
            assert same_axis or not bicubic.horizontal_first(in_w, in_h, out_w, out_h), geometry
            continue
        r, c, h, w = crop
        np.testing.assert_array_equal(got, ref[r : r + h, c : c + w])


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (641, 480), (480, 641), (333, 100), (100, 333), (7, 2)])
@pytest.mark.parametrize("out", [336, 448, 64])
def test_padded_canvas_is_expand2square_then_resize(size, out):
    """The pad canvas is never built, yet the bytes are those of Pillow on the built canvas."""
    w, h = size
    bg = mean_background(build_image_processor(out))
    arr = _noise(h, w, seed=w + 7 * h)
    ref = _pillow(np.asarray(expand2square(Image.fromarray(arr), bg)), (out, out))
    side = max(w, h)
    canvas = bicubic.Canvas(side, side, (side - w) // 2, (side - h) // 2, bg)
    for src in (arr, _rgbx(arr)):  # RGB (3 byte loads per pixel) and RGBX (packed words)
        got = bicubic.resize_crop(src, canvas, (out, out), (0, 0, out, out))
        assert got is not None
        np.testing.assert_array_equal(got, ref)


def _poison_scratch(seed: int) -> None:
    """Fill this thread's reused scratch buffers with noise: the passes write only the padding they read."""
    for buf in getattr(bicubic._scratch, "bufs", {}).values():
        buf[:] = np.random.default_rng(seed).integers(0, 256, buf.shape, dtype=np.uint8)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (427, 640), (640, 427), (333, 100), (100, 333), (7, 2)])
def test_padding_never_read_from_a_stale_buffer(size):
    """Only the background rows/columns within the taps of the image (and one stand-in) are written; every
    other padding pixel comes from the coefficient sums, so noise left in the buffers changes nothing."""
    w, h = size
    bg = (200, 17, 90)
    arr = _noise(h, w, seed=3 * w + h)
    side = max(w, h)
    canvas = bicubic.Canvas(side, side, (side - w) // 2, (side - h) // 2, bg)
    for out in (336, 64):
        ref = _pillow(np.asarray(expand2square(Image.fromarray(arr), bg)), (out, out))
        for i, src in enumerate((arr, _rgbx(arr))):
            bicubic.resize_crop(src, canvas, (out, out), (0, 0, out, out))  # allocates the buffers
            _poison_scratch(seed=out + i)
            got = bicubic.resize_crop(src, canvas, (out, out), (0, 0, out, out))
            assert got is not None
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("aspect", ASPECT_RATIOS)
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 500), (336, 250), (1024, 77), (90, 1500), (20, 30)])
def test_lean_clip_equals_the_processor_call(aspect, size):
    """LeanClip (compiled resize where it applies, Pillow elsewhere) gives the generic processor's tensors."""
    proc = build_image_processor(336)
    lean = LeanClip.for_processor(proc, aspect)
    img = Image.fromarray(_noise(size[1], size[0], seed=size[0] * 3 + size[1]))
    if aspect == "pad":
        expected = proc(images=[expand2square(img, mean_background(proc))], return_tensors="pt")["pixel_values"][0]
    elif aspect == "resize":
        stretched = img.resize((336, 336), Image.Resampling.BICUBIC)
        expected = proc(images=[stretched], do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"][
            0
        ]
    else:
        expected = proc(images=[img], return_tensors="pt")["pixel_values"][0]
    got = lean(img)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected.to(torch.float32))


def test_common_geometries_take_the_compiled_path():
    """COCO-sized images under pad / crop go through the compiled passes (not silently through Pillow)."""
    proc = build_image_processor(336)
    for aspect, size in (("pad", (640, 480)), ("pad", (480, 640)), ("crop", (640, 427)), ("resize", (500, 375))):
        img = Image.fromarray(_noise(size[1], size[0], seed=1))
        assert LeanClip.for_processor(proc, aspect)._compiled(np.asarray(img)) is not None, (aspect, size)


def test_pass_order_follows_the_installed_pillow():
    """A tall shrink: Pillow >= 11 resizes vertically first. The probe finds which rule the installed
    Pillow follows; where it is vertical first, that order reproduces Pillow and resize_crop declines."""
    in_w, in_h, out_w, out_h = 120, 900, 100, 150
    arr = _noise(in_h, in_w, seed=5)
    ref = _pillow(arr, (out_w, out_h))
    if bicubic.horizontal_first(in_w, in_h, out_w, out_h):
        got = bicubic.resize_crop(
            arr, bicubic.Canvas(in_w, in_h, 0, 0, (0, 0, 0)), (out_w, out_h), (0, 0, out_h, out_w)
        )
    else:
        got = bicubic._resize_vertical_first(arr, out_w, out_h)
        assert (
            bicubic.resize_crop(arr, bicubic.Canvas(in_w, in_h, 0, 0, (0, 0, 0)), (out_w, out_h), (0, 0, out_h, out_w))
            is None
        )
    np.testing.assert_array_equal(got, ref)


def test_coefficients_are_fixed_point_and_normalised():
    """Each row's 22-bit coefficients sum to 2**22 within rounding of its taps, and the taps stay inside the input."""
    for in_size, out_size in ((640, 336), (336, 640), (5, 3), (900, 17)):
        bounds, kk = bicubic.coefficients(in_size, out_size)
        assert bounds[:, 0].min() >= 0 and (bounds[:, 0] + bounds[:, 1]).max() <= in_size
        sums = kk.astype(np.int64).sum(axis=1)
        assert np.all(np.abs(sums - (1 << bicubic.PRECISION_BITS)) <= bounds[:, 1])
