"""Model FLOPs per token and the peak they are measured against, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from camelid.config import LlamaConfig

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "4090": 165e12}


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4) plus attention
    scores and values, 12 * layers * heads * head_dim * seq_len (the PaLM appendix B count)."""
    d, hd = config.dim, config.head_dim
    attn = d * hd * (config.n_heads * 2 + config.n_kv_heads * 2)  # wq, wo, wk, wv
    ffn = 3 * d * config.intermediate_size
    matmul_params = config.n_layers * (attn + ffn) + d * config.vocab_size  # + the output head
    return 6.0 * matmul_params + 12.0 * config.n_layers * config.n_heads * hd * seq_len


def gpu_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAKS.items():
        if key in name:
            return peak
    return None


def square_products(device: torch.device | str, dtype: torch.dtype, n: int) -> list[Callable[[], object]]:
    """n x n products on this device and dtype, one per GEMM library camelid can use there: torch's, and on
    the CPU in fp32 oneDNN's too (camelid.ops.linear.matmul_t's alternative), so that the peak is the machine's,
    not one library's."""
    g = torch.Generator(device).manual_seed(0)  # its own: the global RNG (dropout's) is left as it was
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    products: list[Callable[[], object]] = [lambda: a @ b]
    if (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        bt = b.t()
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""))
    return products


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        n: int = 1024, seconds: float = 0.5, clock: Callable[[], float] = time.perf_counter
                        ) -> float:
    """The best FLOP/s of square matmuls on this device and dtype over the GEMM libraries camelid can use,
    measured now with `clock` (the MFU denominator; time.process_time gives FLOPs per CPU-second)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = 0.0
    for product in square_products(device, dtype, n):
        for _ in range(2):
            product()
        sync()
        deadline = clock() + seconds
        while clock() < deadline:
            t0 = clock()
            for _ in range(4):
                product()
            sync()
            best = max(best, 4 * 2 * n**3 / max(clock() - t0, 1e-9))
    return best
