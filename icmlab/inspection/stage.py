"""Inspect stage: dataset statistics, static figures, and an interactive browser of the samples.

Works on the merged training file (``<run_dir>/data/train.json``) with merge's provenance sidecar
(datasets) and validation's problem list (problem kinds). Large files are sampled per dataset
(seeded); the dataset counts are exact.

- :func:`run` computes the statistics and matplotlib figures (source mix, turns per record, token
  lengths against ``model_max_length``, image sizes, random samples per dataset; drawn by
  :mod:`icmlab.inspection.figures`, whose names this module re-exports), saves them as PNG under
  ``<run_dir>/inspect/`` and returns them in an :class:`InspectResult` for the notebook.
- :func:`browser` returns an ipywidgets browser: filter by dataset / category / problem kind, text
  search, previous/next/random; it shows the image beside its conversation and the exact model
  input, rendered by :func:`icmlab.inputs.encode.segments_for_display` from the trainer's own
  :func:`icmlab.inputs.encode.encode_conversation`: trained tokens vs masked ones, and the image span.

Usage (notebook ``04_inspect``)::

    from icmlab import inspection
    result = inspection.run(cfg)
    result.figures["token_lengths"]          # a matplotlib Figure (displayed by the notebook)
    inspection.browser(cfg, result)          # live widget in JupyterLab
"""

from __future__ import annotations

import html
import io
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from matplotlib.figure import Figure
from PIL import Image

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.display import figure_png
from icmlab.inputs.jsonscan import iter_blocks
from icmlab.inputs.lengths import LengthSetup, length_setup_for, record_length
from icmlab.inputs.problems import KINDS
from icmlab.inspection.figures import (
    FIGURE_DPI,
    image_size_figure,
    samples_figure,
    source_mix_figure,
    token_length_figure,
    turns_figure,
)
from icmlab.io import atomic_write_bytes, atomic_write_json, read_jsonl, stale_reason
from icmlab.merge.provenance import read_provenance
from icmlab.rundir import run_dir_lock

log = logging.getLogger("icmlab.inspection.stage")

_MC = re.compile(r"(^|\n)\s*A[.)]\s.*\n\s*B[.)]\s", re.S)
_YES_NO = re.compile(r"^\s*(yes|no)\b", re.I)


def record_category(record: Any) -> str:
    """A coarse kind of record, comparable across datasets (for filters and per-category counts).

    ``text-only`` (no image), ``multiple choice`` (lettered options in the first question),
    ``yes/no`` (first answer starts with yes/no), ``description`` (first answer > 40 words),
    ``multi-turn`` (several rounds of short QA), else ``open question``.
    """
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "malformed"
    turns = [t.get("value", "") if isinstance(t, dict) else "" for t in record["conversations"]]
    turns = [t if isinstance(t, str) else "" for t in turns]
    question, answer = (turns + ["", ""])[:2]
    if "image" not in record:
        return "text-only"
    if _MC.search(question):
        return "multiple choice"
    if _YES_NO.match(answer):
        return "yes/no"
    if len(answer.split()) > 40:
        return "description"
    return "multi-turn" if len(turns) > 2 else "open question"


@dataclass
class Sample:
    """One record as the figures and the browser see it."""

    index: int
    record: Any
    dataset: str
    category: str
    problems: list = field(default_factory=list)


@dataclass
class InspectResult:
    """Statistics and figures of the inspect stage.

    Attributes:
        input: the inspected training file.
        num_records: records in the file.
        datasets: exact record count per dataset (merge provenance).
        samples: the sampled records (all of them for small files), with problems attached.
        categories: per dataset, sampled records per category.
        turns: per dataset, rounds (human+gpt pairs) of each sampled record.
        token_lengths: per dataset, untruncated token counts of sampled records (trainer's encoding).
        image_sizes: per dataset, ``(width, height)`` of sampled images.
        model_max_length: the cut length drawn on the histograms.
        length_status: ``done`` or why token lengths are missing.
        figures: name -> matplotlib Figure (``source_mix``, ``turns``, ``token_lengths``,
            ``image_sizes``, ``samples``).
        figure_files: name -> saved PNG.
    """

    input: Path
    num_records: int
    datasets: dict[str, int]
    samples: list[Sample]
    categories: dict[str, dict[str, int]]
    turns: dict[str, np.ndarray]
    token_lengths: dict[str, np.ndarray]
    image_sizes: dict[str, np.ndarray]
    model_max_length: int
    length_status: str
    figures: dict[str, Figure] = field(default_factory=dict)
    figure_files: dict[str, Path] = field(default_factory=dict)
    setup: LengthSetup | None = field(default=None, repr=False)
    data_root: Path | None = None

    def table(self) -> list[dict]:
        """One row per dataset: records, sampled, image share, mean rounds, token length p50/p95/max, over limit."""
        rows = []
        for name, n in self.datasets.items():
            tok = self.token_lengths.get(name, np.array([]))
            mine = [s for s in self.samples if s.dataset == name]
            rows.append(
                {
                    "dataset": name,
                    "records": n,
                    "sampled": len(mine),
                    "with image": f"{100 * np.mean([isinstance(s.record, dict) and 'image' in s.record for s in mine]):.0f}%"
                    if mine
                    else "-",
                    "rounds (mean)": round(float(self.turns[name].mean()), 2) if len(self.turns.get(name, [])) else "-",
                    "tokens p50/p95/max": f"{int(np.median(tok))}/{int(np.percentile(tok, 95))}/{int(tok.max())}"
                    if len(tok)
                    else "-",
                    f"> {self.model_max_length}": int((tok > self.model_max_length).sum()) if len(tok) else "-",
                }
            )
        return rows

    def summary(self) -> str:
        """Lines for the terminal."""
        lines = [f"{self.input}: {self.num_records:,} records; token lengths: {self.length_status}"]
        lines += ["  " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in self.table()]
        lines += [f"  figure {k}: {v}" for k, v in self.figure_files.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def load_samples(
    path: Path,
    provenance: Path | None,
    problems_file: Path | None,
    *,
    per_dataset: int = 2000,
    max_problems: int = 5000,
    seed: int = 0,
) -> tuple[list[Sample], dict[str, int], int]:
    """Sample up to ``per_dataset`` records of each dataset (seeded) plus records with problems.

    Returns:
        ``(samples in file order, exact records per dataset, total records)``.
    """
    n = sum(len(b) for b in iter_blocks(path))
    prov = read_provenance(provenance)
    if prov is not None and len(prov[0]) != n:
        prov = None
    codes, names = (prov[0], prov[1]) if prov else (np.zeros(n, np.int32), ["train"])
    probs: dict[int, list] = {}
    if problems_file is not None and Path(problems_file).is_file():
        probs = {row["index"]: [tuple(p) for p in row["problems"]] for row in read_jsonl(problems_file)}
    rng = np.random.default_rng(seed)
    chosen = set(sorted(probs)[:max_problems])
    for c in range(len(names)):
        idx = np.flatnonzero(codes == c)
        chosen.update(rng.choice(idx, size=min(per_dataset, len(idx)), replace=False).tolist() if len(idx) else [])
    want = np.array(sorted(chosen), np.int64)
    out = []
    for block in iter_blocks(path):
        lo, hi = block.first, block.first + len(block)
        for i in want[(want >= lo) & (want < hi)].tolist():
            rec = orjson.loads(block.record(i - lo))
            out.append(Sample(i, rec, names[codes[i]], record_category(rec), probs.get(i, [])))
    return out, {name: int((codes == c).sum()) for c, name in enumerate(names)}, n


def _image_size(root: Path, rel: str) -> tuple[int, int] | None:
    try:
        with Image.open(root / rel) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None


# --------------------------------------------------------------------------- run
def run(cfg: RunConfig, *, per_dataset: int = 2000, seed: int | None = None, save: bool = True) -> InspectResult:
    """Inspect stage entry point: statistics and figures of ``paths.merged_json(cfg)``.

    Args:
        cfg: run config.
        per_dataset: records sampled per dataset for the figures (dataset counts are exact).
        seed: sampling seed (default ``cfg.seed``).
        save: write the figures as PNG and ``inspect.json`` under ``<run_dir>/inspect/``.

    Returns:
        The :class:`InspectResult`.

    Raises:
        FileNotFoundError: the merged file does not exist (run the merge stage).
    """
    with run_dir_lock(cfg, "inspect"):
        return _run(cfg, per_dataset, seed, save)


def _run(cfg: RunConfig, per_dataset: int, seed: int | None, save: bool) -> InspectResult:
    path = paths.merged_json(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the merge stage first (`icmlab merge`)")
    report = paths.validation_report(cfg)
    problems_file: Path | None = report.with_name("validation.problems.jsonl")
    if report.is_file() and (why := stale_reason(report)):
        log.warning("%s is not shown: %s; run the validate stage again to see this merge's problems", report, why)
        problems_file = None
    samples, datasets, n = load_samples(
        path,
        paths.provenance_jsonl(cfg),
        problems_file,
        per_dataset=per_dataset,
        seed=cfg.seed if seed is None else seed,
    )
    setup, reason = length_setup_for(cfg)
    turns, lengths, sizes = defaultdict(list), defaultdict(list), defaultdict(list)
    categories: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        categories[s.dataset][s.category] += 1
        convs = s.record.get("conversations") if isinstance(s.record, dict) else None
        turns[s.dataset].append(len(convs) // 2 if isinstance(convs, list) else 0)
        if setup is not None:
            enc = _encode(s.record, setup)
            if enc is not None:
                lengths[s.dataset].append(enc["untruncated"])
        if isinstance(s.record, dict) and isinstance(s.record.get("image"), str):
            size = _image_size(cfg.data.root, s.record["image"])
            if size:
                sizes[s.dataset].append(size)
    res = InspectResult(
        input=path,
        num_records=n,
        datasets=datasets,
        samples=samples,
        categories={k: dict(v) for k, v in categories.items()},
        turns={k: np.array(turns.get(k, []), int) for k in datasets},
        token_lengths={k: np.array(lengths.get(k, []), int) for k in datasets},
        image_sizes={k: np.array(sizes.get(k, []), int).reshape(-1, 2) for k in datasets},
        model_max_length=cfg.data.model_max_length,
        length_status=f"done ({setup.source})" if setup else f"skipped: {reason}",
        setup=setup,
        data_root=cfg.data.root,
    )
    res.figures = {
        "source_mix": source_mix_figure(res),
        "turns": turns_figure(res),
        "token_lengths": token_length_figure(res),
        "image_sizes": image_size_figure(res),
        "samples": samples_figure(res, cfg.data.root, seed=cfg.seed if seed is None else seed),
    }
    if save:
        out = cfg.run_dir / "inspect"
        for name, fig in res.figures.items():
            res.figure_files[name] = atomic_write_bytes(out / f"{name}.png", figure_png(fig, dpi=FIGURE_DPI))
        atomic_write_json(
            out / "inspect.json",
            {
                "input": str(path),
                "num_records": n,
                "datasets": datasets,
                "categories": res.categories,
                "table": res.table(),
                "length_status": res.length_status,
            },
        )
    return res


def _encode(record: Any, setup: LengthSetup) -> dict | None:
    """Token counts of a record, or None when its structure cannot be encoded (validate reports why)."""
    try:
        return record_length(record, setup)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------- rendering
_STYLE = {
    "trained": "background:#c9f2c7;color:#114411",
    "masked": "background:#eeeeee;color:#666666",
    "image": "background:#ffd27f;color:#553300;font-weight:bold;border-radius:3px;padding:0 3px",
}


def model_input_html(record: Any, setup: LengthSetup | None) -> str:
    """The exact model input of a record as HTML: trained tokens green, masked grey, the image span marked.

    Built with the trainer's :func:`icmlab.inputs.encode.encode_conversation` (via
    :func:`icmlab.inputs.lengths.record_length`'s settings) and :func:`icmlab.inputs.encode.segments_for_display`.
    """
    if setup is None:
        return "<i>no tokenizer available: model input not rendered</i>"
    from icmlab.inputs.encode import segments_for_display

    try:
        enc = setup.encode(record)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"<i>the trainer cannot encode this record: {html.escape(str(e))}</i>"
    spans = "".join(
        f'<span style="{_STYLE[kind]}" title="{kind}">{html.escape(text)}</span>'
        for text, kind in segments_for_display(enc, setup.tokenizer)
    )
    cut = f"; <b>cut</b> from {enc.num_tokens_untruncated}" if enc.truncated else ""
    legend = " ".join(f'<span style="{_STYLE[k]}">{k}</span>' for k in _STYLE)
    return (
        f"<div style='font-size:90%'>{legend} &nbsp; {enc.num_tokens} tokens{cut} "
        f"(max {setup.model_max_length}), {enc.num_supervised} trained, template {setup.template}</div>"
        f"<div style='white-space:pre-wrap;font-family:monospace;font-size:85%;border:1px solid #ddd;"
        f"padding:6px'>{spans}</div>"
    )


def conversation_html(sample: Sample) -> str:
    """The record as a conversation, with its dataset, category, id and problems."""
    rec = sample.record
    head = (
        f"<b>#{sample.index}</b> {html.escape(str(rec.get('id') if isinstance(rec, dict) else ''))} · "
        f"{html.escape(sample.dataset)} · {html.escape(sample.category)}"
    )
    if isinstance(rec, dict) and rec.get("image"):
        head += f" · <code>{html.escape(str(rec['image']))}</code>"
    probs = "".join(
        f"<li style='color:{'#b00' if KINDS[k].severity == 'error' else '#a60'}'>"
        f"{html.escape(k)}: {html.escape(str(d))}</li>"
        for k, d in sample.problems
    )
    turns = rec.get("conversations") if isinstance(rec, dict) else None
    rows = "".join(
        f"<tr><td style='vertical-align:top;font-weight:bold'>{html.escape(str(t.get('from')))}</td>"
        f"<td style='white-space:pre-wrap'>{html.escape(str(t.get('value')))}</td></tr>"
        for t in (turns if isinstance(turns, list) else [])
        if isinstance(t, dict)
    )
    return f"<div>{head}</div>" + (f"<ul>{probs}</ul>" if probs else "") + f"<table>{rows}</table>"


def image_png(root: Path | None, sample: Sample, side: int = 256) -> bytes | None:
    """A thumbnail of the record's image as PNG bytes (None without a readable image)."""
    rel = sample.record.get("image") if isinstance(sample.record, dict) else None
    if root is None or not isinstance(rel, str):
        return None
    try:
        from icmlab.inputs.images import load_rgb

        img = load_rgb(root / rel)
    except (OSError, ValueError):
        return None
    if max(img.size) > side:
        img.thumbnail((side, side))
    scale = max(1, side // max(img.size))  # enlarge the tiny demo images so they can be seen
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def samples_html(result: InspectResult, n: int = 3, *, seed: int = 0, problems: bool = False) -> str:
    """Static HTML of ``n`` random samples (image, conversation, exact model input) for papermill outputs."""
    import base64

    pool = [s for s in result.samples if bool(s.problems) == problems]
    parts = []
    for s in random.Random(seed).sample(pool, min(n, len(pool))):
        png = image_png(result.data_root, s)
        img = f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else "<i>no image</i>"
        parts.append(
            f"<div style='display:flex;gap:12px;margin-bottom:6px'><div>{img}</div>"
            f"<div>{conversation_html(s)}</div></div>{model_input_html(s.record, result.setup)}<hr>"
        )
    return "".join(parts) or "<i>no samples</i>"


def matches(
    samples: list[Sample], dataset: str = "all", category: str = "all", problem: str = "all", text: str = ""
) -> list[int]:
    """Positions in ``samples`` passing the browser's filters (``problem``: all / any / none / a kind)."""
    text = text.lower().strip()
    out = []
    for pos, s in enumerate(samples):
        kinds = {k for k, _ in s.problems}
        if dataset != "all" and s.dataset != dataset or category != "all" and s.category != category:
            continue
        if (
            problem == "any"
            and not kinds
            or problem == "none"
            and kinds
            or problem not in ("all", "any", "none")
            and problem not in kinds
        ):
            continue
        if text and text not in orjson.dumps(s.record).decode("utf-8", "replace").lower():
            continue
        out.append(pos)
    return out


def browser(cfg: RunConfig, result: InspectResult | None = None, *, per_dataset: int = 2000) -> Any:
    """An ipywidgets browser of the (sampled) records: filters, search, navigation, image, model input.

    Args:
        cfg: run config.
        result: a previous :func:`run` result to reuse its samples (else they are loaded).
        per_dataset: records sampled per dataset when ``result`` is not given.

    Returns:
        The ``ipywidgets.VBox`` (display it, or make it the cell's last expression).
    """
    import ipywidgets as W

    res = result or run(cfg, per_dataset=per_dataset, save=False)
    samples = res.samples
    kinds = sorted({k for s in samples for k, _ in s.problems})
    dd = dict(layout=W.Layout(width="210px"), style={"description_width": "60px"})
    dataset = W.Dropdown(options=["all", *res.datasets], description="dataset", **dd)
    category = W.Dropdown(options=["all", *sorted({s.category for s in samples})], description="category", **dd)
    problem = W.Dropdown(options=["all", "any", "none", *kinds], description="problem", **dd)
    search = W.Text(placeholder="search text / id", description="search", **dd)
    prev, nxt, rnd = W.Button(description="◀ previous"), W.Button(description="next ▶"), W.Button(description="random")
    status = W.HTML()
    image = W.Image(format="png", layout=W.Layout(width="256px"))
    conv, model = W.HTML(layout=W.Layout(width="640px")), W.HTML()
    state = {"hits": [], "pos": 0}

    def show() -> None:
        hits = state["hits"]
        if not hits:
            status.value, conv.value, model.value, image.value = "<b>no record matches</b>", "", "", b""
            return
        s = samples[hits[state["pos"]]]
        status.value = (
            f"{state['pos'] + 1} / {len(hits)} matching (of {len(samples)} loaded, {res.num_records:,} in file)"
        )
        image.value = image_png(res.data_root, s) or b""
        conv.value = conversation_html(s)
        model.value = model_input_html(s.record, res.setup)

    def refilter(*_: Any) -> None:
        state["hits"] = matches(samples, dataset.value, category.value, problem.value, search.value)
        state["pos"] = 0
        show()

    def step(delta: int) -> None:
        if state["hits"]:
            state["pos"] = (state["pos"] + delta) % len(state["hits"])
            show()

    for w in (dataset, category, problem, search):
        w.observe(refilter, names="value")
    prev.on_click(lambda _: step(-1))
    nxt.on_click(lambda _: step(1))
    rnd.on_click(lambda _: step(random.randrange(1, max(2, len(state["hits"])))))
    refilter()
    return W.VBox(
        [W.HBox([dataset, category, problem, search]), W.HBox([prev, nxt, rnd, status]), W.HBox([image, conv]), model]
    )
