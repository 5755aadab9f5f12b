"""One module per operation, each holding the operation's torch reference (the math of camelid/model.py), its
C++ kernel binding and ONE dispatch function that picks the implementation and falls back by itself:

    rmsnorm.rms_norm   rope.rope_bthd   attention.causal_attention / cached_attention   swiglu.swiglu
    linear.linear / dequantize / matmul_t / trainable   head_loss.head_loss

`native` builds and loads the C++ kernels (csrc/) for this CPU. `implementations()` says which implementation
each op runs on this machine and why (`camelid info --kernels`).
"""

from __future__ import annotations

# head_loss (training only) is imported where it is used: it loads torch._dynamo, which would double the
# import time of `camelid generate`
from camelid.ops import attention, linear, native, rmsnorm, rope, swiglu


def implementations() -> dict[str, native.Choice]:
    """op -> the implementation it runs here for fp32 CPU inputs, with the reason (loads a finished build of
    the kernels, never starts one)."""
    from camelid.ops import head_loss

    native.load(build=False)
    return {
        "kernels": native.status(),
        "rmsnorm": rmsnorm.choose(),
        "rope (training)": rope.choose(),
        "attention (training)": attention.choose(),
        "attention (decode)": attention.choose_cached(),
        "swiglu": swiglu.choose(),
        "GEMM fp32 (prompts, training)": linear.gemm_choice(),
        "linear fp32": linear.choose("f32"),
        "linear int8": linear.choose("int8"),
        "linear int4": linear.choose("int4"),
        "head + loss (training)": head_loss.choose(),
    }
