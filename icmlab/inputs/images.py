"""Image loading and CLIP preprocessing as in LLaVA-v1.5 / mPLUG-Owl2 training.

Upstream opens each image with PIL, converts it to RGB and, with ``image_aspect_ratio pad``,
pastes it centred on a square canvas filled with the processor's mean colour
(``int(x * 255)`` per channel) before ``CLIPImageProcessor`` resizes (shortest edge, bicubic),
centre-crops, rescales by 1/255 and normalises. transformers 5's PIL backend of the CLIP
processor reproduces the original tensors bit for bit (fixture ``image_pad``), so it is used
explicitly (torchvision is not a dependency).

Usage::

    proc = build_image_processor(336)                      # 448 for mPLUG-Owl2, 64 for the demo
    pixels = preprocess_images([load_rgb(p) for p in paths], proc, aspect_ratio="pad")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from PIL import Image, UnidentifiedImageError

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
        with open_image(path) as img:  # refuses decompression bombs from the header
            return img.convert("RGB")
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e} (file corrupt or not an image; remove or replace it)") from e


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
        image_processor: from :func:`build_image_processor` or a checkpoint's processor.
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
