"""Guards of every image reader: no path out of the data root, no decompression bomb.

A record's ``image`` is relative to the data root; ``../x.jpg`` or ``/etc/x.png`` would read files
outside it, so :func:`image_path` refuses them (lexically: a folder of the data root may be a
symlink to another disk). A 69-byte PNG can claim 40000×40000 pixels; decoding it takes 4.8 GB,
so :func:`open_image` refuses headers above :data:`MAX_PIXELS` before anything is decoded.
Both raise :class:`ImageRefused` (a ``ValueError``) with a message for the record's report::

    with open_image(image_path(root, rec["image"])) as im:
        im.convert("RGB")
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

#: 128 Mpixel: 10x the largest image of the training sets (COCO, VG, GQA, OCR-VQA, TextVQA, SPAQ
#: phone photos are at most ~12 Mpixel), a 0.5 GB RGB decode. Below PIL's own hard limit (~179 Mpixel).
MAX_PIXELS = 1 << 27


class ImageRefused(ValueError):
    """An image that is not read: its path leaves the data root, or it claims too many pixels."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # image_outside_root | image_too_large (icmlab.inputs.problems)


def escapes_root(rel: str) -> str | None:
    """Why ``rel`` (a record's ``image``) leaves the data root, or None."""
    if rel.startswith(("/", "\\", "~")):  # POSIX absolute, a Windows root, a home directory
        return f"{rel}: an absolute path; images are paths relative to data.root"
    if ".." not in rel:  # the common case, one substring test per image (validate checks ~1M of them)
        return None
    norm = os.path.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"{rel}: climbs out of data.root with '..'; images are paths below data.root"
    return None


def image_path(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` for a record's image path that stays below ``root``.

    Raises:
        ImageRefused: ``rel`` is absolute or climbs out with ``..``.
    """
    why = escapes_root(rel)
    if why:
        raise ImageRefused("image_outside_root", why)
    return Path(root) / rel


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``PIL.Image.open`` (header read, pixels not decoded) that refuses, from the header alone, an
    image over ``max_pixels``. The caller closes the image (``with open_image(p) as im:``).

    Raises:
        ImageRefused: too many pixels (a decompression bomb, or a corrupt header).
        OSError, ValueError, SyntaxError: as ``PIL.Image.open`` for unreadable files.
    """
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while reading the header
        raise ImageRefused("image_too_large", f"{path}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageRefused(
            "image_too_large",
            f"{path}: claims {w}x{h} = {w * h:,} pixels, over the {max_pixels:,} limit (a decompression "
            "bomb or a corrupt header); replace or drop the image",
        )
    return img
