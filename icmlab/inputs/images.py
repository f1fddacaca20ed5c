"""Image loading and CLIP preprocessing as in LLaVA-v1.5 / mPLUG-Owl2 training.

Upstream opens each image with PIL, converts it to RGB and, with ``image_aspect_ratio pad``,
pastes it centred on a square canvas filled with the processor's mean colour
(``int(x * 255)`` per channel) before ``CLIPImageProcessor`` resizes (shortest edge, bicubic),
centre-crops, rescales by 1/255 and normalises. transformers 5's PIL backend of the CLIP
processor reproduces the original tensors bit for bit (fixture ``image_pad``), so it is used
explicitly (torchvision is not a dependency).

The training loader goes through :class:`LeanClip` instead of the generic processor call: Pillow's
bicubic resize computed by compiled passes that never resize the padding
(:mod:`icmlab.inputs.bicubic`, checked against the installed Pillow per geometry), the centre crop
as a window of that, and one lookup table per channel for rescale + normalise (a pixel's float
value depends on its byte only). The tensors are bit-identical to the processor's
(tests/test_images.py, tests/test_bicubic.py), at about a sixth of the time.

Every file is opened by :func:`icmlab.inputs.image_guard.open_image`, the one place for checks on
image files (decompression bombs; validate's header and decode checks call it too), except the JPEGs
that :meth:`LeanClip.from_file` (the training loader) and :func:`decode_check` (validate) decode with
:mod:`icmlab.inputs.jpeg`: libjpeg-turbo into a reused buffer, Pillow's bytes, the same pixel limit;
any file it declines goes through :func:`load_rgb`.

Usage::

    proc = build_image_processor(336)                      # 448 for mPLUG-Owl2, 64 for the demo
    pixels = preprocess_images([load_rgb(p) for p in paths], proc, aspect_ratio="pad")
    lean = LeanClip.for_processor(proc, "pad")             # None when the processor is configured otherwise
    pixels = lean(load_rgb(path))                           # [3, H, W] float32, same values
    pixels = lean.from_file(path)                           # the same, JPEGs decoded by icmlab.inputs.jpeg
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from icmlab.inputs import bicubic, jpeg
from icmlab.inputs.image_guard import ImageRefused, open_image
from icmlab.models.spec import FAMILY_SPECS

#: CLIP's normalisation constants (openai/clip-vit-large-patch14(-336) preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Input size of each family's vision tower.
IMAGE_SIZES = {name: s.image_size for name, s in FAMILY_SPECS.items()}
AspectRatio = Literal["pad", "square", "crop", "resize"]
ASPECT_RATIOS = ("pad", "square", "crop", "resize")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as an RGB PIL image (fully decoded).

    Args:
        path: image file path.

    Returns:
        The RGB image. Palette, grayscale and RGBA inputs go through PIL's ``convert("RGB")``
        (alpha is dropped, not composited), as upstream does.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but PIL cannot decode it (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path} (check data.root / the record's 'image' path)")
    try:
        img = open_image(path)
        try:
            img.load()
        except BaseException:
            img.close()
            raise
        if img.mode == "RGB" and img.fp is None:  # decoded, file closed: keep it (convert() would copy)
            return img
        with img:
            return img.convert("RGB")
    except ImageRefused:
        raise
    except Image.DecompressionBombError as e:  # a plugin's own check while decoding
        raise ImageRefused("image_too_large", f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e} (file corrupt or not an image; remove or replace it)") from e


def decode_check(path: str | os.PathLike) -> None:
    """Decode an image file as the training loader does (:meth:`LeanClip.from_file`), keep nothing.

    A JPEG that :func:`icmlab.inputs.jpeg.decode_rgbx` decodes without a warning passes; every other
    file goes through :func:`load_rgb` (Pillow).

    Raises:
        as :func:`load_rgb`.
    """
    if jpeg.decode_rgbx(path) is None:
        load_rgb(path).close()


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad an image to a square of side ``max(w, h)``, centred, on a solid ``background``.

    The paste offset is ``((s - w) // 2, (s - h) // 2)`` (the extra pixel of an odd margin goes
    right/bottom, as upstream). A square image is returned unchanged.

    Args:
        img: the image (RGB for the usual 3-tuple background).
        background: fill colour, e.g. :func:`mean_background` of the processor.

    Returns:
        The square image.
    """
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_background(image_processor: Any) -> tuple[int, int, int]:
    """Padding colour of upstream ``pad``: ``tuple(int(x * 255) for x in image_mean)`` (truncation, not rounding)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)  # type: ignore[return-value]


def build_image_processor(size: int, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Any:
    """Build a CLIP image processor for ``size`` px (shortest-edge resize + centre crop, bicubic).

    The PIL backend (``CLIPImageProcessorPil``) is chosen when transformers provides it, because
    it is the one proven bit-identical to the original pipeline; older releases fall back to
    ``CLIPImageProcessor``.

    Args:
        size: 336 (LLaVA-v1.5), 448 (mPLUG-Owl2), 64 (demo model), ...
        mean: normalisation mean (CLIP's by default).
        std: normalisation std.

    Returns:
        The image processor.

    Raises:
        ValueError: non-positive size.
    """
    if int(size) <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True,
        size={"shortest_edge": int(size)},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": int(size), "width": int(size)},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def processor_size(image_processor: Any) -> tuple[int, int]:
    """Return ``(height, width)`` of the processor's output (its crop size)."""
    crop = image_processor.crop_size
    get = crop.get if isinstance(crop, dict) else (lambda k: getattr(crop, k, None))
    h, w = get("height"), get("width")
    if h is None or w is None:
        raise ValueError(f"image processor has no crop height/width: {crop!r}")
    return int(h), int(w)


def preprocess_images(
    images: Sequence[Image.Image], image_processor: Any, aspect_ratio: AspectRatio = "pad"
) -> torch.Tensor:
    """Turn RGB images into a ``[B, 3, H, W]`` float32 pixel tensor.

    Args:
        images: RGB PIL images (see :func:`load_rgb`).
        image_processor: from :func:`build_image_processor` or a checkpoint's processor (through
            :class:`LeanClip` when it covers the processor's settings, else the processor call).
        aspect_ratio: ``pad`` (upstream v1.5: mean-colour square, then the processor),
            ``square``/``crop`` (upstream default path: the processor's resize + centre crop,
            which cuts the long side), or ``resize`` (stretch to the output size, nothing cut).

    Returns:
        The pixel tensor.

    Raises:
        ValueError: unknown ``aspect_ratio`` or an empty list.
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown image_aspect_ratio {aspect_ratio!r}; choose one of {ASPECT_RATIOS}")
    if not images:
        raise ValueError("preprocess_images: no images given")
    lean = LeanClip.for_processor(image_processor, aspect_ratio)
    if lean is not None and all(im.mode == "RGB" for im in images):
        return torch.stack([lean(im) for im in images])
    if aspect_ratio == "pad":
        bg = mean_background(image_processor)
        images = [expand2square(im, bg) for im in images]
    if aspect_ratio == "resize":
        h, w = processor_size(image_processor)
        resample = getattr(image_processor, "resample", Image.Resampling.BICUBIC)
        images = [im.resize((w, h), resample=resample) for im in images]
        out = image_processor(images=list(images), do_resize=False, do_center_crop=False, return_tensors="pt")
    else:
        out = image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"].to(torch.float32)


def load_and_preprocess(
    paths: Sequence[str | os.PathLike], image_processor: Any, aspect_ratio: AspectRatio = "pad"
) -> torch.Tensor:
    """Load image files (:func:`load_rgb`) and preprocess them (:func:`preprocess_images`)."""
    return preprocess_images([load_rgb(p) for p in paths], image_processor, aspect_ratio)


class LeanClip:
    """The CLIP preprocessing of one RGB image without the generic processor call, same values.

    Resize: bicubic (the processor's resample) to the shortest-edge size; centre crop at
    ``(h - crop) // 2``; then ``lut[c][byte]`` with ``lut = (float32(byte * rescale_factor) - mean) / std``
    in float32, the processor's rescale-then-normalise of every possible byte.

    The bicubic resize is :mod:`icmlab.inputs.bicubic` (Pillow's bytes, compiled, the ``pad`` canvas
    never built); where that does not apply, Pillow itself, and for ``pad`` of a wide image without
    the canvas either: PIL resizes horizontally first (every row on its own) and then vertically,
    so the canvas's horizontal pass is the image's rows resized plus one resized padding row
    repeated; only the vertical pass sees the whole square.

    Build it with :meth:`for_processor`.
    """

    def __init__(self, shortest_edge: int, crop: tuple[int, int], resample: int, lut: np.ndarray, aspect: str, bg):
        self.shortest_edge, self.crop, self.resample, self.lut = shortest_edge, crop, resample, lut
        self.aspect, self.bg = aspect, bg
        self._pad_rows: dict[int, np.ndarray] = {}

    @classmethod
    def for_processor(cls, image_processor: Any, aspect_ratio: AspectRatio = "pad") -> "LeanClip | None":
        """The lean path of a CLIP-style processor, or None if it is configured in a way this does not cover
        (no resize/crop/rescale/normalise, a size other than a shortest edge, a crop larger than it)."""
        p = image_processor

        def get(obj: Any, key: str) -> Any:
            return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

        flags = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        if aspect_ratio not in ASPECT_RATIOS or not all(getattr(p, f, False) for f in flags):
            return None
        edge, (h, w) = get(p.size, "shortest_edge"), processor_size(p)
        resample = getattr(p, "resample", None)
        if not edge or edge < max(h, w) or not isinstance(resample, int) or not 0 <= int(resample) <= 5:
            return None
        byte = (np.arange(256, dtype=np.float64) * p.rescale_factor).astype(np.float32)
        mean, std = np.asarray(p.image_mean, np.float32), np.asarray(p.image_std, np.float32)
        if mean.shape != (3,) or std.shape != (3,):
            return None
        lut = np.ascontiguousarray(((byte[None, :] - mean[:, None]) / std[:, None]).astype(np.float32))
        return cls(int(edge), (h, w), int(resample), lut, aspect_ratio, mean_background(p))

    def from_file(self, path: str | os.PathLike) -> torch.Tensor:
        """``[3, H, W]`` float32 pixels of an image file: ``self(load_rgb(path))``, the same values.

        A JPEG is decoded by :func:`icmlab.inputs.jpeg.decode_rgbx` (libjpeg-turbo into a reused buffer,
        Pillow's bytes) where that applies; everything else, and every file that decoder declines
        (missing, truncated, corrupt, not YCbCr), goes through :func:`load_rgb`, which raises its
        errors as before.
        """
        if self.resample == Image.Resampling.BICUBIC:
            arr = jpeg.decode_rgbx(path)
            if arr is not None:
                out = self._compiled(arr)
                if out is not None:
                    return torch.from_numpy(bicubic.planar_lut(out, self.lut))
                return self(Image.fromarray(np.ascontiguousarray(arr[..., :3])))
        return self(load_rgb(path))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """``[3, H, W]`` float32 pixels of an RGB image."""
        if self.resample == Image.Resampling.BICUBIC and img.mode == "RGB":
            arr = self._compiled(np.asarray(img))
            if arr is not None:
                return torch.from_numpy(bicubic.planar_lut(arr, self.lut))
        if self.aspect == "resize":
            h, w = self.crop
            return self._normalise(np.asarray(img.resize((w, h), resample=self.resample)))
        if self.aspect == "pad" and img.width != img.height:
            arr = self._pad_resized(img)
        else:
            arr = np.asarray(img.resize(self._size(img.width, img.height), resample=self.resample))
        h, w = self.crop
        top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
        return self._normalise(arr[top : top + h, left : left + w])

    def _compiled(self, arr: np.ndarray) -> np.ndarray | None:
        """The resized, cropped bytes of ``[h, w, 3 or 4]`` uint8 pixels through :mod:`icmlab.inputs.bicubic`
        (padding never resized), or None where it does not apply (then Pillow resizes)."""
        h, w = arr.shape[:2]
        ch, cw = self.crop
        if self.aspect == "resize":
            canvas, size = bicubic.Canvas(w, h, 0, 0, self.bg), (cw, ch)
        else:
            side = max(w, h)
            if self.aspect == "pad" and w != h:
                canvas = bicubic.Canvas(side, side, (side - w) // 2, (side - h) // 2, self.bg)
            else:
                canvas = bicubic.Canvas(w, h, 0, 0, self.bg)
            size = self._size(canvas.width, canvas.height)
        window = ((size[1] - ch) // 2, (size[0] - cw) // 2, ch, cw)
        return bicubic.resize_crop(arr, canvas, size, window)

    def _size(self, w: int, h: int) -> tuple[int, int]:
        """``(width, height)`` of the shortest-edge resize (the processor's ``int(edge * long / short)``)."""
        e = self.shortest_edge
        return (e, int(e * h / w)) if w <= h else (int(e * w / h), e)

    def _pad_resized(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        side = max(w, h)
        out_w, out_h = self._size(side, side)
        if w < h:  # tall: every canvas row holds padding and image, so the canvas is needed
            canvas = Image.new("RGB", (side, side), self.bg)
            canvas.paste(img, ((side - w) // 2, 0))
            return np.asarray(canvas.resize((out_w, out_h), resample=self.resample))
        row = self._pad_rows.get(w)
        if row is None:
            row = np.asarray(Image.new("RGB", (w, 1), self.bg).resize((out_w, 1), resample=self.resample))
            self._pad_rows[w] = row
        mid = np.asarray(img.resize((out_w, h), resample=self.resample))  # horizontal pass only
        top = (side - h) // 2
        half = np.empty((side, out_w, 3), np.uint8)
        half[:top], half[top : top + h], half[top + h :] = row, mid, row
        return np.asarray(Image.fromarray(half).resize((out_w, out_h), resample=self.resample))  # vertical only

    def _normalise(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(bicubic.planar_lut(np.ascontiguousarray(arr), self.lut))
