"""Speculative decoding on the real SmolLM2-135M-Instruct: acceptance rate and speed-up over plain greedy.

Usage: python benchmarks/speculative.py PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 64] [--rounds 3]

Target: the fp32 model on camelid's fast path (fused projections + C++ GEMV). Draft: an int4 copy of the
same model (no second model is needed). Plain and speculative runs are interleaved in one process and the
speed-up is the ratio of their median times, both wall-clock and CPU time of this (single, by default)
thread, which a busy machine disturbs far less; the output must equal plain greedy decoding token for token.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from camelid.generate import generate
from camelid.speculative import speculative_generate
from camelid.variants.quantized import quantize_model

PROMPTS = {  # SmolLM2 ChatML prompts (system prompt included), tokenised with the model's own tokenizer
    "capital of France": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                          407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
                          520, 9531, 198],
    "haiku about camels": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                           407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 421, 30614, 563, 38140, 30, 2, 198,
                           1, 520, 9531, 198],
}


def load(path: str) -> torch.nn.Module:
    try:
        import camelid
        import camelid.interop.gguf  # noqa: F401 - the real loader, once merged

        return camelid.load(path, tokenizer=False).model.eval()
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent))
        from quality import load as stand_in

        return stand_in(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ks", default="2,3,4,6")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    base = load(args.gguf)
    target = quantize_model(copy.deepcopy(base), "fp32")
    draft = quantize_model(base, "int4")
    ks = [int(k) for k in args.ks.split(",")]
    report = {}
    for name, prompt in PROMPTS.items():
        want = generate(target, prompt, args.tokens)
        times: dict[str, list[float]] = {"plain": [], **{f"k={k}": [] for k in ks}}
        cpu: dict[str, list[float]] = {key: [] for key in times}
        rows: dict[str, dict] = {}
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.thread_time()
            generate(target, prompt, args.tokens)
            times["plain"].append(time.perf_counter() - t)
            cpu["plain"].append(time.thread_time() - c)
            for k in ks:
                t, c = time.perf_counter(), time.thread_time()
                stats = speculative_generate(target, draft, prompt, args.tokens, k=k)
                times[f"k={k}"].append(time.perf_counter() - t)
                cpu[f"k={k}"].append(time.thread_time() - c)
                assert stats.tokens == want, "speculative output differs from plain greedy"
                rows[f"k={k}"] = {"acceptance_rate": round(stats.acceptance_rate, 3),
                                  "target_passes": stats.target_passes}
        plain, plain_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
        for k in ks:
            rows[f"k={k}"]["speed_up_wall"] = round(plain / statistics.median(times[f"k={k}"]), 2)
            rows[f"k={k}"]["speed_up_cpu"] = round(plain_cpu / statistics.median(cpu[f"k={k}"]), 2)
        rows["plain_tok_s_wall"] = round(args.tokens / plain, 1)
        rows["plain_tok_s_cpu"] = round(args.tokens / plain_cpu, 1)
        report[name] = rows
        print(name, json.dumps(rows), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
