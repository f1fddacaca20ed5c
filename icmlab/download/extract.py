"""Putting files in place: safe resumable extraction, OCR-VQA's "everything is a .jpg", tree copies.

Used by :mod:`icmlab.download.stage` after an archive is fetched and verified::

    from icmlab.download.extract import extract_archive, convert_images_to_jpg
    res = extract_archive(Path("train2017.zip"), data_root / "coco")      # → coco/train2017/...
    rep = convert_images_to_jpg(staging, data_root / "ocr_vqa" / "images")

Safety: every member is checked *before anything is written*; an archive holding an absolute path,
a ``..`` component, a link whose target is absolute or climbs with ``..``, or a device/FIFO entry
is refused as a whole (:class:`UnsafeArchiveError`), so nothing can land outside the target.
Resumability: each file is written to a hidden temporary name and renamed, so a file under its
final name is complete; a rerun skips files already present with the right size (pass
``overwrite=True`` when the archive itself changed). Completion markers are the caller's business
(:mod:`icmlab.download.stage` writes one after this returns). :func:`place_file` / :func:`copy_tree` put
hub-cache files and local folders in place atomically; :func:`missing_references` lists images a
LLaVA JSON names that are not on disk.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tarfile
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from tqdm.auto import tqdm

from icmlab.config import DownloadConfig

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_SKIP_TOP = {"__MACOSX"}  # resource forks that macOS zip tools add


class ArchiveError(ValueError):
    """The archive is corrupt, truncated or of an unknown type."""


class ExtractionRefused(OSError):
    """Not extracted: the archive expands beyond the configured size or ratio, or the disk has no
    room for it. The (verified) archive is kept: nothing is wrong with the download itself."""


class UnsafeArchiveError(ArchiveError):
    """The archive has entries that would write outside the target; nothing was extracted."""


@dataclass
class Member:
    """One archive entry after validation.

    Attributes:
        name: safe relative path (``/``-separated, ``strip_components`` removed).
        kind: ``file``, ``dir``, ``symlink`` or ``hardlink``.
        size: bytes (files).
        link: link target (links; for hardlinks the safe member name it refers to).
        raw: the ``ZipInfo`` / ``TarInfo``.
    """

    name: str
    kind: str
    size: int = 0
    link: str = ""
    raw: object = None


@dataclass
class ExtractResult:
    """What :func:`extract_archive` did.

    Attributes:
        target: the extraction root.
        files: relative paths of every regular file of the archive (after stripping).
        written: files written by this call.
        skipped: files already present with the right size (resumed extraction).
        bytes: bytes written by this call.
    """

    target: Path
    files: list[str]
    written: int = 0
    skipped: int = 0
    bytes: int = 0


def archive_format(path: Path) -> str:
    """``zip`` or ``tar`` (any compression), from the file's content, not its name.

    Raises:
        ArchiveError: neither (an HTML page, a truncated download, ...).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" and head[2:4] in (b"\x03\x04", b"\x05\x06", b"\x07\x08"):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveError(
        f"{path}: not a zip or tar archive (first bytes {head!r}); the file is corrupt, "
        "truncated, or not the archive it should be"
    )


def _safe_name(raw: str, strip: int) -> str | None:
    """Validated relative name, None for entries to skip; raises UnsafeArchiveError."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchiveError(f"entry {raw!r}: NUL byte in the name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"entry {raw!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"entry {raw!r}: '..' climbs out of the target")
    if not parts or parts[0] in _SKIP_TOP:
        return None
    parts = parts[strip:]
    return "/".join(parts) if parts else None


def _check_link(name: str, link: str) -> None:
    target = link.replace("\\", "/")
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target) or ".." in target.split("/"):
        raise UnsafeArchiveError(f"entry {name!r}: link to {link!r} points outside the target")


def list_members(path: Path, strip_components: int = 0) -> list[Member]:
    """Validate every entry of an archive and return them in archive order.

    Args:
        path: a zip or tar (optionally compressed) archive.
        strip_components: leading path components to drop (like ``tar --strip-components``).

    Returns:
        The entries to extract (skipped ones such as ``__MACOSX/`` are left out).

    Raises:
        UnsafeArchiveError: listing up to ten offending entries; nothing may be extracted.
        ArchiveError: the archive cannot be read.
    """
    fmt = archive_format(path)
    members: list[Member] = []
    bad: list[str] = []
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    try:
                        name = _safe_name(info.filename, strip_components)
                        if name is None:
                            continue
                        mode = info.external_attr >> 16
                        if info.create_system == 3 and stat.S_ISLNK(mode):
                            link = zf.read(info).decode("utf-8", "replace")
                            _check_link(info.filename, link)
                            members.append(Member(name, "symlink", 0, link, info))
                        elif info.is_dir():
                            members.append(Member(name, "dir", 0, "", info))
                        else:
                            members.append(Member(name, "file", info.file_size, "", info))
                    except UnsafeArchiveError as e:
                        bad.append(str(e))
        else:
            with tarfile.open(path, "r:*") as tf:
                for ti in tf:
                    try:
                        name = _safe_name(ti.name, strip_components)
                        if name is None:
                            continue
                        if ti.isreg():
                            members.append(Member(name, "file", ti.size, "", ti))
                        elif ti.isdir():
                            members.append(Member(name, "dir", 0, "", ti))
                        elif ti.issym():
                            _check_link(ti.name, ti.linkname)
                            members.append(Member(name, "symlink", 0, ti.linkname, ti))
                        elif ti.islnk():
                            target = _safe_name(ti.linkname, strip_components)
                            if target is None:
                                raise UnsafeArchiveError(
                                    f"entry {ti.name!r}: hard link to {ti.linkname!r} outside the extracted part"
                                )
                            members.append(Member(name, "hardlink", 0, target, ti))
                        else:
                            raise UnsafeArchiveError(f"entry {ti.name!r}: device or FIFO entries are not extracted")
                    except UnsafeArchiveError as e:
                        bad.append(str(e))
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
        raise ArchiveError(
            f"{path}: cannot read the archive ({type(e).__name__}: {e}); it is corrupt or truncated"
        ) from None
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise UnsafeArchiveError(f"{path}: refused, nothing was extracted: " + "; ".join(bad[:10]) + more)
    return members


def extract_archive(
    path: Path,
    target: Path,
    *,
    strip_components: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    desc: str | None = None,
    cancel: threading.Event | None = None,
    max_bytes: int | None = int(DownloadConfig.max_extract_gb * 1e9),
    max_ratio: float | None = DownloadConfig.max_extract_ratio,
) -> ExtractResult:
    """Extract a zip/tar archive into ``target`` safely and resumably.

    Args:
        path: the archive.
        target: extraction root (created if missing).
        strip_components: leading path components to drop from every entry.
        overwrite: rewrite files that already exist (the archive changed since a previous run);
            by default a file present with the archive's size is kept (resume).
        progress: show a tqdm bar (bytes).
        desc: bar label.
        cancel: when set, stop after the current file (a rerun resumes).
        max_bytes: refuse archives whose members add up to more (default: ``download.max_extract_gb``'s; None: no limit).
        max_ratio: refuse archives expanding more than this many times their size (default:
            ``download.max_extract_ratio``'s; None: no limit).

    Returns:
        An :class:`ExtractResult`.

    Raises:
        UnsafeArchiveError: see :func:`list_members` (nothing written).
        ExtractionRefused: over ``max_bytes`` / ``max_ratio``, or not enough free space in ``target``
            for what is left to write (nothing written; the message names the folder and the bytes).
        ArchiveError: corrupt or truncated archive (files completed before the error stay; they are whole).
    """
    members = list_members(path, strip_components)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    res = ExtractResult(target, [m.name for m in members if m.kind in ("file", "hardlink")])
    total = sum(m.size for m in members)
    _check_expansion(path, target, members, total, max_bytes, max_ratio, overwrite)
    fmt = archive_format(path)
    opener = zipfile.ZipFile(path) if fmt == "zip" else tarfile.open(path, "r:*")
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=(desc or path.name)[:40], disable=not progress, leave=False)
    try:
        with opener as arc:
            for m in members:
                if cancel is not None and cancel.is_set():
                    raise InterruptedError(f"{path.name}: extraction cancelled; a rerun resumes it")
                dest = target / m.name
                if m.kind == "dir":
                    dest.mkdir(parents=True, exist_ok=True)
                elif m.kind == "symlink":
                    if dest.is_symlink() and os.readlink(dest) == m.link:
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.parent / f".{dest.name}.icmlab-link"
                    tmp.unlink(missing_ok=True)
                    os.symlink(m.link, tmp)
                    os.replace(tmp, dest)
                elif m.kind == "hardlink":
                    src = target / m.link
                    _write(dest, lambda: open(src, "rb"), src.stat().st_size if src.exists() else -1, overwrite, res)
                else:
                    if fmt == "zip":
                        open_member: Callable[[], IO[bytes]] = lambda m=m: arc.open(m.raw)  # noqa: E731
                    else:
                        open_member = lambda m=m: arc.extractfile(m.raw)  # noqa: E731
                    try:
                        _write(dest, open_member, m.size, overwrite, res)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        raise ExtractionRefused(
                            f"{target}: the disk filled up while extracting {path.name} at {m.name!r} "
                            f"({total - res.bytes:,} bytes were still to write); free space there and run again "
                            "(the files written so far are whole and are kept)"
                        ) from None
                    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
                        raise ArchiveError(
                            f"{path}: corrupt or truncated at {m.name!r} "
                            f"({type(e).__name__}: {e}); fetch the archive again"
                        ) from None
                bar.update(m.size)
    finally:
        bar.close()
    return res


def _check_expansion(
    path: Path,
    target: Path,
    members: list[Member],
    total: int,
    max_bytes: int | None,
    max_ratio: float | None,
    overwrite: bool,
) -> None:
    """Refuse a zip bomb (size or ratio) and an extraction the disk cannot hold, before writing anything."""
    packed = max(path.stat().st_size, 1)
    if max_bytes is not None and total > max_bytes:
        raise ExtractionRefused(
            f"{path}: expands to {total:,} bytes, over download.max_extract_gb ({max_bytes / 1e9:g} GB); "
            "raise it if you trust this archive"
        )
    if max_ratio is not None and total > max_ratio * packed:
        raise ExtractionRefused(
            f"{path}: expands {total / packed:,.0f}x ({packed:,} → {total:,} bytes), over "
            f"download.max_extract_ratio ({max_ratio:g}); a zip bomb or a corrupt archive; raise it if you trust it"
        )
    todo = sum(
        m.size
        for m in members
        if m.kind == "file"
        and (overwrite or not ((target / m.name).is_file() and (target / m.name).stat().st_size == m.size))
    )
    free = shutil.disk_usage(target).free
    if todo > free:
        raise ExtractionRefused(
            f"{target}: not enough disk space to extract {path.name}: {todo:,} bytes needed, {free:,} free; "
            "free space there or set data.root on a larger disk"
        )


def _write(dest: Path, open_src: Callable[[], IO[bytes]], size: int, overwrite: bool, res: ExtractResult) -> None:
    if not overwrite and dest.is_file() and not dest.is_symlink() and dest.stat().st_size == size:
        res.skipped += 1
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.icmlab-part"
    try:
        with open_src() as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    res.written += 1
    res.bytes += dest.stat().st_size


# --------------------------------------------------------------------------- placing files
def place_file(src: Path, dest: Path, *, link: bool) -> None:
    """Put ``src``'s content at ``dest`` atomically: a hard link when ``link`` and possible, else a copy.

    Links save space for data files taken from the hub cache (nothing rewrites them in place);
    checkpoints are copied, since training code may write next to them.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.icmlab-part")
    tmp.unlink(missing_ok=True)
    real = Path(os.path.realpath(src))
    try:
        try:
            if not link:
                raise OSError("copy requested")
            os.link(real, tmp)
        except OSError:  # another filesystem, or a copy was asked for
            shutil.copyfile(real, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_tree(src: Path, dest: Path, *, overwrite: bool = False, link: bool = False) -> int:
    """Place every non-hidden file under ``src`` at the same relative path under ``dest``.

    Files already present with the same size are kept unless ``overwrite`` (resumable).

    Returns:
        The number of files in the tree.
    """
    n = 0
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        d = dest / rel
        if overwrite or not (d.is_file() and d.stat().st_size == p.stat().st_size):
            place_file(p, d, link=link)
        n += 1
    return n


def missing_references(json_path: Path, root: Path, prefix: str) -> tuple[int, list[str]]:
    """Image paths starting with ``prefix`` that a LLaVA-format JSON names but ``root`` lacks.

    A regex over the memory-mapped bytes: the 1 GB mix665k JSON is never parsed into Python objects.

    Returns:
        (number of distinct references, sorted missing ones).
    """
    import mmap

    pattern = re.compile(rb'"image"\s*:\s*"(' + re.escape(prefix.encode()) + rb'[^"]+)"')
    with open(json_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        refs = {m.group(1).decode() for m in pattern.finditer(mm)}
    return len(refs), sorted(r for r in refs if not (root / r).is_file())


# --------------------------------------------------------------------------- OCR-VQA images
@dataclass
class ConvertReport:
    """Outcome of :func:`convert_images_to_jpg`.

    Attributes:
        jpeg: files that already were JPEG data (moved/copied unchanged under ``<stem>.jpg``).
        converted: files re-encoded to JPEG (GIF, PNG, ... data, whatever their name said).
        kept: ``<stem>.jpg`` already present from an earlier run.
        dead: ``(source file, reason)`` for files that are empty or cannot be decoded.
        duplicates: source files skipped because another file had the same stem.
        formats: source image format → count.
    """

    jpeg: int = 0
    converted: int = 0
    kept: int = 0
    dead: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able summary (the dead list in full: it is what the user has to look at)."""
        return {
            "jpeg": self.jpeg,
            "converted": self.converted,
            "kept": self.kept,
            "dead": len(self.dead),
            "dead_files": [{"file": f, "reason": r} for f, r in self.dead],
            "duplicates": self.duplicates,
            "formats": self.formats,
        }


def convert_images_to_jpg(
    src: Path,
    dst: Path,
    *,
    move: bool = False,
    overwrite: bool = False,
    quality: int = 95,
    workers: int | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Save every image under ``src`` (any depth, any format) as real JPEG ``dst/<stem>.jpg``.

    The LLaVA mix665k JSON names every OCR-VQA image ``<id>.jpg`` while the downloads are often
    GIF or PNG data under various names; training opens them by the JSON's name. JPEG data is
    kept byte for byte (after a full decode check); anything else is decoded (first frame, alpha
    composited on white) and re-encoded. Undecodable or empty files are listed, not fatal.

    Args:
        src: folder of source images (e.g. the extracted archive).
        dst: output folder (``ocr_vqa/images``).
        move: move JPEG files instead of copying (``src`` is a staging folder we own).
        overwrite: redo outputs that exist (the source archive changed); by default they are kept (resume).
        quality: JPEG quality for re-encoded images.
        workers: decoding threads (default: up to 4).
        progress: show a tqdm bar.

    Returns:
        A :class:`ConvertReport`.
    """
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    report = ConvertReport()
    jobs: dict[str, Path] = {}
    for p in files:
        if p.stem in jobs:
            report.duplicates.append(str(p.relative_to(src)))
        else:
            jobs[p.stem] = p

    def one(item: tuple[str, Path]) -> tuple[str, str | None, str]:
        stem, p = item
        out = dst / f"{stem}.jpg"
        if not overwrite and out.is_file() and out.stat().st_size > 0:
            return "kept", None, ""
        if p.stat().st_size == 0:
            return "dead", "empty file", ""
        tmp = dst / f".{stem}.jpg.icmlab-part"
        try:
            with Image.open(p) as im:
                fmt = im.format or "?"
                if fmt == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # fast full-stream decode check
                    im.load()
                else:
                    im.seek(0)
                    rgb = _to_rgb(im)
                    rgb.save(tmp, "JPEG", quality=quality)
        except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
            tmp.unlink(missing_ok=True)
            return "dead", f"{type(e).__name__}: {e}", ""
        if fmt == "JPEG":
            if move:
                os.replace(p, out)
            else:
                shutil.copyfile(p, tmp)
                os.replace(tmp, out)
            return "jpeg", None, fmt
        os.replace(tmp, out)
        return "converted", None, fmt

    workers = workers or min(4, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(jobs), unit="img", desc="ocr_vqa → .jpg", disable=not progress, leave=False) as bar,
    ):
        for (stem, p), (status, reason, fmt) in zip(jobs.items(), pool.map(one, jobs.items())):
            bar.update(1)
            if status == "dead":
                report.dead.append((str(p.relative_to(src)), reason or ""))
                continue
            if status == "kept":
                report.kept += 1
                continue
            report.formats[fmt] = report.formats.get(fmt, 0) + 1
            if status == "jpeg":
                report.jpeg += 1
            else:
                report.converted += 1
    if report.dead:
        log.warning("ocr_vqa: %d images could not be decoded (listed in the report)", len(report.dead))
    return report


def _to_rgb(im):
    """RGB copy of a PIL image; transparency is composited on white (the usual page background)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")
