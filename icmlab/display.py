"""Notebook display helpers shared by every stage notebook (thin: formatting only, no logic)."""

from __future__ import annotations

import html
from typing import Any, Sequence

import yaml

from icmlab.config import RunConfig


def config_text(cfg: RunConfig) -> str:
    """The resolved config as YAML text, as saved in the run directory."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def show_config(cfg: RunConfig) -> None:
    """Print the resolved config so the executed notebook records the values, not just the file name."""
    print(f"# run directory: {cfg.run_dir}\n# parameters file: {cfg.source_file}")
    print(config_text(cfg))


def html_table(rows: Sequence[dict[str, Any]] | Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """A small HTML table from dict rows (keys = columns) or sequences plus a header."""
    if rows and isinstance(rows[0], dict):
        header = list(header or rows[0].keys())
        body = [[r.get(h, "") for h in header] for r in rows]  # type: ignore[union-attr]
    else:
        body = [list(r) for r in rows]
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in (header or []))
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def show_html(markup: str) -> None:
    """Display HTML in a notebook (falls back to printing outside IPython)."""
    try:
        from IPython.display import HTML, display

        display(HTML(markup))
    except ImportError:
        print(markup)
