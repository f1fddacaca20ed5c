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
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from icmlab.display import HTML, figure_png
from icmlab.display import table_html as html_table
from icmlab.evaluate.scoring import (
    MEQ_CRITERIA,
    QBENCH_COLUMN_NAMES,
    QBENCH_COLUMNS,
    QBENCH_SCORERS,
    EvaluationResult,
    qbench_prompt,
)
from icmlab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

Metric = Literal["strict", "substring", "exact"]


def relative(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory, the project root in notebooks
    and the CLI), with ``/`` separators; a hub id or URL is returned unchanged. Reports and records
    never hold absolute paths (they would leak the user's home and break when the run is moved)."""
    text = str(path)
    if "://" in text or not os.path.isabs(text):
        return text.replace(os.sep, "/")
    return os.path.relpath(text, root or os.getcwd()).replace(os.sep, "/")


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of ``correct / n`` (None for n = 0).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 % and 100 %, the
    values a tiny or untrained model produces.
    """
    if n <= 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _ci(correct: int | None, n: int | None) -> str:
    """``"67.09 [63.2, 70.8]"``: accuracy % with its 95 % Wilson interval."""
    if not n or correct is None:
        return "–"
    lo, hi = wilson(correct, n)  # type: ignore[misc]
    return f"{100 * correct / n:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"


# --------------------------------------------------------------------------- inputs
def _normalize(evaluations: Mapping[str, EvaluationResult | dict]) -> dict[str, EvaluationResult]:
    if not evaluations:
        raise ValueError("build_report: no evaluations given; pass {label: EvaluationResult}")
    out = {}
    for label, res in evaluations.items():
        if str(label).startswith("_"):  # "_context" of a saved report/scores.json
            continue
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
def _ordered_rows(evals: dict[str, EvaluationResult]) -> list[tuple[str, EvaluationResult, str]]:
    """(row label, result, kind) with each model's controls right after the *first* model (the
    baseline): the comparisons a reader should make sit next to each other. kind is ``model`` or
    ``control``."""
    first = next(iter(evals))
    rows = [(first, evals[first], "model")]
    for label, res in evals.items():
        rows.extend((f"{label} · {name}", ctl, "control") for name, ctl in res.controls.items())
    rows.extend((label, res, "model") for label, res in evals.items() if label != first)
    return rows


def qbench_table_html(
    evaluations: Mapping[str, EvaluationResult | dict],
    metric: Metric = "strict",
    references: Mapping[str, Mapping[str, float | None] | None] | None = None,
    reference_source: str = "",
) -> HTML:
    """Q-Bench A1 accuracy (%) per paper column with 95 % Wilson intervals: one row per model and
    control (controls beside the baseline), Δ rows of the last model against the baseline and each
    control, the papers' rows (``references``: our label -> paper columns) with Δ ours − paper, a
    random-guess row and an item-count row. The caption names the scorer."""
    evals = _normalize(evaluations)
    rows, classes = [], []
    for label, res, kind in _ordered_rows(evals):
        if res.qbench is None:
            continue
        q = res.qbench
        right = (
            q.strict_correct
            if metric == "strict"
            else q.substring_correct
            if metric == "substring"
            else q.exact_correct
        )
        rows.append([label] + [_ci(right.get(c), q.counts.get(c)) for c in QBENCH_COLUMNS] + [q.unparsed])
        classes.append("control" if kind == "control" else "")
    labels = list(evals)
    last = evals[labels[-1]]
    if len(labels) > 1 and last.qbench is not None:
        a = getattr(last.qbench, metric)
        against = [(lab, evals[lab].qbench) for lab in labels[:-1]]
        against += [(f"{labels[-1]} · {n}", c.qbench) for n, c in last.controls.items()]
        for lab, other in against:
            if other is not None:
                b = getattr(other, metric)
                rows.append([f"Δ {labels[-1]} vs {lab}"] + [_delta(a.get(c), b.get(c)) for c in QBENCH_COLUMNS] + [""])
                classes.append("delta")
    for lab, ref in (references or {}).items():
        if not ref or lab not in evals or evals[lab].qbench is None:
            continue
        ours = getattr(evals[lab].qbench, metric)
        rows.append([f"paper: {lab}"] + [_pct(ref.get(c)) for c in QBENCH_COLUMNS] + [""])
        rows.append([f"Δ {lab} − paper"] + [_delta(ours.get(c), ref.get(c)) for c in QBENCH_COLUMNS] + [""])
        classes += ["reference", "delta"]
    any_q = next((r.qbench for _, r, _ in _rows(evals) if r.qbench is not None), None)
    if any_q is not None:
        rows.append(["random guess"] + [_pct(any_q.chance.get(c)) for c in QBENCH_COLUMNS] + [""])
        rows.append(["items"] + [any_q.counts[c] for c in QBENCH_COLUMNS] + [""])
        classes += ["chance", "counts"]
    headers = ["model"] + [QBENCH_COLUMN_NAMES[c] for c in QBENCH_COLUMNS] + ["unparsed"]
    caption = f"Q-Bench A1, scorer: {QBENCH_SCORERS[metric]}; % [95 % Wilson interval]"
    if references and any(references.values()):
        caption += f"; paper rows: {reference_source}"
    return html_table(headers, rows, caption, classes)


def qbench_notes(evaluations: Mapping[str, EvaluationResult | dict]) -> list[str]:
    """Plain-language notes the Q-Bench tables need: why in-context columns are empty, and when the
    baseline cannot produce the answer format (so the controls are the fair comparison)."""
    evals = _normalize(evaluations)
    notes = []
    q = next((r.qbench for r in evals.values() if r.qbench is not None), None)
    if q is None:
        return notes
    empty = [QBENCH_COLUMN_NAMES[c] for c in QBENCH_COLUMNS if c != "overall" and not q.counts.get(c)]
    if empty:
        notes.append(
            f"The {', '.join(empty)} column(s) are empty because no item of this set carries that "
            "question type / concern code (in-context concerns are codes 2 and 3 of LLVisionQA's "
            "'concern' field; the embedded demo's synthetic Q-Bench has none)."
        )
    first = next(iter(evals))
    base = evals[first].qbench
    has_controls = any(r.controls for r in evals.values())
    if base is not None and base.counts["overall"] and base.unparsed / base.counts["overall"] >= 0.5:
        share = 100 * base.unparsed / base.counts["overall"]
        notes.append(
            f"The {first} model left {share:.0f} % of its answers without a readable option letter: it "
            "was never taught the answer format, so its low score says little about its perception."
            + (
                " The controls (the fine-tuned model with blank or shuffled images) answer in the "
                "format and are the honest comparison: the gain over them is what reading the pixels buys."
                if has_controls
                else " Run controls (eval.controls: [blank, shuffled]) for a fair comparison."
            )
        )
    return notes


def moderation_table_html(
    evaluations: Mapping[str, EvaluationResult | dict],
    task: Literal["moderation", "icm_test"] = "moderation",
    references: Mapping[str, float | None] | None = None,
    reference_source: str = "",
) -> HTML:
    """Yes/No summary (ICM-Val ``moderation`` or ``icm_test``): accuracy with its 95 % Wilson
    interval, precision/recall/F1 of "violating", confusion counts, unknown; controls beside the
    baseline; ``references`` (our label -> the paper's accuracy) add paper and Δ rows."""
    evals = _normalize(evaluations)
    rows, classes = [], []
    for label, res, kind in _ordered_rows(evals):
        m = getattr(res, task)
        if m is None:
            continue
        is_ctl = kind == "control"
        c = m.confusion
        rows.append(
            [
                label,
                m.n,
                _ci(m.correct, m.n),
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
    for lab, ref in (references or {}).items():
        m = getattr(evals[lab], task) if lab in evals else None
        if ref is None or m is None:
            continue
        rows.append([f"paper: {lab}", "", _pct(ref)] + [""] * 8)
        rows.append([f"Δ {lab} − paper", "", _delta(m.accuracy, ref)] + [""] * 8)
        classes += ["reference", "delta"]
    headers = ["model", "n", "accuracy [95 % CI]", "precision", "recall", "F1", "TP", "FP", "FN", "TN", "unknown"]
    what = "ICM-Val moderation" if task == "moderation" else "ICM-Test"
    caption = f"{what} (positive = violating; unknown answers count as wrong); scorer: first yes/no word"
    if references and any(v is not None for v in references.values()):
        caption += f"; paper rows: {reference_source}"
    return html_table(headers, rows, caption, classes)


def moderation_category_table_html(
    evaluations: Mapping[str, EvaluationResult | dict],
    task: Literal["moderation", "icm_test"] = "moderation",
    references: Mapping[str, Mapping[str, float] | None] | None = None,
) -> HTML:
    """Accuracy (%) [95 % Wilson interval] per category (ICM-Test: per subset), one column per model
    and control; with ``references`` (our label -> {category: paper accuracy}) a paper column each."""
    evals = _normalize(evaluations)
    cols = [(label, getattr(res, task)) for label, res, _ in _ordered_rows(evals) if getattr(res, task) is not None]
    refs = [(lab, r) for lab, r in (references or {}).items() if r]
    cats = sorted({cat for _, m in cols for cat in m.per_category})
    rows = [
        [cat, next((m.per_category[cat]["n"] for _, m in cols if cat in m.per_category), 0)]
        + [
            _ci(m.per_category[cat]["correct"], m.per_category[cat]["n"]) if cat in m.per_category else "–"
            for _, m in cols
        ]
        + [_pct(r.get(cat)) for _, r in refs]
        for cat in cats
    ]
    headers = ["category", "n"] + [label for label, _ in cols] + [f"paper: {lab}" for lab, _ in refs]
    what = "ICM-Val moderation" if task == "moderation" else "ICM-Test"
    return html_table(headers, rows, f"{what} accuracy per category, % [95 % Wilson interval]")


def icm_extra_table_html(
    evaluations: Mapping[str, EvaluationResult | dict],
    references: Mapping[str, Mapping[str, float] | None] | None = None,
    reference_source: str = "",
) -> HTML:
    """MQA accuracy [95 % CI] and MEQ (judged, four criteria) per model, with the paper's values and Δ."""
    evals = _normalize(evaluations)
    rows, classes = [], []
    for label, res, kind in _ordered_rows(evals):
        if res.mqa is None and res.meq is None:
            continue
        crit = [f"{res.meq.criteria[c]:.1f}" if res.meq else "–" for c in MEQ_CRITERIA]
        rows.append(
            [
                label,
                _ci(res.mqa.correct, res.mqa.n) if res.mqa else "–",
                f"{res.meq.meq:.3f}" if res.meq and res.meq.meq is not None else "–",
                *crit,
            ]
        )
        classes.append("control" if kind == "control" else "")
        ref = (references or {}).get(label)
        if ref:
            rows.append(
                [f"paper: {label}", _pct(ref.get("mqa")), f"{ref['meq']:.3f}" if "meq" in ref else "–"] + [""] * 4
            )
            rows.append(
                [
                    f"Δ {label} − paper",
                    _delta(res.mqa.accuracy if res.mqa else None, ref.get("mqa")),
                    f"{res.meq.meq - ref['meq']:+.3f}" if res.meq and res.meq.meq is not None and "meq" in ref else "–",
                ]
                + [""] * 4
            )
            classes += ["reference", "delta"]
    headers = ["model", "MQA accuracy [95 % CI]", "MEQ (0-1)"] + [f"{c} (0-100)" for c in MEQ_CRITERIA]
    caption = (
        "ICM MQA (scorer: ICM-Assistant's first-letter rule) and MEQ (judge: a chat model scoring each "
        "explanation against the reference; MEQ = mean of the four criteria / 100)"
    )
    if references and any(references.values()):
        caption += f"; paper rows: {reference_source}"
    return html_table(headers, rows, caption, classes)


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
        vals = [100 * (getattr(q, metric).get(c) or 0.0) for c in QBENCH_COLUMNS]
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
    images beside the blank/shuffled controls, whiskers = 95 % Wilson intervals."""
    evals = _normalize(evaluations)
    # (name, result -> (correct, n) or None): bars are accuracies, whiskers their 95 % Wilson intervals
    metrics = [
        ("Q-Bench strict", lambda r: r.qbench and (r.qbench.strict_correct["overall"], r.qbench.counts["overall"])),
        (
            "Q-Bench substring",
            lambda r: r.qbench and (r.qbench.substring_correct["overall"], r.qbench.counts["overall"]),
        ),
        ("moderation", lambda r: r.moderation and (r.moderation.correct, r.moderation.n)),
    ]
    metrics = [(name, get) for name, get in metrics if any(get(r) for r in evals.values())]
    fig = _new_figure(max(6.0, 3.2 * max(1, len(metrics))), 3.8)
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, (name, get) in zip(axes, metrics):
        labels, vals, colors, errs = [], [], [], ([], [])
        for idx, (label, res) in enumerate(evals.items()):
            for cond, r in [("images", res)] + list(res.controls.items()):
                correct, n = get(r) or (0, 0)
                v = 100 * correct / n if n else 0.0
                lo, hi = wilson(correct, n) or (v / 100, v / 100)
                labels.append(f"{label}\n{cond}")
                vals.append(v)
                errs[0].append(v - 100 * lo)
                errs[1].append(100 * hi - v)
                colors.append(_colors(len(evals))[idx] if cond == "images" else "lightgrey")
        ax.bar(range(len(vals)), vals, color=colors, edgecolor="black", linewidth=0.5, yerr=errs, capsize=3)
        for i, v in enumerate(vals):
            ax.text(i + 0.25, v + 1, f"{v:.1f}", ha="left", fontsize=7)
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
    task: Literal["qbench", "moderation", "icm_test", "mqa"] = "qbench",
    n: int = 12,
    seed: int = 0,
) -> list[GalleryItem]:
    """Pick ``n`` examples: as many the last model (the fine-tuned one) got right as it got wrong
    where both kinds exist, items where the models disagree first, then a seeded sample.

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
    judged = list(recs.values())[-1]
    right = [i for i in order if judged[i][ok_key]]
    wrong = [i for i in order if not judged[i][ok_key]]
    picked: list[int] = []
    while len(picked) < n and (right or wrong):  # alternate right / wrong answers while both last
        for pool in (wrong, right):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    out = []
    for i in picked:
        first = next(iter(recs.values()))[i]
        if task == "qbench":
            letter = first["correct"]
            question = qbench_prompt(items[i]).rstrip()
            reference = f"{letter}. {items[i]['candidates'][ord(letter) - ord('A')]}"
        else:
            question = str(items[i].get("question", ""))
            reference = str(first["answer"] if task == "mqa" else first["truth"])
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


_CARD = "border:1px solid #ddd;border-radius:6px;padding:8px;width:330px;font-size:12px;background:#fff;color:#222"
_OK, _BAD = "color:#176317", "color:#a31515"


def gallery_html(items: Sequence[GalleryItem], thumb_px: int = 160) -> HTML:
    """Cards with the image, question, reference and each model's answer marked right/wrong.

    The styles are inline, so the cards look the same in the report page, in JupyterLab and in
    any HTML viewer that drops ``<style>`` blocks.
    """
    cards = []
    for it in items:
        preds = "".join(
            f'<div style="{_OK if it.correct.get(lab) else _BAD}"><b>{html.escape(lab)}</b> '
            f"{'✓' if it.correct.get(lab) else '✗'} "
            f'<code style="white-space:pre-wrap">{html.escape(out or "(empty)")}</code></div>'
            for lab, out in it.predictions.items()
        )
        cards.append(
            f'<div style="{_CARD}"><img src="{thumbnail_data_uri(it.image, thumb_px)}" width="{thumb_px}" '
            f'style="image-rendering:pixelated;display:block" alt="example image">'
            f'<pre style="white-space:pre-wrap;font-size:11px">{html.escape(it.question)}</pre>'
            f"<div>reference: <b>{html.escape(it.reference)}</b></div>{preds}</div>"
        )
    return HTML(f'<div style="display:flex;flex-wrap:wrap;gap:12px">{"".join(cards)}</div>')


# --------------------------------------------------------------------------- the report
_CSS = """body{font-family:sans-serif;margin:24px;max-width:1300px}
table.scores{border-collapse:collapse;margin:12px 0;font-size:13px}
table.scores td,table.scores th{border:1px solid #ccc;padding:3px 7px;text-align:right}
table.scores td:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:4px 0}
tr.control{color:#777;font-style:italic}tr.delta{background:#eef6ee}tr.chance,tr.counts{color:#999}
tr.reference{background:#eef2fb}img.fig{max-width:100%;border:1px solid #eee}p.note{color:#444;max-width:900px}"""

_BANNER = (
    '<div style="border:2px solid #c77700;background:#fff4e0;color:#5a3600;padding:10px 14px;'
    'border-radius:6px;margin:10px 0;font-weight:bold">EMBEDDED DEMO: synthetic data and a tiny model '
    "(a few hundred thousand parameters, 64 px images). These numbers show that the pipeline learns "
    "and measures; they are not comparable with the papers' and say nothing about LLaVA or mPLUG-Owl2.</div>"
)


def banner_html(context: Mapping | None) -> HTML:
    """The embedded-demo warning when ``context["demo"]`` is set, else an empty fragment."""
    return HTML(_BANNER if context and context.get("demo") else "")


def context_references(context: Mapping | None) -> tuple[dict, dict, dict]:
    """``(qbench refs, icm refs, sources)`` of a report context: our label -> the paper's Q-Bench
    columns / ICM numbers, and benchmark -> the source to name in captions."""
    refs = (context or {}).get("references") or {}
    q = {lab: (r or {}).get("qbench") for lab, r in refs.items()}
    icm = {lab: (r or {}).get("icm") for lab, r in refs.items()}
    return q, icm, dict((context or {}).get("reference_sources") or {})


def provenance_html(context: Mapping) -> HTML:
    """The report's opening facts: date, commit, parameters file, recipe, protocol, data sources,
    files written (``context`` as built by :func:`icmlab.evaluate.records.report_context`)."""
    facts = [
        ["date", context.get("date", "")],
        ["icmlab commit", context.get("commit", "")],
        ["parameters file", context.get("parameters", "")],
        ["recipe", context.get("recipe", "")],
        ["evaluation protocol", context.get("protocol", "")],
    ]
    for key, files in (context.get("written") or {}).items():
        for label, path in files.items():
            facts.append([f"{key.replace('_', ' ')} ({label})", path])
    parts = [html_table(["", ""], facts, "Run")]
    if context.get("sources"):
        parts.append(
            html_table(["benchmark", "source (relative to the project root)", "items"], context["sources"], "Data")
        )
    return HTML("".join(parts))


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_report(
    out_dir: str | Path,
    evaluations: Mapping[str, EvaluationResult | dict],
    gallery_items: Sequence[GalleryItem] = (),
    title: str = "icmlab evaluation",
    context: Mapping | None = None,
) -> Path:
    """Write ``report.html``, the figure PNGs and ``scores.json`` into ``out_dir``.

    Files: ``qbench_{strict,substring,exact}.png`` (if any model has Q-Bench scores),
    ``moderation_confusion.png`` (if any has moderation scores), ``controls.png`` (if any model has
    controls), ``scores.json`` (every ``EvaluationResult.to_dict()``, plus ``context``),
    ``report.html`` last.

    Args:
        out_dir: output folder (created).
        evaluations: label -> EvaluationResult (or its dict); the first label is the baseline.
        gallery_items: examples to show (see ``gallery_from_records``).
        title: page title.
        context: provenance and references (:func:`icmlab.evaluate.records.report_context`):
            opens the page with the run's facts, a banner for the embedded demo, and adds the
            papers' rows with Δ to the tables.

    Returns:
        Path of ``report.html``.

    Raises:
        ValueError: if ``evaluations`` is empty or malformed.
    """
    out_dir = Path(out_dir)
    evals = _normalize(evaluations)
    if context is None:  # a saved report/scores.json carries its context
        context = evaluations.get("_context") if isinstance(evaluations.get("_context"), dict) else None  # type: ignore[assignment]
    context = dict(context or {})
    q_refs, icm_refs, ref_src = context_references(context)
    has = {k: any(getattr(r, k) is not None for _, r, _ in _rows(evals)) for k in ("qbench", "moderation", "icm_test")}
    has_extra = any(r.mqa is not None or r.meq is not None for r in evals.values())
    has_ctl = any(r.controls for r in evals.values())
    parts = [f"<h1>{html.escape(title)}</h1>", banner_html(context)]
    if context:
        parts.append(provenance_html(context))
    parts.append(
        "<p>Models: "
        + ", ".join(f"<b>{html.escape(k)}</b>" for k in evals)
        + ". Accuracies in %, each with its 95 % Wilson interval in brackets; Δ in percentage points.</p>"
    )
    meta_rows = [
        [label, ", ".join(f"{k}={v}" for k, v in res.meta.items())] for label, res in evals.items() if res.meta
    ]
    if meta_rows:
        parts.append(html_table(["model", "details"], meta_rows, "Models"))

    def figure(name: str, fig: Figure) -> str:
        png = figure_png(fig)
        atomic_write_bytes(out_dir / f"{name}.png", png)
        return _img_tag(png, name)

    if has["qbench"]:
        parts.append(f"<h2>Q-Bench A1 (LLVisionQA, {html.escape(str(context.get('split', 'dev')))})</h2>")
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in qbench_notes(evals)]
        for metric in QBENCH_SCORERS:
            parts += [
                qbench_table_html(evals, metric, q_refs, ref_src.get("qbench", "")),  # type: ignore[arg-type]
                figure(f"qbench_{metric}", qbench_bar_figure(evals, metric)),  # type: ignore[arg-type]
            ]
    elif context.get("written", {}).get("qbench_submission"):
        parts.append(
            '<h2>Q-Bench A1 (test split)</h2><p class="note">The test split\'s answers are not public: '
            "the answers are written as the maintainers' submission file (listed under Run above; "
            "send it as the Q-Bench README says).</p>"
        )
    if has["moderation"]:
        val_refs = {lab: (r or {}).get("val_r1") for lab, r in icm_refs.items()}
        parts += [
            "<h2>ICM-Val moderation</h2>",
            moderation_table_html(evals, "moderation", val_refs, ref_src.get("icm", "")),
            moderation_category_table_html(evals, "moderation"),
            figure("moderation_confusion", confusion_figure(evals)),
        ]
    if has["icm_test"]:
        parts += [
            "<h2>ICM-Test</h2>",
            moderation_table_html(evals, "icm_test"),
            moderation_category_table_html(evals, "icm_test", icm_refs),
        ]
    if has_extra:
        parts += ["<h2>ICM MQA and MEQ</h2>", icm_extra_table_html(evals, icm_refs, ref_src.get("icm", ""))]
    if has_ctl:
        parts += [
            "<h2>Controls</h2><p>The same fine-tuned model with every image replaced by a uniform grey "
            "one (blank) or by another question's image (shuffled). A model that reads the pixels "
            "falls towards the random-guess level here; the gap to its real-image score is what the "
            "pixels contribute.</p>",
            figure("controls", controls_figure(evals)),
        ]
    if gallery_items:
        parts += [
            "<h2>Examples</h2><p>Right (✓) and wrong (✗) answers of the fine-tuned model, mixed.</p>",
            gallery_html(gallery_items),
        ]
    body = "\n".join(parts)
    payload = {label: res.to_dict() for label, res in evals.items()}
    if context:
        payload["_context"] = context
    atomic_write_json(out_dir / "scores.json", payload)
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
    return atomic_write_text(out_dir / "report.html", page)
