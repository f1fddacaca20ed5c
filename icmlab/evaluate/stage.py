"""Evaluate stage: Q-Bench A1 and moderation, baseline vs fine-tuned, with image controls and a report.

``run(cfg)`` loads the evaluation sets from the data root (laid out by the download stage), answers
every question greedily with the starting checkpoint (``cfg.model.base``, the paper's baseline) and
with the fine-tuned model of the run (``runs/<run>/model``), runs the control evaluations on the
fine-tuned model (images blanked / shuffled between questions: a model that reads pixels falls to
chance there), scores strict and substring accuracies, and writes ``runs/<run>/report/``.

Notebook: ``06_evaluate.ipynb``; CLI: ``icmlab evaluate parameters/X.yaml``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.evaluate.generation import PROMPT_FORMATS, PromptFormat, generate_answers
from icmlab.evaluate.icm_val import UPSTREAM_QUESTION, questions_from_folders
from icmlab.evaluate.report import build_report, gallery_from_records
from icmlab.evaluate.scoring import EvaluationResult, qbench_prompt, score_moderation, score_qbench
from icmlab.inputs.encode import PieceEncoder, encode_prompt
from icmlab.inputs.images import expand2square, load_rgb, mean_background
from icmlab.io import atomic_write_json, read_json
from icmlab.models import ModelBundle, get_family
from icmlab.models.spec import DIALECTS, family_spec

log = logging.getLogger("icmlab.evaluate.stage")


@dataclass
class EvalSet:
    """One benchmark's items with resolved image paths and the question text to ask."""

    name: str
    items: list[dict]
    images: list[Path]
    questions: list[str]
    score: Callable[[list[dict], list[str]], Any]


@dataclass
class EvaluateResult:
    """Outcome of the evaluate stage."""

    evaluations: dict[str, EvaluationResult]
    report: Path
    scores_json: Path
    seconds: float
    gallery: list = field(default_factory=list)

    def headline(self) -> list[dict]:
        """One row per model/control: Q-Bench overall (strict, substring) and moderation accuracy."""
        rows = []
        for label, ev in self.evaluations.items():
            for name, e in [(label, ev), *((f"{label} [{c}]", r) for c, r in ev.controls.items())]:
                rows.append(
                    {
                        "model": name,
                        "qbench_strict": e.qbench.strict["overall"] if e.qbench else None,
                        "qbench_substring": e.qbench.substring["overall"] if e.qbench else None,
                        "moderation_acc": e.moderation.accuracy if e.moderation else None,
                    }
                )
        return rows

    def summary(self) -> str:
        """Text table for the terminal."""

        def pct(v):
            return "   -  " if v is None else f"{100 * v:6.1f}"

        lines = [f"{'model':<28} {'Q-Bench strict':>14} {'substring':>10} {'moderation':>11}"]
        for r in self.headline():
            lines.append(
                f"{r['model']:<28} {pct(r['qbench_strict']):>14} {pct(r['qbench_substring']):>10} "
                f"{pct(r['moderation_acc']):>11}"
            )
        return "\n".join(lines) + f"\nreport: {self.report}"


# --------------------------------------------------------------------------- data
def load_eval_sets(cfg: RunConfig) -> list[EvalSet]:
    """Read the benchmarks named in ``cfg.eval.benchmarks`` from the data root.

    Raises:
        FileNotFoundError: when a set is missing (the message names the download step that provides it).
    """
    style = cfg.eval.qbench_style if cfg.eval.qbench_style != "auto" else family_spec(cfg.model.family).qbench_style
    sets = []
    for bench in cfg.eval.benchmarks:
        if bench == "qbench_a1":
            src = paths.qbench_json(cfg, cfg.eval.split)
            _require(src, "Q-Bench A1 (LLVisionQA)")
            items = read_json(src)[: cfg.eval.limit]
            imgs = [paths.qbench_images(cfg) / it["img_path"] for it in items]
            sets.append(EvalSet("qbench", items, imgs, [qbench_prompt(it, style) for it in items], score_qbench))
        elif bench == "moderation":
            items = [it for it in moderation_items(cfg) if it.get("kind", "yes_no") == "yes_no"][: cfg.eval.limit]
            imgs = [paths.icm_eval_dir(cfg) / it["image"] for it in items]
            sets.append(EvalSet("moderation", items, imgs, [it["question"] for it in items], score_moderation))
    return sets


def moderation_items(cfg: RunConfig) -> list[dict]:
    """The moderation questions: ``icm_val_questions.json`` when the data root has one (the demo),
    else built from the ``val/<category>/`` folders as the real ICM-Val ships (see
    :mod:`icmlab.evaluate.icm_val`); a built list is saved in the run's ``eval/`` folder as the record of
    what was asked.

    Raises:
        FileNotFoundError: neither the JSON nor the folders exist.
    """
    root = paths.icm_eval_dir(cfg)
    src = root / "icm_val_questions.json"
    if src.exists() or not (root / "val").is_dir():
        _require(src, "the ICM moderation validation set")
        return read_json(src)
    items = questions_from_folders(root, cfg.eval.moderation_question or UPSTREAM_QUESTION)
    atomic_write_json(cfg.run_dir / "eval" / "icm_val_questions.json", items)
    log.info(
        "built %d moderation questions from %s/val/<category>/ (ground truth: 'normal' categories "
        "are harmless, as upstream's eval.py)",
        len(items),
        root,
    )
    return items


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}; run the download stage "
            "(icmlab download <params> or notebooks/01_download.ipynb) first"
        )


def prepare_images(image_paths: list[Path], bundle: ModelBundle, aspect_ratio: str) -> list:
    """Load images as RGB and pad them to square on the processor's mean colour, as training does."""
    images = [load_rgb(p) for p in image_paths]
    if aspect_ratio == "pad":
        bg = mean_background(bundle.image_processor)
        images = [expand2square(im, bg) for im in images]
    return images


# --------------------------------------------------------------------------- answering
def prompt_format(cfg: RunConfig, bundle: ModelBundle) -> PromptFormat:
    """The inference prompt: the chosen template, encoded with the same piece encoder as training."""
    family = cfg.model.family
    template = cfg.eval.template if cfg.eval.template != "auto" else family_spec(family).eval_template
    encoder = PieceEncoder(bundle.tokenizer, dialect=family)

    def encode(question: str) -> list[int]:
        return encode_prompt(
            question,
            bundle.tokenizer,
            template=template,
            dialect=family,
            image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
            encoder=encoder,
        ).input_ids

    base = PROMPT_FORMATS[family]
    return PromptFormat(build=base.build, image_token=DIALECTS[family], encode=encode)


def evaluate_bundle(
    cfg: RunConfig, bundle: ModelBundle, sets: list[EvalSet], controls: list[str], device: str
) -> EvaluationResult:
    """Answer and score every set with one model, plus the control runs."""
    fmt = prompt_format(cfg, bundle)
    result = EvaluationResult(meta={"template": cfg.eval.template, "max_new_tokens": cfg.eval.max_new_tokens})
    for control in ["none", *controls]:
        target = result if control == "none" else result.controls.setdefault(control, EvaluationResult())
        for s in sets:
            images = prepare_images(s.images, bundle, cfg.data.image_aspect_ratio)
            outputs = generate_answers(
                bundle.model,
                bundle.tokenizer,
                bundle.image_processor,
                s.questions,
                images,
                batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens,
                device=device,
                prompt_format=fmt,
                control=control,
                seed=cfg.seed,
                image_token_id=bundle.image_token_id,
                num_image_tokens=bundle.num_image_tokens,
            )
            setattr(target, s.name, s.score(s.items, outputs))
    return result


def _device(cfg: RunConfig) -> str:
    if cfg.hardware.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def run(cfg: RunConfig) -> EvaluateResult:
    """Evaluate baseline and fine-tuned models and write the report.

    Returns:
        An :class:`EvaluateResult` (scores per model, report path).

    Raises:
        FileNotFoundError: a benchmark set or the fine-tuned model is missing.
    """
    t0 = time.perf_counter()
    family = get_family(cfg.model.family)
    device = _device(cfg)
    dtype = "bfloat16" if device == "cuda" and cfg.train.bf16 else "float32"
    sets = load_eval_sets(cfg)
    finetuned_dir = paths.final_model_dir(cfg)
    if not (finetuned_dir / "config.json").exists():
        raise FileNotFoundError(f"no fine-tuned model at {finetuned_dir}; run the train stage first")
    evaluations: dict[str, EvaluationResult] = {}
    if cfg.eval.baseline:
        log.info("evaluating the baseline %s", cfg.model.base)
        kwargs: dict[str, Any] = dict(
            dtype=dtype,
            device=device,
            revision=cfg.model.revision,
            attn_implementation=cfg.hardware.attn_implementation,
            endpoint=cfg.download.endpoint,
        )
        if cfg.model.base_format == "original" and cfg.model.vision_tower:
            kwargs["vision_source"] = cfg.model.vision_tower  # original LLaVA loads CLIP separately
        base = family.load_for_inference(cfg.model.base, **kwargs)
        evaluations["baseline"] = evaluate_bundle(cfg, base, sets, [], device)
        evaluations["baseline"].meta["checkpoint"] = cfg.model.base
        del base
    log.info("evaluating the fine-tuned model %s", finetuned_dir)
    tuned = family.load_for_inference(
        finetuned_dir,
        dtype=dtype,
        device=device,
        attn_implementation=cfg.hardware.attn_implementation,
        endpoint=cfg.download.endpoint,
    )
    evaluations["fine-tuned"] = evaluate_bundle(cfg, tuned, sets, list(cfg.eval.controls), device)
    evaluations["fine-tuned"].meta["checkpoint"] = str(finetuned_dir)
    out = paths.eval_dir(cfg)
    scores_json = atomic_write_json(out / "scores.json", {k: v.to_dict() for k, v in evaluations.items()})
    gallery = []
    for s in sets:
        task = "qbench" if s.name == "qbench" else "moderation"
        gallery += gallery_from_records(s.items, s.images, evaluations, task=task, n=8, seed=cfg.seed)
    report = build_report(paths.report_dir(cfg), evaluations, gallery, title=f"{cfg.run_name}: baseline vs fine-tuned")
    return EvaluateResult(evaluations, report, scores_json, time.perf_counter() - t0, gallery)
