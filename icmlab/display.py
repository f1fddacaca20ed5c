"""Display helpers shared by every stage notebook and report (thin: formatting only, no logic)."""

from __future__ import annotations

import html
import io
from typing import Any, Iterable, Sequence

import yaml

from icmlab.config import RunConfig
from icmlab.redact import redact


class HTML(str):
    """An HTML fragment that Jupyter renders (``_repr_html_``) and that is still a plain ``str``."""

    def _repr_html_(self) -> str:
        return str(self)


def table_html(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "", row_classes: Sequence[str] | None = None
) -> HTML:
    """A plain HTML table (cells are escaped; no pandas)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return HTML(f'<table class="scores">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def config_text(cfg: RunConfig) -> str:
    """The resolved config as YAML text, as saved in the run directory."""
    return yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False)


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
    return table_html(header, [[_fmt(r.get(h)) for h in header] for r in rows])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def show_figure(fig: Any) -> None:
    """Display a matplotlib Figure as PNG (Figures built without pyplot have no rich repr under papermill)."""
    from IPython.display import Image, display

    display(Image(figure_png(fig)))
