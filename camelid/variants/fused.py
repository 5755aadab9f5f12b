"""The fused inference model, derived from the reference from outside: `fuse(model)`.

Each block's attention becomes a `FusedAttention` (one product for q, k and v; RoPE, the KV-cache write and the
attention of a few new tokens in one C++ call), its feed-forward a `FusedFeedForward` (gate and up in one
product), and every RMSNorm a `FastRMSNorm`. The new modules take the old ones' tensors (the concatenated
projections are new tensors; the old ones are freed with the modules they belonged to). The result computes the
reference's function up to float rounding (tests/variants/test_fused.py) and is what `quantize_model` and the
C++ decode step (camelid.variants.decode_step) build on. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camelid.model import Attention, FeedForward, Llama, RMSNorm
from camelid.ops import attention, rmsnorm, swiglu


class FastRMSNorm(nn.Module):
    """RMSNorm through camelid.ops.rmsnorm (C++ where it runs); holds the reference module's weight."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm.rms_norm(x, self.weight, self.eps)


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing the given ones' outputs side by side (weights and biases concatenated)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device="meta")  # no init
    fused.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]),
                                  requires_grad=linears[0].bias.requires_grad)
    return fused


class FusedAttention(nn.Module):
    """Attention with q, k, v from one product (`wqkv`); `wo` is the reference module's."""

    def __init__(self, att: Attention) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = att.n_heads, att.n_kv_heads, att.head_dim
        self.wqkv = concat_linears([att.wq, att.wk, att.wv])
        self.wo = att.wo
        self.kv_cache = att.kv_cache

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        y = attention.cached_attention(self.wqkv(x), cos, sin, positions, self.kv_cache, mask, self.n_heads,
                                       self.n_kv_heads)
        return self.wo(y)


class FusedFeedForward(nn.Module):
    """SwiGLU with gate and up from one product (`w13`); `w2` is the reference module's."""

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        self.w13 = concat_linears([ffn.w1, ffn.w3])
        self.w2 = ffn.w2

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(swiglu.swiglu(gate, up))


@torch.no_grad()
def fuse(model: Llama) -> Llama:
    """Replace `model`'s attention, feed-forward and norm modules by their fused twins, in place; each block does
    4 products instead of 7. Idempotent. Returns the model."""
    for block in model.layers:
        if isinstance(block.attention, Attention):
            block.attention = FusedAttention(block.attention)
        if isinstance(block.feed_forward, FeedForward):
            block.feed_forward = FusedFeedForward(block.feed_forward)
    for parent in [model, *model.layers]:
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm:
                setattr(parent, name, FastRMSNorm(child))
    return model
