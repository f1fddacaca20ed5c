"""Tables of the download stage: the dry-run plan and the layout check, as text and as HTML.

Pure formatting, no I/O: the terminal gets aligned plain-text tables (:func:`format_plan`,
:func:`format_layout`), the notebook HTML tables whose status column is coloured
(:func:`plan_html`, :func:`layout_html`). :func:`fmt_size`, :func:`text_table` and
:func:`html_table` are the shared building blocks (also used by
:meth:`icmlab.download.stage.DownloadResult.summary` and ``.html``).

Usage (the names are re-exported by :mod:`icmlab.download.stage`, where notebooks and the CLI take them)::

    from icmlab.download.stage import check_layout, format_layout, format_plan, plan, plan_html
    print(format_plan(plan(cfg)))              # dry run, terminal
    show_html(plan_html(plan(cfg)))            # dry run, notebook
    print(format_layout(check_layout(cfg)))
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only (icmlab.download.stage imports this module)
    from icmlab.download.catalog import LayoutRow
    from icmlab.download.stage import PlannedItem


def fmt_size(n: float | None, exact: bool = True) -> str:
    """Human size: ``1.2 GB``; ``≈`` prefix when approximate; ``?`` when unknown."""
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            text = f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            return text if exact else "≈" + text
        n /= 1000
    return "?"


def text_table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned plain-text table lines (cells cut at 60 characters)."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [min(60, max(len(r[i]) for r in cells)) for i in range(len(header))]
    out = [
        "  ".join((c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def html_table(header: list[str], rows: list[list], status_col: int | None = None) -> str:
    """An HTML table; the status column is green for ok/done and red otherwise."""

    def cell(i: int, c: Any) -> str:
        text = html.escape("" if c is None else str(c))
        if i != status_col:
            return f"<td>{text}</td>"
        colour = "#1a7f37" if text in ("ok", "done", "fetched", "already done") else "#b42318"
        return f'<td style="color:{colour};font-weight:600">{text}</td>'

    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _layout_rows(rows: list[LayoutRow]) -> list[list]:
    def expected(r: LayoutRow) -> str:
        return "" if r.expected is None else ("≈" if r.approx else "") + str(r.expected)

    return [[r.source, r.path, r.status, r.found, expected(r), r.note] for r in rows]


def format_layout(rows: list[LayoutRow]) -> str:
    """The layout table for the terminal."""
    return "\n".join(text_table(["source", "path", "status", "files", "expected", "note"], _layout_rows(rows)))


def layout_html(rows: list[LayoutRow]) -> str:
    """The layout table as HTML (notebook)."""
    return html_table(["source", "path", "status", "files", "expected", "note"], _layout_rows(rows), status_col=2)


def _plan_rows(items: list[PlannedItem]) -> tuple[list[str], list[list]]:
    header = ["source", "what", "from", "size", "to", "status", "why"]
    rows = [
        [
            it.name,
            it.title,
            it.origin,
            fmt_size(it.size, it.exact),
            it.target,
            it.status + (" (gated)" if it.gated and it.status != "done" else ""),
            "; ".join(it.reasons),
        ]
        for it in items
    ]
    return header, rows


def _totals(items: list[PlannedItem]) -> str:
    todo = [it for it in items if it.status not in ("done", "local", "MISSING")]
    unknown = [it.name for it in todo if it.size is None]
    return f"{len(items)} sources, {len(todo)} to do, ≈{fmt_size(sum(it.size or 0 for it in todo))} to fetch" + (
        f" (+ unknown size: {', '.join(unknown)})" if unknown else ""
    )


def format_plan(items: list[PlannedItem]) -> str:
    """The dry-run table for the terminal."""
    header, rows = _plan_rows(items)
    return "\n".join(text_table(header, rows) + ["", _totals(items)])


def plan_html(items: list[PlannedItem]) -> str:
    """The dry-run table as HTML (notebook)."""
    header, rows = _plan_rows(items)
    return html_table(header, rows, status_col=5) + f"<p>{_totals(items)}</p>"
