"""Evaluate stage: Q-Bench A1 and the ICM benchmarks, baseline vs fine-tuned, with image controls and a report.

``run(cfg)`` loads the evaluation sets from the data root (laid out by the download stage), answers
every question greedily under the run's evaluation protocol (:mod:`icmlab.evaluate.protocol`:
``upstream`` = Q-Instruct's eval scripts, ``demo`` = the embedded demo's own) with the starting
checkpoint (``cfg.model.base``, the paper's baseline) and with the fine-tuned model of the run
(``runs/<run>/model``), runs the control evaluations on the fine-tuned model (images blanked /
shuffled between questions: a model that reads pixels falls to chance there), scores strict,
substring and exact accuracies, judges MEQ explanations when ``eval.judge_url`` is set, writes the
Q-Bench test-split submission, and writes ``runs/<run>/report/`` with the papers' numbers beside ours.

Data-parallel: ``torchrun --nproc_per_node N -m icmlab evaluate P`` shards the items over N ranks
(:mod:`icmlab.evaluate.parallel`); the answers equal one rank's.

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
from icmlab.evaluate import parallel, report
from icmlab.evaluate.generation import PROMPT_FORMATS, PromptFormat, derangement, generate_answers, normalize_control
from icmlab.evaluate.icm_val import UPSTREAM_QUESTION, icm_test_from_folders, meq_from_folders, questions_from_folders
from icmlab.evaluate.judge import ChatJudge, judge_explanations
from icmlab.evaluate.protocol import EvalProtocol, prepare_image, prompt_encoder, resolve_protocol
from icmlab.evaluate.records import report_context, write_raw_outputs
from icmlab.evaluate.report import build_report, gallery_from_records
from icmlab.evaluate.scoring import (
    EvaluationResult,
    qbench_prompt,
    score_moderation,
    score_mqa,
    score_qbench,
)
from icmlab.inputs.images import load_rgb
from icmlab.io import atomic_write_json, read_json
from icmlab.models import ModelBundle, get_family
from icmlab.models.spec import DIALECTS

log = logging.getLogger("icmlab.evaluate.stage")


@dataclass
class EvalSet:
    """One benchmark's items with resolved image paths and the question text to ask.

    Attributes:
        score: items, outputs -> scores; None for sets scored elsewhere (Q-Bench test: a submission
            file; MEQ: the judge).
        max_new_tokens: the set's decoding budget (None = the protocol's).
        outputs: model label -> answers, for the sets without a scorer.
    """

    name: str
    items: list[dict]
    images: list[Path]
    questions: list[str]
    score: Callable[[list[dict], list[str]], Any] | None
    max_new_tokens: int | None = None
    outputs: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class EvaluateResult:
    """Outcome of the evaluate stage."""

    evaluations: dict[str, EvaluationResult]
    report: Path
    scores_json: Path
    seconds: float
    gallery: list = field(default_factory=list)
    context: dict = field(default_factory=dict)
    """Provenance and the papers' reference rows (:func:`icmlab.evaluate.records.report_context`)."""

    def headline(self) -> list[dict]:
        """One row per model/control: Q-Bench overall (strict, substring, exact) and ICM accuracies."""
        rows = []
        for label, ev in self.evaluations.items():
            for name, e in [(label, ev), *((f"{label} [{c}]", r) for c, r in ev.controls.items())]:
                q = e.qbench
                rows.append(
                    {
                        "model": name,
                        "qbench_strict": q.strict["overall"] if q else None,
                        "qbench_substring": q.substring["overall"] if q else None,
                        "qbench_exact": q.exact.get("overall") if q else None,
                        "moderation_acc": e.moderation.accuracy if e.moderation else None,
                        "icm_test_acc": e.icm_test.accuracy if e.icm_test else None,
                        "mqa_acc": e.mqa.accuracy if e.mqa else None,
                        "meq": e.meq.meq if e.meq else None,
                    }
                )
        return rows

    def summary(self) -> str:
        """Text table for the terminal (columns without any value are left out)."""

        def pct(v):
            return "   -  " if v is None else f"{100 * v:6.1f}"

        rows = self.headline()
        names = {
            "qbench_strict": "Q-Bench strict",
            "qbench_substring": "substring",
            "qbench_exact": "exact",
            "moderation_acc": "moderation",
            "icm_test_acc": "ICM-Test",
            "mqa_acc": "MQA",
            "meq": "MEQ",
        }
        cols = [k for k in names if any(r[k] is not None for r in rows)]
        lines = [f"{'model':<28} " + " ".join(f"{names[k]:>14}" for k in cols)]
        for r in rows:
            lines.append(f"{r['model']:<28} " + " ".join(f"{pct(r[k]):>14}" for k in cols))
        return "\n".join(lines) + f"\nreport: {self.report}"


# --------------------------------------------------------------------------- data
def load_eval_sets(cfg: RunConfig, protocol: EvalProtocol | None = None) -> list[EvalSet]:
    """Read the benchmarks named in ``cfg.eval.benchmarks`` from the data root.

    Q-Bench's ``test`` split has no public answers: its set has no scorer and the stage writes a
    submission file instead (:func:`icmlab.evaluate.submission.write_qbench_submission`).

    Raises:
        FileNotFoundError: when a set is missing (the message names the download step or layout).
    """
    protocol = protocol or resolve_protocol(cfg)
    root = paths.icm_eval_dir(cfg)
    limit = cfg.eval.limit
    sets = []
    for bench in cfg.eval.benchmarks:
        if bench == "qbench_a1":
            src = paths.qbench_json(cfg, cfg.eval.split)
            _require(src, f"Q-Bench A1 (LLVisionQA) {cfg.eval.split} split")
            items = read_json(src)[:limit]
            imgs = [paths.qbench_images(cfg) / it["img_path"] for it in items]
            questions = [qbench_prompt(it, protocol.qbench_style) for it in items]
            scorer = score_qbench if cfg.eval.split == "dev" else None
            sets.append(EvalSet("qbench", items, imgs, questions, scorer))
        elif bench == "moderation":
            items = [it for it in moderation_items(cfg) if it.get("kind", "yes_no") == "yes_no"][:limit]
            sets.append(_icm_set("moderation", root, items, score_moderation))
        elif bench == "icm_test":
            items = icm_test_from_folders(root, cfg.eval.moderation_question or UPSTREAM_QUESTION)[:limit]
            sets.append(_icm_set("icm_test", root, items, score_moderation))
        elif bench == "mqa":
            src = root / "mqa.json"
            if not src.exists():
                raise FileNotFoundError(
                    f"{src} not found: MQA reads a JSON list of {{image (relative to {root}), question, "
                    "answer ('B.' / 'Yes.'), kind ('mc' / 'open')}"
                )
            sets.append(_icm_set("mqa", root, read_json(src)[:limit], score_mqa))
        elif bench == "meq":
            items = [it for it in moderation_items(cfg, required=False) if it.get("kind") == "explanation"]
            if not items:
                items = meq_from_folders(root, cfg.eval.explanation_question)
            s = _icm_set("meq", root, items[:limit], None)
            s.max_new_tokens = cfg.eval.explanation_max_new_tokens
            sets.append(s)
    return sets


def _icm_set(name: str, root: Path, items: list[dict], score) -> EvalSet:
    """An ICM set; every item needs ``image`` (relative to ``root``) and ``question``.

    Raises:
        ValueError: naming the set, the record and the missing key.
    """
    for i, it in enumerate(items):
        missing = [k for k in ("image", "question") if not isinstance(it, dict) or not it.get(k)]
        if missing:
            raise ValueError(
                f"{name} item #{i} ({str(it)[:80]}): no {' / '.join(missing)}; every item needs 'image' "
                f"(a path relative to {root}) and 'question'"
            )
    return EvalSet(name, items, [root / it["image"] for it in items], [str(it["question"]) for it in items], score)


def moderation_items(cfg: RunConfig, required: bool = True) -> list[dict]:
    """The moderation questions: ``icm_val_questions.json`` when the data root has one (the demo),
    else built from the ``val/<category>/`` folders as the real ICM-Val ships (see
    :mod:`icmlab.evaluate.icm_val`); a built list is saved in the run's ``eval/`` folder as the record of
    what was asked. With ``required=False`` a missing set gives ``[]``.

    Raises:
        FileNotFoundError: neither the JSON nor the folders exist.
    """
    root = paths.icm_eval_dir(cfg)
    src = root / "icm_val_questions.json"
    if src.exists():
        return read_json(src)
    if not (root / "val").is_dir():
        if not required:
            return []
        _require(src, "the ICM moderation validation set")
    items = questions_from_folders(root, cfg.eval.moderation_question or UPSTREAM_QUESTION)
    if parallel.is_main():
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


# --------------------------------------------------------------------------- answering
def prompt_format(protocol: EvalProtocol, bundle: ModelBundle) -> PromptFormat:
    """The inference prompt of the protocol, encoded with the same piece encoder as training."""
    encode = prompt_encoder(protocol, bundle.tokenizer, bundle.image_token_id, bundle.num_image_tokens)
    base = PROMPT_FORMATS[protocol.family]
    return PromptFormat(build=base.build, image_token=DIALECTS[protocol.family], encode=encode)


def answer_set(
    cfg: RunConfig, protocol: EvalProtocol, bundle: ModelBundle, s: EvalSet, control: str, device: str
) -> list[str]:
    """Greedy answers to every question of a set, data-parallel over the ranks of a torchrun launch.

    The shuffled control permutes the images of the *whole* set (a seeded derangement) before the
    items are sharded, and the blank control greys each image, so the answers do not depend on the
    number of ranks.
    """
    fmt = prompt_format(protocol, bundle)
    images: list[Path] = list(s.images)
    if normalize_control(control) == "shuffled":
        images = [images[j] for j in derangement(len(images), cfg.seed)]
        control = "none"

    def answer(pairs: list[tuple[str, Path]]) -> list[str]:
        return generate_answers(
            bundle.model,
            bundle.tokenizer,
            bundle.image_processor,
            [q for q, _ in pairs],
            [prepare_image(protocol, load_rgb(p), bundle.image_processor) for _, p in pairs],
            batch_size=cfg.eval.batch_size,
            max_new_tokens=s.max_new_tokens or protocol.max_new_tokens,
            device=device,
            prompt_format=fmt,
            control=control,
            seed=cfg.seed,
            image_token_id=bundle.image_token_id,
            num_image_tokens=bundle.num_image_tokens,
        )

    return parallel.map_sharded(answer, list(zip(s.questions, images)))


def evaluate_bundle(
    cfg: RunConfig,
    bundle: ModelBundle,
    sets: list[EvalSet],
    controls: list[str],
    device: str,
    protocol: EvalProtocol | None = None,
    judge: ChatJudge | None = None,
    label: str = "model",
) -> EvaluationResult:
    """Answer and score every set with one model, plus the control runs.

    Sets without a scorer (Q-Bench test, MEQ) keep their answers in ``EvalSet.outputs[label]``;
    MEQ answers are judged when a judge is given (on rank 0). Controls run the scored sets only.
    """
    protocol = protocol or resolve_protocol(cfg)
    result = EvaluationResult(meta={"protocol": protocol.describe()})
    for control in ["none", *controls]:
        target = result if control == "none" else result.controls.setdefault(control, EvaluationResult())
        for s in sets:
            if control != "none" and s.score is None:
                continue
            outputs = answer_set(cfg, protocol, bundle, s, control, device)
            if s.score is not None:
                setattr(target, s.name, s.score(s.items, outputs))
                continue
            s.outputs[label] = outputs
            if s.name == "meq" and judge is not None and parallel.is_main():
                target.meq = judge_explanations(s.items, outputs, judge)
    return result


def _device(cfg: RunConfig) -> str:
    if cfg.hardware.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _judge(cfg: RunConfig) -> ChatJudge | None:
    if "meq" not in cfg.eval.benchmarks or not cfg.eval.judge_url:
        if "meq" in cfg.eval.benchmarks:
            log.warning("eval.judge_url is not set: MEQ explanations are generated and saved, not judged")
        return None
    return ChatJudge(cfg.eval.judge_url, cfg.eval.judge_model, key_env=cfg.eval.judge_key_env)


def run(cfg: RunConfig) -> EvaluateResult:
    """Evaluate baseline and fine-tuned models and write the report.

    Under ``torchrun --nproc_per_node N -m icmlab evaluate P`` every rank answers a shard of the
    items (:mod:`icmlab.evaluate.parallel`); rank 0 writes the files.

    Returns:
        An :class:`EvaluateResult` (scores per model, report path).

    Raises:
        FileNotFoundError: a benchmark set or the fine-tuned model is missing.
    """
    t0 = time.perf_counter()
    family = get_family(cfg.model.family)
    device = parallel.init_from_env(_device(cfg))
    dtype = "bfloat16" if device.startswith("cuda") and cfg.train.bf16 else "float32"
    protocol = resolve_protocol(cfg)
    log.info("evaluating with %s", protocol.describe())
    sets = load_eval_sets(cfg, protocol)
    judge = _judge(cfg)
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
        evaluations["baseline"] = evaluate_bundle(cfg, base, sets, [], device, protocol, judge, label="baseline")
        evaluations["baseline"].meta["checkpoint"] = report.relative(cfg.model.base)
        del base
    log.info("evaluating the fine-tuned model %s", finetuned_dir)
    tuned = family.load_for_inference(
        finetuned_dir,
        dtype=dtype,
        device=device,
        attn_implementation=cfg.hardware.attn_implementation,
        endpoint=cfg.download.endpoint,
    )
    evaluations["fine-tuned"] = evaluate_bundle(
        cfg, tuned, sets, list(cfg.eval.controls), device, protocol, judge, label="fine-tuned"
    )
    evaluations["fine-tuned"].meta["checkpoint"] = report.relative(finetuned_dir)
    out = paths.eval_dir(cfg)
    scores_json = out / "scores.json"
    report_path = paths.report_dir(cfg) / "report.html"
    gallery: list = []
    context: dict = {}
    if parallel.is_main():
        context = report_context(cfg, protocol, sets, write_raw_outputs(cfg, sets, evaluations))
        atomic_write_json(scores_json, {k: v.to_dict() for k, v in evaluations.items()})
        for s in sets:
            if s.score is not None:
                gallery += gallery_from_records(s.items, s.images, evaluations, task=s.name, n=8, seed=cfg.seed)
        report_path = build_report(
            paths.report_dir(cfg),
            evaluations,
            gallery,
            title=f"{cfg.run_name}: baseline vs fine-tuned",
            context=context,
        )
    parallel.barrier()
    return EvaluateResult(evaluations, report_path, scores_json, time.perf_counter() - t0, gallery, context)
