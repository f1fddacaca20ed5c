"""Playground stage: ask the run's models about one image and read their answers side by side.

- :func:`model_choices`: what can be compared: ``baseline`` (``model.base``), ``fine-tuned``
  (``runs/<run>/model``), every ``checkpoint-N`` of the run (a LoRA checkpoint is its adapter on
  the base) and ``run:<name>`` for the final model of any other run under ``runs_root``.
- :data:`TEMPLATES`: Q-Bench-style questions (built by evaluation's ``qbench_prompt`` in the family's
  Q-Bench layout) and the moderation question, or any free question.
- :func:`ask`: one answer, with the prompt encoder, image preprocessing and greedy decoding of the
  evaluate stage under the run's eval protocol (``prompt_format``, ``prepare_image``, ``generate_answers``), so what the playground
  shows is what evaluation scores. With ``on_token`` the answer streams as it is generated
  (transformers ``TextIteratorStreamer``).
- :func:`run` (headless, ``icmlab run`` / papermill): answers ``playground.pairs`` (or the first
  ``playground.samples`` validated records, with their ground truth) with every model of
  ``playground.models`` and writes ``runs/<run>/playground/answers.{json,html}``.
- :func:`playground`: the ipywidgets UI of notebook ``07_playground``.
"""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.evaluate.generation import generate_answers, pixel_values
from icmlab.evaluate.icm_val import UPSTREAM_QUESTION
from icmlab.evaluate.protocol import prepare_image as protocol_image
from icmlab.evaluate.protocol import resolve_protocol
from icmlab.evaluate.report import thumbnail_data_uri
from icmlab.evaluate.scoring import qbench_prompt
from icmlab.evaluate.stage import prompt_format
from icmlab.inputs.images import load_rgb
from icmlab.io import atomic_write_json, atomic_write_text, read_json
from icmlab.models import ModelBundle, get_family
from icmlab.models.spec import family_spec

log = logging.getLogger("icmlab.playground.stage")

#: Q-Bench-style closed questions (``question`` + ``candidates``, as LLVisionQA items hold them).
QBENCH_TEMPLATES: dict[str, dict] = {
    "qbench: overall quality": {
        "question": "How would you rate the quality of this image?",
        "candidates": ["Good", "Fair", "Poor"],
    },
    "qbench: blur": {"question": "Is this image blurry?", "candidates": ["Yes", "No"]},
    "qbench: noise": {"question": "Is there noise in this image?", "candidates": ["Yes", "No"]},
    "qbench: exposure": {
        "question": "How is the exposure of this image?",
        "candidates": ["Overexposed", "Underexposed", "Well exposed"],
    },
    "qbench: main distortion": {
        "question": "Which distortion is the most apparent in this image?",
        "candidates": ["Blur", "Noise", "Overexposure", "Underexposure"],
    },
}
#: Every template name the playground offers (``playground.pairs[].question`` may name one).
TEMPLATES = (*QBENCH_TEMPLATES, "moderation")


def template_question(cfg: RunConfig, name: str) -> str:
    """The question text of a template, or ``name`` itself when it is no template (a free question).

    Q-Bench templates use the family's (or ``eval.qbench_style``'s) layout; ``moderation`` asks
    ``eval.moderation_question`` or the ICM authors' question.
    """
    if name in QBENCH_TEMPLATES:
        style = cfg.eval.qbench_style if cfg.eval.qbench_style != "auto" else family_spec(cfg.model.family).qbench_style
        return qbench_prompt(QBENCH_TEMPLATES[name], style)
    if name == "moderation":
        return cfg.eval.moderation_question or UPSTREAM_QUESTION
    return name


# --------------------------------------------------------------------------- models
def model_choices(cfg: RunConfig) -> dict[str, str]:
    """``label -> model folder or hub id`` of everything the playground can load for this run."""
    choices = {"baseline": cfg.model.base}
    final = paths.final_model_dir(cfg)
    if (final / "config.json").is_file():
        choices["fine-tuned"] = str(final)
    ckpts = paths.checkpoints_dir(cfg)
    if ckpts.is_dir():
        for d in sorted(
            ckpts.glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else 0,
        ):
            if (d / "config.json").is_file() or (d / "adapter_config.json").is_file():
                choices[d.name] = str(d)
    if cfg.runs_root.is_dir():
        for other in sorted(cfg.runs_root.iterdir()):
            if other.name != cfg.run_name and (other / "model" / "config.json").is_file():
                choices[f"run:{other.name}"] = str(other / "model")
    return choices


def load_model(cfg: RunConfig, label_or_path: str, device: str = "cpu") -> ModelBundle:
    """Load one model of :func:`model_choices` (a label) or any model folder, for generation.

    A PEFT adapter folder (LoRA checkpoint) is applied on ``model.base``.

    Raises:
        FileNotFoundError: for a label that is not there or a folder without a model.
    """
    choices = model_choices(cfg)
    source = choices.get(label_or_path, label_or_path)
    if label_or_path not in choices and not Path(source).is_dir():
        raise FileNotFoundError(
            f"playground model {label_or_path!r}: not one of {', '.join(choices)} and not a model folder"
        )
    family = get_family(cfg.model.family)
    kwargs: dict[str, Any] = dict(device=device, endpoint=cfg.download.endpoint)
    if cfg.model.dtype != "auto":
        kwargs["dtype"] = cfg.model.dtype
    if (Path(source) / "adapter_config.json").is_file():
        from peft import PeftModel

        base = family.load_for_inference(cfg.model.base, revision=cfg.model.revision, **kwargs)
        base.model = PeftModel.from_pretrained(base.model, source).eval()
        return base
    if source == cfg.model.base:
        kwargs["revision"] = cfg.model.revision
    return family.load_for_inference(source, **kwargs)


# --------------------------------------------------------------------------- answering
def prepare_image(cfg: RunConfig, image: Image.Image | str | Path | bytes, bundle: ModelBundle) -> Image.Image:
    """An RGB image as the run's evaluation protocol feeds it (:func:`icmlab.evaluate.protocol.prepare_image`)."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as im:
            img = im.convert("RGB")
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        img = load_rgb(image)
    return protocol_image(resolve_protocol(cfg), img, bundle.image_processor)


def prompt_text(cfg: RunConfig, bundle: ModelBundle, question: str) -> str:
    """The exact model input of a question, decoded (the image placeholders shown as ``<image ×N>``)."""
    ids = prompt_format(resolve_protocol(cfg), bundle).encode(question)
    out: list[str] = []
    run: list[int] = []
    for i in [*ids, None]:
        if i == bundle.image_token_id:
            run.append(i)
            continue
        if run:
            out.append(f"<image ×{len(run)}>")
            run = []
        if i is not None:
            out.append(bundle.tokenizer.decode([i]))
    return "".join(out)


def ask(
    cfg: RunConfig,
    bundle: ModelBundle,
    image: Image.Image | str | Path | bytes,
    question: str,
    *,
    max_new_tokens: int | None = None,
    on_token: Callable[[str], None] | None = None,
) -> str:
    """One greedy answer of ``bundle`` to ``question`` about ``image``, as the evaluate stage decodes it.

    Args:
        on_token: called with the answer so far after every new piece of text (streaming).

    Returns:
        The answer (special tokens skipped, whitespace stripped).
    """
    budget = max_new_tokens or cfg.playground.max_new_tokens
    img = prepare_image(cfg, image, bundle)
    fmt = prompt_format(resolve_protocol(cfg), bundle)
    if on_token is None:
        (answer,) = generate_answers(
            bundle.model, bundle.tokenizer, bundle.image_processor, [question], [img], batch_size=1,
            max_new_tokens=budget, prompt_format=fmt, image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
        )  # fmt: skip
        return answer
    from transformers import TextIteratorStreamer

    model, tok = bundle.model, bundle.tokenizer
    param = next(model.parameters())
    ids = torch.tensor([fmt.encode(question)], device=param.device)
    pixels = pixel_values(tok, bundle.image_processor, img)[None].to(param.device, param.dtype)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False, num_beams=1,
        max_new_tokens=budget, pad_token_id=pad, eos_token_id=tok.eos_token_id, streamer=streamer,
    )  # fmt: skip
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        on_token(text.strip())
    worker.join()
    if errors:
        raise errors[0]
    return text.strip()


# --------------------------------------------------------------------------- dataset images
@dataclass
class Sample:
    """A validated record with an image: what the playground can ask about, with its ground truth."""

    id: str
    image: Path
    question: str
    truth: str


def dataset_samples(cfg: RunConfig, limit: int | None = None) -> list[Sample]:
    """The image records of the run's training file (cleaned by validation when it dropped records),
    each with its first question (image tag removed) and the answer it was trained on."""
    src = paths.training_json(cfg)
    if not src.is_file():
        return []
    tag = family_spec(cfg.model.family).image_token
    out = []
    for i, rec in enumerate(read_json(src)):
        conv = rec.get("conversations") or []
        if not rec.get("image") or len(conv) < 2:
            continue
        question = conv[0]["value"].replace(tag, "").strip()
        out.append(Sample(str(rec.get("id", i)), cfg.data.root / rec["image"], question, conv[1]["value"]))
        if limit is not None and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- headless
@dataclass
class PlaygroundResult:
    """The headless playground's answers: one row per (image, question) with one column per model."""

    models: list[str]
    rows: list[dict] = field(default_factory=list)
    json_path: Path | None = None
    html_path: Path | None = None
    seconds: float = 0.0

    def table(self) -> str:
        """Text table for the terminal."""
        lines = []
        for r in self.rows:
            lines.append(f"{Path(r['image']).name}: {r['question'].splitlines()[0]}")
            if r.get("truth"):
                lines.append(f"  {'ground truth':<14} {r['truth']}")
            lines += [f"  {m:<14} {r['answers'][m]}" for m in self.models]
        return "\n".join(lines) + (f"\nanswers: {self.html_path}" if self.html_path else "")

    summary = table


def answers_html(result: PlaygroundResult) -> str:
    """The answers as an HTML table: image thumbnail, question, ground truth, one column per model."""
    esc = html.escape
    head = "".join(f"<th>{esc(m)}</th>" for m in result.models)
    rows = []
    for r in result.rows:
        img = f'<img src="{thumbnail_data_uri(r["image"], 128)}" alt="{esc(Path(r["image"]).name)}">'
        cells = "".join(f"<td>{esc(r['answers'][m])}</td>" for m in result.models)
        q = esc(r["question"]).replace("\n", "<br>")
        row = f"<tr><td>{img}</td><td>{q}</td><td>{esc(r.get('truth') or '')}</td>{cells}</tr>"
        rows.append(row.replace("<td>", '<td style="text-align:left">'))
    return (
        '<table class="icmlab-playground" style="text-align:left"><tr><th>image</th><th>question</th>'
        "<th>ground truth</th>"
        f"{head}</tr>{''.join(rows)}</table>"
    )


def run(cfg: RunConfig, device: str = "cpu") -> PlaygroundResult:
    """Answer the configured (image, question) pairs with every configured model; write the table.

    Raises:
        FileNotFoundError: a model or an image is missing.
    """
    t0 = time.perf_counter()
    pc = cfg.playground
    if pc.pairs:
        asks = [(cfg.data.root / p.image, template_question(cfg, p.question), None) for p in pc.pairs]
    else:
        asks = [(s.image, s.question, s.truth) for s in dataset_samples(cfg, pc.samples)]
    for image, _, _ in asks:
        if not Path(image).is_file():
            raise FileNotFoundError(f"playground image {image} not found (playground.pairs[].image, under data.root)")
    result = PlaygroundResult(models=list(pc.models))
    rows = [{"image": str(i), "question": q, "truth": t, "answers": {}} for i, q, t in asks]
    for label in pc.models:
        log.info("playground: answering %d questions with %s", len(rows), label)
        bundle = load_model(cfg, label, device)
        for row in rows:
            row["answers"][label] = ask(cfg, bundle, row["image"], row["question"])
        del bundle
    result.rows = rows
    out = paths.playground_dir(cfg)
    result.json_path = atomic_write_json(out / "answers.json", {"models": result.models, "rows": rows})
    result.html_path = atomic_write_text(out / "answers.html", answers_html(result))
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- widgets
def _png(image: Image.Image, side: int = 320) -> bytes:
    im = image.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def playground(cfg: RunConfig, device: str = "cpu") -> Any:
    """The playground UI (ipywidgets): models, image, question or template, answers side by side.

    Image sources: a record of the validated dataset (its ground truth shown), a path, or an upload
    (``FileUpload``); the last one chosen is asked about. Answers stream into one box per model.

    Returns:
        The ``ipywidgets.VBox`` (the cell's last expression shows it).
    """
    import ipywidgets as W

    choices = model_choices(cfg)
    samples = dataset_samples(cfg)
    cache: dict[str, ModelBundle] = {}
    wide = dict(layout=W.Layout(width="520px"), style={"description_width": "80px"})
    models = W.SelectMultiple(
        options=list(choices), value=[m for m in ("baseline", "fine-tuned") if m in choices], description="models"
    )
    record = W.Dropdown(
        options=[("-", None)] + [(f"{s.id}: {s.question.splitlines()[0][:60]}", i) for i, s in enumerate(samples)],
        description="dataset",
        **wide,
    )
    path = W.Text(placeholder="an image file", description="path", **wide)
    upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
    template = W.Dropdown(options=["(free question)", *TEMPLATES], description="template", **wide)
    question = W.Textarea(placeholder="ask about the image", description="question", **wide)
    ask_button = W.Button(description="Ask", button_style="primary")
    image_view = W.Image(format="png", layout=W.Layout(width="320px"))
    truth = W.HTML()
    prompt_view = W.HTML()
    status = W.HTML()
    answers = W.HBox()
    state: dict[str, Any] = {"image": None}

    def show_image(img: Image.Image | None, gt: str = "") -> None:
        state["image"] = img
        image_view.value = _png(img) if img is not None else b""
        truth.value = f"<b>ground truth:</b> {html.escape(gt)}" if gt else ""

    def on_record(change: Any) -> None:
        if change["new"] is None:
            return
        s = samples[change["new"]]
        show_image(load_rgb(s.image), s.truth)
        if not question.value:
            question.value = s.question

    def on_path(change: Any) -> None:
        p = Path(change["new"]).expanduser()
        if not p.is_file():
            status.value = f"<b>no image at {html.escape(str(p))}</b>" if change["new"] else ""
            return
        status.value = ""
        show_image(load_rgb(p))

    def on_upload(change: Any) -> None:
        files = change["new"]
        if files:
            content = files[0]["content"]
            with Image.open(io.BytesIO(bytes(content))) as im:
                show_image(im.convert("RGB"))

    def on_template(change: Any) -> None:
        if change["new"] in TEMPLATES:
            question.value = template_question(cfg, change["new"])

    def on_ask(_: Any) -> None:
        if state["image"] is None or not question.value.strip():
            status.value = "<b>pick an image and ask a question first</b>"
            return
        boxes = []
        for label in models.value:
            box = W.HTML(f"<b>{html.escape(label)}</b><br><i>loading…</i>", layout=W.Layout(width="300px"))
            boxes.append(box)
        answers.children = tuple(boxes)
        for label, box in zip(models.value, boxes):
            status.value = f"loading {html.escape(label)}…"
            if label not in cache:
                cache[label] = load_model(cfg, label, device)
            bundle = cache[label]
            prompt_view.value = (
                f"<details><summary>exact model input ({html.escape(label)})</summary>"
                f"<pre>{html.escape(prompt_text(cfg, bundle, question.value))}</pre></details>"
            )

            def stream(text: str, box: Any = box, label: str = label) -> None:
                box.value = f"<b>{html.escape(label)}</b><br>{html.escape(text)}"

            status.value = f"{html.escape(label)} is answering…"
            stream(ask(cfg, bundle, state["image"], question.value, on_token=stream))
        status.value = "done"

    record.observe(on_record, names="value")
    path.observe(on_path, names="value")
    upload.observe(on_upload, names="value")
    template.observe(on_template, names="value")
    ask_button.on_click(on_ask)
    return W.VBox(
        [
            W.HBox([models, W.VBox([record, path, upload])]),
            W.HBox([image_view, W.VBox([truth, template, question, ask_button, status])]),
            answers,
            prompt_view,
        ]
    )
