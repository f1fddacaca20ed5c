"""Notebook display helpers shared by every stage notebook (thin: formatting only, no logic)."""

from __future__ import annotations

import yaml

from icmlab.config import RunConfig


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
