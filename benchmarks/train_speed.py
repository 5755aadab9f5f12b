"""Training throughput: camelid's Llama vs transformers.LlamaForCausalLM, same config, weights, batch and AdamW.

    python benchmarks/train_speed.py                      # CPU, fp32, the Austen demo's model shape
    python benchmarks/train_speed.py --device cuda --dtype bfloat16 --dim 768 --layers 12 --heads 12 \
        --kv-heads 12 --ffn 2048 --vocab 32000 --batch 16 --seq 1024   # a GPU, bf16 autocast

Both models start from the same weights (camelid's, copied over under HF names) and train on the same
batch with the same loss (F.cross_entropy on fp32 logits) and the same AdamW (foreach on CPU, fused on
GPU). Rounds alternate between the two so that machine noise hits both alike; the result is the median
tokens/s of each, their ratio, and MFU against the matmul peak measured in the same run (fp32 on CPU; on
GPU the data-sheet bf16 peak when known, else the measured one). Writes JSON (and a PNG) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time camelid as `camelid pretrain --set compile=true` runs it (torch.compile)")
    p.add_argument("--out", type=Path, default=Path("runs/train_speed"))
    return p.parse_args()


def build(args: argparse.Namespace):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from camelid.config import LlamaConfig
    from camelid.interop.hf import config_to_hf, hf_state_dict
    from camelid.model import Llama

    cfg = LlamaConfig(name="bench", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, intermediate_size=args.ffn, max_seq_len=args.seq,
                      tie_embeddings=args.tied)
    torch.manual_seed(0)
    ours = Llama(cfg).to(args.device)
    hf_cfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    theirs = LlamaForCausalLM(HFConfig(**hf_cfg, attn_implementation="sdpa")).to(args.device)
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()
    return cfg, ours, theirs


def make_step(model, forward, args: argparse.Namespace):
    kind = {"fused": True} if args.device.startswith("cuda") else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kind)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    from camelid.train.flops import flops_per_token, gpu_peak, measure_matmul_peak

    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, ours, theirs = build(args)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = x[:, :-1], x[:, 1:]
    engines = {
        "camelid": make_step(ours, ours, args),
        "transformers": make_step(theirs, lambda t: theirs(input_ids=t).logits, args),
    }
    first = {name: step(x, y) for name, step in engines.items()}  # same weights, same batch: same first loss
    assert abs(first["camelid"] - first["transformers"]) < 1e-3 * abs(first["camelid"]), first
    if args.compile:
        import copy

        twin = copy.deepcopy(ours)
        engines["camelid+compile"] = make_step(twin, torch.compile(twin), args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in engines.values():
        for _ in range(args.warmup):
            step(x, y)
    tokens = args.batch * args.seq * args.steps
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))  # alternate who goes first
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engines[name](x, y)
            sync()
            speeds[name].append(tokens / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{n} {speeds[n][-1]:,.0f} tok/s" for n in engines), flush=True)

    if device.type == "cuda" and args.dtype == "bfloat16":
        peak, peak_kind = gpu_peak(device) or measure_matmul_peak(device, torch.bfloat16, n=8192), "bf16"
    else:
        peak, peak_kind = measure_matmul_peak(device, torch.float32), "fp32 (measured)"
    fpt = flops_per_token(cfg, args.seq)
    median = {n: statistics.median(v) for n, v in speeds.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__,
        "config": cfg.to_dict(), "params": ours.num_params(), "batch": args.batch, "seq": args.seq,
        "tokens_per_s": median, "rounds": speeds,
        "ratio_camelid_vs_transformers": median["camelid"] / median["transformers"],
        "peak_flops": peak, "peak_kind": peak_kind, "flops_per_token": fpt,
        "mfu": {n: v * fpt / peak for n, v in median.items()},
        "first_loss": first,
    }
    if "camelid+compile" in median:
        result["ratio_compiled_vs_transformers"] = median["camelid+compile"] / median["transformers"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "train_speed.png")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "ratio_camelid_vs_transformers", "mfu", "peak_flops")},
                     indent=2))


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, [result["tokens_per_s"][n] for n in names], color=["C0", "C1", "C2"][: len(names)])
    for b, n in zip(bars, names, strict=True):
        ax.annotate(f"MFU {100 * result['mfu'][n]:.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set(ylabel="training tokens / s (median)",
           title=f"{result['params'] / 1e6:.1f}M params, batch {result['batch']}x{result['seq']}, "
                 f"{result['device']} {result['dtype']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
