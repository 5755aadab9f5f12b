"""What attention over the KV cache adds to a decode step, by context length: SmolLM2-135M's attention (30 layers,
9 query heads over 3 KV heads of 64) with a token-sized feed-forward and vocabulary, so the weights are small and
the cached keys and values are most of what a step reads; the cache is filled with random values.

Usage: python benchmarks/attention_step.py [--threads 2] [--contexts 8,576,2048,4096] [--kv-dtypes fp32,fp16]

Prints the median wall time per step at each context (steps at the contexts interleaved, 40 rounds) and what each
context adds over the first. To compare two checkouts, run it alternately with PYTHONPATH=<checkout> and a
CAMELID_KERNEL_CACHE per checkout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import camelid
from camelid.config import LlamaConfig
from camelid.model import Llama
from camelid.variants.decode_step import decode_step
from camelid.variants.quantized import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="8,576,2048,4096")
    ap.add_argument("--kv-dtypes", default="fp32,fp16")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = LlamaConfig.from_name("smollm2-135m", intermediate_size=64, vocab_size=512,
                                max_seq_len=max(contexts) + 16)
    torch.manual_seed(0)
    model = quantize_model(Llama(cfg).eval(), "fp32")
    print(f"camelid from {camelid.__file__}, {args.threads} threads")
    for name in args.kv_dtypes.split(","):
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[name]
        with torch.inference_mode():
            model.setup_cache(1, cfg.max_seq_len, dtype=dtype)
            for block in model.layers:
                block.attention.kv_cache.k.normal_()
                block.attention.kv_cache.v.normal_()
            step = decode_step(model)
            if step is None:
                raise SystemExit("the C++ decode step is not available here")
            step(1, 0)
            times: dict[int, list[float]] = {c: [] for c in contexts}
            for r in range(args.rounds):
                for c in contexts:
                    t = time.perf_counter()
                    step(1, c + r % 8)
                    times[c].append(time.perf_counter() - t)
            model.clear_cache()
        med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
        base = med[contexts[0]]
        print(f"KV {name}: " + ", ".join(f"context {c}: {m:.2f} ms (+{m - base:.2f})" for c, m in med.items()))


if __name__ == "__main__":
    main()
