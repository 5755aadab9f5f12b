"""CPU time of one decode step, camelid's variants side by side in one process (robust on a busy machine).

Usage: python benchmarks/decode_step.py [--threads 1] [--context 512] [--model smollm2-135m] [--compile int4,...]

Wall-clock timings on a shared machine swing by 2-5x; the CPU time of a single-threaded process does not
(it still feels other jobs' memory traffic). Variants are interleaved round by round; min and median of the
per-round averages are printed. Random-init weights of the named config (speed does not depend on values).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from camelid.config import LlamaConfig
from camelid.model import Llama
from camelid.variants.decode_step import decode_step
from camelid.variants.quantized import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", default="", help="comma-separated variants to add under torch.compile too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    cfg = LlamaConfig.from_name(args.model)
    torch.manual_seed(0)
    base = Llama(cfg).eval()
    models = {"fp32-eager": base}
    for mode in ("fp32", "int8", "int4"):
        models[mode] = quantize_model(copy.deepcopy(base), mode)
    P = args.context
    ids = torch.randint(0, cfg.vocab_size, (1, P))
    steps = dict(models)
    with torch.inference_mode():
        for m in models.values():
            m.setup_cache(1, P + args.steps + 1)
            m(ids, torch.arange(P), last_only=True)
        tok = torch.tensor([[5]])
        for mode in ("fp32", "int8", "int4"):  # the whole step in one C++ call (camelid/ops/csrc/decode_step.cpp)
            fast = decode_step(models[mode])
            if fast is not None:
                steps[mode + "-step"] = lambda t, p, last_only, f=fast: f(int(t), int(p))
            fast = decode_step(models[mode], int8_activations=True) if mode != "fp32" else None
            if fast is not None:
                steps[mode + "-step-q8"] = lambda t, p, last_only, f=fast: f(int(t), int(p))
        for name in filter(None, args.compile.split(",")):
            steps[name + "-compile"] = torch.compile(models[name], dynamic=False)
            t = time.perf_counter()
            steps[name + "-compile"](tok, torch.tensor([P]), last_only=True)
            print(f"compiling {name}: {time.perf_counter() - t:.0f} s", flush=True)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, m in steps.items():
                t = clock()
                for i in range(args.steps):
                    m(tok, torch.tensor([P + i]), last_only=True)
                times[name].append((clock() - t) / args.steps * 1e3)
    ref = statistics.median(times["fp32-eager"])
    unit = 'CPU' if args.threads == 1 else 'wall'
    print(f"{args.model}, {P}-token context, {args.threads} thread(s), {unit} ms/step")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:>12}: min {min(v):6.1f}  median {med:6.1f}  ({ref / med:.2f}x fp32-eager)")


if __name__ == "__main__":
    main()
