"""The output head and the next-token loss together: mean(cross_entropy(h @ weight^T, targets)), fp32 logits.

Implementations: `reference` (the head, then F.cross_entropy); `LinearCrossEntropy`, which runs over chunks of
tokens so the [tokens, vocab] logits are never stored, forming their gradient in the forward pass while each
chunk is in cache: its softmax-and-gradient step is a C++ loop (csrc/head_loss.cpp) or the same math in torch.
`head_loss` picks one. `int8_head_loss` is the same loss under a frozen int8 head (QLoRA's tied embedding kept
quantised): it dequantises the head a block of vocabulary rows at a time, so no fp32 copy of it is ever whole.
`token_logprobs` gives each row's log-probability of its target under a frozen head (DPO's answer scores), in the
same chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camelid.ops import native
from camelid.ops.linear import gemm_library, matmul_t

# logits per chunk: 4 MiB of fp32 (256 rows at vocab 4096). Measured on 2 cores, the head's forward and backward
# took 48 ms in 64-row chunks, 41-43 ms in 128-512-row ones (fuller matmuls), 48 at 1024.
CE_CHUNK_ELEMENTS = 1 << 20


def reference(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """h [n, dim], weight [vocab, dim], targets [n] -> the mean cross-entropy of fp32 logits."""
    return F.cross_entropy(F.linear(h, weight).float(), targets)


def _why_not(h: Tensor, weight: Tensor) -> str | None:
    """None when the C++ chunk step takes these tensors, else why not (the one place this is decided)."""
    if torch.compiler.is_compiling():
        return "under torch.compile (the fused loss runs eagerly)"
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (h, weight)):
        return "the kernel takes contiguous fp32 CPU tensors"
    if native.module() is None:
        return native.reason()
    return None


def _chunked(h: Tensor, weight: Tensor, targets: Tensor, want_h: bool, want_w: bool
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-row cross-entropies [n] of h @ weight.T against targets, and d(their sum)/dh and /dweight (None when
    not wanted), over chunks of rows: the [n, vocab] logits are never held whole."""
    n = h.shape[0]
    chunk = max(32, CE_CHUNK_ELEMENTS // weight.shape[0])
    want_grad = want_h or want_w
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros_like(weight) if want_w else None
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    mod = native.module() if _why_not(h, weight) is None else None
    # C++: softmax in place, into one logits buffer (fresh ones cost page faults)
    gemm_onednn = not torch.compiler.is_compiling() and gemm_library()[0] == "onednn"
    buf = torch.empty(min(chunk, n), weight.shape[0], dtype=h.dtype) if mod is not None and not gemm_onednn else None
    for s in range(0, n, chunk):
        hc, tc = h[s:s + chunk], targets[s:s + chunk].contiguous()
        if mod is not None:
            probs = (matmul_t(hc, weight) if gemm_onednn else torch.mm(hc, weight.t(), out=buf[:len(tc)]))
            losses[s:s + len(tc)] = mod.cross_entropy_grad_(probs, tc)  # probs is now d(loss)/d(logits)
        else:
            logits = matmul_t(hc, weight).float()
            rows = torch.arange(len(tc), device=h.device)
            picked = logits[rows, tc]
            peak = logits.amax(-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: the logits are not needed again
            sums = probs.sum(-1, keepdim=True)
            losses[s:s + len(tc)] = peak.squeeze(-1) + sums.squeeze(-1).log() - picked
            if want_grad:
                probs.div_(sums)
                probs[rows, tc] -= 1.0  # d(loss)/d(logits)
                probs = probs.to(h.dtype)
        if want_h:
            if gemm_onednn:
                grad_h[s:s + chunk] = matmul_t(probs, weight.t())
            else:
                torch.mm(probs, weight, out=grad_h[s:s + chunk])
        if want_w:
            grad_w.addmm_(probs.t(), hc)
    return losses, grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ weight.T, targets)) with fp32 logits, never holding more than a chunk of them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        # a frozen head (LoRA) needs no grad_w
        losses, grad_h, grad_w = _chunked(h, weight, targets, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = h.shape[0]
        return losses.sum() / ctx.n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001 - ctx
        grad_h, grad_w = ctx.saved_tensors
        scale = grad / ctx.n
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype), None)


# vocabulary rows of the int8 head dequantised at a time: 4096 x 576 fp32 is 9 MiB
INT8_HEAD_BLOCK = 4096


class Int8HeadCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ W.T, targets)) for a frozen head W = qweight * scale[:, None] (int8 rows, one fp32
    scale each), with only d/dh. Two passes over blocks of vocabulary rows, each block dequantised when used:
    the first keeps a running log-sum-exp of every row's logits (and the target's logit), the second forms
    softmax - onehot per block and accumulates its product with the block into d/dh. The head is read twice and
    its logits never exist beyond [tokens, block]."""

    @staticmethod
    def forward(ctx, h: Tensor, qweight: Tensor, scale: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        n, vocab = h.shape[0], qweight.shape[0]
        rows = torch.arange(n, device=h.device)
        peak = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
        sums = torch.zeros(n, dtype=torch.float32, device=h.device)
        picked = torch.zeros(n, dtype=torch.float32, device=h.device)
        hf = h.float()
        for s in range(0, vocab, INT8_HEAD_BLOCK):
            w = qweight[s:s + INT8_HEAD_BLOCK].float() * scale[s:s + INT8_HEAD_BLOCK, None]
            logits = hf @ w.T
            new_peak = torch.maximum(peak, logits.amax(-1))
            sums = sums * (peak - new_peak).exp() + (logits - new_peak[:, None]).exp().sum(-1)
            peak = new_peak
            inside = (targets >= s) & (targets < s + w.shape[0])
            picked[inside] = logits[rows[inside], targets[inside] - s]
        lse = peak + sums.log()
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros_like(hf)
            for s in range(0, vocab, INT8_HEAD_BLOCK):
                w = qweight[s:s + INT8_HEAD_BLOCK].float() * scale[s:s + INT8_HEAD_BLOCK, None]
                probs = (hf @ w.T).sub_(lse[:, None]).exp_()
                inside = (targets >= s) & (targets < s + w.shape[0])
                probs[rows[inside], targets[inside] - s] -= 1.0
                grad_h.addmm_(probs, w)
        ctx.save_for_backward(grad_h)
        ctx.n, ctx.dtype = n, h.dtype
        return (lse - picked).sum() / max(1, n)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # noqa: ANN001 - ctx
        (grad_h,) = ctx.saved_tensors
        if grad_h is None:
            return None, None, None, None
        return (grad_h * (grad / max(1, ctx.n))).to(ctx.dtype), None, None, None


def int8_head_loss(h: Tensor, qweight: Tensor, scale: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token loss of h [n, dim] under a frozen int8 head (codes [vocab, dim], scale [vocab])."""
    return Int8HeadCrossEntropy.apply(h, qweight, scale, targets)


class LinearTokenLogProbs(torch.autograd.Function):
    """log_softmax(h @ weight.T)[row, targets[row]] per row [n], fp32, for a head that takes no gradient (LoRA's
    frozen head): each row's gradient d/dh is formed in the forward pass, a chunk of logits at a time, and scaled
    by the incoming gradient in the backward pass (row by row: the rows' weights are not known in advance, so a
    head that trains would need its logits again; it takes the plain path instead)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        losses, grad_h, _ = _chunked(h, weight, targets, ctx.needs_input_grad[0], False)
        ctx.save_for_backward(grad_h)
        return losses.neg_()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # noqa: ANN001 - ctx
        (grad_h,) = ctx.saved_tensors
        return None if grad_h is None else grad_h * grad.neg()[:, None].to(grad_h.dtype), None, None


# eager even inside a compiled model: measured faster than inductor's trace of the chunked loop
_fused = torch.compiler.disable(LinearCrossEntropy.apply)
_fused_logps = torch.compiler.disable(LinearTokenLogProbs.apply)


def head_loss(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token loss of hidden states h [n, dim] under the head `weight` [vocab, dim]."""
    if torch.is_autocast_enabled(h.device.type):  # reduced-precision matmuls: the plain head and loss
        return reference(h, weight, targets)
    return _fused(h, weight, targets)


def token_logprobs(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[i] | h[i]) [n], fp32, under the head `weight` [vocab, dim]: chunked (the logits never held
    whole) when the head takes no gradient, else the plain head and log_softmax."""
    if torch.is_autocast_enabled(h.device.type) or (weight.requires_grad and torch.is_grad_enabled()):
        logits = F.linear(h, weight).float()
        return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    return _fused_logps(h, weight, targets)


def choose(h: Tensor | None = None) -> native.Choice:
    """Which implementation `head_loss` runs for h (default: fp32 CPU hidden states), and why."""
    h = h if h is not None else torch.empty(1, 1)
    if torch.is_autocast_enabled(h.device.type):
        return native.Choice("PyTorch", "autocast: the plain head and F.cross_entropy")
    why = _why_not(h, h)
    if why is None:
        return native.Choice(f"C++ {native.label()}", "chunked head + loss, the logits never stored whole")
    return native.Choice("PyTorch", f"chunked head + loss in torch: {why}")
