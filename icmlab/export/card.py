"""The model card (``README.md``) of an export: what the model is, what it was trained on and how.

The card is built from the run alone: the resolved config (base model, recipe, hyperparameters),
the data sources with their licences (:data:`DATA_SOURCES`), the evaluation table of the run's
``eval/scores.json`` when the evaluate stage wrote one, and the icmlab commit. Its YAML front matter
is what the hub shows as metadata (``base_model``, ``license``, ``tags``, ``datasets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.io import read_json
from icmlab.models.spec import family_spec


@dataclass(frozen=True)
class DataSource:
    """A training data source as the card names it."""

    title: str
    hub: str
    licence: str
    commercial: bool | None
    """False: non-commercial terms; None: terms not published."""


#: The data sources a recipe can train on (``data.datasets`` and ``data.high_level`` names), with
#: their licences as upstream-recipes.md records them.
DATA_SOURCES: dict[str, DataSource] = {
    "q_instruct": DataSource(
        "Q-Instruct (cleaned_labels.json, 200K low-level visual instructions)",
        "q-future/Q-Instruct-DB",
        "non-commercial: the Q-Instruct repository moved to the S-Lab licence on 2024-08-12 "
        "(the hub dataset card still says apache-2.0)",
        False,
    ),
    "icm_instruct": DataSource(
        "ICM-Instruct training set (icm_llava_train.json)",
        "wumengyangok/ICM-Instruct",
        "given on request by the authors; terms not published (ask them before redistributing)",
        None,
    ),
    "llava_v1_5_mix665k": DataSource(
        "LLaVA-v1.5 mix665k (high-level instructions with COCO, GQA, OCR-VQA, TextVQA, VG images)",
        "liuhaotian/LLaVA-Instruct-150K",
        "cc-by-4.0 (the hub dataset card); the images keep their own datasets' terms",
        True,
    ),
    "custom": DataSource("Custom LLaVA-format JSON files of the run (data.custom_json)", "-", "yours", None),
}


def data_sources(cfg: RunConfig) -> list[DataSource]:
    """The sources this run trained on, in recipe order."""
    names = list(cfg.data.datasets) + (
        [cfg.data.high_level] if cfg.train.strategy == "mix" and cfg.data.high_level else []
    )
    return [DATA_SOURCES[n] for n in names if n in DATA_SOURCES]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def evaluation_rows(cfg: RunConfig) -> list[dict]:
    """The headline rows of the run's ``eval/scores.json`` (empty when the run was not evaluated)."""
    from icmlab.evaluate.scoring import EvaluationResult
    from icmlab.evaluate.stage import EvaluateResult

    scores = paths.eval_dir(cfg) / "scores.json"
    if not scores.is_file():
        return []
    evaluations = {k: EvaluationResult.from_dict(v) for k, v in read_json(scores).items()}
    return EvaluateResult(evaluations, paths.report_dir(cfg), scores, 0.0).headline()


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The recipe's training settings as the card lists them."""
    t = cfg.train
    rows: dict[str, Any] = {
        "strategy": f"{t.strategy} ({'MSFT: low-level + high-level mixed' if t.strategy == 'mix' else 'CSFT: low-level after a pretrained model'})",
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "global batch size": t.global_batch_size,
        "learning rate": t.lr,
        "projector learning rate": t.projector_lr if t.projector_lr is not None else t.lr,
        "lr scheduler": f"{t.lr_scheduler}, warmup {t.warmup_steps or t.warmup_ratio}",
        "weight decay": t.weight_decay,
        "model_max_length": cfg.data.model_max_length,
        "image aspect ratio": cfg.data.image_aspect_ratio,
        "vision tower": "frozen" if t.freeze_vision else "trained",
        "projector": "trained" if t.tune_projector else "frozen",
        "precision": "bf16" if t.bf16 else "fp32",
        "seed": cfg.seed,
    }
    if t.lora.enabled:
        rows["LoRA"] = f"r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout}"
    return rows


def model_card(cfg: RunConfig, *, commit: str | None, layouts: dict[str, str], serving: str | None = None) -> str:
    """The ``README.md`` text of an export.

    Args:
        cfg: the run's config.
        commit: the icmlab commit that produced the run (None: unknown).
        layouts: folder name -> one-line description of each exported layout.
        serving: the serving commands (LLaVA), shown in a "Serve it" section.
    """
    spec = family_spec(cfg.model.family)
    sources = data_sources(cfg)
    non_commercial = any(s.commercial is False for s in sources)
    front = {
        "base_model": cfg.model.base,
        "license": "other",
        "license_name": "non-commercial (training data)" if non_commercial else "see the base model and data licences",
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["icmlab", spec.name, "low-level-vision", *(["lora"] if cfg.train.lora.enabled else [])],
        "datasets": [s.hub for s in sources if s.hub != "-"],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {cfg.run_name}: {spec.title} fine-tuned with icmlab", ""]
    lines += [
        f"{spec.title} ({cfg.model.family}) fine-tuned from `{cfg.model.base}` for low-level visual "
        "question answering and image content moderation, with the icmlab workbench.",
        "",
    ]
    if non_commercial:
        lines += [
            "**Licence: non-commercial use only.** The training data includes Q-Instruct, whose licence is "
            "non-commercial; the base model's licence applies as well.",
            "",
        ]
    lines += ["## Base model", "", f"- `{cfg.model.base}` ({cfg.model.base_format} layout)"]
    for key in ("llm", "vision_tower", "mm_projector"):
        if getattr(cfg.model, key):
            lines.append(f"- {key}: `{getattr(cfg.model, key)}`")
    lines += ["", "## Training data", "", "| source | hub | licence |", "|---|---|---|"]
    lines += [f"| {s.title} | {s.hub} | {s.licence} |" for s in sources]
    lines += ["", "## Recipe and hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyperparameters(cfg).items()]
    rows = evaluation_rows(cfg)
    lines += ["", "## Evaluation", ""]
    if rows:
        lines += [
            f"Greedy decoding, template `{cfg.eval.template}`, split `{cfg.eval.split}`"
            + (f", first {cfg.eval.limit} items" if cfg.eval.limit else "")
            + ". Accuracies in %.",
            "",
            "| model | Q-Bench strict | Q-Bench substring | moderation |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {_pct(r['qbench_strict'])} | {_pct(r['qbench_substring'])} | {_pct(r['moderation_acc'])} |"
            for r in rows
        ]
    else:
        lines.append("The run was not evaluated (no `eval/scores.json`); run `icmlab evaluate` first to get the table.")
    lines += ["", "## Files", ""]
    lines += [f"- `{name}/`: {what}" for name, what in layouts.items()]
    lines += [
        "",
        "## Prompt",
        "",
        f"Inference prompt: `{spec.inference_prompt}`; training template `{spec.train_template}` "
        "(the processor's chat template renders it). Images: "
        + (
            "padded to square on the CLIP mean colour before resizing, as in training"
            + (" (the exported processor does it: `do_pad`)." if spec.serving_architecture else ".")
            if cfg.data.image_aspect_ratio == "pad"
            else f"`{cfg.data.image_aspect_ratio}` as in training."
        ),
    ]
    if serving:
        lines += ["", "## Serve it", "", "```bash", serving, "```"]
    lines += [
        "",
        "## Provenance",
        "",
        f"- icmlab commit: `{commit or 'unknown'}`",
        f"- run: `{cfg.run_name}` (parameters `{Path(cfg.source_file).name if cfg.source_file else '-'}`)",
        "",
    ]
    return "\n".join(lines)
