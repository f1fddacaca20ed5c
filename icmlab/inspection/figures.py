"""Static figures of the inspect stage: source mix, turns, token lengths, image sizes, samples.

Each function takes the :class:`icmlab.inspection.stage.InspectResult` of :func:`icmlab.inspection.stage.run`
and returns a matplotlib :class:`~matplotlib.figure.Figure` built without pyplot (an Agg canvas,
so it works headless and in any kernel); :class:`InspectFigure` shows itself as PNG in Jupyter
and papermill outputs; ``run`` saves them as PNG under ``<run_dir>/inspect/``.

Usage::

    from icmlab.inspection.figures import token_length_figure
    token_length_figure(result).savefig("lengths.png")

The names are also importable from :mod:`icmlab.inspection.stage`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from icmlab.display import figure_png
from icmlab.models.spec import DIALECTS

if TYPE_CHECKING:  # the result type only annotates here; inspection imports this module
    from icmlab.inspection.stage import InspectResult


#: Resolution of the inspect figures, on screen and in the saved PNGs.
FIGURE_DPI = 100


def _without_image_tokens(text: str) -> str:
    for token in DIALECTS.values():
        text = text.replace(token, "")
    return text


class InspectFigure(Figure):
    """A matplotlib Figure that renders itself as PNG in Jupyter and papermill outputs.

    Figures built without pyplot get no display formatter unless the kernel's inline backend was
    activated (by a pyplot import); ``_repr_png_`` makes them show as images regardless.
    """

    def _repr_png_(self) -> bytes:
        return figure_png(self, dpi=FIGURE_DPI)


def _figure(w: float, h: float) -> Figure:
    fig = InspectFigure(figsize=(w, h), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas whatever the session's backend
    return fig


def source_mix_figure(res: InspectResult) -> Figure:
    """Records per dataset (exact) and the category mix of each (sampled)."""
    fig = _figure(11, 0.6 * len(res.datasets) + 2)
    ax1, ax2 = fig.subplots(1, 2)
    names = list(res.datasets)
    total = max(1, sum(res.datasets.values()))
    ax1.barh(names, [res.datasets[k] for k in names], color="tab:blue")
    for y, k in enumerate(names):
        ax1.text(res.datasets[k], y, f" {res.datasets[k]:,} ({100 * res.datasets[k] / total:.1f}%)", va="center")
    ax1.set_xlim(0, 1.4 * max(res.datasets.values(), default=1))
    ax1.set_title(f"records per dataset (total {total:,})")
    ax1.invert_yaxis()
    cats = sorted({c for v in res.categories.values() for c in v})
    left = np.zeros(len(names))
    for c in cats:
        frac = np.array(
            [res.categories.get(k, {}).get(c, 0) / max(1, sum(res.categories.get(k, {}).values())) for k in names]
        )
        ax2.barh(names, frac, left=left, label=c)
        left += frac
    ax2.set_xlim(0, 1)
    ax2.invert_yaxis()
    ax2.set_title("category mix (sampled)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _label_histogram(ax, xlabel: str, title: str) -> None:
    """Labels, title and legend of a per-dataset histogram of sampled records."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sampled records")
    ax.set_title(title)
    ax.legend(fontsize=8)


def turns_figure(res: InspectResult) -> Figure:
    """Histogram of rounds (question/answer pairs) per record, per dataset."""
    fig = _figure(8, 3.5)
    ax = fig.subplots()
    top = max([int(v.max()) for v in res.turns.values() if len(v)] + [1])
    bins = np.arange(0.5, top + 1.5)
    for name, v in res.turns.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} (mean {v.mean():.2f})")
    _label_histogram(ax, "rounds per record", "turns per record")
    return fig


def token_length_figure(res: InspectResult) -> Figure:
    """Untruncated token counts (image tokens included) per dataset against ``model_max_length``."""
    fig = _figure(8, 3.5)
    ax = fig.subplots()
    data = {k: v for k, v in res.token_lengths.items() if len(v)}
    if not data:
        ax.text(0.5, 0.5, f"token lengths {res.length_status}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return fig
    top = max(max(int(v.max()) for v in data.values()), res.model_max_length) * 1.05
    bins = np.linspace(0, top, 60)
    for name, v in data.items():
        over = int((v > res.model_max_length).sum())
        ax.hist(v, bins=bins, alpha=0.6, label=f"{name}: {over} of {len(v)} over")
    ax.axvline(res.model_max_length, color="red", ls="--", label=f"model_max_length {res.model_max_length}")
    _label_histogram(ax, "tokens (trainer's template, image tokens expanded)", "sequence length")
    return fig


def image_size_figure(res: InspectResult) -> Figure:
    """Width against height of sampled images, per dataset."""
    fig = _figure(6, 5)
    ax = fig.subplots()
    for name, wh in res.image_sizes.items():
        if len(wh):
            ax.scatter(wh[:, 0], wh[:, 1], s=8, alpha=0.5, label=f"{name} ({len(wh)})")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("image sizes (sampled)")
    if any(len(v) for v in res.image_sizes.values()):
        ax.legend(fontsize=8)
    return fig


def samples_figure(res: InspectResult, root: Path, *, per_dataset: int = 4, seed: int = 0) -> Figure:
    """A grid of random image records per dataset: the image, the first question and answer."""
    rng = random.Random(seed)
    rows = []
    for name in res.datasets:
        pool = [
            s
            for s in res.samples
            if s.dataset == name
            and not s.problems
            and isinstance(s.record, dict)
            and isinstance(s.record.get("image"), str)
        ]
        rows.append((name, rng.sample(pool, min(per_dataset, len(pool)))))
    fig = _figure(3.2 * per_dataset, 3.4 * max(1, len(rows)))
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), per_dataset, squeeze=False))
    for r, (name, picked) in enumerate(rows):
        for c in range(per_dataset):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(picked):
                continue
            s = picked[c]
            try:
                ax.imshow(Image.open(root / s.record["image"]).convert("RGB"))
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "unreadable", ha="center")
            conv = s.record["conversations"]
            q = _without_image_tokens(conv[0]["value"]).strip().split("\n")[0]
            a = conv[1]["value"] if len(conv) > 1 else ""
            ax.set_title(f"{name}\nQ: {q[:38]}\nA: {a[:38]}", fontsize=7, loc="left")
    return fig
