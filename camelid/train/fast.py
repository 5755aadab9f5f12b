"""The LLaMA as `camelid pretrain` trains it: the same function as camelid.model.Llama, computed in fewer passes.

camelid/model.py is the readable reference (bit-identical to transformers). Training spends half its time
outside the matmuls on a CPU, in memory-bound elementwise ops and their autograd bookkeeping, so TrainLlama
swaps in implementations that do the same math in fewer passes over memory:

- the output head and cross-entropy in one autograd Function, chunked over tokens, so the [tokens, vocab]
  logits are never stored; their gradient is formed in the forward pass while each chunk is in cache;
- causal attention, forward and backward, as a C++ kernel (camelid/kernels/attention.cpp) that multiplies only
  the causal triangle (PyTorch's CPU flash attention computes the full square below 512 tokens) and reads the
  heads in the projections' [B, T, heads, d] layout, so no transposes either way;
- RMSNorm, SwiGLU and RoPE as Functions over one-pass C++ loops (camelid/kernels/train.cpp), each with a
  PyTorch fall-back; RMSNorm saves only its input and 1/rms, SwiGLU only its inputs (which its backward
  overwrites with their gradients), RoPE only the tables (its backward is the inverse rotation).

Under torch.compile the norms, SwiGLU and RoPE fall back to the reference ops, which inductor fuses; the fused
head stays, run eagerly, and the attention kernel is a custom op in the graph. Measured and left out (slower,
or no faster, here on CPU): one q/k/v product and one gate/up product with the weights concatenated at each
forward, a SwiGLU Function of PyTorch ops, and a feed-forward Function chunked over tokens (0.98-1.02x).

The parameters and their names are Llama's, so checkpoints, exports, evaluation and sampling are unchanged;
values and gradients match the reference to float32 rounding (tests/train/test_fast.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from camelid import kernels
from camelid.model import Attention, FeedForward, Llama, RMSNorm, apply_rope

# logits per chunk of the fused head: 4 MiB of fp32 (256 rows at vocab 4096). Measured on 2 cores, the head's
# forward and backward took 48 ms in 64-row chunks, 41-43 ms in 128-512-row ones (fuller matmuls), 48 at 1024.
_CE_CHUNK_ELEMENTS = 1 << 20


def _cpp(*tensors: Tensor):  # noqa: ANN202 - the kernels' module or None
    """The C++ kernels, for contiguous fp32 CPU tensors in eager mode (under compile inductor fuses the ops)."""
    if torch.compiler.is_compiling() or not all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return None
    return kernels.load()


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ weight.T, targets)) with fp32 logits, never holding more than a chunk of them."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        n = h.shape[0]
        chunk = max(32, _CE_CHUNK_ELEMENTS // weight.shape[0])
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        mod = _cpp(h, weight)  # C++ softmax in place, into one logits buffer (fresh ones cost page faults)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=h.dtype) if mod is not None else None
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk].contiguous()
            if mod is not None:
                probs = torch.mm(hc, weight.t(), out=buf[:len(tc)])
                total += mod.cross_entropy_grad_(probs, tc).sum()  # probs is now d(loss)/d(logits)
            else:
                logits = (hc @ weight.t()).float()
                rows = torch.arange(len(tc), device=h.device)
                picked = logits[rows, tc]
                peak = logits.amax(-1, keepdim=True)
                probs = logits.sub_(peak).exp_()  # in place: the logits are not needed again
                sums = probs.sum(-1, keepdim=True)
                total += (peak.squeeze(-1) + sums.squeeze(-1).log() - picked).sum()
                if want_grad:
                    probs.div_(sums)
                    probs[rows, tc] -= 1.0  # d(loss)/d(logits), before the 1/n of the mean
                    probs = probs.to(h.dtype)
            if want_grad:
                torch.mm(probs, weight, out=grad_h[s:s + chunk])
                grad_w.addmm_(probs.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001 - ctx
        grad_h, grad_w = ctx.saved_tensors
        scale = grad / ctx.n
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None


# eager even inside a compiled model: measured faster than inductor's trace of the chunked loop
_fused_head_loss = torch.compiler.disable(LinearCrossEntropy.apply)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ANN001 - ctx
        mod = _cpp(x, weight)
        if mod is not None:  # one pass each way (kernels/train.cpp)
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
            grad_x, grad_w = kernels.load().rms_norm_backward(g.contiguous(), x, weight, rstd)
            return grad_x, grad_w, None
        xhat = x * rstd
        g_xhat = (g * xhat).flatten(0, -2)
        grad_w = g_xhat.sum(0)
        dot = torch.mv(g_xhat, weight).view(rstd.shape).div_(x.shape[-1])  # mean(g * weight * xhat)
        return torch.addcmul(g * weight, xhat, dot, value=-1.0).mul_(rstd), grad_w, None


class TrainRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or torch.compiler.is_compiling():  # autocast; or inductor fuses the reference
            return super().forward(x)
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up in one pass, its backward in one more, saving only gate and up (kernels/train.cpp). Only for
    gate and up that nothing else reads (TrainFeedForward's own projections): the backward overwrites them."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        ctx.save_for_backward(gate, up)
        return kernels.load().swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable  # C++ loops: a double backward must fail, not return zeros
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001 - ctx
        gate, up = ctx.saved_tensors
        kernels.load().swiglu_backward_(g.contiguous(), gate, up)  # now their gradients
        return gate, up


class TrainFeedForward(FeedForward):
    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None or _cpp(x) is None:  # inference, reduced precision, a GPU, compile, no kernels
            return super().forward(x)
        return self.w2(_SwiGLUFn.apply(self.w1(x), self.w3(x)))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., d] rotated pairwise (i, i + d/2) by angles with cos/sin [..., d/2] (the tables' first halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _RopeFn(torch.autograd.Function):
    """RoPE on x [B, T, heads, d] with cos, sin [T, d/2] (the tables' first halves)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        ctx.save_for_backward(cos, sin)
        mod = _cpp(x, cos, sin)
        return mod.rope(x, cos, sin, 1.0) if mod is not None else _rotate(x, cos[:, None], sin[:, None])

    @staticmethod
    @once_differentiable  # C++ loops: a double backward must fail, not return zeros
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001 - ctx
        cos, sin = ctx.saved_tensors  # a rotation's inverse turns by the opposite angle
        mod = _cpp(g, cos, sin)
        return (mod.rope(g, cos, sin, -1.0) if mod is not None else _rotate(g, cos[:, None], -sin[:, None])), None, None


class TrainAttention(Attention):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.kv_cache is not None or self.wqkv is not None:
            return super().forward(x, cos, sin, positions, mask)  # generation and inference: the reference
        B, T, _ = x.shape
        H, KV, d = self.n_heads, self.n_kv_heads, self.head_dim
        # [B, T, heads, d], as the projections lay them out: the C++ attention reads them without transposes
        q, k, v = self.wq(x).view(B, T, H, d), self.wk(x).view(B, T, KV, d), self.wv(x).view(B, T, KV, d)
        if torch.compiler.is_compiling() or cos.dim() != 2:  # inductor fuses the reference ops
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            cos, sin = cos[:, : d // 2].contiguous(), sin[:, : d // 2].contiguous()
            q, k = _RopeFn.apply(q, cos, sin), _RopeFn.apply(k, cos, sin)
        y = kernels.causal_attention(q, k, v) if mask is None else None
        if y is None:  # a padding mask, reduced precision, a GPU, a long sequence, or no kernels
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=KV != H).transpose(1, 2)
        return self.wo(y.reshape(B, T, H * d))


_TRAIN_TWINS = {RMSNorm: TrainRMSNorm, Attention: TrainAttention, FeedForward: TrainFeedForward}


class TrainLlama(Llama):
    """Llama with the training fast paths; forward(input_ids, targets=...) returns the mean next-token loss."""

    def __init__(self, config) -> None:  # noqa: ANN001 - a LlamaConfig
        super().__init__(config)
        for module in self.modules():
            if type(module) in _TRAIN_TWINS:  # same parameters and names: only the forward changes
                module.__class__ = _TRAIN_TWINS[type(module)]

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, last_only: bool = False,
                key_mask: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(input_ids, positions, last_only=last_only, key_mask=key_mask)
        h = self.hidden_states(input_ids).flatten(0, 1)
        if torch.is_autocast_enabled(h.device.type):  # reduced-precision matmuls: the plain head and loss
            return F.cross_entropy(self.output(h).float(), targets.flatten())
        return _fused_head_loss(h, self.output.weight, targets.flatten())

