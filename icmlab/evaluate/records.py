"""What the evaluate stage writes besides scores: the Q-Bench test submission, the MEQ explanations,
and the provenance the report opens with.

**Q-Bench test split.** Its answers are not public. The Q-Bench maintainers take results by email
(Q-Future/Q-Bench README, "Submission Guideline for A1/A2": "submit your result in json format") in
the form their and LLaVA's runners write (``llava/eval/model_vqa_qbench.py``, Q-Instruct
``eval_qbench_mcq.py``): every LLVisionQA record unchanged plus a ``"response"`` field holding the
model's answer, one JSON object per line. :func:`write_qbench_submission` writes exactly that
(a real newline after each record, which upstream's ``json.dump`` in append mode forgets) as
``runs/<run>/eval/qbench_test_submission.<model>.jsonl``.

**Provenance.** :func:`report_context` gathers what the report's first section states: the date,
the icmlab commit, the parameters file, a recipe summary, the data sources with their item counts,
the protocol, whether the data are the embedded demo's, and the papers' reference rows.
All paths are relative to the project root (the folder holding ``parameters/``).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

from icmlab import paths
from icmlab.config import RunConfig, project_root_for
from icmlab.envinfo import git_commit
from icmlab.evaluate.protocol import EvalProtocol
from icmlab.evaluate.references import ICM_SOURCE, QBENCH_SOURCE, icm_reference, qbench_reference
from icmlab.evaluate.report import relative
from icmlab.io import atomic_write_text

if TYPE_CHECKING:
    from icmlab.evaluate.scoring import EvaluationResult
    from icmlab.evaluate.stage import EvalSet


def write_qbench_submission(path: Path, items: list[dict], outputs: list[str]) -> Path:
    """Write the maintainers' submission jsonl: each record plus ``"response"`` (atomic).

    Raises:
        ValueError: when items and outputs differ in number.
    """
    if len(items) != len(outputs):
        raise ValueError(f"Q-Bench submission: {len(items)} items but {len(outputs)} answers")
    lines = [json.dumps({**item, "response": out}, ensure_ascii=False) for item, out in zip(items, outputs)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_raw_outputs(cfg: RunConfig, sets: list["EvalSet"], evaluations: dict[str, "EvaluationResult"]) -> dict:
    """Write the answers of the unscored sets and note their paths in each model's ``meta``.

    Returns:
        ``{"qbench_submission": {label: relative path}, "meq_explanations": {label: relative path}}``.
    """
    written: dict[str, dict[str, str]] = {}
    for s in sets:
        for label, outputs in s.outputs.items():
            safe = label.replace(" ", "_")
            if s.name == "qbench":
                target = paths.eval_dir(cfg) / f"qbench_{cfg.eval.split}_submission.{safe}.jsonl"
                write_qbench_submission(target, s.items, outputs)
                key = "qbench_submission"
            else:
                target = paths.eval_dir(cfg) / f"meq_explanations.{safe}.jsonl"
                rows = [{**it, "output": out} for it, out in zip(s.items, outputs)]
                atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                key = "meq_explanations"
            written.setdefault(key, {})[label] = relative(target)
            if label in evaluations:
                evaluations[label].meta[key] = relative(target)
    return written


def _recipe(cfg: RunConfig) -> str:
    t = cfg.train
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs} epoch(s)"
    return (
        f"{cfg.model.family} {cfg.model.size}, strategy {t.strategy}, data {', '.join(cfg.data.datasets)}"
        + (f" + {cfg.data.high_level}" if t.strategy == "mix" else "")
        + f"; {steps}, global batch {t.global_batch_size}, lr {t.lr:g}"
        + (f", LoRA r={t.lora.r}" if t.lora.enabled else "")
    )


def _sources(cfg: RunConfig, sets: list["EvalSet"]) -> list[list[str]]:
    rows = []
    for s in sets:
        if s.name == "qbench":
            where = paths.qbench_json(cfg, cfg.eval.split)
        else:
            where = paths.icm_eval_dir(cfg)
        rows.append([s.name, relative(where), str(len(s.items))])
    return rows


def report_context(cfg: RunConfig, protocol: EvalProtocol, sets: list["EvalSet"], written: dict) -> dict:
    """The report's provenance section (see the module docstring); JSON-ready."""
    labels = {"baseline": "baseline", "fine-tuned": cfg.train.strategy}
    refs: dict[str, dict] = {}
    for ours, theirs in labels.items():
        q = qbench_reference(cfg.model.family, cfg.model.size, cfg.eval.split, theirs)
        icm = icm_reference(cfg.model.family, "after" if ours == "fine-tuned" else "baseline")
        refs[ours] = {"qbench": q, "icm": icm if cfg.model.size != "tiny" else None}
    root = project_root_for(Path(cfg.source_file)) if cfg.source_file else Path.cwd()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit() or "unknown (not a git checkout)",
        "parameters": relative(cfg.source_file, root) if cfg.source_file else "(built in code)",
        "recipe": _recipe(cfg),
        "protocol": protocol.describe(),
        "demo": bool(cfg.demo.enabled),
        "sources": _sources(cfg, sets),
        "split": cfg.eval.split,
        "written": written,
        "references": refs,
        "reference_sources": {"qbench": QBENCH_SOURCE, "icm": ICM_SOURCE},
    }
