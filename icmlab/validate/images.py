"""Image checks of the validate stage: existence with exact case, readability, format and size.

Training opens ``<data root>/<record["image"]>`` for every sample; a missing, truncated or
mislabelled image stops a run hours in. :func:`check_images` finds those first, for many unique
paths at once:

- existence with the exact case, from cached directory listings (one ``listdir`` per folder
  instead of one ``stat`` per file), with a hint of the on-disk spelling when only the case differs;
- with ``header``: PIL can open it, its content format matches the extension, its size is not
  degenerate (tiny side, extreme aspect ratio);
- with ``decode``: a full decode of every image with the trainer's loader
  (:func:`icmlab.inputs.images.decode_check`), which finds truncated and corrupt files, in worker
  processes across the cores (decoding holds the GIL for part of its time), with a progress bar.

Files are opened only through :func:`icmlab.inputs.images.open_image` (header) and ``decode_check``
(decode), so checks on a file added there apply here too.

Usage (called by :func:`icmlab.validate.stage.validate_file`)::

    from icmlab.validate.images import check_images
    found = check_images(cfg.data.root, ["coco/train2017/0001.jpg", ...], decode=False)
    # {rel: ([(kind, detail), ...], {"format", "width", "height"})}
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from PIL import UnidentifiedImageError

from icmlab.inputs.image_guard import ImageRefused, escapes_root, open_image
from icmlab.inputs.images import decode_check

BATCH = 32  # images per task: small enough for a smooth progress bar, large enough to amortise the hand-off

IMAGE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def _plain(folder: str) -> bool:
    """A relative folder without ``.``/``..``/empty parts or backslashes: usable as a listing key as is."""
    return not folder or (
        not folder.startswith("/") and "\\" not in folder and all(p not in ("", ".", "..") for p in folder.split("/"))
    )


class _Listings:
    """Cached directory listings: exact-case existence without one stat per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[Path, set[str] | None] = {}
        self.lower: dict[Path, dict[str, str]] = {}
        self.by_str: dict[str, set[str] | None] = {}

    def names_str(self, folder: str) -> set[str] | None:
        """Listing of ``root/folder`` for a plain relative folder string (cached by the string)."""
        if folder not in self.by_str:
            self.by_str[folder] = self.names(self.root / folder if folder else self.root)
        return self.by_str[folder]

    def names(self, folder: Path) -> set[str] | None:
        if folder not in self.cache:
            try:
                self.cache[folder] = set(os.listdir(folder))
            except OSError:
                self.cache[folder] = None
        return self.cache[folder]

    def missing(self, rel: str) -> str | None:
        """None when ``root/rel`` exists with this exact case, else the detail of what is wrong."""
        folder, _, name = rel.rpartition("/")
        if _plain(folder) and name not in ("", ".", ".."):
            names = self.names_str(folder)
            if names is not None and name in names:
                return None
        p = Path(os.path.normpath(self.root / rel))
        names = self.names(p.parent)
        if names is not None and p.name in names:
            return None
        # Explain: walk from the root, matching each component case-insensitively.
        cur, fixed = self.root, []
        for part in Path(os.path.relpath(p, self.root)).parts:
            if cur not in self.lower:
                self.lower[cur] = {e.lower(): e for e in sorted(self.names(cur) or ())}
            hit = self.lower[cur].get(part.lower())
            if hit is None:
                return f"{rel}: not found ({cur} has no {part!r})"
            fixed.append(hit)
            cur = cur / hit
        return f"{rel}: not found with this case; on disk: {'/'.join(fixed)}"


def _inspect_image(path: Path, decode: bool, min_side: int, max_aspect: float) -> tuple[list[tuple[str, str]], dict]:
    """Header (and optionally full-decode) checks of one existing file: ``(problems, info)``."""
    try:
        if path.stat().st_size == 0:
            return [("image_unreadable", "empty file (0 bytes)")], {}
        with open_image(path) as im:
            fmt, (w, h) = im.format, im.size
    except ImageRefused as e:
        return [(e.kind, str(e))], {}
    except UnidentifiedImageError:
        return [("image_unreadable", "PIL cannot identify the content")], {}
    except (OSError, SyntaxError, ValueError) as e:
        return [("image_unreadable", f"{type(e).__name__}: {e}")], {}
    info = {"format": fmt, "width": w, "height": h}
    out = []
    if decode:
        try:
            decode_check(path)  # the trainer's loader: decode exactly as training will
        except ImageRefused as e:
            return [(e.kind, str(e))], info
        except (ValueError, OSError) as e:
            return [("image_corrupt", str(e.__cause__ or e))], info
    want = IMAGE_FORMATS.get(path.suffix.lower())
    if want and fmt != want:
        out.append(("image_format_mismatch", f"{fmt} content named {path.suffix}"))
    if min(w, h) < min_side or max(w, h) > max_aspect * min(w, h):
        out.append(("image_degenerate", f"{w}x{h}"))
    return out, info


def _inspect_batch(root: str, rels: list[str], decode: bool, min_side: int, max_aspect: float) -> list:
    """:func:`_inspect_image` of a batch of files (the task of a worker thread or process)."""
    return [_inspect_image(Path(root) / r, decode, min_side, max_aspect) for r in rels]


def default_image_workers() -> int:
    """The usable CPUs (decoding is CPU-bound)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_images(
    root: Path,
    rels: list[str],
    *,
    decode: bool = True,
    header: bool = True,
    workers: int | None = None,
    min_side: int = 4,
    max_aspect: float = 20.0,
    progress: bool = True,
) -> dict[str, tuple[list[tuple[str, str]], dict]]:
    """Check image files (paths relative to ``root``): existence first, then every header or full decode.

    Args:
        root: the data root (upstream ``--image_folder``).
        rels: unique relative paths.
        decode: fully decode every image with the trainer's loader (finds truncated files), in
            ``workers`` processes.
        header: read each header (format, size), in threads; False = existence only.
        workers: processes for decoding (default: the usable CPUs); threads for headers (default
            2 x CPUs, at most 16); 0 or 1 checks in this process.
        min_side: smaller sides are ``image_degenerate``.
        max_aspect: larger aspect ratios are ``image_degenerate``.
        progress: show a progress bar (terminal or notebook) over the header/decode pass.

    Returns:
        ``{rel: (problems, info)}``: every missing path, and with ``header`` or ``decode`` every path
        (``info`` holds format/width/height when readable).
    """
    listings = _Listings(Path(root))
    out: dict[str, tuple[list[tuple[str, str]], dict]] = {}
    by_folder: dict[str, set[str]] = {}
    for rel in rels:
        why = escapes_root(rel)  # never looked at: outside the data root
        if why:
            out[rel] = ([("image_outside_root", why)], {})
            continue
        folder, _, name = rel.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    suspects = []
    for folder, names in by_folder.items():  # one listing and one set difference per folder
        listing = listings.names_str(folder) if _plain(folder) else None
        absent = names - listing if listing is not None else names
        suspects += [f"{folder}/{n}" if folder else n for n in absent]
    for rel in suspects:  # the slow, exact path (normalisation, case hints) for the few left
        why = listings.missing(rel)
        if why is not None:
            out[rel] = ([("image_missing", why)], {})
    present = [r for r in rels if r not in out] if header or decode else []
    if not present:
        return out
    batches = [present[i : i + BATCH] for i in range(0, len(present), BATCH)]
    pool = _pool(decode, workers, len(batches))
    bar = _bar(len(present), "decode images" if decode else "image headers") if progress else None
    try:
        if pool is None:
            results = (_inspect_batch(str(root), b, decode, min_side, max_aspect) for b in batches)
        else:
            args = [(str(root), b, decode, min_side, max_aspect) for b in batches]
            results = pool.map(_inspect_batch, *zip(*args))
        for items, found in zip(batches, results):
            out.update(zip(items, found))
            if bar is not None:
                bar.update(len(items))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return out


def _pool(decode: bool, workers: int | None, tasks: int) -> Executor | None:
    if decode:
        n = min(default_image_workers() if workers is None else workers, tasks)
        if n <= 1:
            return None
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        return ProcessPoolExecutor(n, mp_context=ctx)
    n = workers if workers is not None else min(16, 2 * (os.cpu_count() or 1))
    return ThreadPoolExecutor(n) if n > 1 else None


def _bar(total: int, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="img", dynamic_ncols=True, mininterval=0.5)
