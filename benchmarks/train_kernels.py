"""The training kernels one by one: camelid's C++ (camelid/ops/csrc/*.cpp) against the PyTorch
ops they replace, forward + backward, same inputs, same run.

    python benchmarks/train_kernels.py --threads 2        # the Austen model's shapes: 8 x 256 tokens

Rows: causal attention (kernel vs F.scaled_dot_product_attention on the same [B, T, heads, d] tensors, with the
transposes SDPA needs), RMSNorm, SwiGLU, RoPE (each TrainLlama Function with its C++ path vs the reference ops
of camelid/model.py under autograd) and the fused head + cross-entropy (C++ softmax and one logits buffer vs the
same Function's PyTorch fall-back). Medians over interleaved rounds; prints milliseconds and ratios, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10, help="forward+backward calls timed per round (the median)")
    p.add_argument("--out", type=Path, default=Path("runs/train_kernels"))
    return p.parse_args()


def timed(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    return lambda: forward().backward(grad)


def main() -> None:
    from camelid.config import LlamaConfig
    from camelid.model import FeedForward, RMSNorm, apply_rope
    from camelid.ops import attention, head_loss, native, rmsnorm, rope
    from camelid.variants.training import TrainFeedForward

    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    if native.module() is None or not attention.choose().impl.startswith("C++"):
        raise SystemExit("train_kernels: the C++ kernels are unavailable here (a C++ compiler and MKL are needed)")
    B, T, H, KV = args.batch, args.seq, args.heads, args.kv_heads
    d = args.dim // H
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    q, k, v, dy = randn(B, T, H, d), randn(B, T, KV, d), randn(B, T, KV, d), randn(B, T, H, d, grad=False)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=KV != H).transpose(1, 2)

    x, dx = randn(B, T, args.dim), randn(B, T, args.dim, grad=False)
    norm = RMSNorm(args.dim)
    cfg = LlamaConfig(name="bench", vocab_size=args.vocab, dim=args.dim, n_layers=1, n_heads=H, n_kv_heads=KV,
                      intermediate_size=args.ffn, max_seq_len=T)
    ffn = FeedForward(cfg)
    fast_ffn = TrainFeedForward(ffn)  # the same weights
    ang = torch.rand(T, d // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = (cos[:, : d // 2].contiguous(), sin[:, : d // 2].contiguous())
    h, w = randn(B * T, args.dim), (0.02 * torch.randn(args.vocab, args.dim, generator=g)).requires_grad_()
    targets = torch.randint(0, args.vocab, (B * T,), generator=g)
    one = torch.tensor(1.0)

    def head_torch() -> None:  # the fused head's PyTorch twin: as on a machine without the kernels
        real, native.module = native.module, lambda: None
        try:
            head_loss.LinearCrossEntropy.apply(h, w, targets).backward(one)
        finally:
            native.module = real

    pairs = {  # name: (camelid, reference)
        "causal attention": (fwd_bwd(lambda: attention.causal_attention(q, k, v), dy), fwd_bwd(sdpa, dy)),
        "RMSNorm": (fwd_bwd(lambda: rmsnorm.RMSNormFunction.apply(x, norm.weight, norm.eps), dx),
                    fwd_bwd(lambda: norm(x), dx)),
        "SwiGLU feed-forward": (fwd_bwd(lambda: fast_ffn(x), dx), fwd_bwd(lambda: ffn(x), dx)),
        "RoPE (q)": (fwd_bwd(lambda: rope.RopeFunction.apply(q, *half), dy),
                     fwd_bwd(lambda: apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2), dy)),
        "head + cross-entropy": (fwd_bwd(lambda: head_loss.LinearCrossEntropy.apply(h, w, targets), one), head_torch),
    }
    ms: dict[str, dict[str, list[float]]] = {name: {"camelid": [], "reference": []} for name in pairs}
    for r in range(args.rounds):
        for name, (ours, ref) in pairs.items():
            for engine, fn in (("camelid", ours), ("reference", ref))[:: 1 if r % 2 == 0 else -1]:
                ms[name][engine].append(timed(fn, args.reps))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "shape": vars(args) | {"out": None},
              "ms_forward_backward": {}}
    print(f"{'forward + backward, ms':<24} {'camelid':>9} {'reference':>10} {'speed-up':>9}")
    for name, m in ms.items():
        ours, ref = statistics.median(m["camelid"]), statistics.median(m["reference"])
        result["ms_forward_backward"][name] = {"camelid": ours, "reference": ref, "speedup": ref / ours}
        print(f"{name:<24} {ours:>9.2f} {ref:>10.2f} {ref / ours:>8.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_kernels.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
