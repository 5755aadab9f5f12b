"""The fp32 decode step with its weights in 4 KiB pages and in 2 MiB pages (camelid.hugepages), in one process.

Usage: python benchmarks/huge_pages.py [--threads 1] [--rounds 60] [--steps 2] [--model smollm2-135m]

Two copies of one random-init model (speed does not depend on the values), both through the one-call C++ decode
step at a 512-token context; one copy's weights moved to huge pages. Rounds of a few steps alternate between the
two (order flipped every round), so both see the same load; printed: ms per step (CPU time at 1 thread, wall
time otherwise; median and min of the rounds), the median per-round speed ratio and its quartiles, the load
average, and the huge pages each copy holds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from camelid import hugepages
from camelid.config import LlamaConfig
from camelid.model import Llama
from camelid.variants.decode_step import decode_step
from camelid.variants.quantized import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if not hugepages.available():
        raise SystemExit("transparent huge pages are off here (/sys/kernel/mm/transparent_hugepage/enabled)")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    cfg = LlamaConfig.from_name(args.model)
    torch.manual_seed(0)
    base = Llama(cfg).eval()
    models = {"4 KiB": quantize_model(copy.deepcopy(base), "fp32", huge_pages=False),
              "2 MiB": quantize_model(base, "fp32", huge_pages=True)}
    del base
    P = args.context
    ids = torch.randint(0, cfg.vocab_size, (1, P))
    steps, times = {}, {}
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        for name, m in models.items():
            m.setup_cache(1, P + 9)
            m(ids, torch.arange(P), last_only=True)
            steps[name] = decode_step(m)
            if steps[name] is None:
                raise SystemExit("the C++ decode step does not run here (no kernels?)")
            for i in range(4):
                steps[name](5, P + i)
            times[name] = []
        for r in range(args.rounds):
            for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                t = clock()
                for i in range(args.steps):
                    steps[name](5, P + i % 8)
                times[name].append((clock() - t) / args.steps * 1e3)
            if r % 10 == 0:
                loads.append(os.getloadavg()[0])
    unit = "CPU" if args.threads == 1 else "wall"
    print(f"{args.model} fp32, {P}-token context, {args.threads} thread(s), {unit} ms/step, {args.rounds} rounds of "
          f"{args.steps} steps; load average {min(loads):.1f}-{max(loads):.1f}")
    for name, m in models.items():
        v = times[name]
        mib = hugepages.huge_bytes(m.layers[0].feed_forward.w13.weight) / 2**20
        print(f"{name} pages: median {statistics.median(v):6.2f}  min {min(v):6.2f}   "
              f"(huge pages in the first layer's mapping: {mib:.0f} MiB)")
    ratios = sorted(a / b for a, b in zip(times["4 KiB"], times["2 MiB"], strict=True))
    q = len(ratios) // 4
    print(f"2 MiB vs 4 KiB speed: median {statistics.median(ratios):.3f}x "
          f"(quartiles {ratios[q]:.3f}-{ratios[-q - 1]:.3f})")


if __name__ == "__main__":
    main()
