"""Pillow's bicubic resize of 8-bit RGB images, bit for bit, as compiled (numba) passes.

The training loader's image path is decode, pad, resize, crop, normalise; the resize was most of it.
This module computes exactly what ``PIL.Image.resize(size, Image.Resampling.BICUBIC)`` computes and
checks it against the installed Pillow before it is used for a geometry. Pillow's algorithm
(``libImaging/Resample.c``):

- per axis, coefficients from the bicubic kernel (``a = -0.5``, support 2 times the scale when
  shrinking) in double precision, normalised to sum 1, then converted to 22-bit fixed point
  (``int(w * 2**22 +- 0.5)``);
- two passes, each output byte ``clip(floor((2**21 + sum(byte * coef)) / 2**22), 0, 255)`` in 32-bit
  integers, so the intermediate image is rounded to bytes between the passes; the horizontal pass
  runs first unless the height shrinks by more than twice as many pixels as the width (Pillow >= 11;
  older releases always go horizontal first; which rule the installed Pillow follows is probed once).

What is faster here is the order of the work, not the arithmetic: the horizontal pass runs on the
image transposed, so that every tap is one multiply-add over a whole contiguous column of pixels
(vectorised), and the padding of LLaVA's ``pad`` never goes through the passes: a padded canvas
is the image plus copies of one resized background row or column (and output rows whose taps all
lie in the padding are that row times their coefficient sum). Only the crop window's rows are
computed in the vertical pass. An RGBX image (the JPEG decoder's output) is transposed in and out
of the band four pixels at a time, as three 32-bit words.

:func:`resize_crop` returns None where it does not apply (vertical pass first, a pass not needed,
numba missing, or a geometry whose check against Pillow failed); callers then use Pillow.

Usage::

    out = resize_crop(arr, Canvas(640, 640, 0, 80, bg), (336, 336), (0, 0, 336, 336))   # uint8 [336, 336, 3]
    planar_lut(out, lut)                                                                # float32 [3, 336, 336]
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import sys
import threading
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

#: Pillow's fixed-point precision of the 8-bit resample passes (``32 - 8 - 2``).
PRECISION_BITS = 22

#: Whether numba is installed (a locked dependency; without it, in a hand-made environment, the callers
#: use Pillow). The kernels (:mod:`icmlab.inputs.bicubic_kernels`) are imported on first use: numba's
#: import takes ~0.8 s, which stages that never resize an image should not pay.
AVAILABLE = importlib.util.find_spec("numba") is not None
_LITTLE = sys.byteorder == "little"


def _kernels():
    from icmlab.inputs import bicubic_kernels

    return bicubic_kernels


class Canvas(NamedTuple):
    """A ``width`` x ``height`` canvas of ``background`` with the image's top-left pixel at ``(left, top)``."""

    width: int
    height: int
    left: int
    top: int
    background: tuple[int, int, int]


def _bicubic(x: float) -> float:
    """Pillow's ``bicubic_filter`` (``a = -0.5``), the same double operations in the same order."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=4096)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bicubic filter.

    Returns:
        ``bounds`` (``[out_size, 2]`` int64: first input index, number of taps) and ``kk``
        (``[out_size, ksize]`` int32 fixed-point coefficients, zero past each row's taps).
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    kk = np.zeros((out_size, ksize), np.int32)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        for x, v in enumerate(w):
            v = v / ww if ww != 0.0 else v
            kk[xx, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        bounds[xx] = xmin, xmax
    bounds.flags.writeable = kk.flags.writeable = False
    return bounds, kk


def _size_rule(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow >= 11: horizontal first unless the height shrinks by more than twice the width's pixels."""
    return not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)


@functools.cache
def _pillow_orders_by_size() -> bool:
    """Whether the installed Pillow picks the pass order by :func:`_size_rule` (probed on one image whose
    two orders give different bytes); False: horizontal first always (Pillow <= 10)."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (200, 40, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(noise).resize((36, 20), Image.Resampling.BICUBIC))
    return bool(np.array_equal(ref, _resize_vertical_first(noise, 36, 20)))


def horizontal_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Whether the installed Pillow runs the horizontal pass first for this geometry."""
    return _size_rule(in_w, in_h, out_w, out_h) if _pillow_orders_by_size() else True


def planar_lut(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` float32 ``lut[c][arr[..., c]]`` of an ``[H, W, 3]`` uint8 array (numpy without numba)."""
    out = np.empty((3, *arr.shape[:2]), np.float32)
    if AVAILABLE:
        _kernels().planar_lut(arr, lut, out)
    else:  # pragma: no cover
        for c in range(3):
            np.take(lut[c], arr[:, :, c], out=out[c])
    return out


@functools.lru_cache(maxsize=1024)
def _pad_row(width: int, out_w: int, bg: tuple[int, int, int]) -> np.ndarray:
    """The horizontal pass of one background row of ``width`` pixels: ``[3 * out_w]`` uint8 (read-only)."""
    col = np.empty((width, 3), np.uint8)
    col[:] = bg
    out = np.empty((out_w, 3), np.uint8)
    bounds, kk = coefficients(width, out_w)
    _kernels().row_pass(col, bounds, kk, PRECISION_BITS, out)
    out = out.reshape(-1)
    out.flags.writeable = False
    return out


def _resize_vertical_first(arr: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Vertical pass, then horizontal (the order Pillow >= 11 takes for tall shrinks); used by the probe."""
    k = _kernels()
    h, w = arr.shape[:2]
    bounds, kk = coefficients(h, out_h)
    mid = np.empty((out_h, w * 3), np.uint8)
    k.row_pass(np.ascontiguousarray(arr).reshape(h, w * 3), bounds, kk, PRECISION_BITS, mid)
    band_t = np.empty((w, out_h * 3), np.uint8)
    k.transpose_band(mid.reshape(out_h, w, 3), 0, np.zeros(3, np.uint8), band_t)
    bounds, kk = coefficients(w, out_w)
    out_t = np.empty((out_w, out_h * 3), np.uint8)
    k.row_pass(band_t, bounds, kk, PRECISION_BITS, out_t)
    out = np.empty((out_h, out_w, 3), np.uint8)
    k.untranspose(out_t, out)
    return out


_scratch = threading.local()


#: Scratch arrays up to this size are kept per thread; larger ones (a 12-Mpixel phone photo's band is
#: ~36 MB) are allocated per call, so that one big image does not stay in every worker's memory.
KEEP_SCRATCH_BYTES = 8 << 20


def _buffer(slot: int, shape: tuple[int, int]) -> np.ndarray:
    """A per-thread uint8 scratch array of ``shape``, reused between calls (instead of ~2.4 MB of fresh
    arrays per 640x480 image); above :data:`KEEP_SCRATCH_BYTES`, a fresh array."""
    n = shape[0] * shape[1]
    if n > KEEP_SCRATCH_BYTES:
        return np.empty(shape, np.uint8)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        buf = bufs[slot] = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n].reshape(shape)


def _resize_crop(arr, canvas: Canvas, size: tuple[int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
    k = _kernels()
    h, w = arr.shape[:2]
    out_w, out_h = size
    bg = np.asarray(canvas.background, np.uint8)
    packed = arr.shape[2] == 4 and _LITTLE  # RGBX (the JPEG decoder's output): whole words in, whole words out
    bounds, kk = coefficients(canvas.width, out_w)
    if packed:
        span = -(-h // 4) * 4  # band columns hold h rounded up to 4 pixels (filler past h, never read)
        band_t = _buffer(0, (canvas.width, 3 * span))
        margin = kk.shape[1]  # background columns a straddling output's taps can reach
        k.transpose_band32_packed(arr.view(np.uint32)[..., 0], canvas.left, bg, margin, band_t.view(np.uint32))
    else:
        span = h
        band_t = _buffer(0, (canvas.width, 3 * h))
        k.transpose_band(arr, canvas.left, bg, band_t)
    resized_t = _buffer(1, (out_w, 3 * span))
    left = canvas.left  # band rows outside [left, left + w) are background
    pad_col = band_t[0] if left > 0 else band_t[-1]
    k.row_pass_padded(band_t, bounds, kk, PRECISION_BITS, left, left + w, pad_col, resized_t)
    rows = _buffer(2, (canvas.height, 3 * out_w))  # the canvas after the horizontal pass
    top = canvas.top
    vbounds, vkk = coefficients(canvas.height, out_h)
    if top or canvas.height > top + h:
        # Only the padding rows the vertical pass reads: those within its taps of the image, and the
        # first row (the last with no padding above), row_pass_padded's stand-in for the rest; the
        # others keep whatever the scratch buffer held and are never read.
        pad = _pad_row(canvas.width, out_w, tuple(canvas.background))
        reach = vkk.shape[1]
        rows[max(top - reach, 0) : top] = pad
        rows[top + h : top + h + reach] = pad
        rows[0 if top else -1] = pad
    image_rows = rows[top : top + h]
    if packed and out_w % 4 == 0:
        k.untranspose_packed(resized_t, resized_t.view(np.uint32), image_rows, image_rows.view(np.uint32))
    else:
        k.untranspose(resized_t, image_rows.reshape(h, out_w, 3))
    row0, col0, height, width = crop
    out = _buffer(3, (height, 3 * out_w))
    pad_row = rows[0] if top > 0 else rows[-1]  # rows outside [top, top + h) are the resized background
    k.row_pass_padded(
        rows, vbounds[row0 : row0 + height], vkk[row0 : row0 + height], PRECISION_BITS, top, top + h, pad_row, out
    )
    return out.reshape(height, out_w, 3)[:, col0 : col0 + width]


_checked: dict[tuple[int, int, int, int], bool] = {}


def _agrees_with_pillow(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Resize a noise image of this geometry both ways (RGB and RGBX in) once per process; False (and a
    warning) if the bytes differ."""
    key = (in_w, in_h, out_w, out_h)
    ok = _checked.get(key)
    if ok is None:
        from PIL import Image

        noise = np.random.default_rng(in_w * 7919 + in_h).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(noise).resize((out_w, out_h), Image.Resampling.BICUBIC))
        canvas, window = Canvas(in_w, in_h, 0, 0, (0, 0, 0)), (0, 0, out_h, out_w)
        ok = bool(np.array_equal(ref, _resize_crop(noise, canvas, (out_w, out_h), window)))
        rgbx = np.concatenate([noise, noise[..., :1]], axis=2)  # the JPEG decoder's layout (packed kernels)
        ok = _checked[key] = ok and bool(np.array_equal(ref, _resize_crop(rgbx, canvas, (out_w, out_h), window)))
        if not ok:
            log.warning("compiled bicubic resize differs from Pillow's for %dx%d -> %dx%d; using Pillow", *key)
    return ok


def resize_crop(
    arr: np.ndarray, canvas: Canvas, size: tuple[int, int], crop: tuple[int, int, int, int]
) -> np.ndarray | None:
    """Pillow's bicubic resize of ``arr`` placed on ``canvas`` to ``size``, then the crop window.

    Args:
        arr: the image, ``[h, w, 3]`` uint8, or ``[h, w, 4]`` (RGBX: the fourth byte is ignored), inside
            the canvas.
        canvas: the canvas it sits on (:class:`Canvas`; the image itself: ``Canvas(w, h, 0, 0, any)``).
        size: ``(width, height)`` of the resized canvas.
        crop: ``(top, left, height, width)`` of the window to return, inside ``size``.

    Returns:
        ``[height, width, 3]`` uint8, the bytes of
        ``canvas_image.resize(size, BICUBIC).crop((left, top, left + width, top + height))``; None where
        this path does not apply (see the module docstring): the caller uses Pillow. The array is a
        per-thread scratch buffer, overwritten by the next call: copy it (or normalise it) first.
    """
    out_w, out_h = size
    if not AVAILABLE or canvas.width == out_w or canvas.height == out_h:
        return None
    if not horizontal_first(canvas.width, canvas.height, out_w, out_h):
        return None
    if not _agrees_with_pillow(canvas.width, canvas.height, out_w, out_h):
        return None
    return _resize_crop(np.ascontiguousarray(arr), canvas, size, crop)
