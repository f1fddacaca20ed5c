"""Display helpers shared by every stage notebook and report (thin: formatting only, no logic)."""

from __future__ import annotations

import html
import io
from pathlib import Path
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


def config_summary(cfg: RunConfig) -> list[tuple[str, str]]:
    """The few settings that say what a run is, as (label, value) rows."""
    t, m, h = cfg.train, cfg.model, cfg.hardware
    where = (
        f"cpu, {h.num_processes} process(es)"
        if h.device == "cpu"
        else f"{h.device}, {h.num_gpus} GPU(s) × {h.num_nodes} node(s), DeepSpeed {h.deepspeed}"
    )
    length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    data = ", ".join(cfg.data.datasets) + (f" + {cfg.data.high_level}" if t.strategy == "mix" else "")
    return [
        ("run", f"{cfg.run_name}  ({_relative(cfg.run_dir)})"),
        ("parameters file", _relative(cfg.source_file) if cfg.source_file else "(none)"),
        ("model", f"{m.family} {m.size}: {_relative(m.base)}"),
        ("data", f"{data}{'  [embedded demo data]' if cfg.demo.enabled else ''}  (root {_relative(cfg.data.root)})"),
        ("training", f"{t.strategy}, {length}, global batch {t.global_batch_size}, lr {t.lr:g}"),
        ("hardware", where),
    ]


def _relative(path: str | Path) -> str:
    """``path`` relative to the project root when inside it (a Lab kernel's cwd is ``notebooks/``)."""
    from icmlab.config import find_project_root

    try:
        return str(Path(path).resolve().relative_to(find_project_root()))
    except ValueError:
        return str(path)


def show_config(cfg: RunConfig) -> None:
    """Show what the run is in a few lines, with the whole resolved config one click away.

    The executed notebook records every value (in the collapsible element), not just the file name.
    Outside IPython the summary and the full YAML are printed.
    """
    rows = config_summary(cfg)
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = None  # type: ignore[assignment]
    if get_ipython is None or get_ipython() is None:
        print("\n".join(f"# {k}: {v}" for k, v in rows))
        print(config_text(cfg))
        return
    table = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    show_html(
        f"<table>{table}</table><details><summary>full resolved config (YAML)</summary>"
        f"<pre>{html.escape(config_text(cfg))}</pre></details>"
    )


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
