"""Gated cross-attention, the way Llama 3.2 Vision joins an image encoder to a text model.

Text queries attend to image keys and values, softmax(Q_text K_image^T / sqrt(d)) V_image, with RMSNorms on
q and k and grouped-query attention. The layer adds its attention and its SwiGLU feed-forward to the residual
stream through tanh(gate), both gates starting at 0: inserted into a frozen text model, it changes nothing
until training opens the gates, so the model starts exactly where the text model was.

The image's keys and values are computed once (`set_image`) and reused by every token of the prompt and every
decode step; with no image set, the layer is skipped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.config import LlamaConfig
from camelid.model import FeedForward, RMSNorm


class CrossAttention(nn.Module):
    """Queries from the text [B, T, dim], keys and values from image features [B, N, context_dim]; no mask and
    no rotary embedding (patches carry their positions in their features)."""

    def __init__(self, config: LlamaConfig, context_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(context_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(context_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def image_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Image features [B, N, context_dim] -> keys and values [B, n_kv_heads, N, head_dim]."""
        B, N, _ = context.shape
        k = self.k_norm(self.wk(context).view(B, N, self.n_kv_heads, self.head_dim))
        v = self.wv(context).view(B, N, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        if k.shape[0] != B:  # one image for a batch of prompts
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GatedCrossAttention(nn.Module):
    """x + tanh(g_attn) * cross_attn(norm(x)), then h + tanh(g_ffn) * ffn(norm(h)); both gates start at 0.

    With the gates at 0 the output is x bit for bit: tanh(0) = 0, 0 * (anything finite) = 0, and x + 0 = x.
    `gate_scale` s reads each gate as s * (its parameter): Adam moves a parameter by about lr per step whatever its
    gradient's size, so s > 1 lets the gates open in hundreds of steps rather than many thousands."""

    def __init__(self, config: LlamaConfig, context_dim: int, hidden: int, gate_scale: float = 1.0) -> None:
        super().__init__()
        self.gate_scale = gate_scale
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = CrossAttention(config, context_dim)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.replace(intermediate_size=hidden))
        self.ffn_gate = nn.Parameter(torch.zeros(1))
        self.image_kv: tuple[Tensor, Tensor] | None = None  # set per image by set_image
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def set_image(self, features: Tensor | None) -> None:
        """Compute (and keep) this layer's keys and values for image features [B, N, context_dim]; None clears."""
        self.image_kv = None if features is None else self.attention.image_kv(features)

    def forward(self, x: Tensor) -> Tensor:
        if self.image_kv is None:
            raise RuntimeError("no image is set on this cross-attention layer; call set_image first")
        k, v = self.image_kv
        h = x + (self.gate_scale * self.attention_gate).tanh() * self.attention(self.attention_norm(x), k, v)
        # in the text model's dtype: fp32 layers on a bf16 text model hand it bf16, as its own blocks do
        return (h + (self.gate_scale * self.ffn_gate).tanh() * self.feed_forward(self.ffn_norm(h))).to(x.dtype)


class BlockThenCrossAttention(nn.Module):
    """A text model's block followed by a gated cross-attention layer that runs only while an image is set.

    It replaces `model.layers[i]` from the outside: the block itself (and its tensors) is kept as it was, and the
    call signature is the block's, so the text model's own forward pass runs unchanged. Other attributes are the
    block's (`.attention`, `.feed_forward`, ...), so the text model's setup_cache, clear_cache and fuse reach them.
    (camelid's C++ decode step knows nothing of the layer: it refuses a VisionLlama, which is not a Llama.)"""

    def __init__(self, block: nn.Module, cross: GatedCrossAttention) -> None:
        super().__init__()
        self.block = block
        self.cross = cross

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """A child module of the block replaced through the wrapper (a variant's fuse) is replaced in the block."""
        block = self.__dict__.get("_modules", {}).get("block")
        if block is not None and name != "cross" and name in dict(block.named_children()):
            setattr(block, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.block(x, cos, sin, positions, mask)
        return x if self.cross.image_kv is None else self.cross(x)
