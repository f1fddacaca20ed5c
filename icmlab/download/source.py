"""One source of the download stage: fetch, verify, place, and mark it complete.

:func:`run_source` takes one catalog :class:`~icmlab.download.catalog.Source` from wherever it lives (a
plain URL through :func:`icmlab.download.fetch.fetch_url`, the Hugging Face hub through :mod:`icmlab.download.hub`,
a local file or folder, a generated demo checkpoint), verifies it, lays it out under the data root
(archives through :func:`icmlab.download.extract.extract_archive`, OCR-VQA images converted to ``.jpg``)
and writes its completion marker last. Failures come back as an :class:`ItemOutcome` with an
actionable message, so the other sources go on.

The state lives under ``<data root>/.icmlab/`` (:data:`STATE`): ``done/<source>.json`` markers
(:func:`marker_path`, :func:`done_record`), ``downloads/`` for plain URLs (:func:`download_path`)
and ``staging/`` for conversions.

Usage (by :func:`icmlab.download.stage.run`, one thread per source)::

    ctx = SourceContext(cfg, catalog, progress=True, cancel=threading.Event())
    outcome = run_source(ctx, source)       # ItemOutcome(name, "fetched" | "failed", bytes, seconds, message)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.download.catalog import Catalog, Source, count_files
from icmlab.download.extract import ArchiveError, convert_images_to_jpg, copy_tree, extract_archive, place_file
from icmlab.download.fetch import (
    AuthError,
    ChecksumError,
    FetchError,
    HTMLInsteadOfData,
    NotFoundError,
    fetch_url,
    html_message,
    local_path,
    looks_like_html,
    verify_file,
)
from icmlab.download.hub import fetch_hf_file, fetch_hf_snapshot
from icmlab.io import atomic_write_json, read_json
from icmlab.redact import redact, redact_text

log = logging.getLogger("icmlab.download")

STATE = paths.DOWNLOAD_STATE
"""State folder under the data root: ``done/`` markers, ``downloads/`` (plain URLs), ``staging/``."""


@dataclass
class ItemOutcome:
    """What happened to one source in :func:`icmlab.download.stage.run`."""

    name: str
    action: str
    transferred: int = 0
    seconds: float = 0.0
    message: str = ""


# --------------------------------------------------------------------------- state
def marker_path(cfg: RunConfig, name: str) -> Path:
    """The completion marker of source ``name`` (written last, when the source is complete)."""
    return paths.download_marker(cfg, name)


def _fingerprint(src: Source) -> str:
    """What makes a completed source still valid: its origin and how it was laid out."""
    return json.dumps(
        {
            "origin": redact_text(src.origin),  # a new signature of the same pre-signed URL is the same origin
            "sha256": src.sha256,
            "size": src.size,
            "kind": src.kind,
            "target": src.target,
            "archive": src.archive,
            "strip": src.strip,
            "convert": src.convert,
            "allow": list(src.allow),
        },
        sort_keys=True,
    )


def read_json_or_none(path: Path) -> dict | None:
    """A state file's JSON, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def done_record(cfg: RunConfig, src: Source) -> dict | None:
    """The source's completion record while still valid (same origin and layout, files still there), else None."""
    rec = read_json_or_none(marker_path(cfg, src.name))
    if not rec or rec.get("fingerprint") != _fingerprint(src):
        return None
    if src.target and not (cfg.data.root / src.target).exists():
        return None  # the tree was deleted since
    if rec.get("path") and not Path(rec["path"]).exists():
        return None  # the hub cache was cleared since
    return rec


def download_path(cfg: RunConfig, src: Source, url: str) -> Path:
    """Where a plain-URL download of ``src`` is kept until it is extracted."""
    name = Path(url.split("?")[0].rstrip("/")).name or src.name
    return paths.download_file(cfg, src.name, name)


def hf_cached(src: Source, filename: str | None = None) -> Path | None:
    """The hub-cache path of the source's file (``config.json`` for snapshots) when cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(
        src.hf_repo, filename or src.hf_file or "config.json", revision=src.revision, repo_type=src.hf_type
    )
    return Path(got) if isinstance(got, str) else None


def ocr_report_path(cfg: RunConfig) -> Path:
    """The OCR-VQA conversion report (dead and missing images), beside ``ocr_vqa/images``."""
    return paths.ocr_vqa_report(cfg)


# --------------------------------------------------------------------------- doing one source
@dataclass
class SourceContext:
    """What every source of one :func:`icmlab.download.stage.run` shares: config, catalog, progress, Ctrl-C event."""

    cfg: RunConfig
    catalog: Catalog
    progress: bool
    cancel: threading.Event

    @property
    def root(self) -> Path:
        return self.cfg.data.root

    @property
    def endpoint(self) -> str | None:
        return self.cfg.download.endpoint


def run_source(ctx: SourceContext, src: Source) -> ItemOutcome:
    """Process one source; failures become an outcome with an actionable message (others go on)."""
    t0 = time.monotonic()
    try:
        moved, record = _process(ctx, src)
    except AuthError as e:
        hint = f" {' '.join(src.gated.split())}" if src.gated else ""
        return ItemOutcome(
            src.name,
            "failed",
            0,
            time.monotonic() - t0,
            redact_text(f"{src.name}: {e}{hint}") + f" If you already have the file, set data.sources.{src.name}: "
            f"/path/to/{Path(src.hf_file or src.url or src.name).name} (or --set "
            f"data.sources.{src.name}=...).",
        )
    except (FetchError, ArchiveError, OSError, ValueError) as e:
        return ItemOutcome(src.name, "failed", 0, time.monotonic() - t0, redact_text(f"{src.name}: {e}"))
    record |= {
        "fingerprint": _fingerprint(src),
        "origin": redact_text(src.origin),
        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(marker_path(ctx.cfg, src.name), redact(record))  # written last: the source is complete
    return ItemOutcome(src.name, "fetched", moved, time.monotonic() - t0)


def _process(ctx: SourceContext, src: Source) -> tuple[int, dict]:
    """Fetch + verify + place one source. Returns (bytes moved, completion record)."""
    prev = read_json_or_none(marker_path(ctx.cfg, src.name))
    overwrite = bool(prev) and prev.get("fingerprint") != _fingerprint(src)  # the source changed: rewrite
    target = ctx.root / src.target if src.target else ctx.root
    loc = local_path(src.location) if src.location else None
    if src.checkpoint:  # demo checkpoints are copied (not linked): training may write next to them
        if loc is None or not loc.exists():
            raise FileNotFoundError(f"{src.name}: demo checkpoint {loc} was not generated")
        # a projector file comes with the files beside it (config.json), as in the real projector repos
        copy_tree(
            loc if loc.is_dir() else loc.parent,
            target if loc.is_dir() else target.parent,
            overwrite=overwrite,
            link=False,
        )
        if loc.is_file() and loc.name != target.name:
            place_file(loc, target, link=False)
        return 0, {"path": str(target), "source": str(loc)}
    if src.kind == "file":
        if src.location or src.url:
            if loc is not None and not loc.is_file():
                raise FileNotFoundError(f"data.sources.{src.name}: {loc} is not a file")
            return _fetch_file(ctx, src, target, loc, ours=overwrite), {"path": str(target)}
        if _users_file(src, target, _fetch_kw(ctx, src), ours=overwrite):
            return 0, {"path": str(target)}
        moved, path = _hf_file(ctx, src)
        place_file(path, target, link=True)
        return moved, {"path": str(target)}
    if src.kind in ("model", "tree") and not src.location:  # hub snapshots
        is_model = src.kind == "model"
        snap = _hf_call(
            ctx,
            src,
            lambda repo, rev: fetch_hf_snapshot(
                repo,
                repo_type=src.hf_type,
                revision=rev,
                endpoint=ctx.endpoint,
                allow_patterns=list(src.allow) or None,
                ignore_patterns=list(ctx.catalog.model_ignore) if is_model else None,
                prefer_safetensors=is_model,
                max_workers=ctx.cfg.download.concurrency,
            ),
        )
        if is_model:
            return 0, {"path": str(snap)}
        copy_tree(snap, target, overwrite=overwrite, link=True)
        return 0, {"counts": {e.path: count_files(ctx.root / e.path) for e in src.expect}}
    if src.kind == "model_file":
        moved, path = _hf_file(ctx, src)
        return moved, {"path": str(path)}
    if loc is not None and loc.is_dir():  # a tree given as a local folder
        copy_tree(loc, target, overwrite=overwrite, link=True)
        return 0, {"counts": {e.path: count_files(ctx.root / e.path) for e in src.expect}}
    archive, moved, ours = _get_archive(ctx, src, loc)
    try:
        counts = _unpack(ctx, src, archive, overwrite)
    except ArchiveError as e:
        if not ours:
            raise
        archive.unlink()  # a bad download of ours must not be "resumed" forever
        raise ArchiveError(f"{e} (the download was removed; the next run fetches it again)") from None
    if ours:
        archive.unlink()  # our verified download is extracted: the completion record stands for it now
    return moved, {"counts": counts, "archive": str(archive)}


def _fetch_file(ctx: SourceContext, src: Source, target: Path, loc: Path | None, *, ours: bool) -> int:
    """A single-file source from a URL or a local file: fetched into the download state, verified, then
    renamed onto ``target``. Returns the bytes moved.

    ``ours``: ``target`` is this source's earlier version (its marker says so); it stays in place until
    the new one is verified, so a failed fetch (a moved URL now answering HTML) keeps it.
    """
    kw = _fetch_kw(ctx, src)
    if loc is not None and target.exists() and loc.resolve() == target.resolve():
        verify_file(target, kw["size"], kw["sha256"], what=f"{src.name} ({target})")
        return 0
    if _users_file(src, target, kw, ours=ours):
        return 0
    staged = download_path(ctx.cfg, src, src.location or src.url)
    moved = fetch_url(src.location or src.url, staged, replace_other=True, **kw).transferred
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)  # the previous version stayed in place until this one verified
    return moved


def _users_file(src: Source, target: Path, kw: dict, *, ours: bool) -> bool:
    """Whether a file the user placed at ``target`` is used as the source's file (it verifies).

    Raises:
        FetchError: it does not verify; it is never replaced, the message says what to do.
    """
    if ours or not target.exists():
        return False
    try:
        verify_file(target, kw["size"], kw["sha256"], what=str(target))
    except ChecksumError as e:
        raise FetchError(
            f"{target} is already there and is not {src.name}'s file ({e}); it was left untouched: move "
            f"it away to download {src.name}, or set data.sources.{src.name}: {target} to use it as it is"
        ) from None
    log.info("%s: using the file already at %s", src.name, target)
    return True


def _hf_call(ctx: SourceContext, src: Source, call):
    """Try the source's hub repository, then its other known names (renamed repos) when not found."""
    err: NotFoundError | None = None
    for i, repo in enumerate((src.hf_repo, *src.alt_repos)):
        try:
            return call(repo, src.revision if i == 0 else None)
        except NotFoundError as e:
            err = err or e
    raise err  # type: ignore[misc]


def _hf_file(ctx: SourceContext, src: Source) -> tuple[int, Path]:
    """One verified hub file in the hub cache: (bytes downloaded, cached path)."""
    cached_before = hf_cached(src) is not None
    r = _hf_call(
        ctx,
        src,
        lambda repo, rev: fetch_hf_file(
            repo,
            src.hf_file,
            repo_type=src.hf_type,
            revision=rev,
            endpoint=ctx.endpoint,
            size=src.size,
            sha256=src.sha256,
            verify=ctx.cfg.download.verify,
        ),
    )
    return (0 if cached_before else r.size), r.path


def _fetch_kw(ctx: SourceContext, src: Source) -> dict:
    return {
        "size": src.size,
        "sha256": src.sha256 if ctx.cfg.download.verify else None,
        "retries": ctx.cfg.download.retries,
        "progress": ctx.progress,
        "what": src.name,
        "cancel": ctx.cancel,
    }


def _get_archive(ctx: SourceContext, src: Source, loc: Path | None) -> tuple[Path, int, bool]:
    """The verified archive: (path, bytes moved, whether it is our download, to delete after extraction)."""
    if loc is not None:  # a local file: checked in place, never copied or modified
        if not loc.is_file():
            raise FileNotFoundError(
                f"data.sources.{src.name}: {loc} is not a file (expected the {src.archive} archive)"
            )
        with open(loc, "rb") as f:
            if looks_like_html(f.read(2048)):
                raise HTMLInsteadOfData(
                    html_message(_canonical_url(src), f"the {src.archive} archive")
                    + f" (the local file {loc} is that page)"
                )
        verify_file(loc, src.size, src.sha256 if ctx.cfg.download.verify else None, what=f"{src.name} ({loc})")
        return loc, 0, False
    if src.location or src.url:
        dest = download_path(ctx.cfg, src, src.location or src.url)
        moved = fetch_url(src.location or src.url, dest, replace_other=True, **_fetch_kw(ctx, src)).transferred
        return dest, moved, True
    moved, path = _hf_file(ctx, src)
    return path, moved, False


def _extract_limits(ctx: SourceContext) -> dict:
    d = ctx.cfg.download
    return {"max_bytes": int(d.max_extract_gb * 1e9), "max_ratio": d.max_extract_ratio}


def _canonical_url(src: Source) -> str:
    if src.url:
        return src.url
    prefix = "datasets/" if src.hf_type == "dataset" else ""
    return f"https://huggingface.co/{prefix}{src.hf_repo}/resolve/{src.revision or 'main'}/{src.hf_file}"


def _unpack(ctx: SourceContext, src: Source, archive: Path, overwrite: bool) -> dict[str, int]:
    """Extract into the target tree (OCR-VQA: via a staging folder and the .jpg conversion)."""
    target = ctx.root / (src.target or ".")
    if src.convert == "ocr_vqa_jpg":
        staging = paths.download_staging(ctx.root, src.name)
        extract_archive(
            archive,
            staging,
            strip_components=src.strip,
            progress=ctx.progress,
            desc=src.name,
            cancel=ctx.cancel,
            **_extract_limits(ctx),
        )
        rep = convert_images_to_jpg(staging, target, move=True, overwrite=overwrite, progress=ctx.progress)
        atomic_write_json(ocr_report_path(ctx.cfg), rep.summary() | {"archive": str(archive)})
        shutil.rmtree(staging)
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # only when no other source is being staged
        return _counts(src, {src.target: rep.jpeg + rep.converted + rep.kept})
    res = extract_archive(
        archive,
        target,
        strip_components=src.strip,
        overwrite=overwrite,
        progress=ctx.progress,
        desc=src.name,
        cancel=ctx.cancel,
        **_extract_limits(ctx),
    )
    if not res.files:
        raise ArchiveError(f"{archive}: the archive holds no files (an empty or zeroed download?)")
    prefix = "" if src.target in (None, ".") else src.target.rstrip("/") + "/"
    return _counts(
        src,
        {e.path: sum(1 for f in res.files if (prefix + f).startswith(e.path.rstrip("/") + "/")) for e in src.expect},
    )


def _counts(src: Source, counts: dict) -> dict[str, int]:
    return {k: v for k, v in counts.items() if any(e.path == k for e in src.expect)}
