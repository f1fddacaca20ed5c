"""Write the demo datasets directly in their unpacked (post-download) layout.

For tests and notebooks that do not exercise the download stage::

    paths = build_demo_tree("runs/demo_data", seed=0, scale=0.1)
    paths["cleaned_labels.json"], paths["spaq_koniq"], paths["eval/qbench/llvisionqa_dev.json"]

Layout under ``data_root`` (LLaVA's ``playground/data`` conventions)::

    cleaned_labels.json  spaq_koniq/  livefb_liveitw_aigc/              Q-Instruct
    icm_llava_train.json  sexy_check_all/                               ICM-Instruct
    llava_v1_5_mix665k.json  coco/train2017/  gqa/images/  ocr_vqa/images/
        textvqa/train_images/  vg/VG_100K/  vg/VG_100K_2/                high-level mix
    eval/qbench/llvisionqa_dev.json  eval/qbench/images_llvisionqa/     Q-Bench-A1 style
    eval/icm/icm_val_questions.json  eval/icm/val/  eval/icm/val_MEQ/

OCR-VQA images are written as real JPEGs here (the download stage converts the GIF/PNG data that
the packed source hides behind ``.jpg`` names). Everything is first written into a staging folder
and then renamed into place; ``.icmlab_demo_tree.json`` records what was written, so a rebuild
only ever removes paths that an earlier demo build created.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io import atomic_write_json, read_json
from .bundle import DEMO_VERSION, generate_bundle, render_dataset
from .images import sniff_format, to_jpeg
from .pack import json_bytes

MARKER_NAME = ".icmlab_demo_tree.json"
STAGING_NAME = ".icmlab_demo_staging"
TOP_LEVEL: tuple[str, ...] = (
    "cleaned_labels.json",
    "spaq_koniq",
    "livefb_liveitw_aigc",
    "icm_llava_train.json",
    "sexy_check_all",
    "llava_v1_5_mix665k.json",
    "coco",
    "gqa",
    "ocr_vqa",
    "textvqa",
    "vg",
    "eval",
)
RESULT_KEYS: tuple[str, ...] = (
    "cleaned_labels.json",
    "spaq_koniq",
    "livefb_liveitw_aigc",
    "icm_llava_train.json",
    "sexy_check_all",
    "llava_v1_5_mix665k.json",
    "coco/train2017",
    "gqa/images",
    "ocr_vqa/images",
    "textvqa/train_images",
    "vg/VG_100K",
    "vg/VG_100K_2",
    "eval/qbench/llvisionqa_dev.json",
    "eval/qbench/images_llvisionqa",
    "eval/icm/icm_val_questions.json",
    "eval/icm/val",
    "eval/icm/val_MEQ",
)
"""Keys of :func:`build_demo_tree`'s result: paths relative to ``data_root``."""


def tree_files(seed: int = 0, scale: float = 1.0) -> dict[str, bytes]:
    """Every file of the unpacked demo tree (path relative to the data root → bytes)."""
    bundle = generate_bundle(seed, scale)
    cache: dict = {}
    files: dict[str, bytes] = {}
    for ds, json_path, image_root in (
        (bundle.q_instruct, "cleaned_labels.json", ""),
        (bundle.icm_instruct, "icm_llava_train.json", ""),
        (bundle.mix665k, "llava_v1_5_mix665k.json", ""),
        (bundle.qbench, "eval/qbench/llvisionqa_dev.json", "eval/qbench/images_llvisionqa/"),
        (bundle.icm_val, "eval/icm/icm_val_questions.json", "eval/icm/"),
    ):
        files[json_path] = json_bytes(ds.payload)
        for rel, data in render_dataset(ds, cache).items():
            if rel.startswith("ocr_vqa/") and sniff_format(data) != "JPEG":
                data = to_jpeg(data)
            files[image_root + rel] = data
    return files


def _marker_matches(marker: dict, seed: int, scale: float) -> bool:
    return (marker.get("status"), marker.get("demo_version"), marker.get("seed"), marker.get("scale")) == (
        "complete",
        DEMO_VERSION,
        seed,
        scale,
    )


def build_demo_tree(data_root: str | Path, seed: int = 0, scale: float = 1.0, force: bool = False) -> dict[str, Path]:
    """Write the unpacked demo datasets under ``data_root``.

    Idempotent: a complete earlier build with the same (seed, scale, demo version) whose
    top-level entries all exist is reused as is.

    Args:
        data_root: the data folder (``playground/data`` equivalent); created if missing.
        seed: global seed (the same as :func:`icmlab.demo.pack.build_demo_sources` uses, so both
            hold the same records and pixels).
        scale: size multiplier.
        force: rebuild even if a matching build is there.

    Returns:
        ``{key: absolute path}`` for the keys in :data:`RESULT_KEYS`.

    Raises:
        FileExistsError: if ``data_root`` holds one of the demo's top-level names that an earlier
            demo build did not create (real data is never overwritten).
        ValueError: if ``scale`` is not positive.
    """
    root = Path(data_root).resolve()
    if not scale > 0:
        raise ValueError(f"build_demo_tree: scale must be > 0, got {scale!r}")
    result = {k: root / k for k in RESULT_KEYS}
    marker_path = root / MARKER_NAME
    marker = read_json(marker_path) if marker_path.is_file() else None
    if (
        not force
        and marker is not None
        and _marker_matches(marker, seed, scale)
        and all((root / name).exists() for name in TOP_LEVEL)
    ):
        return result
    owned = set(marker.get("entries", [])) if marker else set()
    foreign = [name for name in TOP_LEVEL if (root / name).exists() and name not in owned]
    if foreign:
        raise FileExistsError(
            f"build_demo_tree: {root} already holds {foreign} that no demo build created; "
            "use an empty data_root for the demo (real data is never overwritten)"
        )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        marker_path,
        {"status": "building", "demo_version": DEMO_VERSION, "seed": seed, "scale": scale, "entries": list(TOP_LEVEL)},
    )
    staging = root / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    for rel, data in tree_files(seed, scale).items():
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)  # staged: the rename below is what makes it visible
    for name in TOP_LEVEL:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (staging / name).rename(target)
    staging.rmdir()
    atomic_write_json(
        marker_path,
        {"status": "complete", "demo_version": DEMO_VERSION, "seed": seed, "scale": scale, "entries": list(TOP_LEVEL)},
    )
    return result
