"""LLaVA-v1.5 family adapter: load, train-configure and save ``LlavaForConditionalGeneration`` bundles.

This is the module the registry (:mod:`icmlab.models`) returns for ``family: llava15``. It hides the
three ways a run can start (a llava-hf checkpoint, an original ``liuhaotian/llava-v1.5-*``
checkpoint, or the MSFT "mix" parts Vicuna + CLIP + stage-1 projector, see
:mod:`icmlab.models.llava15.convert`) behind ``load_for_training(cfg)``, and writes every result
in the llava-hf layout, which plain ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` read back.

Usage::

    bundle = load_for_training(cfg)              # vision tower frozen, projector + LLM trainable
    ...                                          # train
    save_bundle(bundle, cfg.run_dir / "final")
    bundle = load_for_inference(cfg.run_dir / "final", dtype="auto", attn_implementation="auto", device="cuda")

Resuming with the HF Trainer: build the model with ``load_for_inference``/``from_pretrained`` of the
checkpoint dir first, then call ``Trainer.train(resume_from_checkpoint=dir)``; transformers 5 saves
legacy key names that the Trainer's raw resume load does not rename (environment-notes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.utils import is_flash_attn_2_available

from icmlab.models import ModelBundle, set_loss_normalization, write_bundle_dir
from icmlab.models import groups as _groups
from icmlab.models.llava15.convert import (
    IMAGE_TOKEN,
    KNOWN_VISION_TOWERS,
    PAD_TOKEN,
    assemble_from_parts,
    build_llava_config,
    load_original_checkpoint,
    native_to_hub_key,
)
from icmlab.models.llava15.files import hub_options, read_config, resolve_source
from icmlab.models.spec import FAMILY_SPECS

SPEC = FAMILY_SPECS["llava15"]
FAMILY = SPEC.name
DIALECT = SPEC.image_token
MODULE_GROUPS: dict[str, list[str]] = {
    "vision_encoder": ["model.vision_tower"],
    "projector": ["model.multi_modal_projector"],
    "llm": ["model.language_model", "lm_head"],  # embed_tokens lives in model.language_model
}
# LLaVA-v1.5 finetuning: CLIP frozen (requires_grad_(False) in upstream's clip_encoder), the rest trained.
DEFAULT_TRAINABLE = {"vision_encoder": False, "projector": True, "llm": True}
ATTN_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
# The vicuna_v1 conversation (sep_style TWO) that --version v1 trains with; a leading system message
# overrides the system prompt (conv_llava_v1 for Q-Instruct-style evaluation, for instance).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "', start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set c = messages[0]['content'] -%}"
    "{%- set ns.system = c if c is string else "
    "(c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{%- set ns.start = 1 -%}{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for m in messages[ns.start:] -%}"
    "{{- 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
    "{%- for part in m['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in m['content'] | selectattr('type', 'equalto', 'text') -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ' if m['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


# ----------------------------------------------------------------------------- hardware choices


def resolve_attn_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """Choose the attention kernel.

    Args:
        requested: ``cfg.hardware.attn_implementation``: ``auto`` picks ``flash_attention_2`` when the
            flash-attn package imports and CUDA is present (and ``dtype`` is half precision), else ``sdpa``.
        dtype: the model dtype, if known.

    Returns:
        ``flash_attention_2``, ``sdpa`` or ``eager``.

    Raises:
        ValueError: for an unknown value, or flash attention with a float32 model.
        RuntimeError: if flash attention is requested but unavailable.
    """
    if requested not in ATTN_CHOICES:
        raise ValueError(f"hardware.attn_implementation={requested!r}; allowed: {list(ATTN_CHOICES)}")
    half = dtype in (None, torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash_attention_2" if half and is_flash_attn_2_available() else "sdpa"
    if requested == "flash_attention_2":
        if not is_flash_attn_2_available():
            raise RuntimeError(
                "hardware.attn_implementation=flash_attention_2 but flash-attn is not importable or CUDA is "
                "absent; install it on a GPU machine (pip install 'icmlab[flash]' --no-build-isolation) or "
                "set hardware.attn_implementation: sdpa"
            )
        if not half:
            raise ValueError("flash_attention_2 needs float16/bfloat16 weights; set hardware.dtype: bf16 or use sdpa")
    return requested


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(spec: str | torch.dtype | None = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it, else float32; names like ``bf16`` map to dtypes.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "auto"):
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if spec not in _DTYPES:
        raise ValueError(f"dtype {spec!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[spec]


def real_config(size: str) -> LlavaConfig:
    """Config of ``llava-hf/llava-1.5-{7b,13b}-hf`` (Vicuna-v1.5 + CLIP-L/14-336; vocab 32064, image 32000, pad 32001).

    Shapes only: real runs read ``rms_norm_eps`` etc. from the checkpoint's own config.json.

    Raises:
        ValueError: for sizes other than ``7b``/``13b``.
    """
    sizes = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    }
    if size.lower() not in sizes:
        raise ValueError(f"model.size={size!r}: LLaVA-v1.5 comes in {sorted(sizes)}")
    text = dict(
        sizes[size.lower()],
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    text["num_key_value_heads"] = text["num_attention_heads"]
    vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"])
    return build_llava_config(text, vision, old_vocab=32000, new_vocab=32064)


# ----------------------------------------------------------------------------- tokenizer / images


def add_image_and_pad_tokens(tokenizer: Any, config: LlavaConfig) -> Any:
    """Add ``<image>`` then ``<pad>`` (as the pad token) and check they land on the config's ids.

    Raises:
        ValueError: if the tokenizer's size does not match the checkpoint's old vocabulary.
    """
    if len(tokenizer) != config.image_token_id:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the checkpoint's embedding had {config.image_token_id} rows; "
            "use the tokenizer saved with this checkpoint"
        )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    got = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    if got != [config.image_token_id, config.pad_token_id]:
        raise ValueError(f"<image>/<pad> got ids {got}, expected {[config.image_token_id, config.pad_token_id]}")
    return tokenizer


def _load_tokenizer(directory: Path, padding_side: str, max_length: int | None) -> Any:
    kwargs = {"padding_side": padding_side}
    if max_length:
        kwargs["model_max_length"] = max_length
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{directory}: no loadable tokenizer ({exc})") from exc


def _image_processor(directory: Path | None, vision: CLIPVisionConfig) -> Any:
    """The CLIP processor of the tower (PIL backend: bit-identical to upstream's); built from the config if absent."""
    # transformers 5 saves it inside processor_config.json; older repos have preprocessor_config.json
    names = ("preprocessor_config.json", "processor_config.json")
    if directory is not None and any((Path(directory) / n).is_file() for n in names):
        return AutoImageProcessor.from_pretrained(directory, backend="pil")
    side = vision.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _bundle(model, tokenizer, image_processor, **extra) -> ModelBundle:
    cfg = model.config
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id:
        raise ValueError(
            f"tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
            f"model expects image_token_index={cfg.image_token_id}"
        )
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_token_id=cfg.image_token_id,
        num_image_tokens=cfg.image_seq_length,
        family=FAMILY,
        extra=extra,
    )


# ----------------------------------------------------------------------------- loading


def _load_any(source: str | Path, *, revision, vision_source, dtype, attn, padding_side, max_length) -> ModelBundle:
    """Load a llava-hf dir (``model_type: llava``) or convert an original one (``mm_vision_tower`` in config)."""
    path = resolve_source(source, revision=revision)
    raw = read_config(path)
    if "mm_vision_tower" in raw:
        model = load_original_checkpoint(path, vision_source=vision_source, dtype=dtype, attn_implementation=attn)
        tok = add_image_and_pad_tokens(_load_tokenizer(path, padding_side, max_length), model.config)
        vdir = resolve_source(vision_source) if vision_source else None
        return _bundle(
            model,
            tok,
            _image_processor(vdir, model.config.vision_config),
            source=str(path),
            format="original",
            converted=True,
        )
    if raw.get("model_type") != "llava":
        raise ValueError(
            f"{path}/config.json: model_type={raw.get('model_type')!r} is neither llava (llava-hf) "
            "nor an original LLaVA checkpoint (mm_vision_tower)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    tok = _load_tokenizer(path, padding_side, max_length)
    return _bundle(model, tok, _image_processor(path, model.config.vision_config), source=str(path), format="hf")


def training_dtype(cfg: Any) -> torch.dtype:
    """The dtype the weights are loaded in for training: ``cfg.model.dtype``, or for ``auto``:

    - bfloat16 when ``train.bf16`` runs under DeepSpeed (ZeRO keeps the fp32 master weights itself,
      as upstream);
    - float32 otherwise, also for ``train.bf16`` without DeepSpeed: the Trainer then runs the forward
      under bf16 autocast and AdamW updates fp32 master weights (pure-bf16 AdamW loses small updates).
      ``model.dtype: bfloat16`` is the switch back to pure bf16 (half the weight memory).
    """
    spec = getattr(cfg.model, "dtype", "auto")
    if spec in (None, "auto"):
        bf16 = getattr(cfg.train, "bf16", False)
        deepspeed = getattr(getattr(cfg, "hardware", None), "deepspeed", "none") != "none"
        return torch.bfloat16 if bf16 and deepspeed else torch.float32
    return resolve_dtype(spec)


def compute_dtype(cfg: Any) -> torch.dtype:
    """The dtype the matmuls run in: bfloat16 under ``train.bf16`` (weights or autocast), else the weights' dtype."""
    return torch.bfloat16 if getattr(cfg.train, "bf16", False) else training_dtype(cfg)


def load_for_training(cfg: Any) -> ModelBundle:
    """Build the starting model of a run (see :func:`_load_for_training`), fetching hub checkpoints that the
    download stage has not placed through ``cfg.download.endpoint`` (:func:`~icmlab.models.llava15.files.hub_options`)."""
    with hub_options(endpoint=getattr(getattr(cfg, "download", None), "endpoint", None)):
        return _load_for_training(cfg)


def _load_for_training(cfg: Any) -> ModelBundle:
    """Build the starting model of a run with upstream's trainable parts.

    Reads ``cfg.model.{base, base_format, llm, vision_tower, mm_projector, revision, dtype}``,
    ``cfg.train.{strategy, bf16, freeze_vision, tune_projector, lora}``,
    ``cfg.hardware.attn_implementation`` and ``cfg.data.model_max_length``. ``strategy: mix``
    assembles Vicuna + CLIP + stage-1 projector; ``after`` starts from ``cfg.model.base`` (llava-hf
    or original layout). The new ``<image>``/``<pad>`` rows use seed 0 whatever the run seed, so one
    base always converts to the same weights. With ``cfg.train.lora.enabled`` the returned model is
    the PEFT wrapper from :func:`apply_lora` (``extra["lora"] = True``).

    Returns:
        A bundle with a right-padding tokenizer and ``use_cache`` off.

    Raises:
        ValueError: for a missing or unknown setting, naming the config key.
    """
    m, t = cfg.model, cfg.train
    dtype = training_dtype(cfg)
    # flash-attn runs on the bf16 autocast inputs even when the weights are fp32 masters
    attn = resolve_attn_implementation(getattr(cfg.hardware, "attn_implementation", "auto"), compute_dtype(cfg))
    max_len = getattr(getattr(cfg, "data", None), "model_max_length", None)
    revision = getattr(m, "revision", None)
    if SPEC.assembles(t.strategy):
        missing = [k for k in SPEC.required_parts(t.strategy) if not getattr(m, k, None)]
        if missing:
            raise ValueError(
                f"train.strategy={t.strategy} needs model.{', model.'.join(missing)} (Vicuna, CLIP, stage-1 projector)"
            )
        model = assemble_from_parts(
            m.llm, m.vision_tower, m.mm_projector, dtype=dtype, attn_implementation=attn, revision=revision
        )
        tok = add_image_and_pad_tokens(
            _load_tokenizer(resolve_source(m.llm, revision=revision), "right", max_len), model.config
        )
        bundle = _bundle(
            model,
            tok,
            _image_processor(resolve_source(m.vision_tower), model.config.vision_config),
            format="mix",
            source=f"{m.llm} + {m.vision_tower} + {m.mm_projector}",
        )
    elif t.strategy == "after":
        if not getattr(m, "base", None):
            raise ValueError("train.strategy=after needs model.base (a llava-hf or original LLaVA-v1.5 checkpoint)")
        fmt = getattr(m, "base_format", "hf")
        if fmt not in ("hf", "original"):
            raise ValueError(f"model.base_format={fmt!r}; allowed: hf, original")
        vision = getattr(m, "vision_tower", None) if fmt == "original" else None
        bundle = _load_any(
            m.base,
            revision=revision,
            vision_source=vision,
            dtype=dtype,
            attn=attn,
            padding_side="right",
            max_length=max_len,
        )
        if bundle.extra["format"] != fmt:
            raise ValueError(
                f"model.base={m.base} is a {bundle.extra['format']} checkpoint but model.base_format={fmt!r}"
            )
    else:
        raise ValueError(f"train.strategy={t.strategy!r}; allowed: mix, after")
    bundle.model.config.use_cache = False  # no KV cache while training (and with gradient checkpointing)
    apply_trainable(
        bundle.model,
        {
            "vision_encoder": not getattr(t, "freeze_vision", True),
            "projector": getattr(t, "tune_projector", True),
            "llm": True,
        },
    )
    lora = getattr(t, "lora", None)
    if lora is not None and getattr(lora, "enabled", False):
        bundle.model = apply_lora(
            bundle.model, lora.r, lora.alpha, lora.dropout, train_projector=getattr(t, "tune_projector", True)
        )
    set_loss_normalization(bundle.model, getattr(t, "loss_normalization", "micro_batch_mean"))
    bundle.extra.update(
        attn_implementation=attn,
        dtype=str(dtype).removeprefix("torch."),
        lora=bool(lora is not None and getattr(lora, "enabled", False)),
    )
    return bundle


def load_for_inference(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    device: str = "cpu",
    *,
    revision: str | None = None,
    vision_source: str | None = None,
    endpoint: str | None = None,
) -> ModelBundle:
    """Load a saved bundle, a llava-hf checkpoint or an original checkpoint for generation.

    Args:
        path: local dir or hub id.
        dtype: ``auto`` (bf16 on CUDA, else fp32), a name (``bf16``...) or a torch dtype.
        attn_implementation: see :func:`resolve_attn_implementation`.
        device: where to put the model.
        revision: hub revision.
        endpoint: hub URL used if the checkpoint is not in the cache (None = ``HF_ENDPOINT``).
        vision_source: CLIP dir for original checkpoints (see ``load_original_checkpoint``).

    Returns:
        The bundle in eval mode with a LEFT-padding tokenizer (batched generation).
    """
    dt = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation, dt)
    with hub_options(endpoint=endpoint):
        bundle = _load_any(
            path,
            revision=revision,
            vision_source=vision_source,
            dtype=dt,
            attn=attn,
            padding_side="left",
            max_length=None,
        )
    bundle.model.to(device).eval()
    bundle.extra.update(attn_implementation=attn, dtype=str(dt).removeprefix("torch."))
    return bundle


def save_bundle(bundle: ModelBundle, out_dir: str | Path) -> Path:
    """Write the llava-hf layout: weights + config, tokenizer, processor (CLIP processor, chat template).

    A PEFT (LoRA) model is merged into its base first, and ``bundle.model`` becomes the merged model.
    Files are written to a temporary sibling folder and then moved in, so an interrupted save leaves
    no half-written file under its final name.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    model = bundle.model
    if hasattr(model, "merge_and_unload"):  # peft.PeftModel
        model = bundle.model = model.merge_and_unload()
    vision = model.config.vision_config
    processor = LlavaProcessor(
        image_processor=bundle.image_processor,
        tokenizer=bundle.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLS; "default" removes it again -> (S/P)^2 placeholders
        chat_template=CHAT_TEMPLATE,
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return write_bundle_dir(out, bundle, write)


def padding_image_processor(image_processor: Any) -> Any:
    """The llava-hf image processor that pads to square itself (``do_pad``: centred on the mean colour
    ``int(x * 255)``, then resize and crop), the same pixels as ``expand2square`` + ``image_processor``
    (``image_aspect_ratio: pad``). Shipped in the export, it gives plain transformers, vLLM and SGLang
    the preprocessing of training and evaluation from an unpadded image."""
    from transformers import LlavaImageProcessorPil

    p = image_processor
    return LlavaImageProcessorPil(
        do_pad=True, size=dict(p.size), crop_size=dict(p.crop_size), resample=p.resample,
        image_mean=list(p.image_mean), image_std=list(p.image_std), do_center_crop=p.do_center_crop,
    )  # fmt: skip


def save_hub_layout(bundle: ModelBundle, out_dir: str | Path, *, pad_images: bool = False) -> Path:
    """:func:`save_bundle`, with the weights under the llava-hf hub names (``language_model.model.*``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``; :func:`~.convert.native_to_hub_key`).

    transformers 5 saves the vision tower as ``vision_tower.*`` (its in-memory layout); vLLM, SGLang
    and transformers 4 read the names of the ``llava-hf/llava-1.5-*-hf`` repos, and transformers 5
    reads those too. This is the layout the export stage ships; ``pad_images`` (``data.image_aspect_ratio:
    pad``) ships :func:`padding_image_processor`.

    Returns:
        ``out_dir``.
    """
    from icmlab.models import write_safetensors

    if pad_images:
        bundle = dataclasses.replace(bundle, image_processor=padding_image_processor(bundle.image_processor))
    out = save_bundle(bundle, out_dir)
    for old in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        old.unlink()
    state = {native_to_hub_key(k): v.detach() for k, v in bundle.model.state_dict().items()}
    write_safetensors(state, out)
    return out


# ----------------------------------------------------------------------------- trainable parts


def apply_trainable(model: nn.Module, groups: dict[str, bool] | None = None) -> dict[str, int]:
    """Set ``requires_grad`` per module group (defaults: :data:`DEFAULT_TRAINABLE`); see
    :func:`icmlab.models.groups.apply_trainable`.

    Raises:
        ValueError: for an unknown group or a parameter outside every group.
    """
    return _groups.apply_trainable(model, MODULE_GROUPS, DEFAULT_TRAINABLE, groups)


LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def apply_lora(
    model: nn.Module,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    *,
    train_projector: bool = True,
) -> nn.Module:
    """Wrap the model with LoRA on the LLM's linear layers only (upstream ``finetune_task_lora.sh``).

    The vision tower, ``lm_head`` and projector get no adapters. With ``train_projector`` the
    projector is trained fully as a PEFT ``modules_to_save`` copy (saved with the adapter, like
    upstream's ``non_lora_trainables.bin``).

    Returns:
        The PEFT model (the trainer builds the optimizer groups, projector lr included).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"] if train_projector else None,
    )
    # Adapters in the weights' dtype (upstream casts the PEFT model to bf16): PEFT's default fp32 adapters
    # beside bf16 weights make ZeRO-3 refuse the parameter group (one dtype per flat buffer).
    return get_peft_model(model, config, autocast_adapter_dtype=False)
