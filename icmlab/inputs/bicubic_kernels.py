"""The compiled (numba) passes of :mod:`icmlab.inputs.bicubic`: plain loops over uint8 rows with int32
accumulators, written so that the inner loop is one multiply-add over a contiguous row (vectorised).
Compiled on first use and cached next to this file (numba ``cache=True``)."""

from __future__ import annotations

import functools

import numba
import numpy as np

_njit = functools.partial(numba.njit, cache=True, nogil=True)


@_njit
def transpose_band(src, left, bg, dst):
    """``dst[x, 3*y + c]``: canvas column ``x`` of the image's rows (``bg`` outside the image)."""
    h, w = src.shape[0], src.shape[1]
    cw = dst.shape[0]
    for x in range(cw):
        if x < left or x >= left + w:
            for y in range(h):
                dst[x, 3 * y] = bg[0]
                dst[x, 3 * y + 1] = bg[1]
                dst[x, 3 * y + 2] = bg[2]
    block = 32
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            for x in range(x0, min(x0 + block, w)):
                row = dst[left + x]
                for y in range(y0, min(y0 + block, h)):
                    row[3 * y] = src[y, x, 0]
                    row[3 * y + 1] = src[y, x, 1]
                    row[3 * y + 2] = src[y, x, 2]


@_njit
def transpose_band32(src, left, bg, dst):
    """:func:`transpose_band` of an RGBX image read as ``[h, w]`` uint32 (little-endian: R is the low byte):
    one 4-byte load per pixel instead of three 1-byte loads."""
    h, w = src.shape[0], src.shape[1]
    cw = dst.shape[0]
    for x in range(cw):
        if x < left or x >= left + w:
            for y in range(h):
                dst[x, 3 * y] = bg[0]
                dst[x, 3 * y + 1] = bg[1]
                dst[x, 3 * y + 2] = bg[2]
    block = 16
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            for x in range(x0, min(x0 + block, w)):
                row = dst[left + x]
                for y in range(y0, min(y0 + block, h)):
                    v = src[y, x]
                    row[3 * y] = v & 0xFF
                    row[3 * y + 1] = (v >> 8) & 0xFF
                    row[3 * y + 2] = (v >> 16) & 0xFF


@_njit
def row_pass(src, bounds, kk, shift, dst):
    """``dst[i] = clip(floor((2**(shift-1) + sum_t kk[i, t] * src[bounds[i, 0] + t]) / 2**shift), 0, 255)``
    over whole rows: one pass of Pillow's, ``shift`` its fixed-point precision."""
    row_pass_padded(src, bounds, kk, shift, 0, src.shape[0], src[0], dst)


@_njit
def row_pass_padded(src, bounds, kk, shift, lo, hi, pad, dst):
    """:func:`row_pass` where every row of ``src`` outside ``[lo, hi)`` equals ``pad`` (a padded canvas):
    an output row whose taps all fall there is ``pad`` times the sum of its coefficients (the same
    integers, without the multiply-adds)."""
    m = src.shape[1]
    acc = np.empty(m, np.int32)
    for i in range(dst.shape[0]):
        _accumulate(src, bounds[i, 0], bounds[i, 1], kk[i], shift, lo, hi, pad, 0, m, acc)
        out = dst[i]
        for j in range(m):
            v = acc[j] >> shift
            out[j] = 0 if v < 0 else (255 if v > 255 else v)


@_njit
def _accumulate(src, first, taps, k, shift, lo, hi, pad, j0, m, acc):
    """``acc[j] = 2**(shift-1) + sum_t k[t] * src[first + t, j0 + j]`` for ``j < m``, four taps per sweep;
    the rows outside ``[lo, hi)`` all equal ``pad``."""
    half = np.int32(1 << (shift - 1))
    if first + taps <= lo or first >= hi:
        total = np.int32(0)
        for t in range(taps):
            total += k[t]
        for j in range(m):
            acc[j] = half + np.int32(pad[j0 + j]) * total
        return
    acc[:m] = half
    t = 0
    while t + 4 <= taps:
        k0, k1, k2, k3 = k[t], k[t + 1], k[t + 2], k[t + 3]
        r0, r1, r2, r3 = src[first + t, j0:], src[first + t + 1, j0:], src[first + t + 2, j0:], src[first + t + 3, j0:]
        for j in range(m):
            acc[j] += np.int32(r0[j]) * k0 + np.int32(r1[j]) * k1 + np.int32(r2[j]) * k2 + np.int32(r3[j]) * k3
        t += 4
    while t < taps:
        kt = k[t]
        row = src[first + t, j0:]
        for j in range(m):
            acc[j] += np.int32(row[j]) * kt
        t += 1


@_njit
def untranspose(src, dst):
    """``dst[y, x, c] = src[x, 3*y + c]``."""
    w, h = src.shape[0], dst.shape[0]
    block = 32
    for x0 in range(0, w, block):
        for y0 in range(0, h, block):
            for y in range(y0, min(y0 + block, h)):
                for x in range(x0, min(x0 + block, w)):
                    dst[y, x, 0] = src[x, 3 * y]
                    dst[y, x, 1] = src[x, 3 * y + 1]
                    dst[y, x, 2] = src[x, 3 * y + 2]


@_njit
def planar_lut(src, lut, dst):
    """``dst[c, y, x] = lut[c, src[y, x, c]]``."""
    h, w = src.shape[0], src.shape[1]
    for c in range(3):
        table = lut[c]
        plane = dst[c]
        for y in range(h):
            for x in range(w):
                plane[y, x] = table[src[y, x, c]]
