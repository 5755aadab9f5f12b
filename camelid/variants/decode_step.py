"""The whole decode step in one C++ call (camelid/ops/csrc/decode_step.cpp), for fused fp32/int8/int4 models.

`decode_step(model)` returns a `DecodeStep` (call it with a token id and a position, get logits [1, 1, vocab];
or `.rows(...)` with one token per sequence of a continuous batch, each in its own cache row) or None where the
step cannot run the model; `refusal(model)` says why in one line. The step implements an exact set of config
fields and module types: a config field outside that set with a non-default value, or any module of another
type (a LoRA adapter, a hook, a future layer kind), is refused, never silently ignored, and the caller keeps the
per-layer path. It reads the model's own weight tensors and writes the model's own KV cache, so prompts through
PyTorch and steps through C++ interleave freely. Built per generation: it costs a walk over the modules, no
copies.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from camelid import heap
from camelid.model import Attention, Block, FeedForward, KVCache, Llama, RMSNorm, RotaryEmbedding
from camelid.ops import linear, native
from camelid.variants.fused import FastRMSNorm, FusedAttention, FusedFeedForward
from camelid.variants.quantized import FastLinear, Fp16Embedding, Fp16Linear, Int4Linear, Int8Embedding, Int8Linear

F32, INT8, INT4, F16 = 0, 1, 2, 3

# the LlamaConfig fields the C++ step implements (RoPE scaling is in the tables it is given); any other field
# must keep its default
IMPLEMENTED_CONFIG = {"name", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "intermediate_size", "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings",
                      "bos_token_id", "eos_token_id"}
# the exact module types it reads (subclasses may change what runs, so they are refused too)
KNOWN_MODULES = {Llama, nn.Embedding, Int8Embedding, Fp16Embedding, nn.ModuleList, Block, RMSNorm, FastRMSNorm,
                 FusedAttention, FusedFeedForward, nn.Linear, FastLinear, Fp16Linear, Int8Linear, Int4Linear,
                 RotaryEmbedding, KVCache}


def _linear(mod: nn.Module) -> tuple[int, list[Tensor]]:
    """(kind, tensors) of a linear layer in the format decode_step.cpp reads (refusal() has checked the type)."""
    if type(mod) is Int8Linear:
        return INT8, [mod.qweight, mod.scale]
    if type(mod) is Int4Linear:
        return INT4, [mod.qweight, mod.scale, mod.minimum]
    if type(mod) is Fp16Linear:
        return F16, [mod.weight]
    return F32, [mod.weight]


def _embedding(mod: nn.Module) -> tuple[int, list[Tensor]]:
    if type(mod) is Int8Embedding:
        return INT8, [mod.table.qweight, mod.table.scale]
    if type(mod) is Fp16Embedding:
        return F16, [mod.table.weight]
    return F32, [mod.weight]


def _config_refusal(config: Any) -> str | None:
    for f in dataclasses.fields(config):
        if f.name in IMPLEMENTED_CONFIG:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(config, f.name)
        if default is dataclasses.MISSING or value != default:
            return f"the config sets {f.name}={value!r}, which the C++ decode step does not implement"
    return None


def refusal(model: nn.Module) -> str | None:
    """None when the C++ step implements `model` exactly; else the reason, in one line (kernels not checked)."""
    if type(model) is not Llama:
        return f"the model is a {type(model).__name__}, not a camelid Llama"
    why = _config_refusal(model.config)
    if why:
        return why
    for name, mod in model.named_modules():
        where = name or "the model"
        if type(mod) in (Attention, FeedForward):
            return f"{where} is not fused (camelid.variants.fused.fuse or quantize_model lays it out for the C++ step)"
        if type(mod) not in KNOWN_MODULES:
            return f"{where} is of type {type(mod).__name__}, which the C++ decode step does not implement"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{where} has a forward hook, which the C++ decode step would skip"
        if type(mod) is nn.Linear and mod.bias is not None:
            return f"{where} has a bias, which the C++ decode step does not implement"
    for i, block in enumerate(model.layers):
        if type(block.attention) is not FusedAttention or type(block.feed_forward) is not FusedFeedForward:
            return f"layers.{i} is not fused (camelid.variants.fused.fuse or quantize_model)"
    if type(model.tok_embeddings) not in (nn.Embedding, Int8Embedding, Fp16Embedding):
        return f"tok_embeddings is a {type(model.tok_embeddings).__name__}, which the C++ decode step does not read"
    norms = [model.norm.weight] + [w for b in model.layers for w in (b.attention_norm.weight, b.ffn_norm.weight)]
    parts = [_embedding(model.tok_embeddings), _linear(model.output)]
    for block in model.layers:
        parts += [_linear(m) for m in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13,
                                       block.feed_forward.w2)]
    tensors = norms + [t for _, ts in parts for t in ts]
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return "the weights are not contiguous CPU tensors"
    if any(t.dtype != torch.float32 for t in norms) or any(k == F32 and ts[0].dtype != torch.float32
                                                             for k, ts in parts):
        return "the weights are not fp32 (or int8/int4)"
    return None


# the greedy heads made so far, by id of the weight tensor (dropped with it; checked against the tensor itself
# and its version counter before use)
_GREEDY_HEADS: dict[int, tuple[weakref.ref[Tensor], int, tuple[Tensor, Tensor, Tensor, Tensor]]] = {}


@torch.no_grad()
def greedy_head(weight: Tensor, rows_at_once: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An fp32 output head [V, K] as the C++ step's greedy head reads it: int8 rows q with one fp32 scale each
    (the largest |w| / 127); per row err, a bound on |h . w - h . (q * scale)| / ||h||_2 for every h, and
    wq = ||q * scale||_2. err is the quantisation residual's norm (Cauchy-Schwarz) plus the rounding of the fp32
    product h . w as the kernel sums it, at most gamma (||w|| + ||q * scale||) ||h|| with gamma = n u / (1 - n u),
    n = K + 2, u = 2^-24, taken twice over for margin; the step adds the rounding of the int8 product,
    2 gamma ||h|| wq (decode_step.cpp, greedy_share). Built a block of rows at a time in float64 (never an fp64
    copy of the whole head), cached per weight tensor. A head memory-mapped from a file (an F32 GGUF's) is read
    once here and its pages handed back as it goes (`heap.page_out`): greedy decoding then reads its fp32 rows
    only for the candidates, a page each (`heap.read_randomly`), so the rest need not stay in memory."""
    cached = _GREEDY_HEADS.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale, err, wq = (torch.empty(n, dtype=torch.float32) for _ in range(3))
    nu = (k + 2) * 2.0 ** -24
    gamma = nu / (1 - nu)
    mapped = weight.device.type == "cpu" and heap.mapped_file(weight.data_ptr()) is not None
    for a in range(0, n, rows_at_once):
        w = weight[a:a + rows_at_once].to(torch.float32)
        s = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(w / s[:, None]).clamp_(-127, 127)
        b = a + len(w)
        q[a:b] = codes.to(torch.int8)
        scale[a:b] = s
        exact, approx = w.double(), codes.double() * s.double()[:, None]  # both exact in float64
        approx_norm = approx.norm(dim=1)
        bound = (approx - exact).norm(dim=1) + 2 * gamma * (exact.norm(dim=1) + approx_norm)
        err[a:b] = (bound * (1 + 1e-3)).float()  # margins for the rounding of the bounds themselves
        wq[a:b] = (approx_norm * (1 + 1e-3)).float()
        if mapped:
            heap.page_out(weight[a:b].data_ptr(), weight[a:b].nbytes)
    if mapped:
        heap.read_randomly(weight.data_ptr(), weight.nbytes)
    heap.trim()  # the blocks' float64 temporaries
    if cached is None:
        weakref.finalize(weight, _GREEDY_HEADS.pop, id(weight), None)
    _GREEDY_HEADS[id(weight)] = (weakref.ref(weight), weight._version, (q, scale, err, wq))
    return q, scale, err, wq


class DecodeStep:
    """One generated token per sequence per call through decode_step.cpp: `step(token_id, position)` -> logits
    [1, 1, vocab] (cache row 0); `step.rows(tokens, positions, rows)` -> logits [B, vocab]; with a greedy head
    (`greedy`), `step.argmax(token_id, position)` -> the next greedy token without the logits."""

    def __init__(self, model: Llama, native_step: Any, interleaved_bytes: int = 0, greedy: bool = False) -> None:
        self.model, self.native = model, native_step
        self.interleaved_bytes = interleaved_bytes  # the interleaved int8/int4 copy's size (0: none)
        self.greedy = greedy  # a greedy head is set: argmax and head_argmax run
        self._bound: Tensor | None = None  # layer 0's cache k tensor the kernel was last bound to

    def __call__(self, token: int, position: int) -> Tensor:
        self._bind()
        return self.native.forward(token, position)

    def argmax(self, token: int, position: int) -> int:
        """The argmax of `self(token, position)`'s logits (the first on ties; the same step, the same cache
        write), from the greedy head: its int8 rows and the fp32 rows of the few tokens that can win."""
        self._bind()
        return self.native.forward_argmax(token, position)

    def head_argmax(self, h: Tensor) -> int:
        """The argmax of the fp32 head's logits of a final-norm hidden state h [dim] (a prompt's last position),
        through the greedy head."""
        return self.native.head_argmax(h.reshape(-1).float())

    def rows(self, tokens: list[int], positions: list[int], rows: list[int], sources: list[int] | None = None,
             shared: list[int] | None = None) -> Tensor:
        """Logits [B, vocab] of one new token per sequence, all in one call: tokens[b] at positions[b] of cache
        row rows[b] (continuous batching: each sequence in its own row of the model's KV cache, which
        `Llama.setup_cache(rows, ...)` allocated; the rows must be distinct). sources/shared: positions
        [0, shared[b]) of row rows[b] hold exactly the keys and values of row sources[b] there (a prompt prefix
        both took from the prefix cache), so attention reads them once for every row that shares them;
        shared[b] a multiple of 16, 0 for none."""
        self._bind()
        return self.native.forward_rows(tokens, positions, rows, sources or [], shared or [])

    def _bind(self) -> None:
        """Point the kernel at the model's current KV cache (setup_cache makes new tensors every generation),
        unless it already points there."""
        m = self.model
        cache = m.layers[0].attention.kv_cache
        if cache is not None and cache.k is self._bound:
            return
        caches = [b.attention.kv_cache for b in m.layers]
        if any(c is None for c in caches):
            raise RuntimeError("no KV cache is set up; call model.setup_cache() first")
        cos, sin = m.rope(torch.arange(m.cache_len), torch.float32)  # exactly the tables the PyTorch path uses
        self.native.bind_cache([c.k for c in caches], [c.v for c in caches], cos.contiguous(), sin.contiguous())
        self._bound = caches[0].k


@torch.no_grad()
def decode_step(model: nn.Module, int8_activations: bool | None = None, interleave: bool = False,
                greedy: bool | None = None) -> DecodeStep | None:
    """A C++ decode step for `model`, or None where it cannot run (`refusal(model)`, or no kernels: then use the
    model itself).

    int8_activations: int8/int4 weights multiply an int8 copy of the activations (blocks of 32, one scale
    each, as llama.cpp's Q8_0/Q4_1 kernels do) with integer dot products: ~20% faster steps, but no longer
    equal to the PyTorch path up to float rounding (benchmarks/quality.py measures the cost). Default: on,
    unless CAMELID_INT8_ACTIVATIONS=0. fp32 weights always use fp32 activations.

    interleave: the step keeps a second copy of the int8/int4 weights (the output head's included), 16 rows
    interleaved (int4: 0.56 bytes per weight, int8: 1), where the kernels have AVX-512 VNNI and int8 activations
    are on. Its kernels sum each group's integer products inside the vector lanes, so a step of several sequences
    (continuous batching) needs about a third of the instructions per weight (benchmarks/README.md, "Batched
    decode steps"). Its logits equal the plain step's up to float summation order.

    greedy: for an fp32 output head, also a greedy head (`greedy_head`: an int8 copy, a quarter of the fp32
    head's bytes), so that `DecodeStep.argmax` reads the head's fp32 rows only for the few tokens that can be
    the largest logit: a batch-1 fp32 decode step reads every weight once, and SmolLM2-135M's head is 21% of
    them. The tokens are the argmax of the fp32 logits (tests/variants/test_decode_step.py). Default: on,
    unless CAMELID_GREEDY_HEAD=0."""
    if int8_activations is None:
        int8_activations = linear.int8_activations()
    if refusal(model) is not None:
        return None
    mod = native.module()
    if mod is None:
        return None
    cfg = model.config
    step = mod.DecodeStep(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size,
                          float(model.norm.eps), int8_activations)
    step.set_embedding(*_embedding(model.tok_embeddings))
    for block in model.layers:
        att, ffn = block.attention, block.feed_forward
        lin = [_linear(m) for m in (att.wqkv, att.wo, ffn.w13, ffn.w2)]
        step.add_layer(block.attention_norm.weight, block.ffn_norm.weight, [k for k, _ in lin], [t for _, t in lin])
    head_kind, head_tensors = _linear(model.output)
    step.set_head(model.norm.weight, head_kind, head_tensors)
    if greedy is None:
        greedy = os.environ.get("CAMELID_GREEDY_HEAD", "1") != "0"
    greedy = greedy and head_kind == F32 and cfg.dim % 32 == 0
    if greedy:
        step.set_greedy_head(*greedy_head(head_tensors[0]))
    return DecodeStep(model, step, step.interleave() if interleave else 0, greedy)
