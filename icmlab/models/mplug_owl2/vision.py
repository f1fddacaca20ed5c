"""The mPLUG-Owl2 vision tower: a CLIP-style pre-LN ViT with a fused ``query_key_value`` projection.

Computation (as in the original ``MplugOwlVisionModel``): a bias-free patch convolution, a learned
CLS token prepended, learned absolute positions added, ``pre_layernorm``, pre-LN encoder layers
(quick-GELU MLP), then ``post_layernorm`` over **all** tokens. The output keeps the CLS token
(``1 + grid**2`` tokens), which is what the visual abstractor consumes.

Parameter names follow the original checkpoint (``embeddings.cls_token``,
``embeddings.position_embedding``, ``encoder.layers.N.self_attn.query_key_value``, ...), so the
original state dict loads without renames. Used by :mod:`icmlab.models.mplug_owl2.modeling`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration import MPLUGOwl2VisionConfig


class MPLUGOwl2VisionEmbeddings(nn.Module):
    """Patchify, prepend the CLS token, add learned positions, then ``pre_layernorm``."""

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_patches = config.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        # A bare Parameter (not an nn.Embedding): the original key has no `.weight` suffix.
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, config.hidden_size))
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, S, S]`` pixels to ``[B, 1 + grid**2, hidden]`` token embeddings."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, {size}, {size}] "
                f"(vision_config.image_size), got {tuple(pixel_values.shape)}"
            )
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        embeddings = embeddings + self.position_embedding[:, : embeddings.shape[1]].to(patches.dtype)
        return self.pre_layernorm(embeddings)


class MPLUGOwl2VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused projection.

    The fused ``query_key_value`` output is laid out per head as ``[heads, 3, head_dim]`` (all
    three projections of head 0, then head 1, ...), not ``[3, heads, head_dim]`` as in CLIP.
    """

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1  # read by the shared attention kernels
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(output, attention_weights_or_None)`` for ``[B, L, hidden]`` inputs."""
        bsz, seq_len, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(bsz, seq_len, self.num_heads, 3, self.head_dim)
        # -> three tensors of shape [B, heads, L, head_dim]
        query, key, value = mixed.permute(3, 0, 2, 1, 4).unbind(0)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, weights = attention(
            self,
            query,
            key,
            value,
            None,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        context = context.reshape(bsz, seq_len, -1).contiguous()
        return self.dense(context), weights


class MPLUGOwl2VisionMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with quick-GELU at full size."""

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the two-layer MLP."""
        return self.fc2(self.act(self.fc1(hidden_states)))


class MPLUGOwl2VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MPLUGOwl2VisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MPLUGOwl2VisionMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run one block."""
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states))
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MPLUGOwl2VisionEncoder(nn.Module):
    """The stack of encoder layers (``encoder.layers.N`` in the checkpoint)."""

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MPLUGOwl2VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run all layers in order."""
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class MPLUGOwl2VisionModel(nn.Module):
    """The whole tower; ``forward(pixel_values)`` returns the post-layernormed tokens, CLS kept."""

    def __init__(self, config: MPLUGOwl2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = MPLUGOwl2VisionEmbeddings(config)
        self.encoder = MPLUGOwl2VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            pixel_values: ``[num_images, channels, image_size, image_size]`` CLIP-normalised pixels.

        Returns:
            ``[num_images, 1 + grid**2, vision_hidden]`` (the original's ``last_hidden_state``).
        """
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
