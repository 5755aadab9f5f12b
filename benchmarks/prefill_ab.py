"""A/B of prompt-pass (prefill) variants inside one process: a T-token prompt through a model loaded from a GGUF,
each variant's rounds interleaved with the others', CPU seconds of this process (`time.process_time`), wall
seconds and minor page faults (`getrusage`).

Usage:
    python benchmarks/prefill_ab.py --gguf int8=PATH.Q8_0.gguf --gguf int4=PATH.Q4_1.gguf --gguf fp32=PATH.F32.gguf
        [--tokens 512] [--threads 1] [--rounds 5] [--at-once 262144 --at-once 1048576] [--attention]

Variants: by default `before` (each block of a prompt product dequantised into a newly allocated tensor, 1M
values a block, prompt attention through PyTorch's SDPA) against `camelid` (its scratch buffer, DEQUANTIZE_AT_ONCE
and prompt attention as chosen). With --at-once N...: `fresh` blocks against the scratch buffer with each block
size N; with --attention: SDPA against the blocks of queries of `attention._chunked_prompt_attention`
(the C++ prompt_attention). KIND is the quantize= argument of camelid.load
(fp32, int8, int4). Figures: best and median of --rounds; the ratio is the first variant's median over each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import camelid
from camelid.ops import attention, linear


def fresh_blocks(x2d: torch.Tensor, kind: str, weight: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The prompt product with a fresh fp32 tensor per dequantised block."""
    n = weight[0].shape[0]
    step = max(1, linear.DEQUANTIZE_AT_ONCE // x2d.shape[-1])
    if n <= step:
        return linear.matmul_t(x2d, linear.dequantize(kind, *weight).to(x2d.dtype))
    y = x2d.new_empty(x2d.shape[0], n)
    for a in range(0, n, step):
        b = min(n, a + step)
        y[:, a:b] = linear.matmul_t(x2d, linear.dequantize(kind, *(w[a:b] for w in weight)).to(x2d.dtype))
    return y


@contextlib.contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def before() -> contextlib.AbstractContextManager:
    """Prompt products with a fresh tensor per block of 1M values, prompt attention through SDPA."""
    stack = contextlib.ExitStack()
    stack.enter_context(patched(linear, "_dequantized_product", fresh_blocks))
    stack.enter_context(patched(linear, "DEQUANTIZE_AT_ONCE", 1 << 20))
    stack.enter_context(patched(attention, "MIN_PROMPT_CHUNKED_T", 1 << 62))
    return stack


def variants(args: argparse.Namespace) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    if args.attention:
        return {"sdpa": lambda: patched(attention, "MIN_PROMPT_CHUNKED_T", 1 << 62),
                "blocks": contextlib.nullcontext}
    if args.at_once:
        out: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
            "fresh": lambda: patched(linear, "_dequantized_product", fresh_blocks)}
        for n in args.at_once:
            out[f"scratch {n}"] = lambda n=n: patched(linear, "DEQUANTIZE_AT_ONCE", n)
        return out
    return {"before": before, "camelid": contextlib.nullcontext}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", action="append", required=True, help="KIND=PATH (KIND: fp32, int8, int4)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--at-once", type=int, action="append", help="DEQUANTIZE_AT_ONCE values to compare")
    ap.add_argument("--attention", action="store_true", help="compare prompt attention: camelid's vs SDPA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, {args.tokens} tokens, load average {os.getloadavg()}")
    for spec in args.gguf:
        kind, path = spec.split("=", 1)
        model = camelid.load(path, quantize=kind).model
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        cases = variants(args)
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        wall: dict[str, list[float]] = {name: [] for name in cases}
        faults: dict[str, list[int]] = {name: [] for name in cases}
        for r in range(args.rounds + 1):
            for name, ctx in cases.items():
                model.setup_cache(1, args.tokens + 8)
                with ctx(), torch.inference_mode():
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0, w0 = time.process_time(), time.perf_counter()
                    model(ids, torch.arange(args.tokens), last_only=True)
                    if r:  # round 0 warms up
                        cpu[name].append(time.process_time() - t0)
                        wall[name].append(time.perf_counter() - w0)
                        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        base = statistics.median(cpu[next(iter(cases))])
        for name in cases:
            c, w = statistics.median(cpu[name]), statistics.median(wall[name])
            print(f"{kind:5s} {name:16s} cpu s best {min(cpu[name]):.3f} median {c:.3f} (x{base / c:.2f})"
                  f"  wall best {min(wall[name]):.3f} median {w:.3f}  {args.tokens / c:.0f} tok/cpu-s"
                  f"  page faults {int(statistics.median(faults[name]))}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
