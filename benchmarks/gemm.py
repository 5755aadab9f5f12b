"""fp32 GEMM: torch's (MKL on x86) against oneDNN's, on the products a LLaMA's prompts and training run.

Usage: python benchmarks/gemm.py [--threads 1] [--rows 512] [--rounds 15]

For SmolLM2-135M's linear layers (dim 576, kv 192, FFN 1536) and its 49,152-row head: the forward product
x @ W^T, the input gradient g @ W and the weight gradient g^T @ x, each through `torch.mm` and through
`torch.ops.mkldnn._linear_pointwise` (oneDNN; transposed operands passed as views, as camelid.ops.linear.matmul_t
does). Prints GFLOP/s (median of --rounds, CPU time of this process, so a busy machine distorts it little) and
the ratio, with the CPU's name and the library camelid picks here (`gemm_library`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from camelid.ops import linear, native


def gflops(fn: Callable[[], object], flop: float, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return flop / max(statistics.median(times), 1e-9) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=512, help="tokens per product (M)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    onednn = torch.ops.mkldnn._linear_pointwise
    M = args.rows
    shapes = {"q / o (576 -> 576)": (576, 576), "k / v (576 -> 192)": (192, 576),
              "gate / up (576 -> 1536)": (1536, 576), "down (1536 -> 576)": (576, 1536),
              "head (576 -> 49152)": (49152, 576)}
    print(f"{native.cpu_name()}; {args.threads} thread(s), M = {M}; torch {torch.__version__}; "
          f"camelid picks: {linear.gemm_library()}\n")
    print("| product | shape | torch.mm GFLOP/s | oneDNN GFLOP/s | oneDNN / torch |")
    print("|---|---|---:|---:|---:|")
    ratios = []
    for name, (N, K) in shapes.items():
        x, w, g = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
        flop = 2.0 * M * N * K
        # (A, B) with the product A @ B^T; transposed operands are views, as in training's backward
        cases = {"forward x W^T": (x, w), "d/dx = g W": (g, w.t()), "d/dW = g^T x": (g.t(), x.t())}
        if N > 10000:  # the head: its weight gradient is not taken when tied and frozen (LoRA)
            cases.pop("d/dW = g^T x")
        for case, (a_op, b_op) in cases.items():
            a = gflops(lambda a_op=a_op, b_op=b_op: a_op @ b_op.t(), flop, args.rounds)
            b = gflops(lambda a_op=a_op, b_op=b_op: onednn(a_op, b_op, None, "none", [], ""), flop, args.rounds)
            ratios.append(b / a)
            print(f"| {case} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    print(f"\ngeometric mean oneDNN / torch: {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()
