"""Moderation questions for an ICM-style validation imagefolder (``val/<category>/<image>``).

The public ICM-Instruct validation set (HF ``zhaoyuzhi/ICM-Instruct``) ships as image folders only:
35 category folders under ``val/`` and an explanation subset under ``val_MEQ/``. The upstream
evaluator (``eval_scripts/eval_icm_val/eval.py``) asks one Yes/No question per image and takes the
ground truth from the category name: a category whose name contains ``normal`` is harmless, every
other one violates the rule. :func:`questions_from_folders` turns the folders into the question
list the evaluate stage reads (the same records the demo's ``icm_val_questions.json`` holds), so
the real set and the demo go through one scorer::

    items = questions_from_folders(Path("data/eval/icm"))
    items[0]  # {"id": "val/lower_hips/0001.jpg", "kind": "yes_no", "image": "val/lower_hips/0001.jpg",
              #  "category": "lower_hips", "question": "Is the picture sexy?", "answer": "Yes"}
"""

from __future__ import annotations

from pathlib import Path

UPSTREAM_QUESTION = "Is the picture sexy?"
"""The question of the ICM authors' ICM-Val runs (their ``sexy_level_folder.py`` scripts)."""

HARMLESS_MARKER = "normal"
"""Category names containing this are the harmless ones (upstream ``eval.py``: ``'normal' in keyword``)."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"})


def is_violating(category: str) -> bool:
    """Ground truth of a category by upstream's rule: everything but the ``*normal*`` folders violates."""
    return HARMLESS_MARKER not in category


def questions_from_folders(root: Path, question: str = UPSTREAM_QUESTION, split: str = "val") -> list[dict]:
    """One Yes/No moderation item per image of ``root/<split>/<category>/``, in sorted order.

    Args:
        root: the validation set's root (holding ``val/`` and optionally ``val_MEQ/``).
        question: asked for every image (one text for all classes: only the image can answer).
        split: the folder of the yes/no set (``val``; ``val_MEQ`` is the explanation subset).

    Returns:
        Items ``{id, kind: "yes_no", image, category, question, answer: "Yes"/"No"}`` with ``image``
        relative to ``root``.

    Raises:
        FileNotFoundError: ``root/<split>`` does not exist (the message names the download step).
        ValueError: it holds no category folder with images, or images lie directly in it (the
            category, hence the ground truth, would be unknown).
    """
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base} not found: the ICM validation imagefolder (val/<category>/<image>) "
            "comes from the download stage (icmlab download <params>)"
        )
    stray = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise ValueError(
            f"{base}: {len(stray)} images lie directly in the folder (e.g. {stray[0]}); each image "
            "must be in its category folder val/<category>/, which decides its ground truth"
        )
    items: list[dict] = []
    for cat_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for img in sorted(p for p in cat_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            rel = img.relative_to(root).as_posix()
            items.append(
                {
                    "id": rel,
                    "kind": "yes_no",
                    "image": rel,
                    "category": cat_dir.name,
                    "question": question,
                    "answer": "Yes" if is_violating(cat_dir.name) else "No",
                }
            )
    if not items:
        raise ValueError(
            f"{base}: no images in category folders; expected val/<category>/<image> "
            f"with suffixes {sorted(IMAGE_SUFFIXES)}"
        )
    return items


# --------------------------------------------------------------------------- ICM-Test, MEQ, MQA
ICM_TEST_HARMLESS = "not-sexy"
"""ICM-Test's ground truth (upstream ``eval_icm_test/eval.py``): an image whose name contains this is harmless."""


def icm_test_from_folders(root: Path, question: str = UPSTREAM_QUESTION) -> list[dict]:
    """ICM-Test yes/no items from the bring-your-own layout ``test/<subset>/<label>/<image>``.

    The ICM-Assistant repository publishes the ICM-Test scorer but not the set's layout, so icmlab
    reads this documented one: ``<subset>`` is the table column (``UGC``, ``AIGC``, ``Porn``) and
    ``<label>`` is ``sexy`` or ``not-sexy``; the truth follows upstream's rule on the image's path
    (``not-sexy`` in it = harmless). Items carry ``category = <subset>``.

    Raises:
        FileNotFoundError: ``root/test`` is missing (the message shows the layout).
        ValueError: an image outside ``<subset>/<label>/``, or no image at all.
    """
    base = Path(root) / "test"
    layout = "test/<subset: UGC|AIGC|Porn>/<sexy|not-sexy>/<image>"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: put ICM-Test under {Path(root) / layout}")
    items: list[dict] = []
    for img in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = img.relative_to(base)
        if len(rel.parts) != 3:
            raise ValueError(f"{img}: ICM-Test images must lie at {layout}")
        items.append(
            {
                "id": rel.as_posix(),
                "kind": "yes_no",
                "image": img.relative_to(root).as_posix(),
                "category": rel.parts[0],
                "question": question,
                "answer": "No" if ICM_TEST_HARMLESS in rel.as_posix() else "Yes",
            }
        )
    if not items:
        raise ValueError(f"{base}: no images; expected {layout}")
    return items


def meq_from_folders(root: Path, question: str) -> list[dict]:
    """Explanation items from ``val_MEQ/<category>/<image>`` with the reference explanation in a
    sibling ``<image stem>.txt`` (an image without one is skipped: there is nothing to judge it by).

    Raises:
        FileNotFoundError: ``root/val_MEQ`` is missing.
        ValueError: no image has a reference text.
    """
    base = Path(root) / "val_MEQ"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: MEQ reads val_MEQ/<category>/<image> + <image stem>.txt")
    items = []
    for img in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        ref = img.with_suffix(".txt")
        if ref.is_file():
            rel = img.relative_to(root).as_posix()
            items.append(
                {
                    "id": rel,
                    "kind": "explanation",
                    "image": rel,
                    "category": img.parent.name,
                    "question": question,
                    "reference": ref.read_text(encoding="utf-8").strip(),
                }
            )
    if not items:
        raise ValueError(f"{base}: no image has a reference explanation <image stem>.txt next to it")
    return items
