"""Linear layers y = x W^T with weights stored as fp32, fp16 (converted to fp32 as they are read), int8 (one fp32
scale per output row) or int4 (groups of 32 along the input, an fp16 scale and minimum per group, as llama.cpp's
Q4_1; two codes per byte).

Implementations: the references (`dequantize_reference`, then torch's GEMM); C++ GEMV kernels
(csrc/linear.cpp) for a few activation rows, which stream each packed weight row once (decode is memory
bound); for prompts, C++ whole-matrix dequantisation and torch's GEMM, or (CAMELID_INT8_PROMPTS=1, int8/int4
weights) a C++ kernel with int8 activations (`gemm_q8`, llama.cpp's Q8_0 activations: blocks of 32, one scale
each) that loads each weight block once for up to 8 rows and multiplies them with integer dot products. `_pick`
decides. Every fp32 GEMM here (prompts, and training through `trainable`) goes through `matmul_t`, which takes
oneDNN's GEMM instead of torch's (MKL) on AMD CPUs, where MKL runs at half speed (`gemm_library` decides). The
formats themselves (quantisation, int4 packing) live here too, so the kernels and their references share one
definition.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from camelid.errors import CamelidError
from camelid.ops import native

GROUP = 32  # int4 group size along the input dimension
MAX_GEMV_ROWS = 8  # decode, small batches, speculative verification: each weight row is streamed from RAM once
KINDS = ("f32", "f16", "int8", "int4")


# -- formats ------------------------------------------------------------------------------------------------
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """fp weight [N, K] -> (int8 codes [N, K], fp32 scale [N]): symmetric, one scale per output row."""
    w = weight.detach().float().clone()
    qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = w.new_empty(w.shape[0])
    quantize_int8_(w, qweight, scale)
    return qweight, scale


def quantize_int8_(weight: Tensor, qweight: Tensor, scale: Tensor) -> None:
    """`quantize_int8` of the fp32 `weight` [N, K] into `qweight` [N, K] and `scale` [N], with `weight`
    overwritten instead of temporaries of its size (a loader converts slice after slice)."""
    # max |w| per row from the largest and the smallest (torch.aminmax is ~10x slower than the two reductions)
    torch.div(torch.maximum(weight.amax(1), weight.amin(1).neg_()), 127, out=scale)
    scale.clamp_(min=1e-12)
    qweight.copy_(weight.div_(scale[:, None]).round_().clamp_(-127, 127))


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [N, K] -> uint8 [N, K/2]: in each group of 32, byte j = code j | code j+16 << 4."""
    N, K = codes.shape
    g = codes.view(N, K // GROUP, GROUP)
    return (g[..., :16] | (g[..., 16:] << 4)).reshape(N, K // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: uint8 [N, K/2] -> codes [N, K]."""
    b = packed.view(packed.shape[0], -1, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp weight [N, K] -> (packed codes [N, K/2], fp16 scale [N, K/32], fp16 minimum [N, K/32])."""
    w = weight.detach().float()
    N, K = w.shape
    if K % GROUP:
        raise CamelidError(f"int4 needs in_features divisible by {GROUP}, got {K}; use quantize='int8'")
    g = w.view(N, K // GROUP, GROUP)
    # scale and minimum are stored in fp16 (as in Q4_1: 0.5625 bytes per weight); the codes are computed from
    # the rounded values so that dequantisation reproduces them exactly
    lo = g.amin(-1).clamp(-65504, 65504).half()
    scale = ((g.amax(-1) - lo.float()) / 15).clamp(min=1e-7, max=65504).half()
    q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scale, lo


def dequantize_reference(kind: str, *weight: Tensor) -> Tensor:
    """The fp32 matrix [N, K] that stored `weight` tensors of `kind` stand for."""
    if kind in ("f32", "f16"):
        return weight[0].float()
    if kind == "int8":
        qweight, scale = weight
        return qweight.float() * scale[:, None]
    qweight, scale, minimum = weight
    N = qweight.shape[0]
    q = unpack_int4(qweight).view(N, -1, GROUP).float()
    return (q * scale.float()[..., None] + minimum.float()[..., None]).view(N, -1)


def reference(x: Tensor, kind: str, *weight: Tensor) -> Tensor:
    """x [..., K] @ W^T with W dequantised in fp32."""
    return x @ dequantize_reference(kind, *weight).to(x.dtype).T


# -- kernels as custom ops, so that torch.compile keeps them in its graph (eager code calls them directly: the
# custom-op wrapper costs microseconds per call) -------------------------------------------------------------
@torch.library.custom_op("camelid::gemv_f32", mutates_args=())
def _gemv_f32(x: Tensor, w: Tensor) -> Tensor:
    return native.loaded().gemv_f32(x, w)


@torch.library.custom_op("camelid::gemv_f16", mutates_args=())
def _gemv_f16(x: Tensor, w: Tensor) -> Tensor:
    return native.loaded().gemv_f16(x, w)


@torch.library.custom_op("camelid::gemv_int8", mutates_args=())
def _gemv_int8(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return native.loaded().gemv_int8(x, w, scale)


@torch.library.custom_op("camelid::gemv_int4", mutates_args=())
def _gemv_int4(x: Tensor, w: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    return native.loaded().gemv_int4(x, w, scale, minimum)


for _op in (_gemv_f32, _gemv_f16, _gemv_int8, _gemv_int4):
    _op.register_fake(lambda x, w, *rest: x.new_empty(x.shape[0], w.shape[0]))


def int8_activations() -> bool:
    """Whether the C++ decode step multiplies int8/int4 weights with int8 copies of the activations: on unless
    CAMELID_INT8_ACTIVATIONS=0."""
    return os.environ.get("CAMELID_INT8_ACTIVATIONS", "1") != "0"


def int8_prompts() -> bool:
    """Whether prompts (more than MAX_GEMV_ROWS rows) of int8/int4 weights take int8 activations too: off unless
    CAMELID_INT8_PROMPTS=1. Faster (1.2-2x per product), but a prompt's logits move by the activations' rounding,
    which can flip a near-tie greedy token (benchmarks/README.md, "Prompt products")."""
    return os.environ.get("CAMELID_INT8_PROMPTS", "0") == "1" and int8_activations()


def _pick(kind: str, x2d: Tensor) -> tuple[str, str]:
    """(implementation, why) for activation rows x2d: "gemv" (the C++ GEMV, fp32 activations), "q8" (the C++
    int8-activation kernel) or "torch" (dequantise, then torch's GEMM). The one place this is decided."""
    if x2d.device.type != "cpu" or x2d.dtype != torch.float32:
        return "torch", "the kernels take fp32 CPU activations"
    compiling = torch.compiler.is_compiling()
    # the build cannot be traced: under compile, a module built before counts
    if (native.loaded() if compiling else native.module()) is None:
        return "torch", native.reason()
    if x2d.shape[0] <= MAX_GEMV_ROWS:
        return "gemv", f"{kind} GEMV for up to {MAX_GEMV_ROWS} rows"
    why = f"more than {MAX_GEMV_ROWS} rows (a prompt)"
    if kind == "f32":
        return "torch", f"{why}, fp32 weights: {_gemm_words()}"
    if kind == "f16":
        return "torch", f"{why}, fp16 weights: converted to fp32, then {_gemm_words()}"
    if compiling or not int8_prompts() or x2d.shape[-1] % GROUP:
        cause = ("under torch.compile" if compiling else "CAMELID_INT8_PROMPTS=1 not set" if not int8_prompts()
                 else f"in_features not a multiple of {GROUP}")
        return "torch", f"{why}, {cause}: dequantise, then {_gemm_words()}"
    # measured 1.2-2x dequantise + GEMM from 16 to 512 rows (benchmarks/README.md, "Prompt products")
    return "q8", f"{why}: int8 activations, integer dot products, each weight block loaded once per 8 rows"


# -- fp32 GEMM: torch's (MKL) or oneDNN's -----------------------------------------------------------------------
@functools.cache
def gemm_library() -> tuple[str, str]:
    """("onednn" | "torch", why): which library multiplies fp32 matrices in camelid's fast paths. CAMELID_GEMM=
    onednn|torch decides; else oneDNN on AMD CPUs, where torch's MKL takes slower code paths (SmolLM2's products
    at 1 thread on an AVX-512 AMD EPYC: 86-94 GFLOP/s for MKL, 140-196 for oneDNN; benchmarks/README.md,
    "fp32 GEMM"), torch's GEMM elsewhere."""
    wanted = os.environ.get("CAMELID_GEMM", "auto")
    if wanted not in ("auto", "onednn", "torch"):
        raise CamelidError(f"CAMELID_GEMM={wanted!r}: use onednn, torch or auto")
    have = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if wanted == "torch":
        return "torch", "CAMELID_GEMM=torch"
    if not have:
        return "torch", "this PyTorch has no oneDNN linear"
    if wanted == "onednn":
        return "onednn", "CAMELID_GEMM=onednn"
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amd = False
    if amd:
        return "onednn", "AMD CPU: MKL's GEMM runs at about half oneDNN's speed here"
    return "torch", "torch's GEMM (MKL on Intel CPUs is at least as fast as oneDNN's)"


def matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]), fp32, with the library `gemm_library` picks; strided views (such as
    weight.t() for a gradient) are read as they are, not copied. No autograd: `trainable` is the op with a
    backward."""
    # under torch.compile: F.linear, which inductor lowers itself (and gemm_library is not traced)
    if (not torch.compiler.is_compiling() and gemm_library()[0] == "onednn" and x.dtype == weight.dtype == torch.float32
            and x.dim() == 2 and x.device.type == "cpu" and weight.device.type == "cpu"
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gemm_choice() -> native.Choice:
    """`gemm_library` as `camelid info --kernels` shows it."""
    lib, why = gemm_library()
    return native.Choice("PyTorch, oneDNN" if lib == "onednn" else "PyTorch", why)


def _gemm_words() -> str:
    if torch.compiler.is_compiling():
        return "torch's GEMM (under torch.compile)"
    lib, why = gemm_library()
    return f"oneDNN's GEMM ({why})" if lib == "onednn" else f"torch's GEMM ({why})"


class _TrainableLinear(torch.autograd.Function):
    """x @ W^T + b with all three products (forward, d/dx, d/dW) through `matmul_t`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ANN001 - ctx
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return matmul_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001 - ctx
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = matmul_t(g, weight.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = matmul_t(g.t(), x2.t()) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def trainable(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for training: forward and backward through oneDNN where `gemm_library` picks it,
    else F.linear itself."""
    if torch.compiler.is_compiling() or gemm_library()[0] != "onednn" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return _TrainableLinear.apply(x, weight, bias)


class DequantizedMatmul(torch.autograd.Function):
    """x @ W^T for a frozen int8/int4 W whose fp32 matrix is rebuilt in the backward pass instead of kept from the
    forward: training through a quantised base (QLoRA) holds the codes, never the fp32 weights."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, *weight: Tensor) -> Tensor:  # noqa: ANN001 - ctx
        ctx.kind = kind
        ctx.save_for_backward(*weight)
        return matmul_t(x, dequantize(kind, *weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001 - ctx
        weight = ctx.saved_tensors
        return (matmul_t(grad, dequantize(ctx.kind, *weight).to(grad.dtype).t()), None, *(None for _ in weight))


def linear(x: Tensor, kind: str, *weight: Tensor) -> Tensor:
    """x [..., K] @ W^T for W stored as `kind` ("f32" or "f16": weight; "int8": codes, scale; "int4": packed codes,
    scale, minimum): the C++ GEMV for a few rows; for more, dequantisation and torch's GEMM, or the
    int8-activation kernel with CAMELID_INT8_PROMPTS=1 (`_pick`); in training, dequantisation and torch's GEMM
    with the matrix rebuilt for the backward pass rather than stored (DequantizedMatmul)."""
    x2d = x.reshape(-1, x.shape[-1])
    if kind != "f32" and x.requires_grad and torch.is_grad_enabled():
        return DequantizedMatmul.apply(x2d, kind, *weight).view(*x.shape[:-1], -1)
    impl, _ = _pick(kind, x2d)
    if impl == "torch" and kind == "f32":
        y = matmul_t(x2d, weight[0].to(x.dtype))
    elif impl == "torch":
        y = _dequantized_product(x2d, kind, weight)
    elif impl == "q8":
        y = native.module().gemm_q8(x2d, 1 if kind == "int8" else 2, list(weight))
    elif torch.compiler.is_compiling():
        y = getattr(torch.ops.camelid, f"gemv_{kind}")(x2d, *weight)
    else:
        y = getattr(native.module(), f"gemv_{kind}")(x2d, *weight)
    return y.view(*x.shape[:-1], y.shape[-1])


# weight values a prompt's product dequantises at a time (4 MiB of fp32): a 512-token prefill of SmolLM2 takes the
# same CPU time as with 16 MiB blocks at fp16, int8 and int4 (within 1%), and the peak is 2-3 MiB lower
# (benchmarks/README.md, "Prompt products")
DEQUANTIZE_AT_ONCE = 1 << 20
_scratch = threading.local()  # per thread: the fp32 buffer `_dequantized_product` dequantises each block into


def _scratch_block(numel: int) -> Tensor:
    """This thread's dequantisation buffer, at least `numel` floats (grown to the largest block asked for, then
    kept; at most DEQUANTIZE_AT_ONCE floats unless one weight row is longer): one buffer reused by every block of
    every prompt product, instead of a fresh tensor of megabytes whose pages the kernel maps, faults in and unmaps
    each time (a cost that swings with the state of the allocator and the machine)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def _dequantized_product(x2d: Tensor, kind: str, weight: tuple[Tensor, ...]) -> Tensor:
    """x2d @ W^T for fp16/int8/int4 W, converted to fp32 a block of weight rows at a time, so that the fp32 copy of a
    large matrix (a fused gate/up, an output head) never exists whole. On the CPU in eager mode each block goes
    into this thread's scratch buffer (`_scratch_block`); the values and the GEMM are the same either way."""
    n, k = weight[0].shape[0], x2d.shape[-1]
    step = max(1, DEQUANTIZE_AT_ONCE // k)
    mod = None
    if x2d.dtype == torch.float32 and weight[0].device.type == "cpu" and not torch.compiler.is_compiling():
        mod = native.module()
    if mod is not None:
        dequant_into = getattr(mod, f"dequant_{kind}")
        buf = _scratch_block(min(n, step) * k)

        def block(a: int, b: int) -> Tensor:
            return dequant_into(*(w[a:b] for w in weight), out=buf[:(b - a) * k].view(b - a, k))
    else:
        def block(a: int, b: int) -> Tensor:
            return dequantize(kind, *(w[a:b] for w in weight)).to(x2d.dtype)
    if n <= step:
        return matmul_t(x2d, block(0, n))
    y = x2d.new_empty(x2d.shape[0], n)
    for a in range(0, n, step):
        b = min(n, a + step)
        y[:, a:b] = matmul_t(x2d, block(a, b))
    return y


def dequantize(kind: str, *weight: Tensor) -> Tensor:
    """The fp32 matrix of fp16/int8/int4 weights: one parallel C++ pass on the CPU, else the reference."""
    if kind != "f32" and weight[0].device.type == "cpu" and not torch.compiler.is_compiling():
        mod = native.module()
        if mod is not None:
            return getattr(mod, f"dequant_{kind}")(*weight)
    return dequantize_reference(kind, *weight)


def choose(kind: str = "f32", x: Tensor | None = None) -> native.Choice:
    """Which implementation `linear` runs for activations x (default: one fp32 CPU row), and why."""
    impl, why = _pick(kind, x.reshape(-1, x.shape[-1]) if x is not None else torch.empty(1, 1))
    if impl == "gemv":
        return native.Choice(f"C++ {native.label()}", f"{why} (more: int8 activations or torch's GEMM)")
    if impl == "q8":
        return native.Choice(f"C++ {native.label()}", why)
    return native.Choice("PyTorch", why)
