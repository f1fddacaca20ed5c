"""The one typed run configuration (``RunConfig``) shared by notebooks, CLI and tests.

A run is described by one YAML file under ``parameters/`` (model × dataset × strategy). It is loaded
one way everywhere::

    from icmlab.config import load_run_config
    cfg = load_run_config("parameters/demo.yaml", {"train.lr": 1e-3})

Loading validates everything that can be checked without touching weights or data: unknown keys
(with a "did you mean"), wrong types, values outside the allowed set, and impossible combinations.
All problems are collected and raised together as one :class:`ConfigError` naming the file, the
dotted key and the allowed values. Relative paths are resolved against the project root (the
parent of the ``parameters/`` folder holding the file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from icmlab.io import atomic_write_text
from icmlab.models.spec import family_spec
from icmlab.redact import install_log_redaction, redact, remember_secrets, restore_secrets
from icmlab.typed_yaml import YamlFileError, apply_override, build_dataclass, deepcopy_plain, load_yaml_file, to_plain

ModelFamily = Literal["llava15", "mplug_owl2"]
Strategy = Literal["mix", "after"]
# The ICM-Assistant README calls the two strategies MSFT and CSFT (never expanded upstream).
STRATEGY_ALIASES = {"msft": "mix", "csft": "after"}
DATASETS = ("icm_instruct", "q_instruct", "custom")


#: ``run_name`` is one path component below ``runs_root``: nothing that could climb out of it.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+=-]+")


class ConfigError(ValueError):
    """A parameters file (or override) is invalid; the message lists every problem found."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    family: ModelFamily = "llava15"
    """Model family: ``llava15`` (LLaVA-v1.5, native transformers) or ``mplug_owl2`` (icmlab's port)."""
    size: Literal["tiny", "7b", "13b"] = "7b"
    """Nominal size; used for reporting and the real-size config checks."""
    base: str = "llava-hf/llava-1.5-7b-hf"
    """Checkpoint to start from (hub id or local dir). For ``after`` an instruction-tuned model;
    for mPLUG-Owl2 ``mix`` too (its pre-SFT weights were never released)."""
    base_format: Literal["hf", "original"] = "hf"
    """``hf``: native layout (llava-hf / icmlab save); ``original``: liuhaotian/MAGAer13 layout, converted on load."""
    llm: str | None = None
    """``mix`` with LLaVA: the text LLM (e.g. ``lmsys/vicuna-7b-v1.5``)."""
    vision_tower: str | None = None
    """``mix`` with LLaVA: the CLIP vision tower (e.g. ``openai/clip-vit-large-patch14-336``)."""
    mm_projector: str | None = None
    """``mix`` with LLaVA: stage-1 projector repo id, dir or ``mm_projector.bin`` path."""
    revision: str | None = None
    """Pinned hub revision for every checkpoint of this run (None = main)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: ``auto`` = bfloat16 when ``train.bf16`` else float32."""


@dataclass
class DataConfig:
    root: Path = Path("data")
    """Data root: the upstream ``playground/data`` (images, JSONs); ``--image_folder`` of the recipes."""
    datasets: list[str] = field(default_factory=lambda: ["icm_instruct"])
    """Low-level datasets: any of ``icm_instruct``, ``q_instruct``, ``custom``."""
    custom_json: list[str] = field(default_factory=list)
    """LLaVA-format JSON files (relative to ``root`` or absolute) used when ``custom`` is listed."""
    high_level: str | None = "llava_v1_5_mix665k"
    """High-level set mixed in by the ``mix`` strategy (ignored by ``after``)."""
    sampling: dict[str, float] = field(default_factory=dict)
    """Per-source sampling/repetition ratio for merge (e.g. ``{q_instruct: 2.0}``); 1.0 when absent."""
    image_aspect_ratio: Literal["pad", "square", "resize"] = "pad"
    """Image preprocessing: ``pad`` (expand2square, upstream v1.5) / ``square`` (resize+crop) / ``resize``."""
    model_max_length: int = 2048
    """Sequences (image tokens included) are cut at this length, as upstream."""
    invalid_records: Literal["stop", "drop"] = "stop"
    """Validation policy: ``stop`` with the report, or ``drop`` into a rejects file with reasons."""
    image_check: Literal["full", "header", "exists"] = "full"
    """Validate's image check: ``full`` decodes every image (on all cores; finds truncated files),
    ``header`` reads format and size only (much faster, truncated files pass), ``exists`` checks paths only."""
    sources: dict[str, str] = field(default_factory=dict)
    """Per-source location override for download: local path, ``file://`` or URL (e.g. gated data)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters on the LLM instead of full weights (ICM-Assistant ``*_lora.sh``)."""
    r: int = 128
    """LoRA rank."""
    alpha: int = 256
    """LoRA alpha."""
    dropout: float = 0.05
    """LoRA dropout."""


@dataclass
class TrainConfig:
    strategy: Strategy = "after"
    """``mix`` (a, MSFT): low-level + high-level data from a pre-trained model; ``after`` (b, CSFT):
    low-level data only, from an instruction-tuned model. ``msft``/``csft`` are accepted aliases."""
    epochs: float = 1.0
    """Number of epochs (``--num_train_epochs``)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run the epochs)."""
    per_device_batch_size: int = 16
    """Micro-batch per GPU (``--per_device_train_batch_size``)."""
    global_batch_size: int = 128
    """Kept whatever the GPU count: gradient accumulation = global / (per_device × GPUs × nodes)."""
    lr: float = 2e-5
    """Peak learning rate."""
    projector_lr: float | None = None
    """Separate lr for the projector / visual abstractor (``mm_projector_lr``, ``visual_abstractor_lr``)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Linear warm-up as a fraction of all steps."""
    warmup_steps: int = 0
    """Warm-up steps (overrides ``warmup_ratio`` when > 0)."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float | None = None
    """Gradient clipping norm. ``None`` (default) = upstream's: the DeepSpeed JSON decides (``zero2``/``zero3``
    have no ``gradient_clipping`` key: no clipping; ``zero3_offload`` says ``auto``: 1.0) and runs without
    DeepSpeed clip at the HF Trainer's 1.0. A number clips at that norm under every config; 0 turns clipping off."""
    loss_normalization: Literal["micro_batch_mean", "token_mean"] = "micro_batch_mean"
    """How the loss of a step is averaged. ``micro_batch_mean`` (upstream, transformers 4.3x): each micro-batch's
    loss is the mean over its answer tokens, the step averages the micro-batches (accumulation and ranks alike).
    ``token_mean`` (transformers 5's default): the sum over the answer tokens of the whole global batch divided by
    their number, so every trained token weighs the same. See ``icmlab/train/loss.py``."""
    logging_steps: int = 1
    """Log every N steps (metrics.jsonl)."""
    save_steps: int = 50000
    """Checkpoint every N steps."""
    save_total_limit: int = 1
    """Checkpoints kept."""
    save_every_minutes: float | None = None
    """Also checkpoint when this many minutes of wall time passed since the last save (None = only
    every ``save_steps``); rank 0's clock decides for all ranks. Pre-emption (SIGTERM) always saves."""
    gradient_checkpointing: bool = True
    """Recompute activations to save memory."""
    group_by_modality_length: bool = True
    """Group image and text-only samples into separate megabatches (LLaVA sampler)."""
    bf16: bool = True
    """bfloat16 mixed precision (needs an Ampere+ GPU)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere+."""
    dataloader_num_workers: int = 4
    """Data loader worker processes."""
    freeze_vision: bool = True
    """Freeze the vision encoder (LLaVA always; mPLUG-Owl2 Q-Instruct trains it: false)."""
    tune_projector: bool = True
    """Train the projector / visual abstractor."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    packing: bool = False
    """Pack each micro-batch's samples into as few rows of at most ``data.model_max_length`` tokens
    as possible (first-fit decreasing, a sample is never split): position ids restart per sample,
    attention stays inside each sample (block-diagonal mask for sdpa/eager; one flattened varlen
    row for flash-attention 2), the first label of every sample is masked. Samples per step,
    trained tokens and the loss are those of the unpacked batch; only the padding is dropped.
    Both families. Off upstream (which has no packing). See ``icmlab/packing.py``."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Trainer loggers (``wandb``, ``tensorboard``); metrics.jsonl is always written."""
    resume: bool = True
    """Continue from the last checkpoint in the run directory when there is one."""
    push_to_hub: str | None = None
    """Hub repo id to push the final model to (None = don't)."""


BENCHMARKS = ("qbench_a1", "moderation", "icm_test", "mqa", "meq")
"""The evaluate stage's benchmarks (``eval.benchmarks``)."""


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["qbench_a1"])
    """Any of ``qbench_a1`` (LLVisionQA multiple choice), ``moderation`` (ICM-Val yes/no), ``icm_test``
    (ICM-Test yes/no per subset), ``mqa`` (ICM moderation question answering) and ``meq`` (ICM
    explanation quality, judged by ``eval.judge_url``)."""
    split: Literal["dev", "test"] = "dev"
    """Q-Bench split (test needs non-public answers)."""
    batch_size: int = 8
    """Generation batch (left padding)."""
    max_new_tokens: int | None = None
    """Greedy decoding length; None = the protocol's (upstream 1024 LLaVA / 512 mPLUG-Owl2, demo 16)."""
    protocol: Literal["auto", "upstream", "demo"] = "auto"
    """How questions become inputs (:mod:`icmlab.evaluate.protocol`): ``upstream`` = Q-Instruct's eval
    scripts (resize + centre crop, their prompt strings and budgets); ``demo`` = the embedded demo's
    own; ``auto`` = ``demo`` when ``demo.enabled``, else ``upstream``."""
    limit: int | None = None
    """Evaluate only the first N items of each set (None = all)."""
    baseline: bool = True
    """Also evaluate the starting checkpoint, for the before/after report."""
    template: Literal["auto", "vicuna_v1", "llava_v1", "llava_hf", "mplug_owl2"] = "auto"
    """Inference chat template; ``auto`` = upstream's eval modes (``llava_v1`` for LLaVA, ``mplug_owl2``)."""
    qbench_style: Literal["auto", "llava", "mplug", "options_first"] = "auto"
    """Q-Bench prompt layout: upstream LLaVA script (instruction before options), mPLUG script, or
    question/options/instruction as the Q-Instruct multiple-choice training records; ``auto`` = per family."""
    moderation_question: str | None = None
    """Question asked when the moderation items are built from ``val/<category>/`` folders (the real
    ICM-Val); None = the ICM authors' "Is the picture sexy?"."""
    explanation_question: str = "Is the picture sexy? Please explain why."
    """MEQ question when explanation items are built from ``val_MEQ/<category>/`` folders."""
    explanation_max_new_tokens: int = 512
    """Decoding budget of MEQ explanations (free text, unlike the letter/yes-no answers)."""
    judge_url: str | None = None
    """OpenAI-compatible endpoint judging MEQ, up to ``/v1`` (e.g. ``https://api.openai.com/v1``); None =
    explanations are generated and saved but not judged."""
    judge_model: str = "gpt-4o-mini"
    """Judge model name sent to ``judge_url``."""
    judge_key_env: str = "ICMLAB_JUDGE_KEY"
    """Environment variable holding the judge's API key (read at run time, never recorded)."""
    controls: list[str] = field(default_factory=list)
    """Control runs on the fine-tuned model: ``blank`` (grey images) and/or ``shuffled`` (images permuted between questions)."""


@dataclass
class HardwareConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run; ``auto`` = CUDA when available."""
    num_gpus: int = 8
    """GPUs per node."""
    num_nodes: int = 1
    """Nodes (multi-node needs ``hostfile``)."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi-node runs."""
    deepspeed: Literal["none", "zero2", "zero3", "zero3_offload", "zero3_mplug_owl2"] = "zero3"
    """DeepSpeed ZeRO config (``parameters/deepspeed/<name>.json``); ``zero3_mplug_owl2`` is mPLUG-Owl2's own
    ZeRO-3 (no parameter prefetch or reuse: ``stage3_max_live_parameters``/``max_reuse_distance``/
    ``prefetch_bucket_size`` 0), which its recipes use as upstream."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel; ``auto`` = flash-attn 2 when installed on CUDA, else sdpa."""
    launcher: Literal["auto", "inprocess", "deepspeed", "torchrun"] = "auto"
    """``auto``: in the notebook kernel for one device, ``deepspeed`` subprocess for several."""
    num_processes: int = 1
    """Training processes (ranks) per node with ``device: cpu``: more than 1 launches them over gloo
    through the same ``deepspeed``/``torchrun`` launcher as GPUs (``OMP_NUM_THREADS`` = cores / ranks)."""


@dataclass
class DownloadConfig:
    concurrency: int = 4
    """Files downloaded at once."""
    retries: int = 5
    """Retries per file with exponential backoff."""
    verify: bool = True
    """Check sizes and sha256 where the catalog knows them."""
    min_free_gb: float = 5.0
    """Disk space kept free after everything is downloaded and extracted."""
    endpoint: str | None = None
    """Hugging Face endpoint (mirror); None = ``HF_ENDPOINT`` or huggingface.co."""
    max_extract_gb: float = 500.0
    """Refuse to extract an archive whose files add up to more (the largest, COCO train2017, is ~19 GB)."""
    max_extract_ratio: float = 100.0
    """Refuse to extract an archive that expands more than this many times its size (a zip bomb;
    image archives expand ~1x, JSON archives ~10x)."""


@dataclass
class DemoConfig:
    enabled: bool = False
    """Generate the embedded synthetic data and tiny models (the CPU demo)."""
    seed: int = 0
    """Seed of the synthetic data and tiny models."""
    scale: float = 1.0
    """Multiplier on the synthetic dataset sizes."""
    source_dir: Path = Path("data/demo-sources")
    """Where the demo's packed "upstream" archives are generated; download fetches from here."""


@dataclass
class ExportConfig:
    enabled: bool = True
    """Notebook ``07_playground`` (and so ``icmlab run``) ends with the export; ``icmlab export``
    always exports."""
    source: str = "final"
    """What to export: ``final`` (``runs/<run>/model``, plus ``runs/<run>/adapter`` of a LoRA run),
    ``checkpoint-N`` (one of the run's checkpoints) or a folder (a saved model or a PEFT adapter)."""
    original_layout: bool = True
    """mPLUG-Owl2: also write the ORIGINAL X-PLUG layout (``export/original``) that Q-Align,
    IQA-PyTorch and the original code load."""
    repo_id: str | None = None
    """Hub repo id (``org/name``) the export's ``hf`` folder is pushed to; None = don't push."""
    private: bool = True
    """Create the hub repo private when it does not exist."""


@dataclass
class PlaygroundPair:
    image: str
    """Image path (relative paths are read under ``data.root``)."""
    question: str
    """The question, or a template name of :data:`icmlab.playground.TEMPLATES` (``qbench:...``, ``moderation``)."""


@dataclass
class PlaygroundConfig:
    models: list[str] = field(default_factory=lambda: ["baseline", "fine-tuned"])
    """Models to compare: ``baseline``, ``fine-tuned``, ``checkpoint-N``, ``run:<name>`` or a folder."""
    pairs: list[PlaygroundPair] = field(default_factory=list)
    """Headless (papermill) mode: the (image, question) pairs to answer; empty = the first
    ``samples`` validated records of the run."""
    samples: int = 4
    """Records of the validated dataset asked when ``pairs`` is empty."""
    max_new_tokens: int = 64
    """Answer length budget of the playground (greedy decoding, as evaluation)."""


@dataclass
class RunConfig:
    run_name: str = "run"
    """Name of the run directory ``<runs_root>/<run_name>``."""
    seed: int = 42
    """Global seed (data order, sampling, init of new rows)."""
    runs_root: Path = Path("runs")
    """Parent of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    playground: PlaygroundConfig = field(default_factory=PlaygroundConfig)
    source_file: str | None = None
    """The parameters file this config came from (set by the loader)."""

    @property
    def run_dir(self) -> Path:
        """The run directory: executed notebooks, resolved config, metrics, checkpoints, report."""
        return self.runs_root / self.run_name

    @property
    def world_size(self) -> int:
        """Number of training processes (GPUs × nodes; ``num_processes`` × nodes on CPU)."""
        h = self.hardware
        return (h.num_processes if h.device == "cpu" else h.num_gpus) * h.num_nodes

    @property
    def gradient_accumulation_steps(self) -> int:
        """Derived so that per_device × world × accumulation = global batch (checked at load)."""
        return max(1, self.train.global_batch_size // (self.train.per_device_batch_size * self.world_size))

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML-able dict of every field (paths as strings)."""
        return to_plain(self)


# --------------------------------------------------------------------------- loading
def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load, override and validate a parameters file.

    Args:
        path: YAML parameters file (absolute, relative to the working directory, or to the project root).
        overrides: dotted keys to values, e.g. ``{"train.lr": 1e-5, "run_name": "x"}``; string values
            are parsed as YAML scalars (so ``"1e-5"`` and ``"true"`` work from the CLI).

    Returns:
        The validated :class:`RunConfig` with absolute paths.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: unknown keys, wrong types, disallowed values or impossible combinations; all
            problems are listed, each with its dotted key.
    """
    p = _find_file(Path(path))
    try:
        raw = load_yaml_file(p)
    except YamlFileError as e:
        raise ConfigError(str(e)) from None
    if raw is None:  # an empty file would silently run every default (the 7B recipe, gated data)
        recipes = sorted(q.name for q in (project_root_for(p) / "parameters").glob("*.yaml"))
        raise ConfigError(
            f"{p}: the parameters file is empty; start from one of the recipes in parameters/: "
            + (", ".join(recipes) or "(none found)")
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=p, base_dir=project_root_for(p))


def config_from_dict(
    raw: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    *,
    source: Path | str | None = None,
    base_dir: Path | None = None,
) -> RunConfig:
    """Build a validated :class:`RunConfig` from nested dicts (the YAML content, or papermill ``-f`` sections).

    Raises:
        ConfigError: as :func:`load_run_config`.
    """
    where = str(source) if source else "<config>"
    data = deepcopy_plain(raw)
    data.pop("source_file", None)
    restore_secrets(data)  # a config.resolved.yaml written by this process or its parent
    errors: list[str] = []
    for key, value in (overrides or {}).items():
        apply_override(data, key, value, errors)
    _normalize_aliases(data)
    cfg = build_dataclass(RunConfig, data, "", errors)
    if not errors:
        cfg.source_file = str(source) if source else None
        _resolve_paths(cfg, base_dir or Path.cwd())
        errors.extend(validate(cfg))
    if errors:
        raise ConfigError(f"{where}: invalid run config:\n  - " + "\n  - ".join(errors))
    return cfg


def load_notebook_config(params_file: str, overrides: dict | None, namespace: dict[str, Any]) -> RunConfig:
    """The notebooks' one config call.

    ``papermill -f parameters/X.yaml`` injects the file's top-level sections as variables; when any
    are present in ``namespace`` they are used (with ``params_file`` ignored), otherwise ``params_file``
    is loaded. Either way the same validation runs. It first sets the kernel up for the notebooks
    (:func:`icmlab.notebook.prepare`: logs on stdout, known-harmless warnings dropped, progress tee).
    """
    install_log_redaction()  # the executed notebooks keep their log lines: no secret in them
    from icmlab.notebook import prepare

    prepare()
    sections = {f.name for f in fields(RunConfig)} - {"source_file"}
    injected = {k: namespace[k] for k in sections if k in namespace}
    if injected:
        return config_from_dict(injected, overrides, source="papermill -f parameters", base_dir=find_project_root())
    return load_run_config(params_file, overrides)


def save_resolved(cfg: RunConfig, path: Path | None = None) -> Path:
    """Write the resolved config as YAML (``<run_dir>/config.resolved.yaml`` by default), atomically."""
    path = path or cfg.run_dir / "config.resolved.yaml"
    header = f"# resolved from {cfg.source_file}\n" if cfg.source_file else ""
    plain = cfg.to_dict()
    remember_secrets(plain)  # the masked values reach the processes this one starts through the environment
    return atomic_write_text(path, header + yaml.safe_dump(redact(plain), sort_keys=False))


def find_project_root(start: Path | None = None) -> Path:
    """The nearest ancestor of ``start`` (default cwd) holding a ``parameters/`` folder, else ``start``."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / "parameters").is_dir() and (d / "notebooks").is_dir():
            return d
    return start


def project_root_for(params_path: Path) -> Path:
    """Relative paths in a parameters file are relative to the folder that holds ``parameters/``."""
    parent = params_path.resolve().parent
    return parent.parent if parent.name == "parameters" else parent


# --------------------------------------------------------------------------- validation
def validate(cfg: RunConfig) -> list[str]:
    """Cross-field checks (types were checked while building). Returns messages naming the keys."""
    e: list[str] = []
    m, d, t, h = cfg.model, cfg.data, cfg.train, cfg.hardware
    if not d.datasets:
        e.append("data.datasets: empty; list at least one of " + ", ".join(DATASETS))
    for name in d.datasets:
        if name not in DATASETS:
            e.append(f"data.datasets: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if "custom" in d.datasets and not d.custom_json:
        e.append("data.custom_json: required when data.datasets lists 'custom' (LLaVA-format JSON paths)")
    if d.custom_json and "custom" not in d.datasets:
        e.append("data.custom_json: set but data.datasets does not list 'custom'")
    if t.strategy == "mix" and not d.high_level:
        e.append("data.high_level: the 'mix' strategy needs a high-level set (llava_v1_5_mix665k)")
    if d.high_level not in (None, "llava_v1_5_mix665k"):
        e.append(f"data.high_level: unknown set {d.high_level!r}; allowed: llava_v1_5_mix665k or null")
    spec = family_spec(m.family)
    if spec.assembles(t.strategy):
        parts = spec.required_parts(t.strategy)
        for key in parts:
            if not getattr(m, key):
                e.append(
                    f"model.{key}: required for {spec.title} '{t.strategy}': the run assembles "
                    f"{' + '.join('model.' + p for p in parts)}"
                )
    if not spec.trains_vision and not t.freeze_vision:
        e.append(f"train.freeze_vision: {spec.title} recipes always freeze the vision tower; set it to true")
    for src in d.sampling:
        if src not in (*DATASETS, "llava_v1_5_mix665k"):
            e.append(f"data.sampling: unknown source {src!r}; allowed: {', '.join((*DATASETS, 'llava_v1_5_mix665k'))}")
    for src, ratio in d.sampling.items():
        if ratio <= 0:
            e.append(f"data.sampling.{src}: ratio must be > 0, got {ratio}")
    if d.model_max_length < 64:
        e.append(f"data.model_max_length: {d.model_max_length} is too short for any image prompt (>= 64)")
    # batch arithmetic: the global batch must split exactly over devices and micro-batches
    per_step = t.per_device_batch_size * cfg.world_size
    if t.per_device_batch_size < 1 or t.global_batch_size < 1:
        e.append("train.per_device_batch_size / train.global_batch_size: must be >= 1")
    elif t.global_batch_size % per_step:
        e.append(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of per_device_batch_size × "
            f"GPUs × nodes = {t.per_device_batch_size} × {cfg.world_size}; change one of them"
        )
    if t.lr <= 0:
        e.append(f"train.lr: must be > 0, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        e.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.epochs <= 0 and t.max_steps <= 0:
        e.append("train.epochs / train.max_steps: one of them must be positive")
    for rep in t.report_to:
        if rep not in ("none", "wandb", "tensorboard"):
            e.append(f"train.report_to: unknown logger {rep!r}; allowed: none, wandb, tensorboard")
    if t.max_grad_norm is not None and t.max_grad_norm < 0:
        e.append(f"train.max_grad_norm: must be >= 0 (0 = no clipping) or null (upstream's), got {t.max_grad_norm}")
    if t.lora.enabled and (t.lora.r < 1 or t.lora.alpha < 1):
        e.append("train.lora.r / train.lora.alpha: must be >= 1")
    for b in cfg.eval.benchmarks:
        if b not in BENCHMARKS:
            e.append(f"eval.benchmarks: unknown benchmark {b!r}; allowed: {', '.join(BENCHMARKS)}")
    for c in cfg.eval.controls:
        if c not in ("blank", "shuffled"):
            e.append(f"eval.controls: unknown control {c!r}; allowed: blank, shuffled")
    if h.device == "cpu":
        if h.launcher not in ("auto", "inprocess") and h.num_processes * h.num_nodes == 1:
            e.append(
                f"hardware.launcher: {h.launcher} on CPU needs several ranks; set hardware.num_processes > 1 "
                "or use launcher: inprocess"
            )
        if h.attn_implementation == "flash_attention_2":
            e.append("hardware.attn_implementation: flash_attention_2 needs CUDA; use sdpa or eager on CPU")
        if t.bf16:
            e.append(
                "train.bf16: bfloat16 training needs an Ampere+ GPU; set train.bf16: false with hardware.device: cpu"
            )
    if h.num_gpus < 1 or h.num_nodes < 1:
        e.append("hardware.num_gpus / hardware.num_nodes: must be >= 1")
    if t.save_every_minutes is not None and t.save_every_minutes <= 0:
        e.append(f"train.save_every_minutes: must be > 0 or null, got {t.save_every_minutes}")
    if h.num_processes < 1:
        e.append(f"hardware.num_processes: must be >= 1, got {h.num_processes}")
    if h.num_nodes > 1 and not h.hostfile and h.launcher != "torchrun":
        e.append(
            "hardware.hostfile: required for multi-node runs (hardware.num_nodes > 1) with the deepspeed "
            "launcher; on SLURM use `icmlab slurm` (torchrun per node, rendezvous from SLURM_*)"
        )
    if cfg.download.max_extract_gb <= 0 or cfg.download.max_extract_ratio < 1:
        e.append("download.max_extract_gb / download.max_extract_ratio: must be > 0 and >= 1")
    if cfg.download.concurrency < 1:
        e.append("download.concurrency: must be >= 1")
    if not _SAFE_NAME.fullmatch(cfg.run_name) or cfg.run_name in (".", ".."):
        e.append(
            f"run_name: {cfg.run_name!r} must be one folder name (letters, digits, '.', '_', '-', '+', '='; "
            "not '.' or '..', no '/'): the run directory is <runs_root>/<run_name>"
        )
    return e


# --------------------------------------------------------------------------- internals
def _find_file(path: Path) -> Path:
    if path.is_file():
        return path.resolve()
    alt = find_project_root() / path
    if alt.is_file():
        return alt.resolve()
    raise FileNotFoundError(f"parameters file not found: {path} (looked in {Path.cwd()} and {alt.parent})")


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    def absolute(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.runs_root = absolute(cfg.runs_root)
    cfg.data.root = absolute(cfg.data.root)
    cfg.demo.source_dir = absolute(cfg.demo.source_dir)
    # Model locations may be hub ids ("org/name"); only those that look like local paths are made absolute.
    # "{data_root}/..." places a local checkpoint under the data root (it follows a data.root override).
    for key in ("base", "llm", "vision_tower", "mm_projector"):
        val = getattr(cfg.model, key)
        if val and "{data_root}" in val:
            val = val.replace("{data_root}", str(cfg.data.root))
            setattr(cfg.model, key, val)
        if val and (val.startswith((".", "/", "~")) or (base / val).exists() or val.startswith("data/")):
            setattr(cfg.model, key, str(absolute(Path(val))))


def _normalize_aliases(data: dict) -> None:
    """``train.strategy: msft/csft`` (any case) → ``mix/after``, before type checking."""
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("strategy"), str):
        train["strategy"] = STRATEGY_ALIASES.get(train["strategy"].lower(), train["strategy"])
