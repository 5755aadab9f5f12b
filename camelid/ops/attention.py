"""Causal self-attention with grouped-query heads: softmax(q k^T / sqrt(d), masked) v.

Implementations: `reference` (camelid.model.Attention's math: PyTorch's scaled_dot_product_attention on
[B, H, T, d]); for training, a C++ kernel with its backward (csrc/attention.cpp) that multiplies only the
causal triangle and reads the projections' [B, T, H, d] layout, registered as the custom op
`camelid::causal_attention` so `torch.compile` keeps it in its graph; for decoding, one C++ call that splits the
fused qkv product, applies RoPE, writes the KV cache and attends for a few new tokens; for long prompts at one
thread where oneDNN is the GEMM library (AMD CPUs), blocks of queries through oneDNN's GEMM. Two dispatch functions,
one per situation: `causal_attention` (training: whole sequences, autograd) and `cached_attention` (inference:
new tokens against the KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from camelid.ops import linear, native
from camelid.ops.rope import reference as rope_reference

# Forward + backward against SDPA on 2 threads (benchmarks/train_kernels.py): 1.33x at 256 tokens, 1.56x at 512,
# 1.16x at 1024, 0.96x at 2048, where SDPA's 512-key blocks skip most of the masked square themselves.
MAX_ATTENTION_T = 1024
MAX_FUSED_TOKENS = 8  # decode steps and speculative verification; prompts go through SDPA or the blocks below
# Prompts of at least this many tokens on oneDNN machines: the C++ `prompt_attention` (blocks of queries, oneDNN's
# GEMM, one parallel region) instead of SDPA, whose CPU kernel multiplies with torch's BLAS (MKL: slow on AMD,
# `linear.gemm_library`)
MIN_PROMPT_CHUNKED_T = 64
PROMPT_QUERY_CHUNK = 128  # query rows per score block: [rows x keys] stays in cache

_blas: bool | None = None  # the training kernel also needs PyTorch's BLAS (sgemm_), which every x86 wheel has


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q [B, H, T, d], k and v [B, KV, S, d]; mask True where a query may see a key (None: causal)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


# -- training -----------------------------------------------------------------------------------------------
@torch.library.custom_op("camelid::causal_attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    o, lse = native.module().causal_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale)
    return o, lse


@torch.library.custom_op("camelid::causal_attention_backward", mutates_args=())
def _attention_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = native.module().causal_attention_backward(grad_o.contiguous(), q, k, v, o, lse, scale)
    return dq, dk, dv


@_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, T)


@_attention_backward.register_fake
def _(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001 - ctx
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), *output)


def _backward(ctx, grad_o: Tensor, _grad_lse: Tensor | None) -> tuple:  # noqa: ANN001 - ctx
    dq, dk, dv = torch.ops.camelid.causal_attention_backward(grad_o, *ctx.saved_tensors, ctx.scale)
    return dq, dk, dv, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def _why_not(q: Tensor, k: Tensor, mask: Tensor | None) -> str | None:
    """None when the training kernel takes these inputs, else why not (the one place this decision is made)."""
    global _blas
    if mask is not None:
        return "an explicit mask (the kernel is causal only)"
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32:
        return "the kernel takes fp32 CPU tensors"
    if q.shape[1] > MAX_ATTENTION_T:
        return f"longer than {MAX_ATTENTION_T} tokens, where SDPA's blocks skip the masked square themselves"
    # the build cannot be traced: under compile, a module built before counts
    mod = native.loaded() if torch.compiler.is_compiling() else native.module()
    if mod is None:
        return native.reason()
    if _blas is None:
        _blas = bool(mod.causal_attention_available())
    return None if _blas else "this PyTorch has no BLAS sgemm for the kernel"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention with autograd for q [B, T, H, d], k and v [B, T, KV, d] (the projections' layout; returns
    [B, T, H, d]): the C++ kernel where it runs, else SDPA on transposed views. mask as in `reference`."""
    if _why_not(q, k, mask) is None:
        return torch.ops.camelid.causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]
    return reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


@dataclass(frozen=True)
class Documents:
    """Packed rows: row b holds documents of lengths[b] tokens one after another (each row's lengths add up to the
    same T). Every document attends causally within itself only, and its positions restart at 0."""

    lengths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len({sum(row) for row in self.lengths}) > 1 or any(n < 1 for row in self.lengths for n in row):
            raise ValueError(f"every row's document lengths must be positive and add up to one T: {self.lengths}")

    def positions(self, device: torch.device | str | None = None) -> Tensor:
        """[B, T]: 0, 1, ... within each document."""
        return torch.tensor([[i for n in row for i in range(n)] for row in self.lengths], device=device)

    def mask(self, device: torch.device | str | None = None) -> Tensor:
        """[B, 1, T, T] bool, True where a query may see a key: block-diagonal, causal within each block."""
        doc = torch.tensor([[j for j, n in enumerate(row) for _ in range(n)] for row in self.lengths], device=device)
        T = doc.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def document_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents) -> Tensor:
    """`causal_attention` of each document of packed rows on its own (q [B, T, H, d], k and v [B, T, KV, d]):
    the same result as the block-diagonal mask, without computing the blocks between documents."""
    rows = []
    for b, lengths in enumerate(docs.lengths):
        parts, s = [], 0
        for n in lengths:
            parts.append(causal_attention(q[b:b + 1, s:s + n], k[b:b + 1, s:s + n], v[b:b + 1, s:s + n]))
            s += n
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


# -- decoding -----------------------------------------------------------------------------------------------
def _why_not_cached(qkv: Tensor, positions: Tensor, cache_k: Tensor) -> str | None:
    """None when the fused decode kernel takes this step, else why not."""
    if torch.compiler.is_compiling():
        return "under torch.compile, inductor fuses the reference ops"
    if qkv.shape[1] > MAX_FUSED_TOKENS:
        return (f"more than {MAX_FUSED_TOKENS} new tokens (a prompt): SDPA or, from {MIN_PROMPT_CHUNKED_T} tokens, "
                f"the C++ blocks of queries through oneDNN's GEMM where it is the GEMM library")
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or cache_k.dtype != torch.float32:
        return "the kernel takes fp32 CPU tensors and an fp32 cache"
    if native.module() is None:
        return native.reason()
    return None


def cached_attention(qkv: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, cache: Any,
                     mask: Tensor | None, n_heads: int, n_kv_heads: int) -> Tensor:
    """One attention layer of inference from the fused projection qkv [B, T, (H + 2 KV) d]: split, RoPE, write
    the new keys and values into `cache` (a camelid.model.KVCache) at `positions` (None: no cache), attend.
    Returns [B, T, H d]. A few new tokens go through one C++ call; the rest through the reference ops."""
    B, T, width = qkv.shape
    d = width // (n_heads + 2 * n_kv_heads)
    if (cache is not None and positions is not None and mask is not None
            and _why_not_cached(qkv, positions, cache.k) is None):
        S = cache.k.shape[2]
        visible = mask.reshape(-1, T, S).expand(B, T, S)  # [T, S] or [B, 1, T, S] -> [B, T, S]
        return native.module().attend_cached(qkv, cos, sin, positions, cache.k, cache.v, visible, n_heads,
                                             n_kv_heads)
    q, k, v = qkv.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)
    q = q.view(B, T, n_heads, d).transpose(1, 2)
    k = k.view(B, T, n_kv_heads, d).transpose(1, 2)
    v = v.view(B, T, n_kv_heads, d).transpose(1, 2)
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    if cache is not None and positions is not None:
        upto = None
        if mask is not None and mask.shape[-1] == cache.k.shape[2] and not torch.compiler.is_compiling():
            # no query sees a slot past the furthest position written: attend over the cache's used part only
            # (a server's slots hold thousands of positions; a prompt's attention would otherwise grow with them)
            upto = int(positions.max()) + 1
            mask = mask[..., :upto]
        k, v = cache.update(positions, k, v, upto)
    if _why_not_chunked(q, k, mask) is None:
        out = _chunked_prompt_attention(q, k, v, mask)
        if out is not None:
            return out.view(B, T, n_heads * d)
    return reference(q, k, v, mask).transpose(1, 2).reshape(B, T, n_heads * d)


def _why_not_chunked(q: Tensor, k: Tensor, mask: Tensor | None) -> str | None:
    """None when a prompt's attention goes through `_chunked_prompt_attention`, else why not."""
    if torch.compiler.is_compiling():
        return "under torch.compile, inductor lowers SDPA itself"
    if q.shape[2] < MIN_PROMPT_CHUNKED_T:
        return f"fewer than {MIN_PROMPT_CHUNKED_T} new tokens"
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32:
        return "fp32 CPU tensors only"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return "with autograd (SDPA has the backward)"
    if linear.gemm_library()[0] != "onednn":
        return "torch's GEMM is the fast one on this CPU, and SDPA uses it"
    if mask is None and q.shape[2] != k.shape[2]:
        return "no mask and fewer queries than keys"
    if mask is not None and (mask.dtype != torch.bool
                             or not (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1))):
        return "a mask other than a bool [T, S] or [B, 1, T, S]"
    if native.module() is None:
        return native.reason()
    return None


def _chunked_prompt_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """`reference` for a prompt, q [B, H, T, d], k and v [B, KV, S, d] (mask as there; None: causal, S == T),
    returned as [B, T, H, d], by the C++ `prompt_attention`: per row, key/value head and block of
    PROMPT_QUERY_CHUNK queries, scores = the group's queries times the keys some query of the block sees (the causal
    triangle, block by block), masked, softmax, times the values, with oneDNN's GEMM, all blocks in one parallel
    region. None when a query sees no key at all (left padding: SDPA's convention for such rows stands)."""
    T, S = q.shape[2], k.shape[2]
    masks = mask.reshape(-1, T, S) if mask is not None else torch.ones(1, T, S, dtype=torch.bool).tril()
    if int(masks.view(torch.uint8).amax(-1).amin()) == 0:  # (uint8: several times faster than bool any/all)
        return None
    return native.module().prompt_attention(q, k, v, masks, PROMPT_QUERY_CHUNK)


def choose(q: Tensor | None = None) -> native.Choice:
    """Which implementation `causal_attention` runs for q [B, T, H, d] (default: fp32, CPU, 256 tokens)."""
    q = q if q is not None else torch.empty(1, 256, 1, 2)
    why = _why_not(q, q, None)
    if why is None:
        return native.Choice(f"C++ {native.label()}", f"training, up to {MAX_ATTENTION_T} tokens (SDPA beyond)")
    return native.Choice("PyTorch", f"SDPA: {why}")


def choose_cached(qkv: Tensor | None = None) -> native.Choice:
    """Which implementation `cached_attention` runs for qkv [B, T, width] (default: one fp32 CPU token)."""
    qkv = qkv if qkv is not None else torch.empty(1, 1, 6)
    why = _why_not_cached(qkv, torch.zeros(qkv.shape[1], dtype=torch.long), qkv)
    if why is None:
        return native.Choice(f"C++ {native.label()}", f"RoPE + cache write + attention in one call for up to "
                                                      f"{MAX_FUSED_TOKENS} new tokens (prompts: SDPA, or from "
                                                      f"{MIN_PROMPT_CHUNKED_T} tokens C++ prompt_attention where "
                                                      f"oneDNN is the GEMM library)")
    return native.Choice("PyTorch", f"SDPA: {why}")
