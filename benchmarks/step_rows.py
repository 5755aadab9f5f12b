"""CPU time of the serving engine's batched decode step: B sequences, one token each, at 1 thread.

Usage: python benchmarks/step_rows.py [--position 300] [--batches 1,4,8,16] [--mode int4] [--rounds 3]
                                      [--root DIR]

Row r sits at position `--position` + r of its own cache row (SmolLM2-135M-Instruct, `engine.forward_rows`, the C++
whole-model step). Each batch size is timed as --rounds rounds of 3 steps in `time.process_time` (one thread, so
this is the step's whole cost, and other jobs on the machine barely move it); the median round is printed, with
the ratio to one row: 8 streams give 8 / ratio times one stream's tokens per second. `--root` runs another
checkout of camelid (its own kernel cache: set CAMELID_KERNEL_CACHE), so two versions can be run one after the
other, alternating, in separate processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--position", type=int, default=300)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--mode", default="int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default=None, help="a camelid checkout to import instead of this one")
    args = ap.parse_args()
    if args.root:
        sys.path.insert(0, os.path.abspath(args.root))
    import torch

    import camelid
    from camelid.serve.engine import Engine

    torch.set_num_threads(1)
    model = camelid.load("smollm2-135m-instruct", quantize=args.mode).model
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(model, slots=max(batches), context=args.position + max(batches) + 1, prefix_cache_bytes=0)
    ms: dict[int, float] = {}
    with torch.inference_mode():
        for b in batches:
            rows, tokens = list(range(b)), [5] * b
            positions = [args.position + r for r in rows]
            engine.forward_rows(tokens, positions, rows)  # warm
            rounds = []
            for _ in range(args.rounds):
                t0 = time.process_time()
                for _ in range(3):
                    engine.forward_rows(tokens, positions, rows)
                rounds.append((time.process_time() - t0) / 3 * 1000)
            ms[b] = statistics.median(rounds)
    one = ms.get(1)
    print(f"{camelid.__file__}: {args.mode}, position {args.position}")
    for b, t in ms.items():
        ratio = f", {t / one:.2f} x one row" if one else ""
        print(f"B={b:>2}: {t:6.2f} ms per step{ratio}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
