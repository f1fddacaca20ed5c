"""Turn LLaVA-v1.5 weights from their upstream layouts into transformers' native ``LlavaForConditionalGeneration``.

Two sources are supported, both ending in the same in-memory model (transformers 5 names:
``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head``):

- an original ``liuhaotian/llava-v1.5-*`` checkpoint (``model_type`` ``llava``/``llava_llama``,
  ``mm_*`` config keys, ``model.mm_projector.{0,2}``) -> :func:`load_original_checkpoint`;
- the parts of an MSFT ("mix") run: a text-only Vicuna/Llama checkpoint, a CLIP vision checkpoint
  and a stage-1 ``mm_projector.bin`` -> :func:`assemble_from_parts`.

Original names map to native ones by :func:`rename_original_key` (``model.mm_projector.0/2`` ->
``model.multi_modal_projector.linear_1/2``, ``model.vision_tower.vision_tower.vision_model.*`` ->
``model.vision_tower.*``, ``model.{embed_tokens,layers,norm}`` -> ``model.language_model.*``,
``lm_head`` unchanged); :func:`native_to_hub_key` gives the llava-hf on-disk names.

The vocabulary grows the way the llava-hf checkpoints did: ``<image>`` gets id ``V`` (the old
vocabulary size) and ``<pad>`` id ``V+1``; the embedding and ``lm_head`` matrices are padded to the
next multiple of 64 rows. Every new row (of both matrices) is drawn from
``N(mu, 1e-5 * Sigma)``, ``mu``/``Sigma`` being the mean and covariance of the OLD INPUT-embedding
rows, from a ``torch.Generator`` seeded with ``seed`` (default 0): first the embedding rows, then
the ``lm_head`` rows. This reproduces the fixture ``tiny_llava_v15/hf`` to float rounding.

Checkpoint I/O (:func:`resolve_source`, :func:`read_config`, :func:`read_state_dict`) lives in
:mod:`icmlab.models.llava15.files` and stays importable from here.

Usage::

    model = load_original_checkpoint("ckpts/llava-v1.5-7b", vision_source="openai/clip-vit-large-patch14-336")
    model = assemble_from_parts("lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336",
                                "ckpts/llava-v1.5-7b-pretrain/mm_projector.bin")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from icmlab.models.llava15.files import read_config, read_state_dict, resolve_source
from icmlab.models.spec import FAMILY_SPECS

IMAGE_TOKEN = FAMILY_SPECS["llava15"].image_token
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64
NEW_ROW_COV_SCALE = 1e-5

# CLIP towers named by ``mm_vision_tower`` in the released configs (openai model cards); used when
# the original checkpoint carries the tower weights but no CLIP config is at hand.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
    ),
}

# Llama settings copied from an original/vicuna config.json into ``text_config``; the mm_* keys of
# the original config must not leak into it.
_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
    "pretraining_tp",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}

# original name -> native name; the first matching rule wins.
_LLM_RULES = [
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^lm_head\."), "lm_head."),
]
_ORIGINAL_RULES = [
    (re.compile(r"^model\.mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "model.vision_tower."),
    *_LLM_RULES,
]
# Recomputable buffers that some checkpoints carry (transformers 4.31 saved rotary inv_freq).
_DROPPED = re.compile(r"(rotary_emb\.inv_freq|\.position_ids)$")
_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _rename(key: str, rules: list, source: str) -> str | None:
    """Apply the first matching rule to ``key``; None for recomputable buffers.

    Raises:
        ValueError: if no rule matches (an unexpected tensor in ``source``).
    """
    if _DROPPED.search(key):
        return None
    for pattern, target in rules:
        if pattern.search(key):
            return pattern.sub(target, key, count=1)
    raise ValueError(
        f"{source}: unexpected tensor {key!r}; a LLaVA-v1.5 (mlp2x_gelu, CLIP, Llama) checkpoint holds only "
        "model.embed_tokens/layers/norm, lm_head, model.mm_projector.{0,2} and model.vision_tower.vision_tower.*"
    )


def rename_original_key(key: str) -> str | None:
    """Map one original LLaVA-v1.5 state-dict name to its native transformers 5 name.

    Args:
        key: e.g. ``model.mm_projector.0.weight``.

    Returns:
        The native name (``model.multi_modal_projector.linear_1.weight``), or None for a
        recomputable buffer (rotary ``inv_freq``, ``position_ids``) that is dropped.

    Raises:
        ValueError: for a name that has no place in LLaVA-v1.5.
    """
    return _rename(key, _ORIGINAL_RULES, "original checkpoint")


def native_to_hub_key(key: str) -> str:
    """Map a native (in-memory, transformers 5) name to the llava-hf hub/safetensors layout.

    The llava-hf repos (and ``save_pretrained`` of transformers 5) store ``language_model.model.*``,
    ``language_model.lm_head.weight``, ``vision_tower.vision_model.*`` and ``multi_modal_projector.*``.
    """
    for src, dst in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(src):
            return dst + key[len(src) :]
    raise ValueError(f"{key!r} is not a native LlavaForConditionalGeneration parameter name")


def clip_vision_state_dict(sd: dict[str, torch.Tensor], source: str = "CLIP checkpoint") -> dict[str, torch.Tensor]:
    """Keep the vision tower of a CLIP checkpoint, named as ``CLIPVisionModel`` modules hold it.

    Accepts a full ``CLIPModel`` (``vision_model.*`` + ``text_model.*`` + projections, as in
    ``openai/clip-vit-large-patch14-336``) or a bare vision model (``embeddings.*``, ``encoder.*``...).

    Raises:
        ValueError: if no vision-tower tensor is found.
    """
    out = {}
    for key, tensor in sd.items():
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        if name.startswith(_VISION_PARTS) and not _DROPPED.search(name):
            out[name] = tensor
    if not out:
        raise ValueError(f"{source}: no CLIP vision tensors (vision_model.embeddings.* ...) found")
    return out


def grow_vocab(
    embed: torch.Tensor, lm_head: torch.Tensor, *, n_added: int = 2, multiple: int = VOCAB_MULTIPLE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append rows for added tokens to the input embedding and ``lm_head`` (see module docstring).

    Args:
        embed: ``[V, d]`` input embedding.
        lm_head: ``[V, d]`` output projection.
        n_added: tokens added (``<image>``, ``<pad>``).
        multiple: the new row count is ``V + n_added`` rounded up to this.
        seed: seed of the generator that draws the new rows.

    Returns:
        The grown ``(embed, lm_head)``, in the input dtype; on the meta device only shapes.
    """
    old, dim = embed.shape
    new = -(-(old + n_added) // multiple) * multiple
    k = new - old
    if embed.is_meta:  # shape-only conversion (manifest checks of the full-size models)
        rows = torch.empty(k, dim, device="meta", dtype=embed.dtype)
        return torch.cat([embed, rows]), torch.cat([lm_head, rows.to(lm_head.dtype)])
    e = embed.detach().float().cpu()
    mu = e.mean(dim=0)
    centred = e - mu
    cov = NEW_ROW_COV_SCALE * (centred.T @ centred) / old
    chol, info = torch.linalg.cholesky_ex(cov)
    if info.item() != 0:  # rank-deficient (fewer rows than dims, repeated rows): a small jitter keeps it PD
        jitter = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
        chol = torch.linalg.cholesky(cov + jitter * torch.eye(dim))
    gen = torch.Generator().manual_seed(seed)
    new_embed = mu + torch.randn(k, dim, generator=gen) @ chol.T
    new_head = mu + torch.randn(k, dim, generator=gen) @ chol.T
    return (
        torch.cat([embed, new_embed.to(embed.dtype).to(embed.device)]),
        torch.cat([lm_head, new_head.to(lm_head.dtype).to(lm_head.device)]),
    )


def convert_original_state_dict(
    sd: dict[str, torch.Tensor],
    *,
    vision_state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    pad_to_multiple_of: int = VOCAB_MULTIPLE,
) -> dict[str, torch.Tensor]:
    """Rename an original LLaVA-v1.5 state dict to native names and grow its vocabulary by two tokens.

    Args:
        sd: the original state dict (``model.*``, ``lm_head.weight``, ``model.mm_projector.*``,
            optionally ``model.vision_tower.vision_tower.vision_model.*``).
        vision_state_dict: CLIP vision tensors (``CLIPVisionModel`` names) used only when ``sd`` has no
            tower (upstream's own loader always takes the tower from the separate CLIP checkpoint;
            the released checkpoints carry a copy of the frozen tower).
        seed: seed for the new vocabulary rows.
        pad_to_multiple_of: row multiple of the grown vocabulary.

    Returns:
        Native-named tensors (no copies except the two grown matrices).

    Raises:
        ValueError: on unknown tensors or when no vision-tower weights are available.
    """
    out = {}
    for key, tensor in sd.items():
        name = rename_original_key(key)
        if name is not None:
            out[name] = tensor
    if not any(k.startswith("model.vision_tower.") for k in out):
        if vision_state_dict is None:
            raise ValueError(
                "the original checkpoint holds no vision tower (model.vision_tower.vision_tower.*); "
                "pass the CLIP checkpoint named by its mm_vision_tower (vision_source=...)"
            )
        out.update({f"model.vision_tower.{k}": v for k, v in vision_state_dict.items()})
    _grow_in_place(out, seed, pad_to_multiple_of)
    return out


def _grow_in_place(sd: dict[str, torch.Tensor], seed: int, multiple: int) -> None:
    ek, hk = "model.language_model.embed_tokens.weight", "lm_head.weight"
    if ek not in sd or hk not in sd:
        raise ValueError(f"checkpoint lacks {ek if ek not in sd else hk} (original name model.embed_tokens/lm_head)")
    sd[ek], sd[hk] = grow_vocab(sd[ek], sd[hk], multiple=multiple, seed=seed)


def vision_config_for(orig_cfg: dict, vision_source_cfg: dict | None) -> CLIPVisionConfig:
    """Pick the CLIP vision config: the given CLIP dir, else the config's ``vision_config`` block, else a known tower.

    Raises:
        ValueError: when none of the three is available.
    """
    if vision_source_cfg is not None:
        block = vision_source_cfg.get("vision_config", vision_source_cfg)  # CLIPModel or CLIPVisionModel config
        return CLIPVisionConfig(**{k: v for k, v in block.items() if k not in ("model_type", "architectures")})
    if isinstance(orig_cfg.get("vision_config"), dict):
        block = orig_cfg["vision_config"]
        return CLIPVisionConfig(**{k: v for k, v in block.items() if k != "model_type"})
    tower = orig_cfg.get("mm_vision_tower")
    if tower in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[tower])
    raise ValueError(f"no CLIP config for mm_vision_tower={tower!r}: pass vision_source=<CLIP dir or hub id>")


def build_llava_config(
    text_cfg: dict,
    vision_cfg: CLIPVisionConfig,
    *,
    old_vocab: int,
    new_vocab: int,
    vision_feature_layer: int = -2,
    select_strategy: str = "default",
) -> LlavaConfig:
    """Build the native config.

    Text config = the Llama keys of ``text_cfg`` with ``new_vocab`` rows; ``<image>`` = ``old_vocab``,
    ``<pad>`` = ``old_vocab + 1``; ``image_seq_length`` = (image / patch)^2 (+1 for ``full``).
    """
    text = {k: text_cfg[k] for k in _TEXT_KEYS if k in text_cfg and text_cfg[k] is not None}
    text.update(vocab_size=new_vocab, tie_word_embeddings=False)
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    return LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=vision_cfg,
        image_token_index=old_vocab,
        pad_token_id=old_vocab + 1,
        image_seq_length=patches + (1 if select_strategy == "full" else 0),
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def instantiate(
    config: LlavaConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LlavaForConditionalGeneration:
    """Build the native model from a native-named state dict; every parameter must be provided.

    Raises:
        ValueError: naming missing/unexpected/mismatched tensors.
    """
    if dtype is None:
        dtype = next(iter(state_dict.values())).dtype
    # Hand over the llava-hf on-disk names: from_pretrained then maps them exactly as for a hub
    # checkpoint and records that mapping, so save_pretrained writes the llava-hf layout again
    # (native names given here would be saved verbatim, unlike every other LLaVA checkpoint).
    hub_sd = {native_to_hub_key(k): v for k, v in state_dict.items()}
    model, info = LlavaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=hub_sd,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"converted LLaVA state dict does not fit LlavaForConditionalGeneration: {bad}")
    return model.eval()


def load_original_checkpoint(
    path: str | Path,
    *,
    vision_source: str | Path | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """Load an original ``liuhaotian/llava-v1.5-*`` checkpoint as a native ``LlavaForConditionalGeneration``.

    Args:
        path: local dir or hub id of the original checkpoint (config.json + .bin/.safetensors shards).
        vision_source: CLIP dir or hub id; its config is preferred, its weights are used only when
            the checkpoint lacks the tower. Default: the config's ``mm_vision_tower`` when needed.
        revision: hub revision of ``path``.
        dtype: target dtype (default: the checkpoint's).
        attn_implementation: ``eager``/``sdpa``/``flash_attention_2`` (default: transformers' choice).
        seed: seed of the new vocabulary rows.

    Returns:
        The model in eval mode; ``image_token_index`` = old vocab, ``pad_token_id`` = old vocab + 1.

    Raises:
        ValueError: if the config is not a LLaVA-v1.5 one (projector type, start/end tokens, tower).
    """
    ckpt = resolve_source(path, revision=revision)
    cfg = read_config(ckpt)
    check_original_config(cfg, ckpt)
    sd = read_state_dict(ckpt)
    has_tower = any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in sd)
    source_cfg, vision_sd = None, None
    if vision_source is not None or not has_tower:
        vdir = resolve_source(vision_source or cfg["mm_vision_tower"])
        source_cfg = read_config(vdir)
        if not has_tower:
            vision_sd = clip_vision_state_dict(read_state_dict(vdir), str(vdir))
    vision_cfg = vision_config_for(cfg, source_cfg)
    if cfg.get("mm_hidden_size", vision_cfg.hidden_size) != vision_cfg.hidden_size:
        raise ValueError(
            f"{ckpt}/config.json: mm_hidden_size={cfg['mm_hidden_size']} but the CLIP tower has "
            f"hidden_size={vision_cfg.hidden_size}; pass the matching vision_source"
        )
    native = convert_original_state_dict(sd, vision_state_dict=vision_sd, seed=seed)
    old_vocab = sd["model.embed_tokens.weight"].shape[0]
    config = build_llava_config(
        cfg,
        vision_cfg,
        old_vocab=old_vocab,
        new_vocab=native["lm_head.weight"].shape[0],
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        select_strategy=_SELECT_FEATURE[cfg.get("mm_vision_select_feature", "patch")],
    )
    return instantiate(config, native, dtype=dtype, attn_implementation=attn_implementation)


def check_original_config(cfg: dict, where: Path) -> None:
    """Reject original configs this conversion cannot represent natively.

    Raises:
        ValueError: naming the offending key of ``where/config.json``.
    """
    if "mm_vision_tower" not in cfg:
        raise ValueError(f"{where}/config.json: no mm_vision_tower; not an original LLaVA checkpoint")
    checks = {
        "mm_projector_type": ("mlp2x_gelu", cfg.get("mm_projector_type", "linear")),
        "mm_use_im_start_end": (False, cfg.get("mm_use_im_start_end", False)),
        "mm_patch_merge_type": ("flat", cfg.get("mm_patch_merge_type", "flat")),
    }
    for key, (want, got) in checks.items():
        if got != want:
            raise ValueError(f"{where}/config.json: {key}={got!r} is not supported (LLaVA-v1.5 uses {want!r})")
    if cfg.get("mm_vision_select_feature", "patch") not in _SELECT_FEATURE:
        raise ValueError(f"{where}/config.json: mm_vision_select_feature must be one of {sorted(_SELECT_FEATURE)}")


def projector_state_dict(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Extract ``mm_projector.{0,2}.{weight,bias}`` (any prefix) as ``linear_{1,2}.*``.

    Raises:
        ValueError: unless exactly the four mlp2x_gelu tensors are present.
    """
    out = {}
    for key, tensor in sd.items():
        m = re.search(r"mm_projector\.([02])\.(weight|bias)$", key)
        if m is None:
            raise ValueError(
                f"{source}: unexpected tensor {key!r} (a stage-1 mm_projector.bin holds mm_projector.{{0,2}}.*)"
            )
        out[f"linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = tensor
    if len(out) != 4:
        raise ValueError(f"{source}: expected mm_projector.{{0,2}}.{{weight,bias}} (mlp2x_gelu), found {sorted(sd)}")
    return out


def assemble_from_parts(
    llm_dir: str | Path,
    vision_dir: str | Path,
    mm_projector_path: str | Path,
    *,
    vision_feature_layer: int = -2,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> LlavaForConditionalGeneration:
    """Assemble the MSFT ("mix") starting point: Vicuna LLM + CLIP tower + stage-1 projector.

    Args:
        llm_dir: text-only Llama checkpoint (local dir or hub id, e.g. ``lmsys/vicuna-7b-v1.5``).
        vision_dir: CLIP checkpoint (``openai/clip-vit-large-patch14-336``).
        mm_projector_path: the stage-1 ``mm_projector.bin`` (read with ``weights_only=True``), or a
            dir / hub id holding it.
        vision_feature_layer: CLIP hidden state fed to the projector (upstream ``-2``).
        dtype: target dtype (default: the LLM's).
        attn_implementation: attention kernel.
        seed: seed of the new vocabulary rows.
        revision: hub revision of ``llm_dir``.

    Returns:
        The native model with the ``"default"`` (drop CLS) feature strategy.

    Raises:
        ValueError: if shapes disagree (projector input vs CLIP width, output vs LLM width).
    """
    ldir, vdir = resolve_source(llm_dir, revision=revision), resolve_source(vision_dir)
    proj_path = resolve_source(mm_projector_path)
    if proj_path.is_dir():  # a pretrain repo/dir such as liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5
        proj_path = proj_path / "mm_projector.bin"
    if not proj_path.is_file():
        raise FileNotFoundError(f"stage-1 projector {proj_path} not found (mm_projector.bin from the pretrain stage)")
    text_cfg = read_config(ldir)
    vision_cfg = vision_config_for({}, read_config(vdir))
    llm = {}
    for key, tensor in read_state_dict(ldir).items():
        name = _rename(key, _LLM_RULES, str(ldir))
        if name is not None:
            llm[name] = tensor
    projector = projector_state_dict(read_state_dict(proj_path), str(proj_path))
    want_in, want_out = vision_cfg.hidden_size, text_cfg["hidden_size"]
    if tuple(projector["linear_1.weight"].shape) != (want_out, want_in):
        raise ValueError(
            f"{proj_path}: mm_projector.0.weight is {tuple(projector['linear_1.weight'].shape)}, expected "
            f"{(want_out, want_in)} for LLM hidden {want_out} and CLIP hidden {want_in}"
        )
    native = dict(llm)
    tower = clip_vision_state_dict(read_state_dict(vdir), str(vdir))
    native.update({f"model.vision_tower.{k}": v for k, v in tower.items()})
    native.update({f"model.multi_modal_projector.{k}": v for k, v in projector.items()})
    old_vocab = native["model.language_model.embed_tokens.weight"].shape[0]
    _grow_in_place(native, seed, VOCAB_MULTIPLE)
    config = build_llava_config(
        text_cfg,
        vision_cfg,
        old_vocab=old_vocab,
        new_vocab=native["lm_head.weight"].shape[0],
        vision_feature_layer=vision_feature_layer,
    )
    dtype = dtype or native["lm_head.weight"].dtype
    return instantiate(config, native, dtype=dtype, attn_implementation=attn_implementation)
