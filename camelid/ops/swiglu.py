"""SwiGLU's elementwise part: silu(gate) * up.

Implementations: `reference` (camelid.model.FeedForward's math); C++ loops (csrc/swiglu.cpp), forward and, in
`SwiGLUFunction`, a backward that writes the gradients over its saved inputs (two fewer [tokens, hidden]
buffers, whose page faults cost more than the arithmetic). `swiglu` picks one. (A PyTorch twin of the Function
was measured no faster than the reference's autograd, so the reference is the fall-back.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from camelid.ops import native


def reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _why_not(gate: Tensor, up: Tensor) -> str | None:
    """None when the C++ loops take gate and up, else why not (the one place this decision is made)."""
    if torch.compiler.is_compiling():
        return "under torch.compile, inductor fuses the reference ops"
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (gate, up)):
        return "the kernel takes contiguous fp32 CPU tensors"
    if native.module() is None:
        return native.reason()
    return None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up in one C++ pass, its backward in one more, saving only gate and up, which the backward
    overwrites with their gradients: only for gate and up that nothing else reads."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        ctx.save_for_backward(gate, up)
        return native.module().swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable  # C++ loops: a double backward must fail, not return zeros
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001 - ctx
        gate, up = ctx.saved_tensors
        native.module().swiglu_backward_(g.contiguous(), gate, up)  # now their gradients
        return gate, up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up. With autograd the C++ backward overwrites gate and up: pass fresh projections only."""
    if _why_not(gate, up) is not None:
        return reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return native.module().swiglu_forward(gate, up)


def choose(gate: Tensor | None = None) -> native.Choice:
    """Which implementation `swiglu` runs for gate (and an up like it), and why."""
    gate = gate if gate is not None else torch.empty(1, 1)
    why = _why_not(gate, gate)
    if why is None:
        return native.Choice(f"C++ {native.label()}", "one pass each way; the backward reuses its inputs")
    return native.Choice("PyTorch", why)
