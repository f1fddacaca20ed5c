"""Where every stage reads and writes: one layout for data roots and run directories.

Data root (``cfg.data.root``, the recipes' ``playground/data``)::

    icm_llava_train.json  sexy_check_all/            # ICM-Instruct
    cleaned_labels.json   spaq_koniq/ livefb_liveitw_aigc/   # Q-Instruct
    llava_v1_5_mix665k.json coco/train2017 gqa/images ocr_vqa/images textvqa/train_images vg/VG_100K vg/VG_100K_2
    eval/qbench/llvisionqa_dev.json eval/qbench/images_llvisionqa/      # Q-Bench A1
    eval/icm/...                                                        # ICM validation
    models/...                                                          # local checkpoints (demo)

Run directory (``cfg.run_dir`` = ``runs/<run_name>``)::

    config.resolved.yaml env.json   NN_stage.ipynb (executed)   .markers/<stage>.json
    data/train.json (merged) data/train.provenance.jsonl data/validation.json data/train.clean.json data/rejects.jsonl
    data/<name>.inputs.json: fingerprints of a derived file and of the inputs it was made from (``icmlab.io``)
    checkpoints/checkpoint-N/   model/ (final, native layout)   adapter/ (LoRA)   metrics.jsonl   eval/   report/
    export/{hf,adapter,original}/   playground/
"""

from __future__ import annotations

from pathlib import Path

from icmlab.config import RunConfig
from icmlab.io import stale_reason

# The file each dataset ships as (names of the upstream releases).
DATASET_JSON = {
    "icm_instruct": "icm_llava_train.json",
    "q_instruct": "cleaned_labels.json",
    "llava_v1_5_mix665k": "llava_v1_5_mix665k.json",
}


def dataset_json(cfg: RunConfig, name: str) -> Path:
    """Path of a source dataset's JSON under the data root."""
    return cfg.data.root / DATASET_JSON[name]


def run_data_dir(cfg: RunConfig) -> Path:
    """Per-run data products (merge and validate outputs)."""
    return cfg.run_dir / "data"


def merged_json(cfg: RunConfig) -> Path:
    """Output of the merge stage: the training JSON in the model's dialect (LLaVA list format)."""
    return run_data_dir(cfg) / "train.json"


def provenance_jsonl(cfg: RunConfig) -> Path:
    """Sidecar of the merged JSON: one line per record with its source file and original index."""
    return run_data_dir(cfg) / "train.provenance.jsonl"


def validation_report(cfg: RunConfig) -> Path:
    """Validation report (JSON) of the merged file."""
    return run_data_dir(cfg) / "validation.json"


def clean_json(cfg: RunConfig) -> Path:
    """Cleaned training JSON written by validation with the ``drop`` policy."""
    return run_data_dir(cfg) / "train.clean.json"


def rejects_jsonl(cfg: RunConfig) -> Path:
    """Rejected records with the reason for each (``drop`` policy)."""
    return run_data_dir(cfg) / "rejects.jsonl"


def training_json(cfg: RunConfig) -> Path:
    """What the train stage reads: the cleaned file when validation wrote one from the current
    merged file, else the merged file (the train stage refuses a stale cleaned file, see
    :func:`icmlab.train.stage.check_training_data`)."""
    clean = clean_json(cfg)
    return clean if clean.exists() and stale_reason(clean) is None else merged_json(cfg)


def checkpoints_dir(cfg: RunConfig) -> Path:
    """Trainer checkpoints (``checkpoint-N``), resumed from automatically."""
    return cfg.run_dir / "checkpoints"


def final_model_dir(cfg: RunConfig) -> Path:
    """The trained model in the family's native layout (llava-hf for LLaVA)."""
    return cfg.run_dir / "model"


def adapter_dir(cfg: RunConfig) -> Path:
    """The LoRA adapter alone (PEFT layout) of a LoRA run, saved beside the merged ``model/``."""
    return cfg.run_dir / "adapter"


def export_dir(cfg: RunConfig) -> Path:
    """The export stage's output: ``hf/`` (with the model card), ``adapter/``, ``original/``."""
    return cfg.run_dir / "export"


def playground_dir(cfg: RunConfig) -> Path:
    """The playground's headless answers (``answers.json``, ``answers.html``)."""
    return cfg.run_dir / "playground"


def metrics_jsonl(cfg: RunConfig) -> Path:
    """Training metrics, one JSON object per logging step."""
    return cfg.run_dir / "metrics.jsonl"


def eval_dir(cfg: RunConfig) -> Path:
    """Raw evaluation outputs (predictions per model/benchmark)."""
    return cfg.run_dir / "eval"


def report_dir(cfg: RunConfig) -> Path:
    """The HTML/PNG report."""
    return cfg.run_dir / "report"


def markers_dir(cfg: RunConfig) -> Path:
    """Stage completion markers, written last by the runner."""
    return cfg.run_dir / ".markers"


def qbench_json(cfg: RunConfig, split: str) -> Path:
    """LLVisionQA JSON of a split."""
    return cfg.data.root / "eval" / "qbench" / f"llvisionqa_{split}.json"


def qbench_images(cfg: RunConfig) -> Path:
    """LLVisionQA image folder (the spelling the scripts expect, not the docs' typo)."""
    return cfg.data.root / "eval" / "qbench" / "images_llvisionqa"


def icm_eval_dir(cfg: RunConfig) -> Path:
    """ICM-Instruct validation set (imagefolder ``val/<category>/`` + questions JSON)."""
    return cfg.data.root / "eval" / "icm"


# --------------------------------------------------------------------------- download state (data root)
#: Folder of the download stage's state inside the data root: ``done/`` markers, ``downloads/``
#: (plain-URL files until extracted), ``staging/`` and the ``lock`` file.
DOWNLOAD_STATE = ".icmlab"


def download_state_dir(cfg: RunConfig) -> Path:
    """``<data root>/.icmlab``: the download stage's state."""
    return cfg.data.root / DOWNLOAD_STATE


def download_marker(cfg: RunConfig, source: str) -> Path:
    """The completion marker of a source (written last, when the source is complete)."""
    return download_state_dir(cfg) / "done" / f"{source.replace('/', '__').replace(':', '_')}.json"


def download_file(cfg: RunConfig, source: str, filename: str) -> Path:
    """Where a plain-URL download of ``source`` is kept until it is extracted."""
    return download_state_dir(cfg) / "downloads" / source / filename


def download_staging(data_root: Path, source: str) -> Path:
    """The staging folder of a source being laid out (renamed into place when complete)."""
    return Path(data_root) / DOWNLOAD_STATE / "staging" / source


def download_lock(cfg: RunConfig) -> Path:
    """The lock file that keeps two download steps off one data root."""
    return download_state_dir(cfg) / "lock"


def ocr_vqa_report(cfg: RunConfig) -> Path:
    """The OCR-VQA conversion report (dead and missing images), beside ``ocr_vqa/images``."""
    return cfg.data.root / "ocr_vqa" / "ocr_vqa_report.json"
