"""Drop-in fast versions of the model's RMSNorm and Attention for eager decoding on CPU.

They keep the parameters and state-dict keys of the layers they replace and fall back to the plain PyTorch
code whenever the C++ kernels cannot be used (no kernels, not fp32 CPU, long prompts, under torch.compile,
which fuses these ops itself). `accelerate(model)` swaps them in; camelid.quantize.quantize_model calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camelid import kernels
from camelid.model import Attention, RMSNorm

MAX_FUSED_TOKENS = 8  # decode steps and speculative verification; prompts go through SDPA


def _usable(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


class FastRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        k = kernels.load() if _usable(x) else None
        return k.rms_norm(x, self.weight, self.eps) if k is not None else super().forward(x)


class FastAttention(Attention):
    """Split, RoPE, cache write and attention of a few new tokens in one C++ call."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        k = kernels.load() if _usable(x) else None
        cache = self.kv_cache
        if k is None or cache is None or positions is None or self.wqkv is None or T > MAX_FUSED_TOKENS:
            return super().forward(x, cos, sin, positions, mask)
        S = cache.k.shape[2]
        visible = mask.reshape(-1, T, S).expand(B, T, S)  # [T, S] or [B, 1, T, S] -> [B, T, S]
        y = k.attend_cached(self.wqkv(x), cos, sin, positions, cache.k, cache.v, visible, self.n_heads,
                            self.n_kv_heads)
        return self.wo(y)


def accelerate(model: nn.Module) -> nn.Module:
    """Swap RMSNorm/Attention modules for their fast twins in place (same parameters, same keys)."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FastRMSNorm  # same attributes, only forward differs
        elif type(module) is Attention:
            module.__class__ = FastAttention
    return model
