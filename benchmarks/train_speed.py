"""Training throughput: camelid's Llama vs transformers.LlamaForCausalLM, same config, weights, batch and AdamW.

    python benchmarks/train_speed.py                      # CPU, fp32, the Austen demo's model shape
    python benchmarks/train_speed.py --device cuda --dtype bfloat16 --dim 768 --layers 12 --heads 12 \
        --kv-heads 12 --ffn 2048 --vocab 32000 --batch 16 --seq 1024   # a GPU, bf16 autocast

camelid is timed on the code path of `camelid pretrain`: the model its clm objective builds (TrainLlama,
camelid/variants/training.py), its loss (`CausalLM.loss`), and the loop's AdamW (`build_optimizer`); transformers
gets the same AdamW and the mean cross-entropy of its fp32 logits. Both start from the same weights
(camelid's, copied over under HF names) and train on the same batch. Also timed: the reference `Llama`
(camelid/model.py) with the same loss, and TrainLlama under torch.compile (`--set compile=true`). Rounds
alternate so that machine noise hits all alike; the result is the median tokens/s of each, the ratios, and
MFU against the matmul peak measured in the same run (fp32 on CPU; on GPU the data-sheet bf16 peak when
known, else the measured one). `--breakdown` profiles one step of each and splits it into matmuls,
attention (PyTorch's SDPA, or camelid's causal-attention kernel in TrainLlama) and the rest. Writes JSON (and
a PNG) to --out.
"""

from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="(CPU) profile one step of each: matmul / attention / other milliseconds")
    p.add_argument("--out", type=Path, default=Path("runs/train_speed"))
    return p.parse_args()


def build(args: argparse.Namespace):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from camelid.config import LlamaConfig
    from camelid.interop.hf import config_to_hf, hf_state_dict
    from camelid.model import Llama
    from camelid.variants.training import TrainLlama

    cfg = LlamaConfig(name="bench", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, intermediate_size=args.ffn, max_seq_len=args.seq,
                      tie_embeddings=args.tied)
    torch.manual_seed(0)
    ours = TrainLlama(cfg).to(args.device)
    torch.manual_seed(0)
    reference = Llama(cfg).to(args.device)  # the same initial weights
    hf_cfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    theirs = LlamaForCausalLM(HFConfig(**hf_cfg, attn_implementation="sdpa")).to(args.device)
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()
    return cfg, ours, reference, theirs


def logits_loss(forward):
    """Mean cross-entropy of fp32 logits: transformers' (and the reference Llama's) loss."""
    return lambda x, y: F.cross_entropy(forward(x).float().flatten(0, 1), y.flatten())


def make_step(model, loss_fn, args: argparse.Namespace, compiled: bool = False):
    from camelid.train.config import TrainConfig
    from camelid.train.loop import build_optimizer, compiles_optimizer

    # the loop's AdamW (decay on matrices only; foreach on CPU, fused on GPU), given to every model; with
    # compiled (camelid+compile) the step is compiled where the loop's `compile=true` compiles it: the same math
    cfg = TrainConfig(lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, compile=compiled)
    device = torch.device(args.device)
    compile_opt = compiles_optimizer(cfg, device, fsdp=False)
    opt = build_optimizer(model, cfg, device, compiled=compile_opt)
    opt_step = torch.compile(opt.step) if compile_opt else opt.step
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    from camelid.train.flops import flops_per_token, gpu_peak, measure_matmul_peak

    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from camelid.train.objectives import CausalLM

    cfg, ours, reference, theirs = build(args)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = x[:, :-1], x[:, 1:]
    twin = copy.deepcopy(ours) if args.compile else None
    engines = {  # camelid: exactly what the pretraining loop calls
        "camelid": make_step(ours, lambda x, y: CausalLM.loss(ours, (x, y)), args),
        "transformers": make_step(theirs, logits_loss(lambda t: theirs(input_ids=t).logits), args),
        "camelid-reference": make_step(reference, logits_loss(reference), args),
    }
    first = {name: step(x, y) for name, step in engines.items()}  # same weights, same batch: same first loss
    assert all(abs(v - first["transformers"]) < 1e-5 * abs(v) for v in first.values()), first
    compile_s = None
    if twin is not None:
        compiled = torch.compile(twin)
        engines["camelid+compile"] = make_step(twin, lambda x, y: CausalLM.loss(compiled, (x, y)), args,
                                               compiled=True)
        t0 = time.perf_counter()
        first["camelid+compile"] = engines["camelid+compile"](x, y)  # the first step compiles
        compile_s = time.perf_counter() - t0
        assert abs(first["camelid+compile"] - first["transformers"]) < 1e-5 * first["transformers"], first
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
    parts = {n: breakdown(step, x, y) for n, step in engines.items()} if args.breakdown and device.type == "cpu" else {}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__,
        "config": cfg.to_dict(), "params": ours.num_params(), "batch": args.batch, "seq": args.seq,
        "tokens_per_s": median, "rounds": speeds,
        "ratio_camelid_vs_transformers": median["camelid"] / median["transformers"],
        "peak_flops": peak, "peak_kind": peak_kind, "flops_per_token": fpt,
        "mfu": {n: v * fpt / peak for n, v in median.items()},
        "first_loss": first, "compile_s": compile_s,
        "ratios_vs_transformers": {n: v / median["transformers"] for n, v in median.items()},
        # each round runs every engine back to back: the median of per-round ratios shrugs off a disturbed round
        "ratios_vs_transformers_per_round_median": {
            n: statistics.median(a / b for a, b in zip(v, speeds["transformers"], strict=True))
            for n, v in speeds.items()},
        "breakdown_ms": parts,
    }
    if parts:
        # were everything but transformers' matmuls and attention free, this would be the speed-up over it
        hf = parts["transformers"]
        result["ratio_bound_if_the_rest_were_free"] = hf["step"] / (hf["matmul"] + hf["attention"])
    if "camelid+compile" in median:
        result["ratio_compiled_vs_transformers"] = median["camelid+compile"] / median["transformers"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "train_speed.png")
    keys = ("tokens_per_s", "ratios_vs_transformers", "ratios_vs_transformers_per_round_median", "mfu", "peak_flops",
            "compile_s", "breakdown_ms",
            "ratio_bound_if_the_rest_were_free")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))


MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "mkldnn::_linear_pointwise"}


def breakdown(step, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Milliseconds of one profiled step: matmuls, attention (forward and backward), everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(x, y)
        total = time.perf_counter() - t0
    ms = {"matmul": 0.0, "attention": 0.0}
    for e in prof.key_averages():
        if e.key in MATMUL:
            ms["matmul"] += e.self_cpu_time_total / 1e3
        elif "scaled_dot_product" in e.key or "causal_attention" in e.key:  # eager names its forward oddly
            ms["attention"] += e.self_cpu_time_total / 1e3
    ms["step"] = total * 1e3
    ms["other"] = ms["step"] - ms["matmul"] - ms["attention"]
    return {k: round(v, 1) for k, v in ms.items()}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, [result["tokens_per_s"][n] for n in names], color=["C0", "C1", "C7", "C2"][: len(names)])
    for b, n in zip(bars, names, strict=True):
        ax.annotate(f"{result['ratios_vs_transformers'][n]:.2f}x, MFU {100 * result['mfu'][n]:.1f}%",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.12 * max(result["tokens_per_s"].values()))
    ax.set(ylabel="training tokens / s (median)",
           title=f"{result['params'] / 1e6:.1f}M params, batch {result['batch']}x{result['seq']}, "
                 f"{result['device']} {result['dtype']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
