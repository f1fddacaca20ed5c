"""The mPLUG-Owl2 visual abstractor: learnable queries that summarise the ViT output.

Per layer, with ``q`` the current queries and ``v`` the ViT tokens (CLS kept)::

    qn  = norm1(q);  vn = normk(v);  kv = cat([qn, vn])
    key = Linear(kv + cat([q_pos, k_pos]));  value = Linear(kv);  query = Linear(qn + q_pos)
    q   = qn + out_proj(softmax(query key^T / sqrt(d)) value)     # residual is the NORMED queries
    q   = q + w2(ffn_ln(silu(w1 q') * w3 q')),  q' = norm2(q)

After the last layer ``visual_fc`` maps the queries to the LLM width and the learned ``vit_eos``
token is appended: ``num_learnable_queries + 1`` visual tokens per image (65 at full size).

``q_pos``/``k_pos`` are fixed sin-cos tables (persistent buffers, as in the original checkpoint):
``q_pos[i] = [sin(i w), cos(i w)]`` with ``w_k = 10000^(-k/(D/2))``; ``k_pos`` row 0 is zeros (CLS)
and row ``1 + r G + c`` is ``[sin(c u), cos(c u), sin(r u), cos(r u)]`` with ``u_k = 10000^(-k/(D/4))``.
``norm1``/``normk``/``norm2`` use ``nn.LayerNorm``'s default eps (1e-5), ``ffn_ln`` uses
``layer_norm_eps`` -- both exactly as in the original. Used by :mod:`.modeling`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration import MPLUGOwl2AbstractorConfig


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1-D positions: ``[sin(p w), cos(p w)]``, ``w_k = 10000^(-k/(dim/2))``.

    Computed in float32 like the original (numpy float32), so the tables agree to float32 rounding.

    Args:
        dim: embedding width (even).
        positions: any-shaped positions; flattened.

    Returns:
        ``[positions.numel(), dim]`` float32 table.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    angles = positions.reshape(-1).to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def query_position_table(dim: int, num_queries: int) -> torch.Tensor:
    """The abstractor's ``q_pos_embed``: 1-D sin-cos over the query index, ``[num_queries, dim]``."""
    return sincos_1d(dim, torch.arange(num_queries, dtype=torch.float32))


def key_position_table(dim: int, grid_size: int) -> torch.Tensor:
    """The abstractor's ``k_pos_embed``: a zero CLS row, then 2-D sin-cos per patch.

    Row ``1 + r * grid_size + c`` (patch row ``r``, column ``c``) is the column encoding
    followed by the row encoding, each ``dim / 2`` wide.

    Returns:
        ``[1 + grid_size**2, dim]`` float32 table.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float32), torch.arange(grid_size, dtype=torch.float32), indexing="ij"
    )
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


class MPLUGOwl2AbstractorMultiHeadAttention(nn.Module):
    """Queries attend to ``[queries; image tokens]`` with fixed sin-cos positions on q and k."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        # Persistent: the original checkpoints carry them, and loading them keeps bit-equality.
        self.register_buffer(
            "q_pos_embed", query_position_table(config.hidden_size, config.num_learnable_queries), persistent=True
        )
        self.register_buffer("k_pos_embed", key_position_table(config.hidden_size, config.grid_size), persistent=True)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            queries: normed queries ``[B, Q, D]``.
            keys_values: ``cat([normed queries, normed image tokens])`` ``[B, Q + 1 + G*G, D]``.

        Returns:
            Context ``[B, Q, D]`` (before ``out_proj``).
        """
        dtype = queries.dtype
        kv_pos = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).unsqueeze(0).to(dtype)
        if kv_pos.shape[1] != keys_values.shape[1]:
            raise ValueError(
                f"abstractor expects {self.k_pos_embed.shape[0]} image tokens (1 + grid_size**2), got "
                f"{keys_values.shape[1] - self.q_pos_embed.shape[0]}"
            )
        query = self._heads(self.query(queries + self.q_pos_embed.unsqueeze(0).to(dtype)))
        key = self._heads(self.key(keys_values + kv_pos))
        value = self._heads(self.value(keys_values))  # values carry no positions
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, _ = attention(
            self,
            query,
            key,
            value,
            None,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return context.reshape(queries.shape[0], queries.shape[1], -1).contiguous()


class MPLUGOwl2AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the hidden width: ``w2(ffn_ln(silu(w1 x) * w3 x))``."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.act = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.w2(self.ffn_ln(self.act(self.w1(hidden_states)) * self.w3(hidden_states)))


class MPLUGOwl2AbstractorOutput(nn.Module):
    """Residual ``out_proj`` then a pre-LN MLP block (``crossattention.output`` in the checkpoint)."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)  # default eps 1e-5, as in the original
        self.mlp = MPLUGOwl2AbstractorMLP(config)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Combine the attention context with the (normed) queries."""
        hidden_states = residual + self.out_proj(context)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MPLUGOwl2AbstractorCrossAttention(nn.Module):
    """``norm1`` on queries, ``normk`` on image tokens, attention, output block."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.attention = MPLUGOwl2AbstractorMultiHeadAttention(config)
        self.output = MPLUGOwl2AbstractorOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.normk = nn.LayerNorm(config.hidden_size)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Update the queries from the image tokens."""
        queries = self.norm1(queries)
        keys_values = torch.cat([queries, self.normk(image_tokens)], dim=1)
        return self.output(self.attention(queries, keys_values), queries)


class MPLUGOwl2AbstractorLayer(GradientCheckpointingLayer):
    """One abstractor layer (``encoder.layers.N`` holding ``crossattention``)."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.crossattention = MPLUGOwl2AbstractorCrossAttention(config)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Run one layer."""
        return self.crossattention(queries, image_tokens)


class MPLUGOwl2AbstractorEncoder(nn.Module):
    """The stack of abstractor layers."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MPLUGOwl2AbstractorLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Run all layers in order."""
        for layer in self.layers:
            queries = layer(queries, image_tokens)
        return queries


class MPLUGOwl2VisualAbstractor(nn.Module):
    """Queries + encoder + ``visual_fc`` + ``vit_eos``: ViT tokens in, LLM-width visual tokens out."""

    def __init__(self, config: MPLUGOwl2AbstractorConfig, language_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_learnable_queries, config.hidden_size))
        self.encoder = MPLUGOwl2AbstractorEncoder(config)
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Summarise images.

        Args:
            image_tokens: ViT output ``[num_images, 1 + grid**2, vision_hidden]``.

        Returns:
            ``[num_images, num_learnable_queries + 1, language_hidden]``.
        """
        batch = image_tokens.shape[0]
        queries = self.query_embeds.expand(batch, -1, -1).to(image_tokens.dtype)
        queries = self.visual_fc(self.encoder(queries, image_tokens))
        return torch.cat([queries, self.vit_eos.expand(batch, -1, -1).to(queries.dtype)], dim=1)
