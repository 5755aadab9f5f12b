"""Weight-only quantisation for inference: int8 (one scale per output row) and int4 (groups of 32 with a
scale and a minimum, like llama.cpp's Q4_1). Activations stay fp32.

Decode (one row of activations) goes through camelid's C++ GEMV kernels, which stream the packed weights;
PyTorch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` were measured 5-25x slower than an fp32
GEMV on this class of CPU, so they are not used. Prefill (many rows) dequantises the layer and uses torch's
GEMM, which keeps prefill at fp32 speed. Without the kernels everything runs the dequantise path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from camelid import kernels
from camelid.errors import CamelidError

MODES = ("int8", "int4")
GROUP = 32


def _use_kernel(x2d: Tensor) -> bool:
    return x2d.shape[0] <= 4 and x2d.device.type == "cpu" and x2d.dtype == torch.float32


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = w.shape

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        k = kernels.load() if _use_kernel(x2d) else None
        y = k.gemv_int8(x2d, self.qweight, self.scale) if k else x2d @ self.dequantize().to(x.dtype).T
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        if K % GROUP:
            raise CamelidError(f"int4 needs in_features divisible by {GROUP}, got {K}; use quantize='int8'")
        g = w.view(N, K // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        self.register_buffer("qweight", (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2))
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", lo)
        self.out_features, self.in_features = N, K

    def dequantize(self) -> Tensor:
        return kernels.dequant_int4(self.qweight, self.scale, self.minimum)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        k = kernels.load() if _use_kernel(x2d) else None
        y = k.gemv_int4(x2d, self.qweight, self.scale, self.minimum) if k else x2d @ self.dequantize().to(x.dtype).T
        return y.view(*x.shape[:-1], self.out_features)


class FastLinear(nn.Module):
    """fp32 linear whose batch-1 product uses camelid's streaming GEMV (torch's GEMM otherwise)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        k = kernels.load() if _use_kernel(x2d) else None
        y = k.gemv_f32(x2d, self.weight) if k else x2d @ self.weight.T
        return y.view(*x.shape[:-1], self.out_features)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp32": FastLinear}


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.bias is None]


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every bias-free nn.Linear in place by its weight-only quantised twin ("int8", "int4") or by
    the fp32 fast-GEMV linear ("fp32"). The embedding stays fp32 (a tied output head gets its own copy).
    In int4 mode a layer whose input width is not a multiple of 32 is quantised to int8 instead."""
    if mode not in LINEARS:
        raise CamelidError(f"unknown quantize mode {mode!r}; choose one of int8, int4, fp32")
    if hasattr(model, "fuse"):
        model.fuse()  # fewer, larger GEMVs: QKV and gate+up read x once
    for parent, name, lin in _linears(model):
        kind = LINEARS[mode]
        if mode == "int4" and lin.in_features % GROUP:
            kind = Int8Linear  # groups of 32 do not tile this row; int8 keeps it exact enough
        setattr(parent, name, kind(lin.weight))
    model.quantized = mode  # type: ignore[assignment]
    return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write the quantised state dict as safetensors (atomically) with the mode in the metadata."""
    from camelid.interop.hf import atomic_write

    mode = getattr(model, "quantized", None)
    if mode is None:
        raise CamelidError("model is not quantised; call quantize_model(model, 'int8'|'int4') first")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("output.weight", None)
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata={"camelid_quantize": mode}))


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by save_quantized into a fresh model of the same config (no unpickling)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        mode = (f.metadata() or {}).get("camelid_quantize")
    if mode not in LINEARS:
        raise CamelidError(f"{path}: no camelid quantisation metadata; write it with `camelid quantize`")
    quantize_model(model, mode)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or [m for m in missing if m != "output.weight"]:
        raise CamelidError(f"{path}: weights do not match the model (missing {missing[:3]}, extra {unexpected[:3]})")
    return model
