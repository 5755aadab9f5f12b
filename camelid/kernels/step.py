"""The whole batch-1 decode step in one C++ call (camelid/kernels/step.cpp), for fused fp32/int8/int4 models.

`decode_step(model)` returns a `DecodeStep` (call it with a token id and a position, get logits [1, 1, vocab])
or None when the step cannot be used: no kernels (or CAMELID_NO_KERNELS=1), a model that is not fused
(`Llama.fuse()` / `quantize_model`), not fp32 on CPU, or a layer kind the kernel does not know (biases, ...).
It reads the model's own weight tensors and writes the model's own KV cache, so prompts through PyTorch and
steps through C++ interleave freely. Built per generation: it costs a walk over the modules, no copies.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from camelid import kernels
from camelid.model import Llama

F32, INT8, INT4 = 0, 1, 2


def _linear(mod: nn.Module) -> tuple[int, list[Tensor]] | None:
    """(kind, tensors) of a linear layer in a format step.cpp reads, or None."""
    from camelid.quantize import FastLinear, Int4Linear, Int8Linear

    if isinstance(mod, Int8Linear):
        return INT8, [mod.qweight, mod.scale]
    if isinstance(mod, Int4Linear):
        return INT4, [mod.qweight, mod.scale, mod.minimum]
    if isinstance(mod, FastLinear) or (type(mod) is nn.Linear and mod.bias is None):
        return F32, [mod.weight]
    return None


def _embedding(mod: nn.Module) -> tuple[int, list[Tensor]] | None:
    from camelid.quantize import Int8Embedding

    if isinstance(mod, Int8Embedding):
        return INT8, [mod.table.qweight, mod.table.scale]
    if type(mod) is nn.Embedding:
        return F32, [mod.weight]
    return None


def _usable(tensors: list[Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


class DecodeStep:
    """One generated token per call through step.cpp: `step(token_id, position)` -> logits [1, 1, vocab]."""

    def __init__(self, model: Llama, native: Any) -> None:
        self.model, self.native = model, native
        self._bound: Tensor | None = None  # layer 0's cache k tensor the kernel was last bound to

    def __call__(self, token: int, position: int) -> Tensor:
        cache = self.model.layers[0].attention.kv_cache
        if cache is None or cache.k is not self._bound:
            self._bind()
        return self.native.forward(token, position)

    def _bind(self) -> None:
        """Point the kernel at the model's current KV cache (setup_cache makes new tensors every generation)."""
        m = self.model
        caches = [b.attention.kv_cache for b in m.layers]
        if any(c is None for c in caches):
            raise RuntimeError("no KV cache is set up; call model.setup_cache() first")
        cos, sin = m.rope(torch.arange(m.cache_len), torch.float32)  # exactly the tables the PyTorch path uses
        self.native.bind_cache([c.k for c in caches], [c.v for c in caches], cos.contiguous(), sin.contiguous())
        self._bound = caches[0].k


@torch.no_grad()
def decode_step(model: nn.Module, int8_activations: bool | None = None) -> DecodeStep | None:
    """A C++ decode step for `model`, or None where it cannot run (then use the model itself).

    int8_activations: int8/int4 weights multiply an int8 copy of the activations (blocks of 32, one scale
    each, as llama.cpp's Q8_0/Q4_1 kernels do) with integer dot products: ~20% faster steps, but no longer
    equal to the PyTorch path up to float rounding (benchmarks/quality.py measures the cost). Default: on,
    unless CAMELID_INT8_ACTIVATIONS=0. fp32 weights always use fp32 activations."""
    if int8_activations is None:
        int8_activations = os.environ.get("CAMELID_INT8_ACTIVATIONS", "1") != "0"
    if not isinstance(model, Llama) or model.norm.weight.device.type != "cpu":
        return None
    cfg = model.config
    parts: list[tuple[int, list[Tensor]] | None] = [_embedding(model.tok_embeddings), _linear(model.output)]
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        if att.wqkv is None or ffn.w13 is None:
            return None  # not fused: the plain model is the readable reference path
        parts += [_linear(att.wqkv), _linear(att.wo), _linear(ffn.w13), _linear(ffn.w2)]
    if any(p is None for p in parts):
        return None
    norms = [model.norm.weight] + [w for b in model.layers for w in (b.attention_norm.weight, b.ffn_norm.weight)]
    tensors = norms + [t for _, ts in parts for t in ts]  # type: ignore[misc]
    if not _usable(tensors) or any(t.dtype != torch.float32 for t in norms):
        return None
    if any(p[0] == F32 and p[1][0].dtype != torch.float32 for p in parts):  # type: ignore[index]
        return None
    native_module = kernels.load()
    if native_module is None:
        return None
    native = native_module.DecodeStep(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                      float(model.norm.eps), int8_activations)
    native.set_embedding(*parts[0])
    for i, block in enumerate(model.layers):
        lin = parts[2 + 4 * i: 6 + 4 * i]
        native.add_layer(block.attention_norm.weight, block.ffn_norm.weight, [k for k, _ in lin], [t for _, t in lin])
    native.set_head(model.norm.weight, *parts[1])
    return DecodeStep(model, native)
