"""Model FLOPs per token and the peak they are measured against, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import time

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


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        n: int = 1024, seconds: float = 0.5) -> float:
    """The best FLOP/s of square matmuls on this device and dtype, measured now (the MFU denominator)."""
    g = torch.Generator(device).manual_seed(0)  # its own: the global RNG (dropout's) is left as it was
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best
