"""Notebook display helpers shared by every stage notebook (thin: formatting only, no logic)."""

from __future__ import annotations

from typing import Any

import yaml

from icmlab.config import RunConfig
from icmlab.report import html_table as _table


def config_text(cfg: RunConfig) -> str:
    """The resolved config as YAML text, as saved in the run directory."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def show_config(cfg: RunConfig) -> None:
    """Print the resolved config so the executed notebook records the values, not just the file name."""
    print(f"# run directory: {cfg.run_dir}\n# parameters file: {cfg.source_file}")
    print(config_text(cfg))


def show_html(markup: str) -> None:
    """Display HTML in a notebook (falls back to printing outside IPython)."""
    try:
        from IPython.display import HTML, display

        display(HTML(markup))
    except ImportError:
        print(markup)


def html_table(rows: list[dict]) -> str:
    """An HTML table from dict rows (keys of the first row = columns); empty rows give a note."""
    if not rows:
        return "<p><i>(none)</i></p>"
    header = list(rows[0])
    return _table(header, [[_fmt(r.get(h)) for h in header] for r in rows])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def show_figure(fig: Any) -> None:
    """Display a matplotlib Figure as PNG (Figures built without pyplot have no rich repr under papermill)."""
    from IPython.display import Image, display

    from icmlab.report import figure_png

    display(Image(figure_png(fig)))
