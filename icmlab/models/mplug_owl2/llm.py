"""The modality-adaptive LLaMA-2 decoder layer of mPLUG-Owl2.

Each token carries a modality indicator (0 = text, 1 = image). ``k_proj``, ``v_proj``,
``input_layernorm`` and ``post_attention_layernorm`` exist twice, as ``<name>.multiway.0`` (text)
and ``<name>.multiway.1`` (image), and each token goes through the copy of its modality;
``q_proj``, ``o_proj`` and the MLP are shared. Everything else is plain LLaMA (RoPE, RMSNorm in
float32, SwiGLU), reused from ``transformers.models.llama``.

Both copies are always *called* (on possibly empty inputs) so that every parameter takes part in
every forward pass: DeepSpeed ZeRO-3 gathers a module's weights only when the module runs, and
ranks that skip a module would deadlock the collective. Used by :mod:`.modeling`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration import MPLUGOwl2Config


@dataclass
class ModalityRouting:
    """Which tokens are image tokens, precomputed once per forward pass for all layers.

    Attributes:
        is_image: ``[B, T]`` bool, True where the modality indicator is 1.
        text_index: flat (``B*T``) positions of text tokens.
        image_index: flat positions of image tokens (empty for text-only inputs and decoding).
    """

    is_image: torch.Tensor
    text_index: torch.Tensor
    image_index: torch.Tensor

    @classmethod
    def from_indicators(cls, modality_indicators: torch.Tensor) -> "ModalityRouting":
        """Build the routing from ``[B, T]`` indicators (0 text, anything else image)."""
        flat = modality_indicators.reshape(-1)
        is_image = modality_indicators != 0
        return cls(
            is_image=is_image,
            text_index=(flat == 0).nonzero().squeeze(1),
            image_index=(flat != 0).nonzero().squeeze(1),
        )


class MultiwayLinear(nn.Module):
    """Two ``nn.Linear`` (``multiway.0`` text, ``multiway.1`` image), each applied to its tokens."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.out_features = out_features
        self.multiway = nn.ModuleList([nn.Linear(in_features, out_features, bias=bias) for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        """Project ``[B, T, in]`` to ``[B, T, out]`` with the per-token modality's weights."""
        batch, seq, width = hidden_states.shape
        flat = hidden_states.reshape(-1, width)
        if routing.image_index.numel() == 0:
            # Text-only fast path (decoding, text batches). The image branch still runs, on an empty
            # input, so ZeRO-3 gathers it on every rank; in training its (zero) gradient is kept so
            # DDP without `find_unused_parameters` sees every parameter used.
            out = self.multiway[0](hidden_states)
            unused = self.multiway[1](flat[:0])
            return out + 0.0 * unused.sum() if self.training else out
        text_out = self.multiway[0](flat.index_select(0, routing.text_index))
        image_out = self.multiway[1](flat.index_select(0, routing.image_index))
        out = flat.new_empty(flat.shape[0], self.out_features, dtype=text_out.dtype)
        out = out.index_copy(0, routing.text_index, text_out).index_copy(0, routing.image_index, image_out)
        return out.view(batch, seq, self.out_features)


class MultiwayRMSNorm(nn.Module):
    """Two LLaMA RMSNorms (``multiway.0`` text, ``multiway.1`` image).

    RMSNorm works per token, so running both on all tokens and picking per token gives exactly
    the original's gather/scatter result at negligible cost and without a host sync.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([LlamaRMSNorm(hidden_size, eps=eps) for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        """Normalise each token with its modality's weight."""
        text = self.multiway[0](hidden_states)
        image = self.multiway[1](hidden_states)
        return torch.where(routing.is_image.unsqueeze(-1), image, text)


class MPLUGOwl2Attention(nn.Module):
    """LLaMA self-attention whose key/value projections are modality-specific."""

    def __init__(self, config: MPLUGOwl2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=bias)
        self.k_proj = MultiwayLinear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = MultiwayLinear(config.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: ModalityRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(output, attention_weights_or_None)``; appends this step's k/v to ``cache``."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states, routing).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states, routing).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        context = context.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(context), weights


class MPLUGOwl2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block with modality-specific norms and k/v projections."""

    def __init__(self, config: MPLUGOwl2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MPLUGOwl2Attention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: ModalityRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(hidden_states, attention_weights_or_None)``."""
        residual = hidden_states
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states, routing),
            routing,
            position_embeddings,
            attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + attn_out
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states, routing))
        return residual + hidden_states, weights
