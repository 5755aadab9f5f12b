"""Several activation rows times int8/int4 weights, in CPU seconds at one thread (robust on a busy machine).

Usage:
    python benchmarks/prompt_products.py                      # kernel: M rows x SmolLM2's gate+up matrix
    python benchmarks/prompt_products.py --prefill --gguf Q4_1=PATH.gguf --gguf Q8_0=PATH.gguf

The kernel part times `gemm_q8` (int8 activations, each weight block loaded once for up to 8 rows) for M = 1..16
rows against M = 1, and against dequantisation + torch's GEMM (the default prompt path) for 16..512 rows.
`--prefill` times a 512-token prompt through SmolLM2-135M at int8 and int4, with the default prompt path and with
CAMELID_INT8_PROMPTS=1, and through llama.cpp (llama-cpp-python, one thread) for each --gguf. Every figure is the
best of --rounds, in CPU time of this process (`time.process_time`).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

import torch

from camelid.ops import linear, native

MODEL = "smollm2-135m-instruct"


def cpu_ms(fn: Callable[[], object], reps: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t0) / reps)
    return best * 1e3


def weights(kind: str, N: int, K: int, g: torch.Generator) -> list[torch.Tensor]:
    if kind == "int8":
        return [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g), torch.rand(N, generator=g) / 100]
    return [torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
            (torch.rand(N, K // 32, generator=g) / 10).half(), (torch.randn(N, K // 32, generator=g) / 10).half()]


def kernels(N: int, K: int, rounds: int) -> None:
    mod = native.module()
    if mod is None:
        raise SystemExit(f"the C++ kernels are not available: {native.reason()}")
    g = torch.Generator().manual_seed(0)
    print(f"kernels: {native.label()}, W [{N}, {K}]")
    for kind, code in (("int4", 2), ("int8", 1)):
        w = weights(kind, N, K, g)
        one = 0.0
        cells = []
        for M in (1, 2, 4, 8, 16):
            x = torch.randn(M, K, generator=g)
            ms = cpu_ms(lambda x=x, code=code, w=w: mod.gemm_q8(x, code, w), 20, rounds)
            one = one or ms
            cells.append(f"M={M} {ms:.3f} ms ({ms / one:.2f}x)")
        print(f"{kind} gemm_q8: " + ", ".join(cells))
        for M in (16, 64, 512):
            x = torch.randn(M, K, generator=g)
            q8 = cpu_ms(lambda x=x, code=code, w=w: mod.gemm_q8(x, code, w), 2, rounds)
            gemm = cpu_ms(lambda x=x, kind=kind, w=w: x @ linear.dequantize(kind, *w).T, 2, rounds)
            print(f"{kind} M={M}: gemm_q8 {q8:.2f} ms, dequantise + GEMM {gemm:.2f} ms: {gemm / q8:.2f}x")


def prefill(ggufs: list[str], rounds: int) -> None:
    import camelid

    ids = torch.tensor([[random.Random(0).randint(100, 40000) for _ in range(512)]])
    for mode in ("int8", "int4"):
        model = camelid.load(MODEL, quantize=mode).model
        for q8 in ("0", "1"):
            os.environ["CAMELID_INT8_PROMPTS"] = q8
            with torch.inference_mode():
                ms = cpu_ms(lambda model=model: model(ids, last_only=True), 1, rounds)
            print(f"camelid {mode}, CAMELID_INT8_PROMPTS={q8}: {512 / ms * 1000:.0f} tok/s")
        os.environ.pop("CAMELID_INT8_PROMPTS")
    toks = ids[0].tolist()
    for spec in ggufs:
        from llama_cpp import Llama

        name, path = spec.split("=", 1)
        llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=1, n_threads_batch=1,
                    verbose=False)

        def run(llm: Llama = llm) -> None:
            llm.reset()
            llm.eval(toks)

        ms = cpu_ms(run, 1, rounds)
        print(f"llama.cpp {name}: {512 / ms * 1000:.0f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3072, help="weight rows (SmolLM2's fused gate+up: 3072)")
    ap.add_argument("--k", type=int, default=576, help="weight columns (SmolLM2's width: 576)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", action="store_true", help="also time 512-token prompts through the whole model")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=PATH of a GGUF for llama.cpp (--prefill)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kernels(args.n, args.k, args.rounds)
    if args.prefill:
        prefill(args.gguf, args.rounds)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
