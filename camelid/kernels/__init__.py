"""Small C++ CPU kernels for batch-1 decode and for training (causal attention, RMSNorm, SwiGLU, RoPE, forward
and backward), JIT-built on first use; pure PyTorch is the fall-back.

`load()` returns the compiled module or None (no compiler, build failure, or CAMELID_NO_KERNELS=1), with a
one-line warning. Each kernel has a pure-PyTorch twin here that the tests compare it against.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

_module: ModuleType | None = None
_tried = False
_attention_ok = False  # the attention kernel also needs PyTorch's BLAS (sgemm_), which every x86 wheel has


def load() -> ModuleType | None:
    global _module, _tried, _attention_ok
    if _tried:
        return _module
    _tried = True
    if os.environ.get("CAMELID_NO_KERNELS") == "1":
        return None
    try:
        from torch.utils import cpp_extension

        build_dir = Path(os.environ.get("CAMELID_KERNEL_CACHE", Path.home() / ".cache" / "camelid" / "kernels"))
        build_dir.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).parent
        # torch rebuilds when a source or a flag changes; the hash flag makes an edit of dot.h count too
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.[ch]*")))).hexdigest()[:16]
        stamp = build_dir / "sources.sha256"
        if sys.stderr.isatty() and not (stamp.is_file() and stamp.read_text() == digest):
            print("camelid: compiling the C++ kernels (once; about a minute)...", file=sys.stderr, flush=True)
        _module = cpp_extension.load(
            name="camelid_kernels",
            sources=[str(here / f) for f in ("gemv.cpp", "decode.cpp", "step.cpp", "attention.cpp", "train.cpp")],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp", f"-DCAMELID_SOURCES={digest}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
        _register_ops(_module)
        _attention_ok = bool(_module.causal_attention_available())
        stamp.write_text(digest)
    except Exception as e:  # noqa: BLE001 - any build problem means: use the PyTorch path
        warnings.warn(f"camelid: C++ kernels unavailable ({type(e).__name__}); using pure PyTorch", stacklevel=2)
        _module = None
    return _module


def _register_ops(mod: ModuleType) -> None:
    """Expose the kernels as torch custom ops (camelid::gemv_*) so `torch.compile` can put them in its graph.
    Eager code calls the pybind functions directly: the custom-op wrapper costs microseconds per call."""
    if hasattr(torch.ops.camelid, "gemv_f32"):
        return

    @torch.library.custom_op("camelid::gemv_f32", mutates_args=())
    def gemv_f32(x: Tensor, w: Tensor) -> Tensor:
        return mod.gemv_f32(x, w)

    @torch.library.custom_op("camelid::gemv_int8", mutates_args=())
    def gemv_int8(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
        return mod.gemv_int8(x, w, scale)

    @torch.library.custom_op("camelid::gemv_int4", mutates_args=())
    def gemv_int4(x: Tensor, w: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
        return mod.gemv_int4(x, w, scale, minimum)

    for op in (gemv_f32, gemv_int8, gemv_int4):
        op.register_fake(lambda x, w, *rest: x.new_empty(x.shape[0], w.shape[0]))

    @torch.library.custom_op("camelid::causal_attention", mutates_args=())
    def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        o, lse = mod.causal_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale)
        return o, lse

    @torch.library.custom_op("camelid::causal_attention_backward", mutates_args=())
    def attention_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = mod.causal_attention_backward(grad_o.contiguous(), q, k, v, o, lse, scale)
        return dq, dk, dv

    @attention.register_fake
    def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        B, T, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty(B, H, T)

    @attention_backward.register_fake
    def _(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
          scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001 - ctx
        q, k, v, ctx.scale = inputs
        ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), *output)

    def backward(ctx, grad_o: Tensor, _grad_lse: Tensor | None) -> tuple:  # noqa: ANN001 - ctx
        dq, dk, dv = torch.ops.camelid.causal_attention_backward(grad_o, *ctx.saved_tensors, ctx.scale)
        return dq, dk, dv, None

    attention.register_autograd(backward, setup_context=setup_context)


# Forward + backward against SDPA on 2 threads (benchmarks/train_kernels.py): 1.33x at 256 tokens, 1.56x at 512,
# 1.16x at 1024, 0.96x at 2048, where SDPA's 512-key blocks skip most of the masked square themselves.
MAX_ATTENTION_T = 1024


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """softmax(q k^T / sqrt(D), causal) v for q [B, T, H, D] and k, v [B, T, KV, D] (grouped-query heads), with
    autograd, through the C++ kernel (attention.cpp); None where it does not apply (not fp32 on the CPU, longer
    than MAX_ATTENTION_T, the kernels unavailable), and the caller uses F.scaled_dot_product_attention."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32 or q.shape[1] > MAX_ATTENTION_T:
        return None
    if not torch.compiler.is_compiling():  # the build cannot be traced: under compile, a module built before counts
        load()
    if not _attention_ok:
        return None
    return torch.ops.camelid.causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]


MAX_GEMV_ROWS = 8  # decode, small batches, speculative verification: each weight row is streamed from RAM once


def gemv(name: str, x2d: Tensor, *args: Tensor) -> Tensor | None:
    """Run kernel `name` ("gemv_f32" | "gemv_int8" | "gemv_int4") on a few fp32 CPU rows, or return None when
    the kernels are unavailable or the input is not a decode-sized fp32 CPU batch (callers then use torch)."""
    if x2d.shape[0] > MAX_GEMV_ROWS or x2d.device.type != "cpu" or x2d.dtype != torch.float32:
        return None
    if torch.compiler.is_compiling():  # the build cannot be traced: use the kernels only if already loaded
        return getattr(torch.ops.camelid, name)(x2d, *args) if _module is not None else None
    return getattr(_module, name)(x2d, *args) if load() is not None else None


def dequantize(name: str, *args: Tensor) -> Tensor | None:
    """C++ "dequant_int8" / "dequant_int4" when available (fp32 CPU tensors), else None."""
    if args[0].device.type != "cpu" or torch.compiler.is_compiling() or load() is None:
        return None
    return getattr(_module, name)(*args)


def gemv_int8_ref(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return x @ (w.float() * scale[:, None]).T


def unpack_int4(w: Tensor) -> Tensor:
    """uint8 [N, K/2] (per group of 32: byte j = weight j | weight j+16 << 4) -> int codes [N, K]."""
    N = w.shape[0]
    b = w.view(N, -1, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).reshape(N, -1)


def dequant_int4(w: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    """scale, minimum: [N, K/32] (fp16 as stored; computed in fp32)."""
    N = w.shape[0]
    q = unpack_int4(w).view(N, -1, 32).float()
    return (q * scale.float()[..., None] + minimum.float()[..., None]).view(N, -1)


def gemv_int4_ref(x: Tensor, w: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    return x @ dequant_int4(w, scale, minimum).T
