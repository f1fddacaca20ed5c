"""The download stage: fetch, verify and lay out every source a recipe needs, restartably.

Entry points (CLI ``icmlab download parameters/X.yaml [--dry-run]``, notebook ``01_download``)::

    from icmlab.download import plan, run, format_plan, plan_html, layout_html
    print(format_plan(plan(cfg)))        # dry run: what, from where, how big, to where, why
    result = run(cfg)                    # fetch + verify + extract + layout check
    print(result.summary())

Which sources: :func:`icmlab.catalog.needed_sources` (from the recipe). How: Hugging Face sources
through ``huggingface_hub`` (its cache), other URLs through :func:`icmlab.fetch.fetch_url`
(resumable, verified, atomic), archives through :func:`icmlab.extract.extract_archive` (safe,
resumable) into the exact trees of the upstream READMEs; OCR-VQA images become real ``.jpg``.
State lives under ``<data root>/.icmlab/``: a ``done/<source>.json`` marker is written last, and a
source with a valid marker is never fetched again (a second run does no network work). The demo
(``demo.enabled``) first generates its local mirror in ``demo.source_dir`` and then goes through
exactly the same path via ``file://`` locations.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm


from icmlab.catalog import DATA_KINDS, Catalog, Expect, LocalModel, Need, Source, load_catalog, needed_sources
from icmlab.config import RunConfig
from icmlab.extract import ArchiveError, convert_images_to_jpg, extract_archive
from icmlab.fetch import (AuthError, FetchError, HTMLInsteadOfData, NotFoundError, fetch_hf_file, fetch_hf_snapshot,
                          fetch_url, html_message, local_path, looks_like_html, verify_file)
from icmlab.io import atomic_write_json, read_json

log = logging.getLogger(__name__)
STATE = ".icmlab"
"""State folder under the data root: ``done/`` markers, ``downloads/`` (plain URLs), ``staging/``."""


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
class LayoutRow:
    """One expected folder/file/checkpoint and what is on disk."""

    source: str
    path: str
    status: str
    found: int | None = None
    expected: int | None = None
    approx: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        """Present (and not short of files when the expected count is exact)."""
        return self.status == "ok"


@dataclass
class ItemOutcome:
    """What happened to one source in :func:`run`."""

    name: str
    action: str
    transferred: int = 0
    seconds: float = 0.0
    message: str = ""


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
        lines += _table(["source", "action", "moved", "time", "message"],
                        [[o.name, o.action, fmt_size(o.transferred), f"{o.seconds:.1f}s", o.message.splitlines()[0]
                          if o.message else ""] for o in self.outcomes])
        lines += ["", format_layout(self.layout), "",
                  f"{len(self.outcomes)} sources, {fmt_size(self.transferred)} moved in {self.seconds:.1f}s; "
                  f"layout {'complete' if all(r.ok for r in self.layout) else 'INCOMPLETE'}"]
        if self.ocr_vqa:
            lines.append(f"OCR-VQA: {self.ocr_vqa.get('dead', 0)} undecodable, "
                         f"{len(self.ocr_vqa.get('missing_referenced', []))} referenced but missing "
                         f"(see {self.ocr_vqa.get('report')})")
        return "\n".join(lines)

    def html(self) -> str:
        """Notebook report: outcomes and layout tables."""
        rows = [[o.name, o.action, fmt_size(o.transferred), f"{o.seconds:.1f}s", o.message] for o in self.outcomes]
        return _html_table(["source", "action", "moved", "time", "message"], rows) + layout_html(self.layout)
