"""JPEG decoding for the training loader: libjpeg-turbo straight into a reused numpy buffer.

Pillow decodes a JPEG with libjpeg-turbo too, but then copies it into its own RGBX storage, and
``np.asarray`` copies it once more (≈ 0.5 ms of a 640x480 image's ≈ 2 ms). :func:`decode_rgbx`
calls libjpeg-turbo through ``simplejpeg`` (its TurboJPEG API) with the settings Pillow uses
(accurate integer DCT, fancy upsampling) and writes the pixels once, into a per-thread buffer.

The bytes must be Pillow's, so the fast path is taken only where that is checked:

- once per process, JPEGs that Pillow encodes from noise and from a smooth gradient (4:4:4, 4:2:2,
  4:2:0, progressive, odd sizes) are decoded both ways and compared (:func:`agrees_with_pillow`);
  any difference turns the fast path off, with a warning;
- only a YCbCr JPEG (what Pillow opens as ``RGB``) of at most
  :data:`icmlab.inputs.image_guard.MAX_PIXELS` pixels is decoded this way;
- any decoder warning (a truncated or corrupt file) is an error here (``strict``): the caller then
  reads the file with Pillow, which raises or decodes exactly as upstream's loader does.

Everything else returns None and is read by :func:`icmlab.inputs.images.load_rgb` (Pillow).

Usage::

    arr = decode_rgbx(path)        # [h, w, 4] uint8 (RGB + a pad byte), or None: use Pillow
"""

from __future__ import annotations

import io
import logging
import os
import threading

import numpy as np

from icmlab.inputs.image_guard import MAX_PIXELS

log = logging.getLogger(__name__)

try:
    import simplejpeg
except ImportError:  # an environment without it: Pillow decodes every image
    simplejpeg = None

_SOI = b"\xff\xd8"
_local = threading.local()
_agrees: bool | None = None
_probe_lock = threading.Lock()


def available() -> bool:
    """Whether :func:`decode_rgbx` can decode at all (simplejpeg importable and agreeing with Pillow)."""
    return simplejpeg is not None and agrees_with_pillow()


def agrees_with_pillow() -> bool:
    """Decode a few Pillow-encoded JPEGs with both decoders (once per process); True if every byte is equal."""
    global _agrees
    if _agrees is None:
        with _probe_lock:
            if _agrees is None:
                _agrees = simplejpeg is not None and _probe()
    return _agrees


def _probe() -> bool:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:61, 0:83]
    smooth = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    sources = (rng.integers(0, 256, (45, 67, 3), dtype=np.uint8), smooth)
    options = ({"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"progressive": True, "quality": 60})
    for src in sources:
        for opts in options:
            buf = io.BytesIO()
            Image.fromarray(src).save(buf, "JPEG", **opts)
            data = buf.getvalue()
            with Image.open(io.BytesIO(data)) as im:
                ref = np.asarray(im.convert("RGB"))
            try:
                got = simplejpeg.decode_jpeg(data, colorspace="RGBX")
            except ValueError as e:
                log.warning("simplejpeg cannot decode a Pillow JPEG (%s); Pillow decodes every image", e)
                return False
            if got.shape[:2] != ref.shape[:2] or not np.array_equal(got[..., :3], ref):
                log.warning("simplejpeg's pixels differ from Pillow's (%s); Pillow decodes every image", opts)
                return False
    return True


#: Decoded images up to this size go into the per-thread buffer; larger ones (12-Mpixel phone photos:
#: 48 MB) into a fresh array, so that one big image does not stay in every worker's memory.
KEEP_BUFFER_BYTES = 16 << 20


#: Where the decoded pixels start relative to a 64-byte boundary. libjpeg-turbo's SIMD colour
#: conversion writes a row whose start is 32-byte aligned with non-temporal stores, which bypass the
#: cache: the decode is ~6 % slower and the resize that reads the pixels next finds none of them cached
#: (measured: 2.37 vs 2.68 ms per 640x480 sample, the same process with the buffer at either offset).
#: An odd multiple of 16 keeps every row of a width with ``4 * w % 32 == 0`` on the cached path.
BUFFER_OFFSET = 16


def _offset_array(n: int) -> np.ndarray:
    """``n`` bytes starting :data:`BUFFER_OFFSET` past a 64-byte boundary."""
    raw = np.empty(n + 64, np.uint8)
    start = (BUFFER_OFFSET - raw.ctypes.data) % 64
    return raw[start : start + n]


def _buffer(n: int) -> np.ndarray:
    if n > KEEP_BUFFER_BYTES:
        return _offset_array(n)  # a big image: its own array, not kept
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _local.buf = _offset_array(max(n, 1 << 21))
    return buf


def decode_rgbx(path: str | os.PathLike) -> np.ndarray | None:
    """The file's pixels as ``[h, w, 4]`` uint8 (R, G, B, pad), equal to Pillow's ``RGB`` decode, or None.

    None: not a JPEG, not YCbCr, over the pixel limit, a decoder warning or error, an unreadable
    file, or the fast path is off (see the module docstring). The caller then uses Pillow, which
    raises the proper error for a missing or broken file.

    The array lives in a per-thread buffer that the next call overwrites (images up to
    :data:`KEEP_BUFFER_BYTES`): use it (or copy it) first.
    """
    if simplejpeg is None or not agrees_with_pillow():
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(_SOI):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace != "YCbCr" or not 0 < w * h <= MAX_PIXELS:
            return None
        buf = _buffer(h * w * 4)
        return simplejpeg.decode_jpeg(data, colorspace="RGBX", buffer=buf, strict=True)
    except ValueError:
        return None
