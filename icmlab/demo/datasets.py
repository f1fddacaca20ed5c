"""Records of the demo's low-level datasets, in the exact upstream layouts.

Each builder returns a :class:`DemoDataset`: the JSON payload exactly as the real file holds it,
plus ``{relative image path: ImageSpec}`` for every image it references. No pixels are drawn here
(see :mod:`icmlab.demo.images`), so building records is fast and the tokenizer corpus can reuse
them.

- :func:`quality_train` — Q-Instruct ``cleaned_labels.json`` (LLaVA list format) with images under
  ``spaq_koniq/`` and ``livefb_liveitw_aigc/``.
- :func:`moderation_train` — ICM-Instruct ``icm_llava_train.json``: flat ``sexy_check_all/``,
  ``<image>`` at the END of the human turn, ids ``identity_<file>_pair<j>``,
  ``identity_<file>_mc_pair<j>``, ``identity_<file>_description<k>``.
- :func:`qbench_dev` — a Q-Bench-A1 ``llvisionqa_dev.json`` (``img_path``, ``question``,
  ``candidates``, ``correct_ans``, ``type``, ``concern``) from another seed stream.
- :func:`icm_val` — an ICM-style validation imagefolder ``val/<category>/`` (+ ``val_MEQ/``) and a
  JSON of questions with Yes/No ground truth, from another seed stream.

Every builder is deterministic in ``seed``; the decisive questions have one text for all classes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from . import texts as T
from .images import DISTORTIONS, EXTENSION_FORMATS, SYMBOL_POSITIONS, ImageSpec, scene_of

IMAGE_TOKEN = "<image>"
MODERATION_CATEGORIES: tuple[str, ...] = ("whole_normal",) + tuple(f"{p}_symbol" for p in SYMBOL_POSITIONS)
"""ICM-style category folder names; ``*_symbol`` categories violate the demo rule."""

# Extension frequencies of the real ICM ``sexy_check_all/`` folder (counted upstream, see
# upstream-recipes §2.3); the rare ones are forced onto the first images so that every case
# appears even in small test builds.
ICM_EXTENSIONS: dict[str, float] = {
    ".JPEG": 7348,
    ".jpg": 6514,
    ".png": 1297,
    ".JPG": 246,
    ".PNG": 163,
    ".jpeg": 14,
    ".GIF": 5,
}
ICM_FORCED_EXTENSIONS: tuple[str, ...] = (".GIF", ".jpeg", ".PNG", ".JPG", ".png", ".JPEG")


@dataclass
class DemoDataset:
    """One dataset's payload and images.

    Attributes:
        name: short name (``q_instruct``, ``icm_instruct``, ...).
        payload: the JSON object exactly as the real file holds it (a list of records).
        images: relative image path (as the JSON names it) → :class:`ImageSpec`.
        json_name: the real file name of the payload.
        extra: dataset-specific facts (class counts, ...), not written to the payload.
    """

    name: str
    payload: list[dict]
    images: dict[str, ImageSpec]
    json_name: str
    extra: dict = field(default_factory=dict)


def stream(seed: int, tag: str) -> np.random.Generator:
    """Independent random stream for (``seed``, ``tag``); held-out sets use their own tags."""
    return np.random.default_rng([int(seed), zlib.crc32(tag.encode("utf-8"))])


def scaled(n: int, scale: float, minimum: int) -> int:
    """``round(n * scale)`` but at least ``minimum``.

    Raises:
        ValueError: if ``scale`` is not positive.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return max(minimum, int(round(n * scale)))


def balanced(rng: np.random.Generator, values: tuple, n: int) -> list:
    """``n`` values cycling through ``values`` (as balanced as ``n`` allows), shuffled."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _image_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**62))


def _human(question: str, rng: np.random.Generator, p_end: float) -> str:
    """Attach the image token: at the end with probability ``p_end``, else at the start."""
    if rng.random() < p_end:
        return f"{question}\n{IMAGE_TOKEN}"
    return f"{IMAGE_TOKEN}\n{question}"


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def _uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 16))
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


# ---- Q-Instruct -----------------------------------------------------------------------------
def _qinstruct_names(rng: np.random.Generator, n: int) -> list[str]:
    """File names in the two real Q-Instruct folders (SPAQ/KonIQ vs LIVE-FB/LIVE-itw/AIGC)."""
    names: list[str] = []
    used: set[str] = set()
    n_spaq = int(round(0.55 * n))
    for i in range(n):
        if i < n_spaq:
            name = f"spaq_koniq/{i + 1:05d}.jpg" if i % 2 == 0 else f"spaq_koniq/{int(rng.integers(10**9, 10**10))}.jpg"
        else:
            r = rng.random()
            k = int(rng.integers(1, 10**6))
            if r < 0.25:
                name = f"livefb_liveitw_aigc/AVA__{k}.jpg"
            elif r < 0.45:
                name = f"livefb_liveitw_aigc/VOC2012__2008_{k:06d}.jpg"
            elif r < 0.6:
                name = f"livefb_liveitw_aigc/EE371R__{k}.jpg"
            elif r < 0.7:
                name = f"livefb_liveitw_aigc/blur_dataset__{k}.jpg"
            elif r < 0.85:
                name = f"livefb_liveitw_aigc/{k}.JPG"  # LIVE-itw keeps upper-case extensions
            else:
                name = f"livefb_liveitw_aigc/AGIQA-3K__demo_{k}.png"
        if name in used:  # a rare collision of random numbers: make it unique, deterministically
            stem, ext = name.rsplit(".", 1)
            name = f"{stem}_{i}.{ext}"
        used.add(name)
        names.append(name)
    return names


def _spec_for(name: str, seed: int, **kw) -> ImageSpec:
    ext = "." + name.rsplit(".", 1)[1]
    return ImageSpec(seed=seed, fmt=EXTENSION_FORMATS[ext], **kw)


def _yes_no_attr(rng: np.random.Generator, d: str) -> str:
    """Pick the attribute of a yes/no question so that Yes and No come about equally often."""
    attrs = list(T.YES_NO_QUESTIONS)
    if d != "none" and rng.random() < 0.5:
        return d
    others = [a for a in attrs if a != d]
    return others[int(rng.integers(0, len(others)))]


def brightness_of(d: str) -> str:
    """The brightness option implied by a distortion class."""
    return {"overexposure": "too bright", "underexposure": "too dark"}.get(d, "normal")


def _quality_description(d: str, spec: ImageSpec) -> str:
    scene = scene_of(spec)
    verdict = T.QUALITY_VERDICTS["good" if d == "none" else "poor"]
    return f"{T.DISTORTION_SENTENCES[d]} It shows {T.scene_phrase(scene.shapes)}. {verdict}"


QUALITY_EXTRAS: tuple[str, ...] = ("yes_no", "what", "how", "describe", "two_round")
"""Free-text record kinds of the Q-Instruct layout, given to a share of the images in turn."""


def quality_train(seed: int = 0, n_images: int = 3000, size: int = 64, extra_every: int = 1) -> DemoDataset:
    """Build the Q-Instruct-layout training set.

    Per image, the three questions the held-out Q-Bench set asks, in its exact option layout: the
    5-way distortion multiple choice (answer: the letter), a Yes/No multiple choice about one
    distortion attribute (``A. Yes`` / ``B. No``, Yes/No about equally often) and the brightness
    multiple choice. Every ``extra_every``-th image also gets one free-text record, cycling
    through :data:`QUALITY_EXTRAS`: a Yes/No question (``"Yes."``/``"No."``), the what and how
    questions, a quality description, and a two-round conversation. The free text keeps every
    record kind of the real file while the short decisive questions dominate the mix: on two CPU
    cores the tiny model then reaches the held-out accuracy within the demo's training budget.
    ``<image>`` opens the first human turn (10 % of records put it at the end). Records are
    shuffled; several records share an image, as in the real file.

    Args:
        seed: global demo seed.
        n_images: number of training images.
        size: square image side in pixels.
        extra_every: one image in ``extra_every`` gets a free-text record (1 = every image).

    Returns:
        The dataset (payload = ``cleaned_labels.json``).

    Raises:
        ValueError: if ``extra_every`` is not a positive integer.
    """
    if extra_every < 1:
        raise ValueError(f"quality_train: extra_every must be >= 1, got {extra_every!r}")
    rng = stream(seed, "q_instruct")
    names = _qinstruct_names(rng, n_images)
    classes = balanced(rng, DISTORTIONS, n_images)
    images: dict[str, ImageSpec] = {}
    records: list[dict] = []

    def add(name: str, *turns: str) -> None:
        records.append({"id": _uuid(rng), "image": name, "conversations": _conv(*turns)})

    for i, (name, d) in enumerate(zip(names, classes)):
        spec = _spec_for(name, _image_seed(rng), width=size, height=size, distortion=d)
        images[name] = spec
        mc = T.mc_prompt(T.DISTORTION_QUESTION, T.DISTORTION_OPTIONS)
        add(name, _human(mc, rng, 0.1), T.LETTERS[T.DISTORTION_OPTIONS.index(d)])
        a = _yes_no_attr(rng, d)
        q = T.mc_prompt(T.YES_NO_QUESTIONS[a], T.YES_NO_OPTIONS)
        add(name, _human(q, rng, 0.1), "A" if a == d else "B")
        q = T.mc_prompt(T.BRIGHTNESS_QUESTION, T.BRIGHTNESS_OPTIONS)
        add(name, _human(q, rng, 0.1), T.LETTERS[T.BRIGHTNESS_OPTIONS.index(brightness_of(d))])
        if i % extra_every:
            continue
        # Cycling by index (not drawing) puts every kind into even the smallest test builds.
        kind = QUALITY_EXTRAS[(i // extra_every) % len(QUALITY_EXTRAS)]
        if kind == "yes_no":
            a = _yes_no_attr(rng, d)
            add(name, _human(T.YES_NO_QUESTIONS[a], rng, 0.1), "Yes." if a == d else "No.")
        elif kind == "what":
            add(name, _human(T.WHAT_QUESTION, rng, 0.1), T.WHAT_ANSWERS[d])
        elif kind == "how":
            add(name, _human(T.HOW_QUESTION, rng, 0.1), T.HOW_ANSWERS[d])
        elif kind == "describe":
            prompt = T.DESCRIBE_PROMPTS[int(rng.integers(0, len(T.DESCRIBE_PROMPTS)))]
            add(name, _human(prompt, rng, 0.1), _quality_description(d, spec))
        else:
            add(
                name,
                _human(T.DESCRIBE_PROMPTS[0], rng, 0.1),
                _quality_description(d, spec),
                T.FOLLOW_UP_QUESTION,
                T.WHAT_ANSWERS[d],
            )
    order = rng.permutation(len(records))
    payload = [records[i] for i in order]
    return DemoDataset(
        "q_instruct", payload, images, "cleaned_labels.json", {"classes": {c: classes.count(c) for c in DISTORTIONS}}
    )


# ---- ICM-Instruct ---------------------------------------------------------------------------
def _icm_extension(rng: np.random.Generator, i: int) -> str:
    if i < len(ICM_FORCED_EXTENSIONS):
        return ICM_FORCED_EXTENSIONS[i]
    exts = list(ICM_EXTENSIONS)
    p = np.asarray([ICM_EXTENSIONS[e] for e in exts], dtype=np.float64)
    return exts[int(rng.choice(len(exts), p=p / p.sum()))]


def category_position(category: str) -> str | None:
    """Symbol position of a moderation category (``None`` for the harmless ``whole_normal``)."""
    return None if category == "whole_normal" else category.split("_", 1)[0]


def _moderation_categories(rng: np.random.Generator, n: int) -> list[str]:
    """Half harmless, half with the symbol spread over the three bands, shuffled."""
    n_bad = n // 2
    cats = ["whole_normal"] * (n - n_bad) + [f"{SYMBOL_POSITIONS[i % 3]}_symbol" for i in range(n_bad)]
    return [cats[i] for i in rng.permutation(n)]


def moderation_explanation(spec: ImageSpec) -> str:
    """Reference explanation of a moderation image (scene + rule decision)."""
    scene = scene_of(spec)
    return f"The image shows {T.scene_phrase(scene.shapes)}. {T.RULE_SENTENCES[spec.symbol]}"


MODERATION_EXTRAS: tuple[str, ...] = ("pair1", "mc_pair0", "mc_pair1", "description")
"""Record kinds of the ICM-Instruct layout besides the decisive ``pair0``, given in turn."""


def moderation_train(
    seed: int = 0, n_images: int = 3000, n_descriptions: int = 5, size: int = 64, extra_every: int = 1
) -> DemoDataset:
    """Build the ICM-Instruct-layout training set (``icm_llava_train.json`` + ``sexy_check_all/``).

    Per image ``<category>_<n><ext>`` (``ext`` in the real mix of cases): open QA ``pair0`` (the
    decisive "Does this image contain the forbidden symbol?" → "Yes."/"No.") always. The other
    kinds — open QA ``pair1`` (where), multiple choice ``mc_pair0`` (violation, A/B) and
    ``mc_pair1`` (where, A–D) with a paraphrased letter instruction, and ``n_descriptions``
    explanation records ``description1..k`` with paraphrased prompts — go to every image with
    ``extra_every=1`` (the upstream generator's layout) or, with ``extra_every=m``, to one image
    in ``m``, one kind per image in turn (the demo's lighter mix, so that the decisive question
    dominates). Records are grouped by kind, as the upstream generator writes them (all QA, then
    all MC, then explanations round by round).

    Args:
        seed: global demo seed.
        n_images: number of training images.
        n_descriptions: explanation records per explained image (upstream: 5).
        size: square image side in pixels.
        extra_every: 1 = every kind for every image; m > 1 = one extra kind for one image in m.

    Returns:
        The dataset (payload = ``icm_llava_train.json``).

    Raises:
        ValueError: if ``extra_every`` or ``n_descriptions`` is below 1.
    """
    if extra_every < 1 or n_descriptions < 1:
        raise ValueError(
            f"moderation_train: extra_every ({extra_every!r}) and n_descriptions ({n_descriptions!r}) must be >= 1"
        )
    rng = stream(seed, "icm_instruct")
    cats = _moderation_categories(rng, n_images)
    images: dict[str, ImageSpec] = {}
    qa, mc, desc = [], [], [[] for _ in range(n_descriptions)]
    for i, cat in enumerate(cats):
        stem = f"{cat}_{i:05d}"
        name = f"sexy_check_all/{stem}{_icm_extension(rng, i)}"
        pos = category_position(cat)
        spec = _spec_for(name, _image_seed(rng), width=size, height=size, symbol=pos)
        images[name] = spec

        def rec(suffix: str, question: str, answer: str) -> dict:
            return {
                "id": f"identity_{stem}_{suffix}",
                "image": name,
                "conversations": _conv(f"{question}\n{IMAGE_TOKEN}", answer),
            }

        qa.append(rec("pair0", T.MODERATION_QUESTION, "No." if pos is None else "Yes."))
        if extra_every == 1:
            kinds = set(MODERATION_EXTRAS)
        elif i % extra_every == 0:  # cycling by index puts every kind into small test builds
            kinds = {MODERATION_EXTRAS[(i // extra_every) % len(MODERATION_EXTRAS)]}
        else:
            continue
        instr = T.MC_LETTER_INSTRUCTIONS
        if "pair1" in kinds:
            qa.append(rec("pair1", T.LOCATION_QUESTION, T.LOCATION_ANSWERS[pos]))
        if "mc_pair0" in kinds:
            q0 = T.mc_prompt(T.VIOLATION_MC_QUESTION, T.VIOLATION_MC_OPTIONS, instr[int(rng.integers(0, len(instr)))])
            mc.append(rec("mc_pair0", q0, "B." if pos is None else "A."))
        if "mc_pair1" in kinds:
            q1 = T.mc_prompt(T.LOCATION_MC_QUESTION, T.LOCATION_MC_OPTIONS, instr[int(rng.integers(0, len(instr)))])
            loc = 3 if pos is None else SYMBOL_POSITIONS.index(pos)
            mc.append(rec("mc_pair1", q1, f"{T.LETTERS[loc]}."))
        if "description" in kinds:
            explanation = moderation_explanation(spec)
            for k in range(n_descriptions):
                prompt = T.MODERATION_PROMPTS[int(rng.integers(0, len(T.MODERATION_PROMPTS)))]
                desc[k].append(rec(f"description{k + 1}", prompt, explanation))
    payload = qa + mc + [r for round_ in desc for r in round_]
    return DemoDataset(
        "icm_instruct",
        payload,
        images,
        "icm_llava_train.json",
        {"categories": {c: cats.count(c) for c in MODERATION_CATEGORIES}},
    )


# ---- held-out evaluation sets ---------------------------------------------------------------
QBENCH_TYPES = {"yes_no": 0, "what": 1, "how": 2}
QBENCH_CONCERNS = {"distortion": 0, "other": 1, "in_context_distortion": 2, "in_context_other": 3}


def qbench_dev(seed: int = 0, n_items: int = 200, size: int = 64) -> DemoDataset:
    """Build a Q-Bench-A1-style ``llvisionqa_dev.json`` with one question per image.

    Types: 40 % Yes/No (one of the four "Is this image …?" questions, Yes/No balanced), 30 % what
    (the 5-way distortion question, classes balanced), 30 % how (brightness, 3 classes balanced).
    The question and candidate texts are the training texts, in the training option order.

    Args:
        seed: global demo seed (the stream differs from every training stream).
        n_items: number of questions/images.
        size: square image side.

    Returns:
        The dataset (payload = the LLVisionQA list; image keys = ``img_path``).
    """
    rng = stream(seed, "qbench_dev")
    n_yn = int(round(0.4 * n_items))
    n_what = int(round(0.3 * n_items))
    kinds = ["yes_no"] * n_yn + ["what"] * n_what + ["how"] * (n_items - n_yn - n_what)
    kinds = [kinds[i] for i in rng.permutation(n_items)]
    yn_answers = iter(balanced(rng, ("Yes", "No"), n_yn))
    what_answers = iter(balanced(rng, DISTORTIONS, n_what))
    how_answers = iter(balanced(rng, T.BRIGHTNESS_OPTIONS, n_items - n_yn - n_what))
    attrs = list(T.YES_NO_QUESTIONS)
    payload, images = [], {}
    for i, kind in enumerate(kinds):
        if kind == "yes_no":
            attr = attrs[int(rng.integers(0, len(attrs)))]
            ans = next(yn_answers)
            others = [d for d in DISTORTIONS if d != attr]
            d = attr if ans == "Yes" else others[int(rng.integers(0, len(others)))]
            question, candidates, concern = T.YES_NO_QUESTIONS[attr], list(T.YES_NO_OPTIONS), "distortion"
        elif kind == "what":
            d = ans = next(what_answers)
            question, candidates, concern = T.DISTORTION_QUESTION, list(T.DISTORTION_OPTIONS), "distortion"
        else:
            ans = next(how_answers)
            pool = {"too bright": ["overexposure"], "too dark": ["underexposure"]}.get(ans, ["blur", "noise", "none"])
            d = pool[int(rng.integers(0, len(pool)))]
            question, candidates, concern = T.BRIGHTNESS_QUESTION, list(T.BRIGHTNESS_OPTIONS), "other"
        name = f"{i:05d}.jpg" if rng.random() < 0.9 else f"{i:05d}.png"
        images[name] = _spec_for(name, _image_seed(rng), width=size, height=size, distortion=d)
        payload.append(
            {
                "img_path": name,
                "question": question,
                "candidates": candidates,
                "correct_ans": ans,
                "type": QBENCH_TYPES[kind],
                "concern": QBENCH_CONCERNS[concern],
            }
        )
    return DemoDataset(
        "qbench", payload, images, "llvisionqa_dev.json", {"types": {k: kinds.count(k) for k in QBENCH_TYPES}}
    )


def icm_val(seed: int = 0, n_items: int = 200, meq_fraction: float = 0.25, size: int = 64) -> DemoDataset:
    """Build an ICM-style validation set: ``val/<category>/<file>``, a ``val_MEQ/<category>/``
    subset for explanation quality, and ``icm_val_questions.json``.

    Question records: ``{"id", "kind": "yes_no", "image", "category", "question", "answer"}``
    with the training's decisive question and "Yes"/"No" (half each), and for the MEQ subset
    ``{"id", "kind": "explanation", "image", "category", "question", "reference"}``.

    Args:
        seed: global demo seed (own stream).
        n_items: number of ``val/`` images.
        meq_fraction: share of them also placed under ``val_MEQ/``.
        size: square image side.

    Returns:
        The dataset (payload = the question list; image keys relative to the set's root).
    """
    rng = stream(seed, "icm_val")
    cats = _moderation_categories(rng, n_items)
    payload, images, meq = [], {}, []
    for i, cat in enumerate(cats):
        ext = ".jpg" if rng.random() < 0.8 else ".png"
        name = f"val/{cat}/{i:04d}{ext}"
        spec = _spec_for(name, _image_seed(rng), width=size, height=size, symbol=category_position(cat))
        images[name] = spec
        payload.append(
            {
                "id": f"val_{i:04d}",
                "kind": "yes_no",
                "image": name,
                "category": cat,
                "question": T.MODERATION_QUESTION,
                "answer": "No" if spec.symbol is None else "Yes",
            }
        )
        if rng.random() < meq_fraction:
            meq_name = f"val_MEQ/{cat}/{i:04d}{ext}"
            images[meq_name] = spec
            meq.append(
                {
                    "id": f"val_MEQ_{i:04d}",
                    "kind": "explanation",
                    "image": meq_name,
                    "category": cat,
                    "question": T.MODERATION_PROMPTS[0],
                    "reference": moderation_explanation(spec),
                }
            )
    return DemoDataset(
        "icm_val",
        payload + meq,
        images,
        "icm_val_questions.json",
        {"categories": {c: cats.count(c) for c in MODERATION_CATEGORIES}, "meq": len(meq)},
    )
