"""Pack the demo datasets the way the real sources ship them, with a manifest.

:func:`build_demo_sources` writes one local folder that stands in for every upstream download, so
the download stage can fetch "remote" files through its real code path (unzip, untar, OCR-VQA
conversion, checksum) from a local mirror::

    paths = build_demo_sources("runs/demo_sources", seed=0)
    paths["icm_instruct_train"]   # .../icm_instruct/icm-instruct-train.zip

Artifacts (name: file under ``out_dir`` — top-level entries inside):

- ``icm_instruct_train``: ``icm_instruct/icm-instruct-train.zip`` — ``sexy_check_all/``,
  ``icm_llava_train.json``
- ``q_instruct_labels``: ``q_instruct/cleaned_labels.json`` (bare JSON)
- ``q_instruct_images``: ``q_instruct/q-instruct-images.tar`` — ``spaq_koniq/``,
  ``livefb_liveitw_aigc/``
- ``llava_mix665k``: ``llava/llava_v1_5_mix665k.json`` (bare JSON)
- ``coco_train2017``: ``coco/train2017.zip`` — ``train2017/``
- ``gqa_images``: ``gqa/images.zip`` — ``images/``
- ``ocr_vqa_images``: ``ocr_vqa/ocr_vqa_images.zip`` — ``images/`` (``.jpg`` names, some GIF/PNG data)
- ``textvqa_train_val_images``: ``textvqa/train_val_images.zip`` — ``train_images/``
- ``vg_images``: ``vg/images.zip`` — ``VG_100K/``
- ``vg_images2``: ``vg/images2.zip`` — ``VG_100K_2/``
- ``qbench_dev_json``: ``qbench/llvisionqa_dev.json`` (bare JSON)
- ``qbench_images``: ``qbench/images_llvisionqa.tar`` — ``images_llvisionqa/``
- ``icm_val``: ``icm_val/icm-instruct-val.zip`` — ``val/``, ``val_MEQ/``, ``icm_val_questions.json``

Archives are byte-deterministic (sorted entries, fixed timestamps and owners), so the same seed
gives the same sha256. ``demo_manifest.json`` records each artifact's sha256, size and the real
URL it stands in for; a second call with the same (seed, scale) reuses the files when they still
match the manifest.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..io import atomic_write_bytes, atomic_write_json, read_json
from .bundle import DEMO_VERSION, DemoBundle, generate_bundle, render_dataset

MANIFEST_NAME = "demo_manifest.json"
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)
_TAR_MTIME = 1704067200  # 2024-01-01T00:00:00Z
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif")


@dataclass(frozen=True)
class Artifact:
    """One shipped file: where it goes and which real download it stands in for."""

    name: str
    path: str
    upstream: str | None
    top_level: tuple[str, ...] = ()


HF = "https://huggingface.co/datasets"
ARTIFACTS: tuple[Artifact, ...] = (
    Artifact(
        "icm_instruct_train",
        "icm_instruct/icm-instruct-train.zip",
        f"{HF}/wumengyangok/ICM-Instruct/resolve/main/icm-instruct-train.zip",
        ("sexy_check_all/", "icm_llava_train.json"),
    ),
    Artifact(
        "q_instruct_labels", "q_instruct/cleaned_labels.json", f"{HF}/teowu/Q-Instruct/resolve/main/cleaned_labels.json"
    ),
    Artifact(
        "q_instruct_images",
        "q_instruct/q-instruct-images.tar",
        f"{HF}/teowu/Q-Instruct/resolve/main/q-instruct-images.tar",
        ("spaq_koniq/", "livefb_liveitw_aigc/"),
    ),
    Artifact(
        "llava_mix665k",
        "llava/llava_v1_5_mix665k.json",
        f"{HF}/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_v1_5_mix665k.json",
    ),
    Artifact(
        "coco_train2017", "coco/train2017.zip", "http://images.cocodataset.org/zips/train2017.zip", ("train2017/",)
    ),
    Artifact("gqa_images", "gqa/images.zip", "https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", ("images/",)),
    # OCR-VQA ships as a Google-Drive download script; the demo packs its result as one zip.
    Artifact("ocr_vqa_images", "ocr_vqa/ocr_vqa_images.zip", None, ("images/",)),
    Artifact(
        "textvqa_train_val_images",
        "textvqa/train_val_images.zip",
        "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip",
        ("train_images/",),
    ),
    Artifact("vg_images", "vg/images.zip", "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", ("VG_100K/",)),
    Artifact(
        "vg_images2", "vg/images2.zip", "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", ("VG_100K_2/",)
    ),
    Artifact(
        "qbench_dev_json",
        "qbench/llvisionqa_dev.json",
        f"{HF}/nanyangtu/LLVisionQA-QBench/resolve/main/llvisionqa_dev.json",
    ),
    Artifact(
        "qbench_images",
        "qbench/images_llvisionqa.tar",
        f"{HF}/nanyangtu/LLVisionQA-QBench/resolve/main/images_llvisionqa.tar",
        ("images_llvisionqa/",),
    ),
    # The real validation set is an imagefolder repo (zhaoyuzhi/ICM-Instruct), not one archive.
    Artifact("icm_val", "icm_val/icm-instruct-val.zip", None, ("val/", "val_MEQ/", "icm_val_questions.json")),
)
ARTIFACTS_BY_NAME: dict[str, Artifact] = {a.name: a for a in ARTIFACTS}


def json_bytes(obj) -> bytes:
    """Indented UTF-8 JSON, as the upstream files are written."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


def _dirs_of(paths) -> list[str]:
    dirs = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]) + "/")
    return sorted(dirs)


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deterministic zip of ``files`` (archive path → bytes) with explicit directory entries.

    Images are stored (they do not compress), everything else is deflated.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for d in _dirs_of(files):
            info = zipfile.ZipInfo(d, date_time=_ZIP_TIME)
            info.create_system = 3
            info.external_attr = (0o40755 << 16) | 0x10
            zf.writestr(info, b"")
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=_ZIP_TIME)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            stored = path.lower().endswith(_IMAGE_SUFFIXES)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            zf.writestr(info, files[path])
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A deterministic uncompressed tar (GNU format, root-owned, fixed mtime) of ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for d in _dirs_of(files):
            info = tarfile.TarInfo(d.rstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _TAR_MTIME
            tf.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, _TAR_MTIME
            tf.addfile(info, io.BytesIO(files[path]))
    return buf.getvalue()


def _strip(files: dict[str, bytes], prefix: str, new_prefix: str = "") -> dict[str, bytes]:
    """The entries under ``prefix``, re-rooted at ``new_prefix`` (archive-internal paths)."""
    return {new_prefix + k[len(prefix) :]: v for k, v in files.items() if k.startswith(prefix)}


def artifact_contents(bundle: DemoBundle) -> dict[str, bytes]:
    """Render every image and pack each artifact's bytes (name → file content)."""
    cache: dict = {}
    q = render_dataset(bundle.q_instruct, cache)
    icm = render_dataset(bundle.icm_instruct, cache)
    hl = render_dataset(bundle.mix665k, cache)
    qb = render_dataset(bundle.qbench, cache)
    iv = render_dataset(bundle.icm_val, cache)
    return {
        "icm_instruct_train": zip_bytes({**icm, "icm_llava_train.json": json_bytes(bundle.icm_instruct.payload)}),
        "q_instruct_labels": json_bytes(bundle.q_instruct.payload),
        "q_instruct_images": tar_bytes(q),
        "llava_mix665k": json_bytes(bundle.mix665k.payload),
        "coco_train2017": zip_bytes(_strip(hl, "coco/")),
        "gqa_images": zip_bytes(_strip(hl, "gqa/")),
        "ocr_vqa_images": zip_bytes(_strip(hl, "ocr_vqa/")),
        "textvqa_train_val_images": zip_bytes(_strip(hl, "textvqa/")),
        "vg_images": zip_bytes(_strip(hl, "vg/VG_100K/", "VG_100K/")),
        "vg_images2": zip_bytes(_strip(hl, "vg/VG_100K_2/", "VG_100K_2/")),
        "qbench_dev_json": json_bytes(bundle.qbench.payload),
        "qbench_images": tar_bytes({f"images_llvisionqa/{k}": v for k, v in qb.items()}),
        "icm_val": zip_bytes({**iv, "icm_val_questions.json": json_bytes(bundle.icm_val.payload)}),
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_matches(out_dir: Path, seed: int, scale: float) -> bool:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        m = read_json(path)
    except ValueError:
        return False
    if (m.get("demo_version"), m.get("seed"), m.get("scale")) != (DEMO_VERSION, seed, scale):
        return False
    arts = m.get("artifacts", {})
    if set(arts) != set(ARTIFACTS_BY_NAME):
        return False
    for name, entry in arts.items():
        f = out_dir / entry["path"]
        if not f.is_file() or f.stat().st_size != entry["size"] or sha256_file(f) != entry["sha256"]:
            return False
    return True


def build_demo_sources(out_dir: str | Path, seed: int = 0, scale: float = 1.0, force: bool = False) -> dict[str, Path]:
    """Write every demo source artifact under ``out_dir`` and a ``demo_manifest.json``.

    Idempotent: when the manifest exists for the same (seed, scale, demo version) and every file
    still has its recorded size and sha256, nothing is rebuilt. Every file is written atomically
    and the manifest last, so an interrupted build is simply redone.

    Args:
        out_dir: destination folder (created if missing).
        seed: global seed (same seed → byte-identical artifacts).
        scale: size multiplier (1.0: ~3000 images each for Q-Instruct and ICM-Instruct).
        force: rebuild even if the manifest matches.

    Returns:
        Artifact name → absolute path (see the module table), plus ``"manifest"``.

    Raises:
        ValueError: if ``scale`` is not positive.
    """
    out_dir = Path(out_dir).resolve()
    if not scale > 0:
        raise ValueError(f"build_demo_sources: scale must be > 0, got {scale!r}")
    paths = {a.name: out_dir / a.path for a in ARTIFACTS}
    paths["manifest"] = out_dir / MANIFEST_NAME
    if not force and _manifest_matches(out_dir, seed, scale):
        return paths
    bundle = generate_bundle(seed, scale)
    contents = artifact_contents(bundle)
    entries = {}
    for art in ARTIFACTS:
        data = contents[art.name]
        atomic_write_bytes(out_dir / art.path, data)
        entries[art.name] = {
            "path": art.path,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "upstream_url": art.upstream,
            "top_level": list(art.top_level),
        }
    manifest = {
        "generator": "icmlab.demo",
        "demo_version": DEMO_VERSION,
        "seed": seed,
        "scale": scale,
        "counts": bundle.counts(),
        "artifacts": entries,
    }
    atomic_write_json(paths["manifest"], manifest)
    return paths
