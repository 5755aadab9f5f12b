"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight over the last dimension.

Implementations: `reference` (camelid.model.RMSNorm's math, in fp32 whatever the input dtype); C++ loops
(csrc/rmsnorm.cpp): a sequential one for decode-sized inputs and a training forward/backward pair, one pass over
memory each, wrapped in `RMSNormFunction`, which also has a PyTorch twin that saves the same two tensors.
`rms_norm` picks one.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from camelid.ops import native


def reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _why_not(x: Tensor) -> str | None:
    """None when the C++ kernels take x, else why they do not (the one place this decision is made)."""
    if torch.compiler.is_compiling():
        return "under torch.compile, inductor fuses the reference ops"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "the kernels take fp32 CPU tensors"
    if native.module() is None:
        return native.reason()
    return None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with autograd, saving only x and 1/rms: the C++ pair where it runs, else the same math in torch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001 - ctx
        mod = native.module() if _why_not(x) is None and x.is_contiguous() and weight.is_contiguous() else None
        if mod is not None:
            y, rstd = mod.rms_norm_forward(x, weight, eps)
        else:
            rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
            y = (x * rstd).mul_(weight)
        ctx.save_for_backward(x, weight, rstd)
        ctx.cpp = mod is not None
        return y

    @staticmethod
    @once_differentiable  # C++ loops: a double backward must fail, not return zeros
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN001 - ctx
        x, weight, rstd = ctx.saved_tensors
        if ctx.cpp:
            grad_x, grad_w = native.module().rms_norm_backward(g.contiguous(), x, weight, rstd)
            return grad_x, grad_w, None
        xhat = x * rstd
        g_xhat = (g * xhat).flatten(0, -2)
        grad_w = g_xhat.sum(0)
        dot = torch.mv(g_xhat, weight).view(rstd.shape).div_(x.shape[-1])  # mean(g * weight * xhat)
        return torch.addcmul(g * weight, xhat, dot, value=-1.0).mul_(rstd), grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [..., d] through the fastest implementation that applies here."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32:
        return reference(x, weight, eps)  # inductor fuses it; reduced precision keeps the reference's fp32 math
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    if _why_not(x) is None:
        return native.module().rms_norm(x, weight, eps)
    return reference(x, weight, eps)


def choose(x: Tensor | None = None) -> native.Choice:
    """Which implementation `rms_norm` runs for x (default: an fp32 CPU activation), and why."""
    why = _why_not(x if x is not None else torch.empty(1, 1))
    if why is None:
        return native.Choice(f"C++ {native.label()}", "one pass each way; sequential for a few rows")
    return native.Choice("PyTorch", why)
