"""Export stage: ship a trained model in the layouts other tools read, with a model card.

``run(cfg)`` reads ``cfg.export.source`` (the run's final model, one of its checkpoints, or a
folder) and writes ``runs/<run>/export/``:

- ``hf/``: the family's transformers layout (LLaVA: the llava-hf folder that plain
  ``AutoProcessor`` + ``LlavaForConditionalGeneration``, vLLM and SGLang read: weights, config,
  tokenizer, processor with the chat template), the inference ``generation_config.json`` (greedy,
  as evaluation decodes) and the model card ``README.md``. A LoRA source is merged into its base.
- ``adapter/`` (LoRA runs): the adapter alone in PEFT format, ``base_model_name_or_path`` set to
  ``model.base``, reloadable with ``PeftModel.from_pretrained(base, adapter)``.
- ``original/`` (mPLUG-Owl2, ``export.original_layout``): the ORIGINAL X-PLUG layout, for the
  original code, Q-Align and IQA-PyTorch.

For LLaVA it prints the ``vllm serve`` / SGLang commands of the ``hf`` folder; with
``export.repo_id`` set the ``hf`` folder (or the adapter of a LoRA source) is pushed to the hub.

Notebook: ``07_playground.ipynb`` (its last section); CLI: ``icmlab export parameters/X.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.envinfo import git_commit
from icmlab.export.card import model_card
from icmlab.export.hub import check_repo_id, push_folder
from icmlab.export.serving import serve_commands, serving_problems
from icmlab.io import atomic_write_text, read_json
from icmlab.models import ModelBundle, get_family
from icmlab.models.spec import family_spec

log = logging.getLogger("icmlab.export.stage")

#: Files of a PEFT adapter folder (what ``PeftModel.save_pretrained`` writes).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ExportResult:
    """What the export wrote.

    Attributes:
        out_dir: ``runs/<run>/export``.
        layouts: folder name -> path of each written layout (``hf``, ``adapter``, ``original``).
        source: the model folder exported.
        serving: the serve commands (LLaVA), else None.
        pushed: the hub commit URL when ``export.repo_id`` is set.
        seconds: wall time.
    """

    out_dir: Path
    layouts: dict[str, Path] = field(default_factory=dict)
    source: Path | None = None
    serving: str | None = None
    pushed: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """Text for the terminal and the notebook."""
        lines = [f"exported {self.source} -> {self.out_dir}"]
        lines += [f"  {name:<9} {path}" for name, path in self.layouts.items()]
        if self.pushed:
            lines.append(f"pushed: {self.pushed}")
        if self.serving:
            lines += ["", "serve it:", self.serving]
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources
def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json`` + adapter weights)."""
    return (path / ADAPTER_CONFIG).is_file() and any((path / w).is_file() for w in ADAPTER_WEIGHTS)


def resolve_source(cfg: RunConfig) -> tuple[Path | None, Path | None]:
    """``(model folder, adapter folder)`` of ``cfg.export.source``; either may be None, not both.

    ``final``: ``runs/<run>/model`` with ``runs/<run>/adapter`` of a LoRA run; ``checkpoint-N``: that
    checkpoint (a LoRA run's checkpoints hold the adapter alone); else a folder path.

    Raises:
        FileNotFoundError: naming the missing folder and the stage that writes it.
    """
    src = cfg.export.source
    if src == "final":
        model, adapter = paths.final_model_dir(cfg), paths.adapter_dir(cfg)
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"export.source=final: no trained model at {model}; run the train stage first")
        return model, adapter if is_adapter_dir(adapter) else None
    path = paths.checkpoints_dir(cfg) / src if src.startswith("checkpoint-") else Path(src).expanduser()
    if is_adapter_dir(path):
        return None, path
    if (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(
        f"export.source={src!r}: {path} holds neither a model (config.json) nor a PEFT adapter "
        f"({ADAPTER_CONFIG}); use 'final', one of {_checkpoints(cfg) or 'the run checkpoints'} or a model folder"
    )


def _checkpoints(cfg: RunConfig) -> list[str]:
    d = paths.checkpoints_dir(cfg)
    return sorted(p.name for p in d.glob("checkpoint-*")) if d.is_dir() else []


def _saved_dtype(model_dir: Path) -> str:
    """The dtype the weights were saved in (``config.json``), so the export neither up- nor down-casts."""
    raw = read_json(model_dir / "config.json")
    return raw.get("dtype") or raw.get("torch_dtype") or "float32"


def _load(cfg: RunConfig, family: Any, model_dir: Path | None, adapter: Path | None) -> ModelBundle:
    """The model to export: the saved one, or the base with the adapter applied (merged on save)."""
    if model_dir is not None:
        return family.load_for_inference(model_dir, dtype=_saved_dtype(model_dir), attn_implementation="eager")
    from peft import PeftModel

    base = family.load_for_inference(
        cfg.model.base,
        dtype=cfg.model.dtype if cfg.model.dtype != "auto" else "float32",
        attn_implementation="eager",
        revision=cfg.model.revision,
        endpoint=cfg.download.endpoint,
    )
    return dataclasses.replace(base, model=PeftModel.from_pretrained(base.model, str(adapter)))


# --------------------------------------------------------------------------- layouts
def write_generation_config(bundle: ModelBundle, out: Path, max_new_tokens: int) -> Path:
    """The inference defaults: greedy decoding as evaluation runs it, and the special tokens."""
    from transformers import GenerationConfig

    tok = bundle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
    )
    config.save_pretrained(out)
    return out / "generation_config.json"


def write_adapter(adapter: Path, out: Path, base_model: str, revision: str | None) -> Path:
    """Copy a PEFT adapter into ``out`` with ``base_model_name_or_path`` naming the run's base model.

    Written to a staging folder and renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        config = read_json(tmp / ADAPTER_CONFIG)
        config["base_model_name_or_path"] = base_model
        config["revision"] = revision
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


#: One line per layout for the model card.
LAYOUT_NOTES = {
    "hf": "transformers layout (weights, config, tokenizer, processor with chat template, generation config)",
    "adapter": "the LoRA adapter alone (PEFT), for `PeftModel.from_pretrained(<base model>, adapter)`",
    "original": "the ORIGINAL mPLUG-Owl2 layout (X-PLUG code, Q-Align, IQA-PyTorch)",
}


def run(cfg: RunConfig) -> ExportResult:
    """Export the configured model (see the module docstring).

    Returns:
        An :class:`ExportResult`.

    Raises:
        FileNotFoundError: the source is missing.
        ValueError: the exported LLaVA folder fails a serving check, or the repo id is malformed.
    """
    t0 = time.perf_counter()
    if cfg.export.repo_id:
        check_repo_id(cfg.export.repo_id)  # before any work
    spec = family_spec(cfg.model.family)
    family = get_family(cfg.model.family)
    model_dir, adapter = resolve_source(cfg)
    out = paths.export_dir(cfg)
    result = ExportResult(out_dir=out, source=model_dir or adapter)
    log.info("exporting %s", result.source)
    bundle = _load(cfg, family, model_dir, adapter)
    if adapter is not None:
        result.layouts["adapter"] = write_adapter(adapter, out / "adapter", cfg.model.base, cfg.model.revision)
    hf = out / "hf"
    # merges a PEFT model into its base; LLaVA writes the llava-hf hub key names and a processor that
    # pads to square as training did
    if hasattr(family, "save_hub_layout"):
        family.save_hub_layout(bundle, hf, pad_images=cfg.data.image_aspect_ratio == "pad")
    else:
        family.save_bundle(bundle, hf)
    write_generation_config(bundle, hf, cfg.playground.max_new_tokens)
    result.layouts["hf"] = hf
    if spec.original_layout and cfg.export.original_layout:
        result.layouts["original"] = family.save_original(bundle, out / "original")
    result.serving = serve_commands(
        hf, family=cfg.model.family, name=cfg.run_name, max_model_len=cfg.data.model_max_length
    )
    if result.serving:
        # transformers 5 keeps the image processor inside processor_config.json; engines on
        # transformers 4 read preprocessor_config.json, as the llava-hf repos ship it
        AutoImageProcessor.from_pretrained(hf, backend="pil").save_pretrained(hf)
        problems = serving_problems(hf, cfg.model.family)
        if problems:
            raise ValueError(f"{hf}: not servable as {spec.serving_architecture}: " + "; ".join(problems))
    card = model_card(
        cfg,
        commit=git_commit(),
        layouts={name: LAYOUT_NOTES[name] for name in result.layouts},
        serving=result.serving,
    )
    for path in result.layouts.values():
        atomic_write_text(path / "README.md", card)
    if cfg.export.repo_id:
        result.pushed = push_folder(
            result.layouts["hf"],
            cfg.export.repo_id,
            private=cfg.export.private,
            endpoint=cfg.download.endpoint,
            commit_message=f"icmlab export of run {cfg.run_name}",
        )
    result.seconds = time.perf_counter() - t0
    return result
