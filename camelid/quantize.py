"""Weight-only quantisation for inference: int8 (one scale per output row) and int4 (groups of 32 with an
fp16 scale and minimum, like llama.cpp's Q4_1). Activations stay fp32 (except in the one-call decode step,
camelid.kernels.step, which by default multiplies int8/int4 weights with int8 activations).

Decode (1-8 rows of activations) goes through camelid's C++ GEMV kernels, which stream the packed weights
(batch-1 generation runs the whole step in one C++ call: camelid.kernels.step); PyTorch's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` were measured 5-25x slower than an fp32 GEMV on this
class of CPU, so they are not used. Prompts (many rows) dequantise the layer and use torch's GEMM. Without
the kernels everything runs the dequantise path. `quantize_model` also fuses the projections and swaps in the
fused RMSNorm/attention layers (camelid.kernels.layers); mode "fp32" does only that, keeping fp32 weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from camelid import kernels
from camelid.config import LlamaConfig
from camelid.errors import CamelidError
from camelid.model import Llama, rope_inv_freq

MODES = ("int8", "int4")
GROUP = 32


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = w.shape

    def dequantize(self) -> Tensor:
        w = kernels.dequantize("dequant_int8", self.qweight, self.scale)
        return w if w is not None else self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        y = kernels.gemv("gemv_int8", x2d, self.qweight, self.scale)
        if y is None:
            y = x2d @ self.dequantize().to(x.dtype).T
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        if K % GROUP:
            raise CamelidError(f"int4 needs in_features divisible by {GROUP}, got {K}; use quantize='int8'")
        g = w.view(N, K // GROUP, GROUP)
        # scale and minimum are stored in fp16 (as in Q4_1: 0.5625 bytes per weight); the codes are computed
        # from the rounded values so that dequantisation reproduces them exactly
        lo = g.amin(-1).clamp(-65504, 65504).half()
        scale = ((g.amax(-1) - lo.float()) / 15).clamp(min=1e-7, max=65504).half()
        q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        self.register_buffer("qweight", (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2))
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", lo)
        self.out_features, self.in_features = N, K

    def dequantize(self) -> Tensor:
        w = kernels.dequantize("dequant_int4", self.qweight, self.scale, self.minimum)
        return w if w is not None else kernels.dequant_int4(self.qweight, self.scale, self.minimum)

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        y = kernels.gemv("gemv_int4", x2d, self.qweight, self.scale, self.minimum)
        if y is None:
            y = x2d @ self.dequantize().to(x.dtype).T
        return y.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Embedding rows as int8 with one scale per row: Int8Linear's format, so a tied int8 output head and the
    embedding share one matrix (for SmolLM2 that saves the 113 MB fp32 table)."""

    def __init__(self, weight: Tensor | None = None, shared: Int8Linear | None = None) -> None:
        super().__init__()
        if shared is not None:
            self.__dict__["table"] = shared  # not registered: its tensors are saved once, under output.*
        else:
            self.table = Int8Linear(weight)

    def dequantize(self) -> Tensor:
        return self.table.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        t = self.table
        return t.qweight[ids].float() * t.scale[ids].unsqueeze(-1)


class FastLinear(nn.Module):
    """fp32 linear whose batch-1 product uses camelid's streaming GEMV (torch's GEMM otherwise)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        y = kernels.gemv("gemv_f32", x2d, self.weight)
        if y is None:
            y = x2d @ self.weight.T
        return y.view(*x.shape[:-1], self.out_features)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp32": FastLinear}


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    return [(f"{pname}.{name}".lstrip("."), parent, name, child) for pname, parent in model.named_modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear) and child.bias is None]


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, head: str | None = None) -> nn.Module:
    """Replace every bias-free nn.Linear in place, one at a time, by its weight-only quantised twin ("int8",
    "int4") or by the fp32 fast-GEMV linear ("fp32"); each fp32 weight is freed as soon as it is replaced,
    so peak memory is the fp32 model plus one layer. In int8/int4 mode the embedding becomes int8 too
    (sharing the head's matrix when they are tied and the head is int8). The output head uses `head`
    (default: int8 in int4 mode, because the head's error shows directly in every logit; else `mode`).
    In int4 mode a layer whose input width is not a multiple of 32 is quantised to int8."""
    if mode not in LINEARS:
        raise CamelidError(f"unknown quantize mode {mode!r}; choose one of int8, int4, fp32")
    head = head or ("int8" if mode == "int4" else mode)
    if head not in LINEARS:
        raise CamelidError(f"unknown head mode {head!r}; choose one of int8, int4, fp32")
    kernels.load()  # build (or find) the kernels now, not inside the first (possibly compiled) forward
    if hasattr(model, "fuse"):
        model.fuse()  # fewer, larger GEMVs: QKV and gate+up read x once
    for path, parent, name, lin in _linears(model):
        kind = LINEARS[head if path == "output" else mode]
        if kind is Int4Linear and lin.in_features % GROUP:
            kind = Int8Linear  # groups of 32 do not tile this row; int8 keeps it exact enough
        setattr(parent, name, kind(lin.weight))
    emb = getattr(model, "tok_embeddings", None)
    if mode in ("int8", "int4") and isinstance(emb, nn.Embedding):
        tied = getattr(model.config, "tie_embeddings", False) and isinstance(model.output, Int8Linear)
        model.tok_embeddings = Int8Embedding(shared=model.output) if tied else Int8Embedding(emb.weight)
    from camelid.kernels.layers import accelerate

    accelerate(model)  # fused RMSNorm and decode attention (C++), same parameters
    model.quantized = mode  # type: ignore[assignment]
    return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write the quantised weights as safetensors (atomically), with the mode and the model's config in the
    metadata so that `load_quantized(path)` needs nothing else."""
    from camelid.fileio import atomic_write

    mode = getattr(model, "quantized", None)
    if mode not in ("int8", "int4"):
        raise CamelidError("model is not quantised; call quantize_model(model, 'int8'|'int4') first")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"camelid_quantize": mode, "camelid_config": json.dumps(model.config.to_dict())}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of `path` (a one-line CamelidError if it is not a safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise CamelidError(f"{path}: not a readable safetensors file ({e}); write one with `camelid quantize`") from e


@torch.no_grad()
def load_quantized(path: str | Path) -> Llama:
    """Build the model described in a file written by `save_quantized`/`camelid quantize` and load its
    quantised weights. The model is built on the meta device, so no fp32 copy is ever allocated: peak
    memory is the quantised weights. safetensors only, nothing is unpickled."""
    meta = read_metadata(path)
    mode = meta.get("camelid_quantize")
    if mode not in ("int8", "int4") or "camelid_config" not in meta:
        raise CamelidError(f"{path}: no camelid quantisation metadata; write it with `camelid quantize`")
    config = LlamaConfig(**json.loads(meta["camelid_config"]))
    with torch.device("meta"):
        model = Llama(config)
        quantize_model(model, mode, head=_head_mode(meta, path))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CamelidError(f"{path}: weights do not match the config (missing {missing[:3]}, extra {unexpected[:3]})")
    model.rope.inv_freq = rope_inv_freq(config)  # a non-persistent buffer: not in the file
    return model.eval()


def _head_mode(meta: dict[str, str], path: str | Path) -> str:
    # the file's own tensors say which kind the head is: int4 heads carry a `minimum`
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if "output.minimum" in keys:
        return "int4"
    return "int8" if "output.scale" in keys else meta["camelid_quantize"]
