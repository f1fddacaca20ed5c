"""A few hundred records in the ``llava_v1_5_mix665k.json`` layout, with their image folders.

The real mixture (upstream-recipes §3.12) draws from LLaVA-Instruct conversations, VQAv2, RefCOCO
(COCO images), GQA, OCR-VQA, TextCaps (TextVQA images), Visual Genome region captions and
ShareGPT text-only chats. This module mimics each source's record shape on demo scenes, with
answers that the scene really supports (shape colours, counts, boxes, printed titles):

- ids as upstream spells them: 12-digit COCO ids (the same id appears in several records, as in
  the real file, where LLaVA-Instruct and VQAv2 share COCO images), numeric GQA/VG ids,
  10-character OCR-VQA ids, 16-hex TextVQA ids, ``<word>_<k>`` ShareGPT ids;
- images under ``coco/train2017``, ``gqa/images``, ``ocr_vqa/images``, ``textvqa/train_images``,
  ``vg/VG_100K``, ``vg/VG_100K_2`` with various aspect ratios (the ``pad`` path matters);
- multi-turn records where the image token is only in the first human turn, and text-only records
  without an ``image`` key. OCR-VQA images are ``.jpg`` names whose content is sometimes GIF or
  PNG (upstream "saved all files as .jpg").
"""

from __future__ import annotations

import numpy as np

from . import texts as T
from .datasets import IMAGE_TOKEN, DemoDataset, _conv, _human, _image_seed, scaled, stream
from .images import PALETTE, ImageSpec, scene_of

SIZES: tuple[tuple[int, int], ...] = ((64, 48), (48, 64), (64, 64), (80, 60), (60, 80))
TITLE_WORDS = ("RED", "SKY", "CAT", "TREE", "MOON", "SEA", "BOOK", "STAR", "ROAD", "GOLD")
AUTHORS = ("Ann Lee", "Bo Kim", "Cy Ray", "Di Fox", "Ed Moe")
SIGN_WORDS = ("STOP", "OPEN", "EXIT", "CAFE", "SALE", "BUS", "PARK", "INN")

# Per-source record counts at scale 1.0 (a few hundred records in all).
COUNTS: dict[str, int] = {
    "coco_conv": 60,
    "coco_vqa": 40,
    "coco_ref": 20,
    "gqa": 50,
    "ocr_vqa": 50,
    "textvqa": 30,
    "vg": 25,
    "vg2": 15,
    "sharegpt": 60,
}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _box(shape, spec: ImageSpec) -> str:
    x0, y0, x1, y1 = shape.box
    w, h = spec.width, spec.height
    vals = [min(x0, w) / w, min(y0, h) / h, min(x1, w) / w, min(y1, h) / h]
    return "[" + ", ".join(f"{v:.2f}" for v in vals) + "]"


def _unique(shapes, key) -> list:
    """Shapes whose ``key`` (kind, or (colour, kind)) no other shape of the scene shares."""
    keys = [key(s) for s in shapes]
    return [s for s, k in zip(shapes, keys) if keys.count(k) == 1]


def _scene_qa(spec: ImageSpec, rng: np.random.Generator, short: bool) -> list[tuple[str, str]]:
    """Question/answer pairs that the scene of ``spec`` answers unambiguously."""
    scene = scene_of(spec)
    n = len(scene.shapes)
    present = {s.colour for s in scene.shapes}
    absent = [c for c in PALETTE if c not in present]
    colour_q = _pick(rng, sorted(present)) if rng.random() < 0.5 or not absent else _pick(rng, absent)
    single = _unique(scene.shapes, lambda s: s.kind)
    pairs = []
    if short:
        pairs.append(("How many shapes are there?", str(n)))
        pairs.append((f"Is there a {colour_q} shape?", "Yes" if colour_q in present else "No"))
        pairs.append(("Is the background a gradient?", "Yes"))
        if single:
            s = _pick(rng, single)
            pairs.append((f"What color is the {T.SHAPE_NOUNS[s.kind]}?", s.colour))
    else:
        pairs.append(("What shapes can you see in the image?", f"I can see {T.scene_phrase(scene.shapes)}."))
        pairs.append(("How many shapes are there?", f"There are {n} shapes in the image."))
        pairs.append(("Describe the background.", f"The background is a {scene.direction} color gradient."))
        if single:
            s = _pick(rng, single)
            noun = T.SHAPE_NOUNS[s.kind]
            pairs.append((f"What color is the {noun}?", f"The {noun} is {s.colour}."))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order[: int(rng.integers(1, len(pairs) + 1))]]


def _multi(pairs: list[tuple[str, str]], rng: np.random.Generator, p_end: float, suffix: str = "") -> list[dict]:
    """Conversation of several rounds; only the first human turn carries the image token."""
    turns = []
    for j, (q, a) in enumerate(pairs):
        q = q + suffix
        turns += [(_human(q, rng, p_end) if j == 0 else q), a]
    return _conv(*turns)


def _sharegpt(rng: np.random.Generator) -> list[dict]:
    """A short text-only chat with verifiable answers (arithmetic, spelling, colours)."""
    turns = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 3))
        if kind == 0:
            a, b = int(rng.integers(1, 20)), int(rng.integers(1, 20))
            turns += [f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."]
        elif kind == 1:
            w = _pick(rng, TITLE_WORDS).lower()
            turns += [f"Spell the word '{w}' backwards.", f"Backwards, '{w}' is '{w[::-1]}'."]
        else:
            c = _pick(rng, ("orange", "green", "blue", "purple"))
            turns += [f"Write a short sentence about the color {c}.", f"The color {c} is easy to see on a white page."]
    return _conv(*turns)


def mix665k(seed: int = 0, scale: float = 1.0) -> DemoDataset:
    """Build the mini ``llava_v1_5_mix665k.json`` and its images.

    Args:
        seed: global demo seed.
        scale: multiplies every per-source count (at least 3 records each, so small builds still
            hold every case, e.g. GIF, PNG and JPEG covers).

    Returns:
        The dataset (payload = the shuffled record list; image keys = the records' ``image``).
    """
    rng = stream(seed, "llava_mix665k")
    n = {k: scaled(v, scale, 3) for k, v in COUNTS.items()}
    images: dict[str, ImageSpec] = {}
    records: list[dict] = []

    def new_image(path: str, **kw) -> ImageSpec:
        w, h = kw.pop("size", None) or _pick(rng, SIZES)
        spec = ImageSpec(seed=_image_seed(rng), width=w, height=h, **kw)
        images[path] = spec
        return spec

    coco_ids = sorted({int(x) for x in rng.integers(9, 581930, n["coco_conv"] * 2)})[: n["coco_conv"]]
    coco = []
    for cid in coco_ids:
        path = f"coco/train2017/{cid:012d}.jpg"
        spec = new_image(path)
        coco.append((f"{cid:012d}", path, spec))
        records.append(
            {"id": f"{cid:012d}", "image": path, "conversations": _multi(_scene_qa(spec, rng, short=False), rng, 0.5)}
        )
    for _ in range(n["coco_vqa"]):  # VQAv2: re-uses COCO images AND their ids
        cid, path, spec = coco[int(rng.integers(0, len(coco)))]
        pairs = _scene_qa(spec, rng, short=True)
        records.append(
            {"id": cid, "image": path, "conversations": _multi(pairs, rng, 0.0, "\n" + T.SHORT_ANSWER_INSTRUCTION)}
        )
    for _ in range(n["coco_ref"]):  # RefCOCO: boxes of referred shapes
        cid, path, spec = coco[int(rng.integers(0, len(coco)))]
        shapes = _unique(scene_of(spec).shapes, lambda s: (s.colour, s.kind))
        if not shapes:
            continue
        pairs = [
            (
                "Please provide the bounding box coordinate of the region this sentence describes: "
                f"{s.colour} {T.SHAPE_NOUNS[s.kind]}.",
                _box(s, spec),
            )
            for s in shapes[: int(rng.integers(1, len(shapes) + 1))]
        ]
        records.append({"id": cid, "image": path, "conversations": _multi(pairs, rng, 0.0)})
    for gid in sorted({int(x) for x in rng.integers(1, 2417997, n["gqa"] * 2)})[: n["gqa"]]:
        path = f"gqa/images/{gid}.jpg"
        spec = new_image(path)
        pairs = _scene_qa(spec, rng, short=True)
        records.append(
            {"id": str(gid), "image": path, "conversations": _multi(pairs, rng, 0.0, "\n" + T.SHORT_ANSWER_INSTRUCTION)}
        )
    for i in range(n["ocr_vqa"]):
        oid = f"{int(rng.integers(10**8, 10**9))}{_pick(rng, '0123456789X')}"
        title = f"{_pick(rng, TITLE_WORDS)} {_pick(rng, TITLE_WORDS)}"
        author = _pick(rng, AUTHORS)
        # One in three covers is GIF or PNG data behind the .jpg name, as in the real download.
        fmt = ("GIF", "JPEG", "PNG", "JPEG", "JPEG", "JPEG")[i % 6]
        path = f"ocr_vqa/images/{oid}.jpg"
        new_image(path, size=(64, 96), fmt=fmt, text=f"{title}\n{author}")
        pairs = [
            ("Who wrote this book?", author),
            ("What is the title of this book?", title),
            ("Is this a comic book?", "No"),
        ]
        records.append(
            {
                "id": oid,
                "image": path,
                "conversations": _multi(pairs[: int(rng.integers(1, 4))], rng, 0.0, "\n" + T.SHORT_ANSWER_INSTRUCTION),
            }
        )
    for _ in range(n["textvqa"]):
        tid = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 8))
        word = _pick(rng, SIGN_WORDS)
        path = f"textvqa/train_images/{tid}.jpg"
        spec = new_image(path, size=(80, 60), text=word)
        s = scene_of(spec).shapes[0]
        q = f"Provide a one-sentence caption for the provided image.\nReference OCR token: {word}"
        caption = f"A sign that says {word} near {T.shape_phrase(s.colour, s.kind)}."
        records.append({"id": tid, "image": path, "conversations": _conv(f"{IMAGE_TOKEN}\n{q}", caption)})
    for key, folder, lo, hi in (("vg", "VG_100K", 1, 2_400_000), ("vg2", "VG_100K_2", 2_400_000, 2_420_000)):
        for vid in sorted({int(x) for x in rng.integers(lo, hi, n[key] * 2)})[: n[key]]:
            path = f"vg/{folder}/{vid}.jpg"
            spec = new_image(path)
            shapes = scene_of(spec).shapes
            shapes = shapes[: int(rng.integers(1, len(shapes) + 1))]
            pairs = [
                (
                    f"Please provide a short description for this region: {_box(s, spec)}",
                    T.shape_phrase(s.colour, s.kind).capitalize() + ".",
                )
                for s in shapes
            ]
            records.append({"id": str(vid), "image": path, "conversations": _multi(pairs, rng, 0.0)})
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for _ in range(n["sharegpt"]):
        sid = "".join(_pick(rng, letters) for _ in range(7)) + f"_{int(rng.integers(0, 4))}"
        records.append({"id": sid, "conversations": _sharegpt(rng)})
    order = rng.permutation(len(records))
    return DemoDataset("llava_mix665k", [records[i] for i in order], images, "llava_v1_5_mix665k.json", {"counts": n})


def corpus_texts(seed: int = 0) -> list[str]:
    """Every human/gpt string of a small mix665k build (for the tokenizer corpus)."""
    ds = mix665k(seed, scale=0.5)
    return [t["value"].replace(IMAGE_TOKEN, "") for r in ds.payload for t in r["conversations"]]
