"""Evaluation report: baseline vs fine-tuned tables, charts, confusion matrices, controls, gallery.

``build_report(out_dir, evaluations, gallery_items)`` writes one self-contained ``report.html``
(figures and image thumbnails embedded as base64, no external files needed to view it) plus the
same figures as PNG files and ``scores.json``::

    from icmlab.evaluate.report import build_report, gallery_from_records
    evaluations = {"baseline": base_result, "fine-tuned": ft_result}   # icmlab.evaluate.scoring.EvaluationResult
    gallery = gallery_from_records(items, images, evaluations, task="qbench", n=12)
    build_report(cfg.run_dir / "eval", evaluations, gallery)

The first label is the reference: tables add a "Δ vs <first>" row for every other model. Each
model's controls (``EvaluationResult.controls``: "blank", "shuffled") appear beside it as extra
rows/bars, so the report shows at a glance whether a gain needs the pixels.

For notebooks, every piece is also a function: ``qbench_table_html``/``moderation_table_html``/
``gallery_html`` return an ``HTML`` string that Jupyter renders, and ``qbench_bar_figure``/
``controls_figure``/``confusion_figure`` return matplotlib Figures drawn on the Agg canvas (no
pyplot state, no GUI backend needed).
"""

from __future__ import annotations

import base64
import html
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from icmlab.display import HTML, figure_png
from icmlab.display import table_html as html_table
from icmlab.evaluate.scoring import QBENCH_COLUMN_NAMES, QBENCH_COLUMNS, EvaluationResult, qbench_prompt
from icmlab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

Metric = Literal["strict", "substring"]


# --------------------------------------------------------------------------- inputs
def _normalize(evaluations: Mapping[str, EvaluationResult | dict]) -> dict[str, EvaluationResult]:
    if not evaluations:
        raise ValueError("build_report: no evaluations given; pass {label: EvaluationResult}")
    out = {}
    for label, res in evaluations.items():
        if isinstance(res, dict):
            res = EvaluationResult.from_dict(res)
        if not isinstance(res, EvaluationResult):
            raise ValueError(f"evaluation {label!r}: expected EvaluationResult or its dict, got {type(res).__name__}")
        out[str(label)] = res
    return out


def _rows(evals: dict[str, EvaluationResult]) -> list[tuple[str, EvaluationResult, bool]]:
    """(row label, result, is_control): each model followed by its controls."""
    rows = []
    for label, res in evals.items():
        rows.append((label, res, False))
        rows.extend((f"{label} · {name}", ctl, True) for name, ctl in res.controls.items())
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{100 * (a - b):+.2f}"


# --------------------------------------------------------------------------- tables
def qbench_table_html(evaluations: Mapping[str, EvaluationResult | dict], metric: Metric = "strict") -> HTML:
    """Q-Bench A1 accuracy (%) per paper column: one row per model and control, Δ rows vs the first
    model, a random-guess row and an item-count row."""
    evals = _normalize(evaluations)
    rows, classes = [], []
    ref = next(iter(evals.values())).qbench
    for label, res, is_ctl in _rows(evals):
        if res.qbench is None:
            continue
        vals = getattr(res.qbench, metric)
        rows.append([label] + [_pct(vals[c]) for c in QBENCH_COLUMNS] + [res.qbench.unparsed])
        classes.append("control" if is_ctl else "")
    first = next(iter(evals))
    for label, res in list(evals.items())[1:]:
        if res.qbench is not None and ref is not None:
            a, b = getattr(res.qbench, metric), getattr(ref, metric)
            rows.append([f"Δ {label} vs {first}"] + [_delta(a[c], b[c]) for c in QBENCH_COLUMNS] + [""])
            classes.append("delta")
    any_q = next((r.qbench for _, r, _ in _rows(evals) if r.qbench is not None), None)
    if any_q is not None:
        rows.append(["random guess"] + [_pct(any_q.chance.get(c)) for c in QBENCH_COLUMNS] + [""])
        rows.append(["items"] + [any_q.counts[c] for c in QBENCH_COLUMNS] + [""])
        classes += ["chance", "counts"]
    headers = ["model"] + [QBENCH_COLUMN_NAMES[c] for c in QBENCH_COLUMNS] + ["unparsed"]
    caption = (
        "Q-Bench A1, strict: the one letter parse_choice reads must be the correct one"
        if metric == "strict"
        else "Q-Bench A1, substring (upstream rule, comparable with the paper): correct letter anywhere in the output"
    )
    return html_table(headers, rows, caption, classes)


def moderation_table_html(evaluations: Mapping[str, EvaluationResult | dict]) -> HTML:
    """Moderation summary: accuracy, precision/recall/F1 of "violating", confusion counts, unknown."""
    evals = _normalize(evaluations)
    rows, classes = [], []
    for label, res, is_ctl in _rows(evals):
        m = res.moderation
        if m is None:
            continue
        c = m.confusion
        rows.append(
            [
                label,
                m.n,
                _pct(m.accuracy),
                _pct(m.precision),
                _pct(m.recall),
                _pct(m.f1),
                c["tp"],
                c["fp"],
                c["fn"],
                c["tn"],
                m.unknown,
            ]
        )
        classes.append("control" if is_ctl else "")
    headers = ["model", "n", "accuracy", "precision", "recall", "F1", "TP", "FP", "FN", "TN", "unknown"]
    return html_table(headers, rows, "Moderation (positive = violating; unknown answers count as wrong)", classes)


def moderation_category_table_html(evaluations: Mapping[str, EvaluationResult | dict]) -> HTML:
    """Moderation accuracy (%) per category, one column per model and control."""
    evals = _normalize(evaluations)
    cols = [(label, res.moderation) for label, res, _ in _rows(evals) if res.moderation is not None]
    cats = sorted({cat for _, m in cols for cat in m.per_category})
    rows = [
        [cat, next((m.per_category[cat]["n"] for _, m in cols if cat in m.per_category), 0)]
        + [_pct(m.per_category[cat]["accuracy"]) if cat in m.per_category else "–" for _, m in cols]
        for cat in cats
    ]
    return html_table(["category", "n"] + [label for label, _ in cols], rows, "Moderation accuracy per category")


# --------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # draw on Agg regardless of the session's backend
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def qbench_bar_figure(evaluations: Mapping[str, EvaluationResult | dict], metric: Metric = "strict") -> Figure:
    """Grouped bars: one group per Q-Bench column, one bar per model; controls hatched in the
    model's colour; a dashed tick per column marks the random-guess level."""
    evals = _normalize(evaluations)
    series = []  # (bar label, scores, is_control, colour index of the model)
    for idx, (label, res) in enumerate(evals.items()):
        for lab, r in [(label, res)] + [(f"{label} · {k}", c) for k, c in res.controls.items()]:
            if r.qbench is not None:
                series.append((lab, r.qbench, r is not res, idx))
    fig = _new_figure(max(8.0, 1.2 * len(QBENCH_COLUMNS) * max(1, len(series)) / 3), 4.2)
    ax = fig.add_subplot()
    colors = _colors(len(evals))
    width = 0.8 / max(1, len(series))
    for k, (lab, q, ctl, idx) in enumerate(series):
        vals = [100 * (getattr(q, metric)[c] or 0.0) for c in QBENCH_COLUMNS]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(QBENCH_COLUMNS))]
        ax.bar(
            xs,
            vals,
            width,
            label=lab,
            color=colors[idx],
            alpha=0.45 if ctl else 1.0,
            hatch="//" if ctl else None,
            edgecolor="black" if ctl else colors[idx],
            linewidth=0.5,
        )
        if len(series) <= 4:
            for x, v in zip(xs, vals):
                ax.text(x, v + 0.8, f"{v:.1f}", ha="center", va="bottom", fontsize=6, rotation=90)
    if series:
        chance = series[0][1].chance
        for i, c in enumerate(QBENCH_COLUMNS):
            if chance.get(c) is not None:
                ax.hlines(100 * chance[c], i - 0.45, i + 0.45, colors="grey", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(QBENCH_COLUMNS)), [QBENCH_COLUMN_NAMES[c] for c in QBENCH_COLUMNS])
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Q-Bench A1 ({metric}); dashed = random guess")
    ax.legend(fontsize=7, ncols=min(4, max(1, len(series))), loc="upper left")
    return fig


def controls_figure(evaluations: Mapping[str, EvaluationResult | dict]) -> Figure:
    """Per model: overall Q-Bench accuracy (strict and substring) and moderation accuracy with real
    images beside the blank/shuffled controls."""
    evals = _normalize(evaluations)
    metrics = [
        ("Q-Bench strict", lambda r: r.qbench and r.qbench.strict["overall"]),
        ("Q-Bench substring", lambda r: r.qbench and r.qbench.substring["overall"]),
        ("moderation", lambda r: r.moderation and r.moderation.accuracy),
    ]
    metrics = [(name, get) for name, get in metrics if any(get(r) is not None for r in evals.values())]
    fig = _new_figure(max(6.0, 3.2 * max(1, len(metrics))), 3.8)
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, (name, get) in zip(axes, metrics):
        labels, vals, colors = [], [], []
        for idx, (label, res) in enumerate(evals.items()):
            for cond, r in [("images", res)] + list(res.controls.items()):
                labels.append(f"{label}\n{cond}")
                vals.append(100 * (get(r) or 0.0))
                colors.append(_colors(len(evals))[idx] if cond == "images" else "lightgrey")
        ax.bar(range(len(vals)), vals, color=colors, edgecolor="black", linewidth=0.5)
        for i, v in enumerate(vals):
            ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 110)
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("overall accuracy (%)")
    fig.suptitle("Controls: real images vs blank (uniform grey) and shuffled images")
    return fig


def confusion_figure(evaluations: Mapping[str, EvaluationResult | dict]) -> Figure:
    """One moderation confusion matrix per model and control (rows truth yes/no, columns
    prediction yes/no/unknown), counts written in the cells."""
    evals = _normalize(evaluations)
    panels = [(label, res.moderation) for label, res, _ in _rows(evals) if res.moderation is not None]
    fig = _new_figure(max(4.0, 3.0 * max(1, len(panels))), 3.0)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (label, m) in zip(axes, panels):
        mat = m.matrix()
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, max(max(r) for r in mat)))
        for i in range(2):
            for j in range(3):
                ax.text(
                    j,
                    i,
                    str(mat[i][j]),
                    ha="center",
                    va="center",
                    fontsize=10,
                    color="white" if mat[i][j] > 0.6 * max(1, max(max(r) for r in mat)) else "black",
                )
        ax.set_xticks(range(3), ["yes", "no", "unknown"])
        ax.set_yticks(range(2), ["yes", "no"])
        ax.set_xlabel("predicted")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("truth (violating?)")
    if not panels:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no moderation results", ha="center", va="center")
    return fig


# --------------------------------------------------------------------------- gallery
@dataclass
class GalleryItem:
    """One example for the gallery.

    Attributes:
        image: a PIL image or a path.
        question: the question as shown to the model.
        reference: the expected answer.
        predictions: model label -> output text.
        correct: model label -> whether it was scored right.
    """

    image: Image.Image | str | Path
    question: str
    reference: str
    predictions: dict[str, str] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)


def gallery_from_records(
    items: Sequence[dict],
    images: Sequence[Image.Image | str | Path],
    evaluations: Mapping[str, EvaluationResult | dict],
    task: Literal["qbench", "moderation"] = "qbench",
    n: int = 12,
    seed: int = 0,
) -> list[GalleryItem]:
    """Pick ``n`` examples (items where the models disagree first, then a seeded sample).

    Args:
        items: the scored items (same order as the scores' records).
        images: one image or path per item.
        evaluations: label -> result holding ``task`` scores for these items.
        task: which scores to read; Q-Bench uses the strict verdict.
        n, seed: how many and which.

    Raises:
        ValueError: if lengths disagree or a model lacks ``task`` scores.
    """
    evals = _normalize(evaluations)
    if len(items) != len(images):
        raise ValueError(f"gallery: {len(items)} items but {len(images)} images")
    recs = {}
    for label, res in evals.items():
        scores = getattr(res, task)
        if scores is None or len(scores.records) != len(items):
            raise ValueError(f"gallery: model {label!r} has no {task} scores for these {len(items)} items")
        recs[label] = scores.records
    ok_key = "strict_ok" if task == "qbench" else "ok"
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: len({recs[lab][i][ok_key] for lab in recs}) == 1)  # disagreements first
    out = []
    for i in order[:n]:
        if task == "qbench":
            first = next(iter(recs.values()))[i]
            letter = first["correct"]
            question = qbench_prompt(items[i]).rstrip()
            reference = f"{letter}. {items[i]['candidates'][ord(letter) - ord('A')]}"
        else:
            question = str(items[i].get("question", ""))
            reference = next(iter(recs.values()))[i]["truth"]
        out.append(
            GalleryItem(
                image=images[i],
                question=question,
                reference=reference,
                predictions={lab: r[i]["output"] for lab, r in recs.items()},
                correct={lab: bool(r[i][ok_key]) for lab, r in recs.items()},
            )
        )
    return out


def thumbnail_data_uri(image: Image.Image | str | Path, max_px: int = 160) -> str:
    """A base64 PNG data URI of the image, shrunk to fit ``max_px`` (small images are kept as is
    and enlarged by the browser with pixelated rendering).

    Raises:
        FileNotFoundError: if a path does not exist.
    """
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"gallery image {path} not found")
        with Image.open(path) as f:
            im = f.convert("RGB")
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(items: Sequence[GalleryItem], thumb_px: int = 160) -> HTML:
    """Cards with the image, question, reference and each model's answer marked right/wrong."""
    cards = []
    for it in items:
        preds = "".join(
            f'<div class="pred {"ok" if it.correct.get(lab) else "bad"}"><b>{html.escape(lab)}</b> '
            f"{'✓' if it.correct.get(lab) else '✗'} <code>{html.escape(out or '(empty)')}</code></div>"
            for lab, out in it.predictions.items()
        )
        cards.append(
            f'<div class="card"><img src="{thumbnail_data_uri(it.image, thumb_px)}" width="{thumb_px}" '
            f'alt="example image"><pre class="q">{html.escape(it.question)}</pre>'
            f'<div class="ref">reference: <b>{html.escape(it.reference)}</b></div>{preds}</div>'
        )
    return HTML(f'<div class="gallery">{"".join(cards)}</div>')


# --------------------------------------------------------------------------- the report
_CSS = """body{font-family:sans-serif;margin:24px;max-width:1300px}
table.scores{border-collapse:collapse;margin:12px 0;font-size:13px}
table.scores td,table.scores th{border:1px solid #ccc;padding:3px 7px;text-align:right}
table.scores td:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:4px 0}
tr.control{color:#777;font-style:italic}tr.delta{background:#eef6ee}tr.chance,tr.counts{color:#999}
img.fig{max-width:100%;border:1px solid #eee}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:330px;font-size:12px}
.card img{image-rendering:pixelated;display:block}.q{white-space:pre-wrap;font-size:11px}
.pred.ok{color:#176317}.pred.bad{color:#a31515}code{white-space:pre-wrap}"""


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_report(
    out_dir: str | Path,
    evaluations: Mapping[str, EvaluationResult | dict],
    gallery_items: Sequence[GalleryItem] = (),
    title: str = "icmlab evaluation",
) -> Path:
    """Write ``report.html``, the figure PNGs and ``scores.json`` into ``out_dir``.

    Files: ``qbench_strict.png``, ``qbench_substring.png`` (if any model has Q-Bench scores),
    ``moderation_confusion.png`` (if any has moderation scores), ``controls.png`` (if any model has
    controls), ``scores.json`` (every ``EvaluationResult.to_dict()``), ``report.html`` last.

    Args:
        out_dir: output folder (created).
        evaluations: label -> EvaluationResult (or its dict); the first label is the reference.
        gallery_items: examples to show (see ``gallery_from_records``).
        title: page title.

    Returns:
        Path of ``report.html``.

    Raises:
        ValueError: if ``evaluations`` is empty or malformed.
    """
    out_dir = Path(out_dir)
    evals = _normalize(evaluations)
    has_q = any(r.qbench is not None for _, r, _ in _rows(evals))
    has_m = any(r.moderation is not None for _, r, _ in _rows(evals))
    has_ctl = any(r.controls for r in evals.values())
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Models: "
        + ", ".join(f"<b>{html.escape(k)}</b>" for k in evals)
        + f" (Δ rows are against <b>{html.escape(next(iter(evals)))}</b>). Accuracies in %.</p>",
    ]
    meta_rows = [
        [label, ", ".join(f"{k}={v}" for k, v in res.meta.items())] for label, res in evals.items() if res.meta
    ]
    if meta_rows:
        parts.append(html_table(["model", "details"], meta_rows, "Runs"))

    def figure(name: str, fig: Figure) -> str:
        png = figure_png(fig)
        atomic_write_bytes(out_dir / f"{name}.png", png)
        return _img_tag(png, name)

    if has_q:
        parts.append("<h2>Q-Bench A1 (LLVisionQA)</h2>")
        for metric in ("strict", "substring"):
            parts += [qbench_table_html(evals, metric), figure(f"qbench_{metric}", qbench_bar_figure(evals, metric))]
    if has_m:
        parts += [
            "<h2>Moderation</h2>",
            moderation_table_html(evals),
            moderation_category_table_html(evals),
            figure("moderation_confusion", confusion_figure(evals)),
        ]
    if has_ctl:
        parts += [
            "<h2>Controls</h2><p>The same model with every image replaced by a uniform grey one "
            "(blank) or by another question's image (shuffled). A model that reads the pixels "
            "falls towards the random-guess level here.</p>",
            figure("controls", controls_figure(evals)),
        ]
    if gallery_items:
        parts += ["<h2>Examples</h2>", gallery_html(gallery_items)]
    body = "\n".join(parts)
    atomic_write_json(out_dir / "scores.json", {label: res.to_dict() for label, res in evals.items()})
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
    return atomic_write_text(out_dir / "report.html", page)
