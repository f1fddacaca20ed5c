"""Procedural images for the embedded demo: scenes, low-level distortions and the forbidden symbol.

Every demo image is described by a small frozen :class:`ImageSpec` (size, per-image seed,
distortion, symbol position, file format, optional printed text). Rendering is a pure function of
the spec, so the dataset builders can write their JSON records from the spec (and the
:class:`Scene` it implies, via :func:`scene_of`) without drawing a single pixel, and the pixels can
be produced later, in any order, bit-identically.

The recipe follows the measured settings in ``demo-learnability.md``: a random two-colour gradient
plus 2–5 shapes (rectangles, ellipses, thin lines, stripe and checker patches with a 3–7 px
period) drawn directly at the target size; one distortion per image with its strength scaled by
``sc = side / 32``; the moderation "forbidden symbol" is a small red X (22–32 % of the side,
1–2 px stroke at 32 px) on undistorted images.

Usage::

    spec = ImageSpec(seed=7, width=64, height=64, distortion="blur", fmt="JPEG")
    scene = scene_of(spec)            # what the records may talk about
    data = encode_image(render_image(spec), spec.fmt)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DISTORTIONS: tuple[str, ...] = ("blur", "noise", "overexposure", "underexposure", "none")
"""The five low-level classes; the order is the option order of the 5-way question."""

SYMBOL_POSITIONS: tuple[str, ...] = ("upper", "middle", "lower")
"""Vertical band of the red X (the moderation rule's forbidden symbol)."""

SHAPE_KINDS: tuple[str, ...] = ("rectangle", "ellipse", "line", "stripes", "checker")

# Shape colours have names so that descriptions and high-level questions can mention them.
# Pure red is left out on purpose: red is reserved for the forbidden symbol, and red shapes would be
# hard negatives, which the learnability study found to slow the moderation task down.
PALETTE: dict[str, tuple[int, int, int]] = {
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (250, 150, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}

FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw one image, deterministically.

    Attributes:
        seed: per-image seed; the scene, the distortion strength and the symbol placement are all
            drawn from ``numpy.random.default_rng(seed)`` in a fixed order.
        width: width in pixels.
        height: height in pixels.
        distortion: one of :data:`DISTORTIONS`.
        symbol: ``None`` or one of :data:`SYMBOL_POSITIONS` (a red X in that vertical band).
        fmt: container format written by :func:`encode_image` (``JPEG``, ``PNG`` or ``GIF``).
        text: optional text printed on a light box (OCR-VQA covers, TextVQA signs).
    """

    seed: int
    width: int = 64
    height: int = 64
    distortion: str = "none"
    symbol: str | None = None
    fmt: str = "JPEG"
    text: str | None = None

    def __post_init__(self) -> None:
        if self.distortion not in DISTORTIONS:
            raise ValueError(f"ImageSpec.distortion={self.distortion!r}; allowed: {DISTORTIONS}")
        if self.symbol is not None and self.symbol not in SYMBOL_POSITIONS:
            raise ValueError(f"ImageSpec.symbol={self.symbol!r}; allowed: None or {SYMBOL_POSITIONS}")
        if self.fmt not in FORMATS:
            raise ValueError(f"ImageSpec.fmt={self.fmt!r}; allowed: {FORMATS}")
        if min(self.width, self.height) < 16:
            raise ValueError(f"ImageSpec size {self.width}x{self.height} is below the 16 px minimum")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, palette colour name and bounding box ``(x0, y0, x1, y1)``."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    period: int = 0  # stripe/checker period in px; line width for lines


@dataclass(frozen=True)
class Scene:
    """The content of an image before distortion: gradient background plus shapes."""

    width: int
    height: int
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    direction: str  # "vertical" | "horizontal" | "diagonal"
    shapes: tuple[Shape, ...]


def _is_symbol_red(colour) -> bool:
    """True for colours close enough to the symbol's red to hide it (reds, crimsons, red-magentas)."""
    r, g, b = colour
    return r > 110 and r - max(g, b) > 50


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB colour that is not symbol red (redrawn until it is not).

    Backgrounds never take the symbol's colour, so a red X is always visible and a harmless
    scene never shows a red area that could be mistaken for it: the moderation label is decided
    by the pixels alone.
    """
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if not _is_symbol_red(colour):
            return colour


def _sample_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Draw a scene; the number and order of rng calls here define the demo's content."""
    colour_a = _background_colour(rng)
    colour_b = _background_colour(rng)
    direction = ("vertical", "horizontal", "diagonal")[int(rng.integers(0, 3))]
    side = min(width, height)
    names = list(PALETTE)
    shapes = []
    for _ in range(int(rng.integers(2, 6))):
        kind = SHAPE_KINDS[int(rng.integers(0, len(SHAPE_KINDS)))]
        colour = names[int(rng.integers(0, len(names)))]
        w = int(rng.integers(max(3, int(0.15 * side)), max(4, int(0.5 * side)) + 1))
        h = int(rng.integers(max(3, int(0.15 * side)), max(4, int(0.5 * side)) + 1))
        x0 = int(rng.integers(0, max(1, width - w)))
        y0 = int(rng.integers(0, max(1, height - h)))
        # Stripe/checker periods stay at 3–7 px whatever the size: that is the fine texture which
        # blur removes and noise hides. Lines are 1–2 px wide.
        period = int(rng.integers(3, 8)) if kind in ("stripes", "checker") else 0
        if kind == "line":
            period = int(rng.integers(1, 3))
        shapes.append(Shape(kind, colour, (x0, y0, x0 + w, y0 + h), period))
    return Scene(width, height, colour_a, colour_b, direction, tuple(shapes))


def scene_of(spec: ImageSpec) -> Scene:
    """Return the scene :func:`render_image` draws for ``spec`` (same seed, same first draws)."""
    return _sample_scene(np.random.default_rng(spec.seed), spec.width, spec.height)


def _gradient(scene: Scene) -> np.ndarray:
    h, w = scene.height, scene.width
    if scene.direction == "vertical":
        t = np.repeat(np.linspace(0.0, 1.0, h)[:, None], w, axis=1)
    elif scene.direction == "horizontal":
        t = np.repeat(np.linspace(0.0, 1.0, w)[None, :], h, axis=0)
    else:
        t = (np.linspace(0.0, 1.0, h)[:, None] + np.linspace(0.0, 1.0, w)[None, :]) / 2.0
    a = np.asarray(scene.colour_a, dtype=np.float32)
    b = np.asarray(scene.colour_b, dtype=np.float32)
    return (a * (1.0 - t[..., None]) + b * t[..., None]).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    colour = PALETTE[shape.colour]
    x0, y0, x1, y1 = shape.box
    if shape.kind == "rectangle":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif shape.kind == "ellipse":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif shape.kind == "line":
        draw.line((x0, y0, x1 - 1, y1 - 1), fill=colour, width=shape.period)
    elif shape.kind == "stripes":
        half = max(1, shape.period // 2)
        for x in range(x0, x1, shape.period):
            draw.rectangle((x, y0, min(x + half, x1) - 1, y1 - 1), fill=colour)
    elif shape.kind == "checker":
        half = max(1, shape.period // 2)
        for y in range(y0, y1, half):
            for x in range(x0, x1, half):
                if ((x - x0) // half + (y - y0) // half) % 2 == 0:
                    draw.rectangle((x, y, min(x + half, x1) - 1, min(y + half, y1) - 1), fill=colour)


def _draw_text(img: Image.Image, text: str, rng: np.random.Generator) -> None:
    """Print ``text`` on a light box with Pillow's built-in bitmap font (no FreeType dependency)."""
    font = ImageFont.load_default_imagefont()
    draw = ImageDraw.Draw(img)
    lines = text.split("\n")
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    tw = max(b[2] - b[0] for b in boxes) + 4
    th = sum(b[3] - b[1] + 2 for b in boxes) + 4
    x = int(rng.integers(0, max(1, img.width - tw)))
    y = int(rng.integers(0, max(1, img.height - th)))
    draw.rectangle((x, y, x + tw, y + th), fill=(250, 250, 240))
    cy = y + 2
    for line, b in zip(lines, boxes):
        draw.text((x + 2, cy - b[1]), line, fill=(10, 10, 10), font=font)
        cy += b[3] - b[1] + 2


SYMBOL_SIZE = (0.22, 0.32)
"""Range of the red X's side as a fraction of the image side."""
SYMBOL_STROKE = (1.0, 2.0)
"""Range of its stroke width in pixels at 32 px (scaled with the side)."""


def _draw_symbol(img: Image.Image, position: str, rng: np.random.Generator) -> None:
    """Draw the red X in the given vertical band."""
    w, h = img.size
    side = min(w, h)
    sc = side / 32.0
    size = float(rng.uniform(*SYMBOL_SIZE)) * side
    stroke = max(1, int(round(float(rng.uniform(*SYMBOL_STROKE)) * sc)))
    half = size / 2.0
    cx = float(rng.uniform(half + 1, w - half - 1))
    band = {"upper": (0.12, 0.30), "middle": (0.42, 0.58), "lower": (0.70, 0.88)}[position]
    cy = float(rng.uniform(*band)) * h
    cy = min(max(cy, half + 1), h - half - 1)
    red = (int(rng.integers(215, 256)), int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    draw = ImageDraw.Draw(img)
    draw.line((cx - half, cy - half, cx + half, cy + half), fill=red, width=stroke)
    draw.line((cx - half, cy + half, cx + half, cy - half), fill=red, width=stroke)


def _distort(img: Image.Image, distortion: str, rng: np.random.Generator) -> Image.Image:
    """Apply one distortion with the measured strength ranges (``sc = side / 32``)."""
    sc = min(img.size) / 32.0
    if distortion == "none":
        return img
    if distortion == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.2, 2.0)) * sc))
    x = np.asarray(img, dtype=np.float32)
    if distortion == "noise":
        x = x + rng.normal(0.0, float(rng.uniform(25.0, 45.0)), size=x.shape).astype(np.float32)
    elif distortion == "overexposure":
        x = x * float(rng.uniform(1.5, 2.0)) + float(rng.uniform(50.0, 90.0))
    elif distortion == "underexposure":
        x = x * float(rng.uniform(0.18, 0.35))
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


def render_image(spec: ImageSpec) -> Image.Image:
    """Draw the RGB image that ``spec`` describes.

    The draw order is fixed: scene, printed text, distortion, symbol. The symbol goes last so
    that it is never blurred or darkened (moderation images are undistorted anyway).

    Args:
        spec: the image description.

    Returns:
        A ``PIL.Image.Image`` in mode ``RGB`` of size ``(spec.width, spec.height)``.
    """
    rng = np.random.default_rng(spec.seed)
    scene = _sample_scene(rng, spec.width, spec.height)
    img = Image.fromarray(_gradient(scene), "RGB")
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    if spec.text:
        _draw_text(img, spec.text, rng)
    img = _distort(img, spec.distortion, rng)
    if spec.symbol is not None:
        _draw_symbol(img, spec.symbol, rng)
    return img


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """Encode ``img`` as ``fmt`` bytes (JPEG quality 95 with 4:4:4 chroma, PNG, or palette GIF).

    4:4:4 chroma keeps the 2–4 px red strokes of the symbol red after JPEG compression.

    Raises:
        ValueError: for a format other than JPEG/PNG/GIF.
    """
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "PNG":
        img.save(buf, format="PNG")
    elif fmt == "GIF":
        img.convert("RGB").quantize(colors=256).save(buf, format="GIF")
    else:
        raise ValueError(f"unsupported image format {fmt!r}; allowed: {FORMATS}")
    return buf.getvalue()


def render_bytes(spec: ImageSpec) -> bytes:
    """Render ``spec`` and encode it in ``spec.fmt``."""
    return encode_image(render_image(spec), spec.fmt)


def to_jpeg(data: bytes) -> bytes:
    """Re-encode any readable image bytes (GIF, PNG, JPEG) as an RGB JPEG.

    This is what the OCR-VQA download step does to files saved as ``.jpg`` whose content is
    another format; the demo tree writer uses it to lay out the post-download state.
    """
    with Image.open(io.BytesIO(data)) as im:
        return encode_image(im.convert("RGB"), "JPEG")


def sniff_format(data: bytes) -> str:
    """Return ``JPEG``/``PNG``/``GIF`` from magic bytes, or ``unknown``."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return "unknown"


EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "JPEG",
    ".JPG": "JPEG",
    ".jpeg": "JPEG",
    ".JPEG": "JPEG",
    ".png": "PNG",
    ".PNG": "PNG",
    ".gif": "GIF",
    ".GIF": "GIF",
}
"""File-name extension → the format its content has in the demo (extension case preserved)."""
