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
def transpose_band32_packed(src, left, bg, margin, dst):
    """:func:`transpose_band` of an RGBX image read as ``[h, w]`` uint32 (little-endian: R is the low byte),
    writing four pixels as three uint32 words (``dst``: the band viewed as
    uint32, ``3 * h4 // 4`` words per canvas column, ``h4`` = ``h`` rounded up to a multiple of 4; the
    pixels past ``h`` repeat the last row: filler that no later pass reads).

    Of the background columns only those a pass can read are written: the ``margin`` columns on each side
    of the image (the taps of an output that straddles its edge) and the canvas's first and last column
    (the padding row of :func:`row_pass_padded`); the others keep whatever the buffer held.

    The image is read four rows at a time along the row (contiguous loads, vectorised), in blocks of
    128 columns, and stored three words per canvas column."""
    h, w = src.shape[0], src.shape[1]
    cw, groups = dst.shape[0], dst.shape[1] // 3
    fill = np.uint32(bg[0]) | (np.uint32(bg[1]) << np.uint32(8)) | (np.uint32(bg[2]) << np.uint32(16))
    f0, f1, f2 = _pack(fill, fill, fill, fill)
    for x in range(cw):
        outside = x < left or x >= left + w
        if outside and (x == 0 or x == cw - 1 or left - margin <= x < left + w + margin):
            row = dst[x]
            for g in range(groups):
                row[3 * g], row[3 * g + 1], row[3 * g + 2] = f0, f1, f2
    block = 128
    last = h - 1
    for x0 in range(0, w, block):
        x1 = min(x0 + block, w)
        for g in range(groups):
            y = 4 * g
            s0, s1, s2, s3 = src[min(y, last)], src[min(y + 1, last)], src[min(y + 2, last)], src[min(y + 3, last)]
            for x in range(x0, x1):
                row = dst[left + x]
                row[3 * g], row[3 * g + 1], row[3 * g + 2] = _pack(s0[x], s1[x], s2[x], s3[x])


@_njit
def untranspose_packed(src, src32, dst, dst32):
    """:func:`untranspose` four pixels at a time as three uint32 words, both ways (``src32``/``dst32``: the
    uint32 views of ``src``/``dst``; ``dst`` is ``[h, 3 * w]`` with ``w % 4 == 0``); the last ``h % 4``
    rows byte by byte."""
    w, h = src.shape[0], dst.shape[0]
    full = h // 4
    for g in range(full):
        r0, r1, r2, r3 = dst32[4 * g], dst32[4 * g + 1], dst32[4 * g + 2], dst32[4 * g + 3]
        for k in range(w // 4):
            a0, a1, a2, a3 = _unpack(src32[4 * k], g)
            b0, b1, b2, b3 = _unpack(src32[4 * k + 1], g)
            c0, c1, c2, c3 = _unpack(src32[4 * k + 2], g)
            d0, d1, d2, d3 = _unpack(src32[4 * k + 3], g)
            r0[3 * k], r0[3 * k + 1], r0[3 * k + 2] = _pack(a0, b0, c0, d0)
            r1[3 * k], r1[3 * k + 1], r1[3 * k + 2] = _pack(a1, b1, c1, d1)
            r2[3 * k], r2[3 * k + 1], r2[3 * k + 2] = _pack(a2, b2, c2, d2)
            r3[3 * k], r3[3 * k + 1], r3[3 * k + 2] = _pack(a3, b3, c3, d3)
    for y in range(4 * full, h):
        out = dst[y]
        for x in range(w):
            out[3 * x] = src[x, 3 * y]
            out[3 * x + 1] = src[x, 3 * y + 1]
            out[3 * x + 2] = src[x, 3 * y + 2]


@_njit(inline="always")
def _pack(p0, p1, p2, p3):
    """Four little-endian RGBX pixels (uint32) as the three words of their 12 RGB bytes."""
    return (
        (p0 & np.uint32(0xFFFFFF)) | (p1 << np.uint32(24)),
        ((p1 >> np.uint32(8)) & np.uint32(0xFFFF)) | (p2 << np.uint32(16)),
        ((p2 >> np.uint32(16)) & np.uint32(0xFF)) | (p3 << np.uint32(8)),
    )


@_njit(inline="always")
def _unpack(words, g):
    """Pixels ``4g .. 4g + 3`` (RGB in the low 24 bits) of a row of packed RGB bytes viewed as uint32."""
    u0, u1, u2 = words[3 * g], words[3 * g + 1], words[3 * g + 2]
    return (
        u0 & np.uint32(0xFFFFFF),
        (u0 >> np.uint32(24)) | ((u1 & np.uint32(0xFFFF)) << np.uint32(8)),
        (u1 >> np.uint32(16)) | ((u2 & np.uint32(0xFF)) << np.uint32(16)),
        u2 >> np.uint32(8),
    )


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
        _accumulate(src, bounds[i, 0], bounds[i, 1], kk[i], shift, lo, hi, pad, acc)
        out = dst[i]
        for j in range(m):
            v = acc[j] >> shift
            out[j] = 0 if v < 0 else (255 if v > 255 else v)


@_njit
def _accumulate(src, first, taps, k, shift, lo, hi, pad, acc):
    """``acc[j] = 2**(shift-1) + sum_t k[t] * src[first + t, j]``, four taps per sweep;
    the rows outside ``[lo, hi)`` all equal ``pad``."""
    m = acc.shape[0]
    half = np.int32(1 << (shift - 1))
    if first + taps <= lo or first >= hi:
        total = np.int32(0)
        for t in range(taps):
            total += k[t]
        for j in range(m):
            acc[j] = half + np.int32(pad[j]) * total
        return
    acc[:] = half
    t = 0
    while t + 4 <= taps:
        k0, k1, k2, k3 = k[t], k[t + 1], k[t + 2], k[t + 3]
        r0, r1, r2, r3 = src[first + t], src[first + t + 1], src[first + t + 2], src[first + t + 3]
        for j in range(m):
            acc[j] += np.int32(r0[j]) * k0 + np.int32(r1[j]) * k1 + np.int32(r2[j]) * k2 + np.int32(r3[j]) * k3
        t += 4
    while t < taps:
        kt = k[t]
        row = src[first + t]
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
