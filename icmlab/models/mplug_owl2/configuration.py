"""Configuration classes of the native mPLUG-Owl2 model (``model_type = "mplug_owl2"``).

Three configs describe the model:

- :class:`MPLUGOwl2VisionConfig`: the CLIP-like ViT (ViT-L/14 at 448 px at full size);
- :class:`MPLUGOwl2AbstractorConfig`: the visual abstractor (64 learnable queries, 6 layers);
- :class:`MPLUGOwl2Config`: the modality-adaptive LLaMA-2 (its fields sit at the top level, as in
  the original checkpoint) holding the two others as ``vision_config`` and ``abstractor_config``.

The original checkpoints' ``config.json`` nests the visual configs as
``visual_config.{visual_model, visual_abstractor}``; :meth:`MPLUGOwl2Config.from_original_dict`
(and the constructor, when it sees a ``visual_config`` key) translates that layout, so
``AutoConfig.from_pretrained(<original checkpoint dir>)`` works once ``icmlab.models.mplug_owl2``
is imported. Our own ``save_pretrained`` writes ``vision_config``/``abstractor_config`` instead.

Usage::

    from icmlab.models.mplug_owl2 import MPLUGOwl2Config
    cfg = MPLUGOwl2Config()                  # the 7B layout (LLaMA-2-7B + ViT-L/14-448)
    cfg.num_image_tokens                     # 65 = 64 queries + the end token
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PreTrainedConfig

# Keys of the original sub-config dicts that carry meaning for the computation. Everything else in
# those dicts (generation defaults, label maps, `use_flash_attn`, `projection_dim`, ...) is either
# unused by the original forward pass or constant, and is dropped on translation.
_VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
)  # fmt: skip
_ABSTRACTOR_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "encoder_hidden_size",
    "grid_size", "num_learnable_queries",
)  # fmt: skip


@strict
class MPLUGOwl2VisionConfig(PreTrainedConfig):
    """The mPLUG-Owl2 vision transformer (CLIP ViT with a fused ``query_key_value`` projection).

    Attributes mirror the original ``MplugOwlVisionConfig``; defaults are the ViT-L/14-448 tower.
    The original's ``use_cls_token``/``use_post_layernorm`` are always true for mPLUG-Owl2 and are
    therefore not configurable here.
    """

    model_type = "mplug_owl2_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02

    @property
    def grid_size(self) -> int:
        """Patches per side (``image_size // patch_size``)."""
        return self.image_size // self.patch_size

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # Checked here rather than in `validate_architecture`, whose errors the strict-dataclass
        # machinery re-raises as a non-ValueError type.
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )


@strict
class MPLUGOwl2AbstractorConfig(PreTrainedConfig):
    """The visual abstractor: learnable queries cross-attending to the ViT output.

    ``grid_size`` sizes the fixed 2-D sin-cos key positions (``1 + grid_size**2`` rows, the first
    one for the CLS token); it must equal the vision tower's patch grid.
    """

    model_type = "mplug_owl2_abstractor"
    base_config_key = "abstractor_config"

    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    encoder_hidden_size: int = 1024
    grid_size: int = 32
    num_learnable_queries: int = 64

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"abstractor_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"abstractor_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % 4 != 0:
            raise ValueError(
                f"abstractor_config.hidden_size ({self.hidden_size}) must be a multiple of 4 "
                "(the 2-D sin-cos key positions split it into four equal parts)"
            )


@strict
class MPLUGOwl2Config(LlamaConfig):
    """mPLUG-Owl2: modality-adaptive LLaMA-2 + ViT + visual abstractor.

    The LLaMA fields are the top-level fields (``hidden_size``, ``num_hidden_layers``, ...), as in
    the original checkpoints. Defaults describe mPLUG-Owl2-LLaMA2-7B (vocab 32000, 4096 positions,
    RMS-norm eps 1e-5); real checkpoints override them from their own ``config.json``.

    Attributes:
        vision_config: the ViT (:class:`MPLUGOwl2VisionConfig` or a dict of its fields).
        abstractor_config: the abstractor (:class:`MPLUGOwl2AbstractorConfig` or a dict).
        image_token_index: id of the placeholder token; the text's ``<|image|>`` expands into
            ``num_image_tokens`` copies of it. ``None`` means ``vocab_size`` (an id outside the
            embedding table: the model never embeds it, it only marks where image features go).
    """

    model_type = "mplug_owl2"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": MPLUGOwl2VisionConfig,
        "abstractor_config": MPLUGOwl2AbstractorConfig,
    }

    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    vision_config: dict | PreTrainedConfig | None = None
    abstractor_config: dict | PreTrainedConfig | None = None
    image_token_index: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # BC: the original checkpoints nest both visual configs under `visual_config`.
        visual = kwargs.pop("visual_config", None)
        if visual is not None:
            vision, abstractor = translate_original_visual_config(visual)
            if self.vision_config is None:
                self.vision_config = vision
            if self.abstractor_config is None:
                self.abstractor_config = abstractor
        super().__post_init__(**kwargs)
        if self.image_token_index is None:
            self.image_token_index = self.vocab_size
        self._check_parts()

    def _check_parts(self) -> None:
        """Check that the three parts fit together (sizes the forward pass relies on).

        Raises:
            ValueError: naming the mismatching fields.
        """
        vision, abstractor = self.vision_config, self.abstractor_config
        if abstractor.encoder_hidden_size != vision.hidden_size:
            raise ValueError(
                f"abstractor_config.encoder_hidden_size ({abstractor.encoder_hidden_size}) must equal "
                f"vision_config.hidden_size ({vision.hidden_size})"
            )
        # The abstractor concatenates queries with ViT tokens before its shared key projection.
        if abstractor.hidden_size != vision.hidden_size:
            raise ValueError(
                f"abstractor_config.hidden_size ({abstractor.hidden_size}) must equal "
                f"vision_config.hidden_size ({vision.hidden_size}): queries and image tokens share "
                "the abstractor's key/value projections"
            )
        if abstractor.grid_size != vision.grid_size:
            raise ValueError(
                f"abstractor_config.grid_size ({abstractor.grid_size}) must equal "
                f"vision_config.image_size // patch_size ({vision.grid_size})"
            )
        if self.image_token_index is not None and self.image_token_index < 0:
            raise ValueError(
                f"image_token_index must be a non-negative token id, got {self.image_token_index} "
                "(the original's -200 is an in-batch marker, not a token; use e.g. vocab_size)"
            )

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the learnable queries plus the appended end token."""
        return self.abstractor_config.num_learnable_queries + 1

    @classmethod
    def from_original_dict(cls, raw: dict, **overrides: Any) -> "MPLUGOwl2Config":
        """Build a config from an original checkpoint's ``config.json`` contents.

        Args:
            raw: the parsed JSON (LLaMA fields at top level + ``visual_config``).
            **overrides: fields to set on top (e.g. ``image_token_index``).

        Returns:
            The native config.

        Raises:
            ValueError: if ``raw`` lacks ``visual_config`` or is not an mPLUG-Owl2 LLaMA config.
        """
        if raw.get("model_type") not in (None, "mplug_owl2"):
            raise ValueError(
                f"config.json has model_type {raw.get('model_type')!r}; expected 'mplug_owl2' "
                "(the Qwen-based 'mplug_owl2_1' is not supported)"
            )
        if "visual_config" not in raw:
            raise ValueError(
                "config.json has no 'visual_config' block: not an original mPLUG-Owl2 checkpoint "
                "(a checkpoint saved by icmlab loads with MPLUGOwl2ForCausalLM.from_pretrained)"
            )
        llama_keys = set(cls.default_config_fields()) | {"rope_theta", "rope_scaling"}
        kwargs = {k: v for k, v in raw.items() if k in llama_keys and k not in ("vision_config", "abstractor_config")}
        kwargs["visual_config"] = raw["visual_config"]
        kwargs.update(overrides)
        return cls(**kwargs)


def translate_original_visual_config(visual: dict) -> tuple[dict, dict]:
    """Split the original ``visual_config`` into our vision and abstractor sub-config dicts.

    Args:
        visual: ``{"visual_model": {...}, "visual_abstractor": {...}}`` from an original config.

    Returns:
        ``(vision_kwargs, abstractor_kwargs)`` restricted to the fields our configs define.

    Raises:
        ValueError: if a block is missing or the vision tower disables its CLS token or post
            layer norm (variants mPLUG-Owl2 never shipped and this port does not implement).
    """
    if not isinstance(visual, dict) or "visual_model" not in visual or "visual_abstractor" not in visual:
        raise ValueError("visual_config must hold both 'visual_model' and 'visual_abstractor' blocks")
    vm, va = visual["visual_model"], visual["visual_abstractor"]
    if not vm.get("use_cls_token", True) or not vm.get("use_post_layernorm", True):
        raise ValueError("visual_config.visual_model with use_cls_token/use_post_layernorm false is not supported")
    if va.get("add_v2t_pos_emb", False):
        raise ValueError("visual_config.visual_abstractor.add_v2t_pos_emb=true is not supported")
    vision = {k: vm[k] for k in _VISION_KEYS if k in vm}
    abstractor = {k: va[k] for k in _ABSTRACTOR_KEYS if k in va}
    return vision, abstractor
