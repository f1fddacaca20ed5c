"""Download stage: fetch, verify and lay out every source a recipe needs (``icmlab download P``).

Modules: :mod:`~icmlab.download.stage` (plan and run), :mod:`~icmlab.download.source` (one source),
:mod:`~icmlab.download.tables` (plan and layout tables), :mod:`~icmlab.download.catalog` (the source
catalog, ``catalog.yaml``), :mod:`~icmlab.download.fetch` (resumable HTTP),
:mod:`~icmlab.download.hub` (Hugging Face) and :mod:`~icmlab.download.extract` (safe archives).

Usage (notebook ``01_download``)::

    from icmlab import download
    print(download.format_plan(download.plan(cfg)))
    result = download.run(cfg)
"""

from icmlab.download.stage import DownloadError, DownloadResult, PlannedItem, check_layout, plan, run
from icmlab.download.tables import format_layout, format_plan, layout_html, plan_html

__all__ = [
    "DownloadError",
    "DownloadResult",
    "PlannedItem",
    "check_layout",
    "format_layout",
    "format_plan",
    "layout_html",
    "plan",
    "plan_html",
    "run",
]
