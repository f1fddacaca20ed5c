"""Native mPLUG-Owl2 for transformers 5: ``MPLUGOwl2Model`` and ``MPLUGOwl2ForCausalLM``.

Input convention (differs from the original's in-batch ``-200`` marker): the text's single
``<|image|>`` is expanded into ``config.num_image_tokens`` (65 at full size) consecutive copies of
``config.image_token_index``; ``pixel_values`` holds one ``[3, S, S]`` image per expanded run, in
batch order (text-only samples take none). The model embeds the text (placeholder ids are never
looked up), writes the image features over the placeholders, and marks them with modality
indicator 1 (0 for everything else), which routes them through the ``multiway.1`` weights.

Generation: ``model.generate(input_ids, attention_mask=..., pixel_values=..., ...)``; the images are
used in the prefill only, and every generated token is text (modality 0). Left padding works
(positions come from the attention mask).

State-dict names equal the original checkpoint's (``model.layers.N.self_attn.k_proj.multiway.1``,
``model.vision_model.*``, ``model.visual_abstractor.*``, ``lm_head``) minus the per-layer
``rotary_emb.inv_freq`` buffers, so original weights load without renames (see :mod:`.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .abstractor import (
    MPLUGOwl2AbstractorMultiHeadAttention,
    MPLUGOwl2VisualAbstractor,
    key_position_table,
    query_position_table,
)
from .configuration import MPLUGOwl2Config
from .llm import ModalityRouting, MPLUGOwl2DecoderLayer
from .vision import MPLUGOwl2VisionEmbeddings, MPLUGOwl2VisionModel

IGNORE_INDEX = -100


@dataclass
class MPLUGOwl2ModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the multimodal bookkeeping of this forward pass.

    Attributes:
        modality_indicators: ``[B, T]`` long, 1 at image-feature positions, 0 elsewhere.
        image_features: ``[num_images, num_image_tokens, hidden]`` or None without images.
    """

    modality_indicators: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


@dataclass
class MPLUGOwl2CausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``modality_indicators`` and ``image_features`` (see above)."""

    modality_indicators: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    """Weight init, attention-backend flags and loading rules shared by the mPLUG-Owl2 classes."""

    config_class = MPLUGOwl2Config
    config: MPLUGOwl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MPLUGOwl2DecoderLayer", "MPLUGOwl2VisionEncoderLayer", "MPLUGOwl2AbstractorLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Original checkpoints store the RoPE frequencies per layer; they are recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MPLUGOwl2VisionEmbeddings):
            init.normal_(module.cls_token, mean=0.0, std=std)
            init.normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, MPLUGOwl2VisualAbstractor):
            init.normal_(module.query_embeds, mean=0.0, std=std)
            init.normal_(module.vit_eos, mean=0.0, std=std)
        elif isinstance(module, MPLUGOwl2AbstractorMultiHeadAttention):
            cfg = module.config
            init.copy_(module.q_pos_embed, query_position_table(cfg.hidden_size, cfg.num_learnable_queries))
            init.copy_(module.k_pos_embed, key_position_table(cfg.hidden_size, cfg.grid_size))


class MPLUGOwl2Model(MPLUGOwl2PreTrainedModel):
    """Vision tower + abstractor + modality-adaptive LLaMA decoder (no LM head)."""

    def __init__(self, config: MPLUGOwl2Config) -> None:
        super().__init__(config)
        # A directly constructed model resolves its attention backend on the top-level config only;
        # the vision tower and the abstractor read theirs from the sub-configs.
        for sub in (config.vision_config, config.abstractor_config):
            if sub._attn_implementation is None:
                sub._attn_implementation_internal = config._attn_implementation
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MPLUGOwl2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.vision_model = MPLUGOwl2VisionModel(config.vision_config)
        self.visual_abstractor = MPLUGOwl2VisualAbstractor(config.abstractor_config, config.hidden_size)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Encode images into LLM-width visual tokens.

        Args:
            pixel_values: ``[num_images, 3, S, S]`` (or a list of ``[3, S, S]``/``[k, 3, S, S]``).

        Returns:
            ``[num_images, num_image_tokens, hidden_size]``.
        """
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat([p if p.ndim == 4 else p.unsqueeze(0) for p in pixel_values], dim=0)
        return self.visual_abstractor(self.vision_model(pixel_values))

    def embed_multimodal(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, past_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Embed ``input_ids`` and splice image features over the placeholder runs.

        Args:
            input_ids: ``[B, T]`` token ids, images expanded into placeholder runs.
            pixel_values: one image per placeholder run, in batch order, or None.
            past_length: tokens already in the cache (0 for a fresh forward pass).

        Returns:
            ``(inputs_embeds [B, T, H], modality_indicators [B, T], image_features or None)``.

        Raises:
            ValueError: if placeholders and images do not match.
        """
        image_id = self.config.image_token_index
        placeholder = input_ids == image_id
        if pixel_values is None:
            n_placeholders = int(placeholder.sum())
            # A placeholder inside the vocabulary may be *generated* during cached decoding: it is text then.
            if n_placeholders and (past_length == 0 or image_id >= self.config.vocab_size):
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholders (id {image_id}) but no pixel_values "
                    "were given; pass one image per run of num_image_tokens placeholders"
                )
            return self.embed_tokens(input_ids), torch.zeros_like(input_ids), None

        features = self.get_image_features(pixel_values)
        n_images, per_image = features.shape[:2]
        # Placeholder ids may lie outside the table (default: vocab_size); their rows are overwritten.
        embeds = self.embed_tokens(input_ids.masked_fill(placeholder, 0))
        n_placeholders = int(placeholder.sum())
        if n_placeholders == 0:
            # No image in the batch: images sent anyway (a dummy, as the original's trainer feeds to
            # text-only batches) run through the tower and contribute exactly zero, so every
            # rank's vision/abstractor weights take part in the step (ZeRO-3 / DDP).
            embeds = embeds + 0.0 * features.sum().to(embeds.dtype)
            return embeds, torch.zeros_like(input_ids), features
        if n_placeholders != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_placeholders} image placeholders (id {image_id}) but pixel_values has "
                f"{n_images} images x {per_image} tokens = {n_images * per_image}; expand each <|image|> into "
                f"exactly {per_image} placeholders and pass one image per expanded run"
            )
        embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), features.to(embeds.dtype))
        return embeds, placeholder.long(), features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_indicators: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MPLUGOwl2ModelOutputWithPast:
        """Run the decoder over text with spliced image features.

        Args:
            input_ids: ``[B, T]`` ids with expanded image placeholders (exclusive with ``inputs_embeds``).
            pixel_values: ``[num_images, 3, S, S]``, one per placeholder run (prefill only).
            attention_mask: ``[B, past + T]`` 1/0 padding mask (left or right padding).
            position_ids: ``[B, T]``; default ``past + arange(T)`` (the original's rule).
            cache: a transformers ``Cache`` holding earlier keys/values.
            inputs_embeds: ready embeddings ``[B, T, H]`` (then ``modality_indicators`` may mark images).
            modality_indicators: ``[B, T]`` 0/1, only together with ``inputs_embeds``.
            use_cache: build/extend a ``DynamicCache`` (default: ``config.use_cache`` outside training).
            output_attentions: also return per-layer attention weights (eager attention only).
            output_hidden_states: also return the embeddings and every layer's output.

        Returns:
            :class:`MPLUGOwl2ModelOutputWithPast`.

        Raises:
            ValueError: on inconsistent inputs (see :meth:`embed_multimodal`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        image_features = None
        if inputs_embeds is None:
            if modality_indicators is not None:
                raise ValueError("modality_indicators are derived from input_ids; pass them only with inputs_embeds")
            inputs_embeds, modality_indicators, image_features = self.embed_multimodal(
                input_ids, pixel_values, past_length
            )
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds; splice the features yourself")
        elif modality_indicators is None:
            modality_indicators = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)

        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        routing = ModalityRouting.from_indicators(modality_indicators)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                routing,
                position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,  # flash-attention kernels use it to detect packed rows
                output_attentions=bool(output_attentions),
            )
            if all_attn is not None:
                all_attn.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        return MPLUGOwl2ModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
            modality_indicators=modality_indicators,
            image_features=image_features,
        )


class MPLUGOwl2ForCausalLM(MPLUGOwl2PreTrainedModel, GenerationMixin):
    """mPLUG-Owl2 with its LM head: the class ``AutoModelForCausalLM`` maps ``mplug_owl2`` to."""

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MPLUGOwl2Config) -> None:
        super().__init__(config)
        self.model = MPLUGOwl2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """See :meth:`MPLUGOwl2Model.get_image_features`."""
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_indicators: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MPLUGOwl2CausalLMOutputWithPast:
        """Forward pass with optional loss.

        Args:
            labels: ``[B, T]`` targets aligned with ``input_ids`` (shifted inside, ``-100`` ignored);
                positions holding image placeholders are never trained, whatever their label.
            logits_to_keep: keep only the last N positions' logits (0 = all), as in transformers.
            **kwargs: ``num_items_in_batch`` (from the HF Trainer) normalises the summed loss.
            Other arguments: see :meth:`MPLUGOwl2Model.forward`.

        Returns:
            :class:`MPLUGOwl2CausalLMOutputWithPast` (a ``CausalLMOutputWithPast``).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            modality_indicators=modality_indicators,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_index, IGNORE_INDEX)
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        return MPLUGOwl2CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            modality_indicators=outputs.modality_indicators,
            image_features=outputs.image_features,
        )
