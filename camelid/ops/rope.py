"""RoPE, Hugging Face's rotate-half layout: each pair (x[i], x[i + d/2]) of a head turned by its position's angle.

Implementations: `reference` (camelid.model.apply_rope's math on [B, H, T, d] with full-width tables [T, d]);
`RopeFunction` for training on the projections' own [B, T, H, d] layout with half-width tables, whose backward
is the inverse rotation: a C++ loop (csrc/rope.cpp) or its PyTorch twin. `rope_bthd` picks one. (Decode-time
RoPE is part of the fused decode attention, camelid.ops.attention.)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from camelid.ops import native


def reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., d] rotated by cos, sin (full width d, broadcast against x)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _why_not(*tensors: Tensor) -> str | None:
    """None when the C++ loop takes these tensors, else why not (the one place this decision is made)."""
    if torch.compiler.is_compiling():
        return "under torch.compile, inductor fuses the reference ops"
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return "the kernel takes contiguous fp32 CPU tensors"
    if native.module() is None:
        return native.reason()
    return None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., d] rotated pairwise (i, i + d/2) by angles with cos/sin [..., d/2] (the tables' first halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class RopeFunction(torch.autograd.Function):
    """RoPE on x [B, T, heads, d] with cos, sin [T, d/2] (the tables' first halves); saves only the tables."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        ctx.save_for_backward(cos, sin)
        if _why_not(x, cos, sin) is None:
            return native.module().rope(x, cos, sin, 1.0)
        return _rotate(x, cos[:, None], sin[:, None])

    @staticmethod
    @once_differentiable  # C++ loops: a double backward must fail, not return zeros
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001 - ctx
        cos, sin = ctx.saved_tensors  # a rotation's inverse turns by the opposite angle
        if _why_not(g, cos, sin) is None:
            return native.module().rope(g, cos, sin, -1.0), None, None
        return _rotate(g, cos[:, None], -sin[:, None]), None, None


def rope_bthd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on x [B, T, heads, d] with the model's tables: [T, d], or [B, 1, T, d] for per-row positions."""
    if torch.compiler.is_compiling() or cos.dim() != 2:  # inductor fuses the reference; per-row tables
        if cos.dim() == 4:
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, T, 1, d]
        else:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, d]
        return reference(x, cos, sin)
    half = x.shape[-1] // 2
    return RopeFunction.apply(x, cos[:, :half].contiguous(), sin[:, :half].contiguous())


def choose(x: Tensor | None = None) -> native.Choice:
    """Which implementation `rope_bthd` runs for x (default: an fp32 CPU training activation), and why."""
    why = _why_not(x if x is not None else torch.empty(1, 1, 1, 2))
    if why is None:
        return native.Choice(f"C++ {native.label()}", "training, forward and backward in one pass each")
    return native.Choice("PyTorch", why)
