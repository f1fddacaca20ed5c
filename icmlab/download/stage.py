"""The download stage: fetch, verify and lay out every source a recipe needs, restartably.

Entry points (CLI ``icmlab download parameters/X.yaml [--dry-run]``, notebook ``01_download``)::

    from icmlab.download.stage import plan, run, format_plan, plan_html, layout_html
    print(format_plan(plan(cfg)))        # dry run: what, from where, how big, to where, why
    result = run(cfg)                    # fetch + verify + extract + layout check
    print(result.summary())

Which sources: :func:`icmlab.download.catalog.needed_sources` (from the recipe). How (one source:
:mod:`icmlab.download.source`): Hugging Face sources through ``huggingface_hub`` (its cache,
:mod:`icmlab.download.hub`), other URLs through :func:`icmlab.download.fetch.fetch_url` (resumable, verified,
atomic), archives through :func:`icmlab.download.extract.extract_archive` (safe, resumable) into the exact
trees of the upstream READMEs; OCR-VQA images become real ``.jpg``. State lives under
``<data root>/.icmlab/``: a ``done/<source>.json`` marker is written last, and a source with a
valid marker is never fetched again (a second run does no network work). The demo
(``demo.enabled``) first generates its local mirror in ``demo.source_dir`` and then goes through
exactly the same path via ``file://`` locations. The tables (:func:`format_plan`,
:func:`plan_html`, :func:`format_layout`, :func:`layout_html`) come from
:mod:`icmlab.download.tables` and are importable from here.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.download.catalog import LayoutRow, LocalModel, Need, count_files, load_catalog, needed_sources
from icmlab.download.catalog import check_layout as _check_layout
from icmlab.download.extract import missing_references
from icmlab.download.fetch import local_path
from icmlab.download.source import (
    STATE,
    ItemOutcome,
    SourceContext,
    done_record,
    download_path,
    hf_cached,
    marker_path,
    ocr_report_path,
    read_json_or_none,
    run_source,
)
from icmlab.download.tables import (  # noqa: F401  (format_plan, plan_html: re-exported for notebooks and the CLI)
    fmt_size,
    format_layout,
    format_plan,
    html_table,
    layout_html,
    plan_html,
    text_table,
)
from icmlab.io import atomic_write_json
from icmlab.redact import redact_text

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """Some sources failed (each message is listed); ``result`` holds what was done and the layout."""

    def __init__(self, message: str, result: "DownloadResult"):
        super().__init__(message)
        self.result = result


class InsufficientDiskSpace(OSError):
    """The remaining downloads and extractions do not fit; raised before anything starts."""


@dataclass
class PlannedItem:
    """One line of the dry run.

    Attributes:
        name, title, kind: the catalog entry.
        origin: where it comes from (URL, ``hf://``, local file).
        size: bytes (exact or approximate, see ``exact``); None when unknown.
        target: where it lands (relative to the data root, or ``HF cache``).
        status: ``done``, ``to fetch``, ``partial …``, ``in HF cache``, ``local file``, ...
        reasons: the config keys that ask for it.
        todo_bytes / extract_bytes: what the disk check counts (download still to do / unpacking).
        to_cache: the download goes to the Hugging Face cache (else under the data root).
    """

    name: str
    title: str
    kind: str
    origin: str
    size: int | None
    exact: bool
    target: str
    status: str
    reasons: list[str]
    gated: bool = False
    todo_bytes: int = 0
    extract_bytes: int = 0
    to_cache: bool = False


@dataclass
class DownloadResult:
    """Result of :func:`run`: per-source outcomes, the layout table, and the OCR-VQA report."""

    data_root: Path
    outcomes: list[ItemOutcome]
    layout: list[LayoutRow]
    seconds: float
    ocr_vqa: dict | None = None

    @property
    def transferred(self) -> int:
        """Bytes moved by this run (network or local copies)."""
        return sum(o.transferred for o in self.outcomes)

    @property
    def ok(self) -> bool:
        """No source failed and every layout row is present."""
        return all(o.action != "failed" for o in self.outcomes) and all(r.ok for r in self.layout)

    def summary(self) -> str:
        """Terminal report: outcomes, layout table, totals."""
        lines = [f"data root: {self.data_root}", ""]
        lines += text_table(
            ["source", "action", "moved", "time", "message"],
            [
                [
                    o.name,
                    o.action,
                    fmt_size(o.transferred),
                    f"{o.seconds:.1f}s",
                    o.message.splitlines()[0] if o.message else "",
                ]
                for o in self.outcomes
            ],
        )
        lines += [
            "",
            format_layout(self.layout),
            "",
            f"{len(self.outcomes)} sources, {fmt_size(self.transferred)} moved in {self.seconds:.1f}s; "
            f"layout {'complete' if all(r.ok for r in self.layout) else 'INCOMPLETE'}",
        ]
        if not all(r.ok for r in self.layout):
            lines.append(f"to redo a source, delete {self.data_root / STATE / 'done'}/<source>.json and run again")
        if self.ocr_vqa:
            lines.append(
                f"OCR-VQA: {self.ocr_vqa.get('dead', 0)} undecodable, "
                f"{len(self.ocr_vqa.get('missing_referenced', []))} referenced but missing "
                f"(see {self.ocr_vqa.get('report')})"
            )
        return "\n".join(lines)

    def html(self) -> str:
        """Notebook report: outcomes and layout tables."""
        rows = [[o.name, o.action, fmt_size(o.transferred), f"{o.seconds:.1f}s", o.message] for o in self.outcomes]
        return html_table(["source", "action", "moved", "time", "message"], rows) + layout_html(self.layout)


# --------------------------------------------------------------------------- entry points
def plan(cfg: RunConfig) -> list[PlannedItem]:
    """The dry run: every source the recipe needs, its size, target and state; nothing is fetched.

    Args:
        cfg: the run config.

    Returns:
        One :class:`PlannedItem` per source (then one per local model path), in catalog order.

    Raises:
        ValueError: ``data.sources`` names an unknown or model source (see :func:`needed_sources`).
    """
    catalog = load_catalog(demo=cfg.demo.enabled)
    needs, locals_ = needed_sources(cfg, catalog)
    if cfg.demo.enabled:
        _demo_locations(cfg, needs, build=False)
    items = [_plan_item(cfg, n) for n in needs]
    for lm in locals_:
        items.append(
            PlannedItem(
                lm.key,
                "local checkpoint",
                "model",
                str(lm.path),
                None,
                False,
                str(lm.path),
                "local" if lm.path.exists() else "MISSING",
                [lm.key],
            )
        )
    return items


def run(cfg: RunConfig, *, progress: bool = True) -> DownloadResult:
    """Fetch, verify and lay out every source the recipe needs; then check the layout.

    Args:
        cfg: the run config (``data.root``, ``data.sources``, ``download.*``, ``demo.*``).
        progress: tqdm progress bars.

    Returns:
        A :class:`DownloadResult` (outcomes, layout table, OCR-VQA report).

    Raises:
        InsufficientDiskSpace: before starting, when the remaining work does not fit.
        DownloadError: after trying every source, when some failed (messages say what to do: log in,
            request access, fix the URL, point ``data.sources`` at a local copy); ``.result`` is set.
        ValueError: bad ``data.sources`` entries.
    """
    t0 = time.monotonic()
    root = cfg.data.root
    catalog = load_catalog(demo=cfg.demo.enabled)
    needs, locals_ = needed_sources(cfg, catalog)
    if cfg.demo.enabled:  # generate the demo mirror only when something is left to fetch from it
        _demo_locations(cfg, needs, build=False)
        if not all(done_record(cfg, n.source) for n in needs if n.source.artifact or n.source.checkpoint):
            needs, locals_ = needed_sources(cfg, catalog)
            _demo_locations(cfg, needs, build=True)
    items = {it.name: it for it in (_plan_item(cfg, n) for n in needs)}
    preflight_disk(cfg, list(items.values()))
    todo = [n.source for n in needs if items[n.source.name].status != "done"]
    outcomes = [ItemOutcome(n.source.name, "already done") for n in needs if items[n.source.name].status == "done"]
    paths.download_state_dir(cfg).mkdir(parents=True, exist_ok=True)
    ctx = SourceContext(cfg, catalog, progress, threading.Event())
    try:  # one download step per data root at a time (a notebook and a CLI run would race)
        lock = FileLock(str(paths.download_lock(cfg))).acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"another download step is running on {root} (lock {paths.download_lock(cfg)})") from None
    with lock, tqdm(total=len(todo), desc="sources", unit="src", disable=not progress or not todo) as bar:
        pool = ThreadPoolExecutor(max_workers=cfg.download.concurrency)
        try:
            for fut in as_completed([pool.submit(run_source, ctx, src) for src in todo]):
                outcome = fut.result()
                log.info(
                    "%s: %s (%s, %.1fs)%s",
                    outcome.name,
                    outcome.action,
                    fmt_size(outcome.transferred),
                    outcome.seconds,
                    f": {outcome.message}" if outcome.message else "",
                )
                outcomes.append(outcome)
                bar.update(1)
        except KeyboardInterrupt:
            ctx.cancel.set()  # running transfers stop at their next chunk; partial files resume next time
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    order = {n.source.name: i for i, n in enumerate(needs)}
    outcomes.sort(key=lambda o: order.get(o.name, 0))
    ocr = _ocr_vqa_report(cfg, needs)
    result = DownloadResult(root, outcomes, check_layout(cfg, needs, locals_), time.monotonic() - t0, ocr)
    failed = [o for o in outcomes if o.action == "failed"]
    if failed:
        raise DownloadError(
            f"{len(failed)} of {len(outcomes)} sources failed:\n" + "\n".join(f"- {o.message}" for o in failed), result
        )
    return result


def preflight_disk(cfg: RunConfig, items: list[PlannedItem]) -> None:
    """Check that the remaining downloads and extractions fit, per filesystem, with ``download.min_free_gb`` spare.

    Raises:
        InsufficientDiskSpace: naming each short filesystem, what it needs and the largest items.
    """
    from huggingface_hub import constants

    need: dict[int, list] = {}
    for it in items:
        for where, nbytes in (
            (Path(constants.HF_HUB_CACHE) if it.to_cache else cfg.data.root, it.todo_bytes),
            (cfg.data.root, it.extract_bytes),
        ):
            if nbytes:
                anchor = _existing_ancestor(where)
                entry = need.setdefault(os.stat(anchor).st_dev, [anchor, 0, []])
                entry[1] += nbytes
                entry[2].append((nbytes, it.name))
    spare = int(cfg.download.min_free_gb * 1e9)
    problems = []
    for anchor, nbytes, parts in need.values():
        free = shutil.disk_usage(anchor).free
        if free - nbytes < spare:
            big = ", ".join(f"{n} {fmt_size(b)}" for b, n in sorted(parts, reverse=True)[:4])
            problems.append(
                f"{anchor}: needs {fmt_size(nbytes)} + {fmt_size(spare)} spare, {fmt_size(free)} free (largest: {big})"
            )
    unknown = [it.name for it in items if it.status != "done" and it.size is None]
    if problems:
        raise InsufficientDiskSpace(
            "not enough disk space for the download step:\n  "
            + "\n  ".join(problems)
            + ("\n  (not counted, size unknown: " + ", ".join(unknown) + ")" if unknown else "")
            + "\nFree space, set data.root (data) or HF_HOME (hub cache) to a larger disk, or lower "
            "download.min_free_gb."
        )


# --------------------------------------------------------------------------- planning
def _existing_ancestor(p: Path) -> Path:
    p = Path(p).resolve()
    while not p.exists():
        p = p.parent
    return p


def _plan_item(cfg: RunConfig, need: Need) -> PlannedItem:
    src = need.source
    size = src.display_size
    unpack = src.kind in ("archive", "tree") or (src.kind == "file" and not src.location)
    extract = (size or 0) * (2 if src.convert else 1) if unpack else 0
    target = {None: "HF cache", ".": "(data root)"}.get(src.target, src.target)
    item = PlannedItem(
        src.name,
        src.title,
        src.kind,
        redact_text(src.origin),  # plan tables and the dry run never show a signature or credentials
        size,
        src.size is not None,
        target,
        "to fetch",
        list(need.reasons),
        bool(src.gated),
        size or 0,
        extract,
        bool(src.hf_repo) and not src.location,
    )
    if done_record(cfg, src):
        item.status, item.todo_bytes, item.extract_bytes = "done", 0, 0
    elif src.location:
        lp = local_path(src.location)
        item.todo_bytes = 0 if lp else item.todo_bytes
        if lp is not None:
            item.status = ("local " + ("folder" if lp.is_dir() else "file")) if lp.exists() else f"MISSING: {lp}"
    elif src.artifact or src.checkpoint:
        item.status, item.todo_bytes = "generated on first run", 0
    elif src.url:
        dest = download_path(cfg, src, src.url)
        part = dest.with_name(dest.name + ".part")
        if dest.exists():
            item.status, item.todo_bytes = "downloaded, to extract", 0
        elif part.exists():
            have = part.stat().st_size
            item.status, item.todo_bytes = f"partial: {fmt_size(have)}", max(0, (size or 0) - have)
    elif src.hf_repo:
        cached = hf_cached(src)
        if cached is not None and src.kind != "model":
            item.status, item.todo_bytes = "in HF cache", 0
        elif cached is not None:
            have = sum(p.stat().st_size for p in cached.parent.rglob("*") if p.is_file())
            item.status, item.todo_bytes = "partly in HF cache", max(0, (size or 0) - have)
    return item


# --------------------------------------------------------------------------- demo, OCR-VQA, layout
def _demo_locations(cfg: RunConfig, needs: list[Need], *, build: bool) -> None:
    """Point demo sources at the generated local mirror (``file://``, size and sha256 from its manifest).

    With ``build`` the mirror and the tiny checkpoints are generated first (idempotent: reused when
    their manifests match). Without it (dry run, or checking whether anything is left to do) an
    existing mirror of the same demo version, seed and scale is used, and checkpoints keep the
    location recorded when they were placed.
    """
    from icmlab.demo import DEMO_VERSION, build_demo_sources

    src_dir = cfg.demo.source_dir
    ckpts: dict[str, Path] = {}
    if build:
        build_demo_sources(src_dir, seed=cfg.demo.seed, scale=cfg.demo.scale)
        if any(n.source.checkpoint for n in needs):
            from icmlab.demo import build_tiny_checkpoints  # imports torch: only when checkpoints are needed

            ckpts = build_tiny_checkpoints(src_dir / "checkpoints", seed=cfg.demo.seed)
    manifest = read_json_or_none(src_dir / "demo_manifest.json") or {}
    same = (manifest.get("demo_version"), manifest.get("seed"), manifest.get("scale"))
    arts = manifest.get("artifacts", {}) if same == (DEMO_VERSION, cfg.demo.seed, cfg.demo.scale) else {}
    ck_manifest = read_json_or_none(src_dir / "checkpoints" / "checkpoints_manifest.json") or {}
    ck_same = (ck_manifest.get("demo_version"), ck_manifest.get("seed")) == (DEMO_VERSION, cfg.demo.seed)
    for need in needs:
        s = need.source
        if s.artifact and not s.location and s.artifact in arts:
            entry = arts[s.artifact]
            need.source = replace(
                s, location=(src_dir / entry["path"]).as_uri(), size=entry["size"], sha256=entry["sha256"]
            )
        elif s.checkpoint and s.checkpoint in ckpts:
            need.source = replace(s, location=str(ckpts[s.checkpoint]))
        elif s.checkpoint and ck_same:
            placed = (read_json_or_none(marker_path(cfg, s.name)) or {}).get("source")
            if placed and Path(placed).exists():
                need.source = replace(s, location=placed)


def _ocr_vqa_report(cfg: RunConfig, needs: list[Need]) -> dict | None:
    """Add to the OCR-VQA report the images the mix JSON names that are not on disk (listed, not fatal)."""
    path, mix = ocr_report_path(cfg), cfg.data.root / "llava_v1_5_mix665k.json"
    rep = read_json_or_none(path)
    if rep is None or not any(n.source.name == "ocr_vqa_images" for n in needs):
        return None
    if mix.is_file():
        stamp = [mix.stat().st_size, mix.stat().st_mtime_ns, count_files(cfg.data.root / "ocr_vqa" / "images")]
        if rep.get("missing_checked") != stamp:  # the scan is redone only when something changed
            rep["referenced"], rep["missing_referenced"] = missing_references(mix, cfg.data.root, "ocr_vqa/")
            rep["missing_checked"] = stamp
            atomic_write_json(path, rep)
    return rep | {"report": str(path)}


def check_layout(
    cfg: RunConfig, needs: list[Need] | None = None, locals_: list[LocalModel] | None = None
) -> list[LayoutRow]:
    """The layout table of the recipe: every expected folder/file/checkpoint, present or missing, with counts.

    Args:
        cfg: the run config.
        needs, locals_: from :func:`icmlab.download.catalog.needed_sources` (computed when omitted).

    Returns:
        The :class:`LayoutRow` list (see :func:`format_layout` / :func:`layout_html`).
    """
    if needs is None:
        needs, locals_ = needed_sources(cfg, load_catalog(demo=cfg.demo.enabled))
    records = {n.source.name: read_json_or_none(marker_path(cfg, n.source.name)) or {} for n in needs}
    notes = {}
    ocr = read_json_or_none(ocr_report_path(cfg))
    if ocr:
        notes["ocr_vqa_images"] = (
            f"{ocr.get('converted', 0)} re-encoded to JPEG, {ocr.get('dead', 0)} undecodable, "
            f"{len(ocr.get('missing_referenced', []))} referenced but missing "
            f"(ocr_vqa/ocr_vqa_report.json)"
        )
    custom = [Path(p) if Path(p).is_absolute() else cfg.data.root / p for p in cfg.data.custom_json]
    return _check_layout(cfg.data.root, needs, locals_ or [], records, notes, custom)
