"""Fine-tuning speed and memory: camelid's LoRA and QLoRA-int4 against transformers + peft, same base, data and
LoRA settings, same thread count.

    python benchmarks/finetune_speed.py                       # SmolLM2-135M-Instruct, 2 threads, rows of 512
    python benchmarks/finetune_speed.py --steps 20 --threads 1 --out runs/finetune_speed/t1

Three arms, each in a process of its own (so that each one's peak RSS is its own), one after another, in `--rounds`
rounds with the order reversed every other round:
- camelid-lora: what `camelid finetune` runs: the SFT objective (packed rows, the training model's kernels, the
  head only at learned positions), LoRA over an fp32 base, the loop's AdamW
- camelid-qlora-int4: the same over an int4 base quantised while the checkpoint streams in (`quantize=int4`)
- transformers+peft: LlamaForCausalLM with the same weights, peft's LoRA (same rank, alpha, targets, dropout 0),
  a plain PyTorch loop with the same AdamW, each step's examples as one padded batch (no packing: without
  FlashAttention's varlen kernels packing would let examples attend to each other)

Every arm trains on the same examples in the same steps (the Natural Instructions training split rendered with
SmolLM2's chat template, loss on the answers): step s of transformers+peft holds exactly the examples that
camelid packs into the rows of its step s. tokens/s counts real tokens (no padding) over the timed steps; MFU
uses the same FLOPs per token for all (the SFT objective's count: frozen weights forward and input-gradient,
LoRA weights 6x, the head at learned positions, attention) against the fp32 matmul peak measured in the run.
After the timed steps each arm's held-out loss is measured on the same dev examples. Peak RSS is the process's
maximum resident set (ru_maxrss), also given above the RSS after `import torch, camelid` (the interpreter).
The first-step losses of camelid-lora and transformers+peft agree (same weights, B = 0), which the script checks.
Writes finetune_speed.json and finetune_speed.png to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from camelid.ops.native import cpu_name

ARMS = ("transformers+peft", "camelid-lora", "camelid-qlora-int4")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", type=Path, default=Path("data/chat/natural_instructions.jsonl.gz"))
    p.add_argument("--block", type=int, default=512, help="camelid's row length (tokens)")
    p.add_argument("--batch", type=int, default=2, help="camelid's rows per step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--eval-examples", type=int, default=40, help="dev examples for the held-out loss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (all arms): activations no longer dominate memory")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="camelid arms: FinetuneConfig.return_freed_memory (large tensors on pages of their own)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of all arms, the order reversed every other round (a changing machine load "
                        "then weighs on every arm alike); tokens/s and the speed-up are medians over the rounds")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_speed"))
    p.add_argument("--parallel", action="store_true",
                   help="run a round's arms at the same time (on a machine loaded by others: each arm gets its own "
                        "share of the CPU; compare tokens per CPU-second then, with --threads 1)")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)  # internal: its round
    return p.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def subset(args: argparse.Namespace) -> Path:
    """The records the arms read: enough training records for the steps and `eval_examples` dev records, each
    spread evenly over the file (it is grouped by subtask)."""
    need = (args.warmup + args.steps) * args.batch * args.block // 100 + 100  # records are > 100 tokens
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        lines = [(json.loads(line)["split"], line) for line in f]
    train = [line for split, line in lines if split == "train"]
    dev = [line for split, line in lines if split == "dev"]
    train = train[:: max(1, len(train) // need)][:need]
    dev = dev[:: max(1, len(dev) // args.eval_examples)][: args.eval_examples]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "records.jsonl"
    path.write_text("".join(train + dev), encoding="utf-8")
    return path


def run_arm(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import camelid  # noqa: F401  (the interpreter baseline includes camelid's import)
    from camelid.finetune import SFT, FinetuneConfig

    baseline = peak_rss_mib()
    arm = args.arm
    cfg = FinetuneConfig(model=args.model, data=str(args.out / "records.jsonl"), block_size=args.block,
                         batch_size=args.batch, lora_rank=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                         lr=args.lr, min_lr=args.lr, warmup_steps=0, quantize="int4" if "qlora" in arm else "none",
                         out=str(args.out / "unused"), seed=0,
                         activation_checkpointing=args.activation_checkpointing,
                         return_freed_memory=args.return_freed_memory and arm != "transformers+peft")
    cfg.validate()
    sft = SFT(cfg, torch.device("cpu"))
    steps = args.warmup + args.steps
    examples = [[sft.data.train[i] for row in sft._rows(s, 0) for i in row] for s in range(steps)]
    t_load = time.perf_counter()
    if arm == "transformers+peft":
        model, step_fn, heldout = hf_arm(args, sft, cfg)
    else:
        model, step_fn, heldout = camelid_arm(sft, cfg)
    load_s = time.perf_counter() - t_load
    losses, times, cpu_times, tokens = [], [], [], []
    for s in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step_fn(s, examples[s]))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if s >= args.warmup:
            times.append(dt)
            cpu_times.append(dc)
            tokens.append(sum(ex.width for ex in examples[s]))
        print(f"{arm}: step {s + 1}/{steps} loss {losses[-1]:.4f} {sum(ex.width for ex in examples[s]) / dt:,.0f}"
              " tok/s", file=sys.stderr, flush=True)
    val = heldout() if args.round == 0 else None  # the same weights in every round: measured once
    return {"arm": arm, "tokens_per_s": sum(tokens) / sum(times), "step_s": times, "tokens": sum(tokens),
            "tokens_per_cpu_s": sum(tokens) / sum(cpu_times), "step_cpu_s": cpu_times,
            "losses": losses, "first_loss": losses[0], "heldout_loss": val, "load_s": load_s,
            "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
            "flops_per_token": sft.flops_per_token(), "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def camelid_arm(sft, cfg):
    import torch

    from camelid.train.loop import build_optimizer

    model = sft.build_model()
    if cfg.activation_checkpointing:
        from camelid.train.loop import use_activation_checkpointing

        use_activation_checkpointing(sft.blocks(model))
    model.train()
    opt = build_optimizer(model, cfg, torch.device("cpu"))

    def step(s: int, _examples: list) -> float:
        loss = sft.loss(model, sft.batch(s, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step, lambda: sft.evaluate(model, full=True)["val_loss"]


def hf_arm(args: argparse.Namespace, sft, cfg):
    import peft
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    import camelid
    from camelid.interop.hf import config_to_hf, hf_state_dict
    from camelid.train.loop import build_optimizer

    base = camelid.load(cfg.model, tokenizer=False).model
    sft.model_config = base.config  # the same FLOPs per token as camelid's arms
    hf_cfg = {k: v for k, v in config_to_hf(base.config).items() if k not in ("architectures", "model_type",
                                                                                "torch_dtype")}
    model = LlamaForCausalLM(HFConfig(**hf_cfg, attn_implementation="sdpa"))
    missing, unexpected = model.load_state_dict(hf_state_dict(base), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    del base
    lora = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=HF_TARGETS,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    pad = sft.pad_id

    def batch(examples: list) -> tuple:
        n = max(len(ex.ids) for ex in examples)
        ids = torch.full((len(examples), n), pad, dtype=torch.long)
        labels = torch.full((len(examples), n), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for i, ex in enumerate(examples):
            ids[i, :len(ex.ids)] = torch.tensor(ex.ids)
            labels[i, :len(ex.ids)] = torch.tensor([t if m else -100 for t, m in zip(ex.ids, ex.trained,
                                                                                     strict=True)])
            mask[i, :len(ex.ids)] = 1
        return ids, mask, labels

    def loss_of(examples: list) -> torch.Tensor:
        ids, mask, labels = batch(examples)
        # transformers' loss: the mean over the learned targets (it shifts the labels itself)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def step(_s: int, examples: list) -> float:
        loss = loss_of(examples)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def heldout() -> float:
        model.eval()
        total, count = 0.0, 0
        val = sft.data.val
        for i in range(0, len(val), 4):
            chunk = val[i:i + 4]
            n = sum(ex.n_trained for ex in chunk)
            total += float(loss_of(chunk)) * n
            count += n
        return total / max(1, count)

    return model, step, heldout


def matmul_peak_per_cpu_s(n: int = 1024, seconds: float = 1.0) -> float:
    """The best fp32 matmul FLOPs per CPU-second of this process over the GEMM libraries camelid can use (what a
    core does while it runs, whatever share of the machine the process gets: the MFU denominator for tokens per
    CPU-second)."""
    import torch

    from camelid.train.flops import measure_matmul_peak

    return measure_matmul_peak("cpu", torch.float32, n=n, seconds=seconds / 2, clock=time.process_time)


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def main() -> None:
    args = parse()
    if args.arm:
        result = run_arm(args)
        (args.out / f"{args.arm}.round{args.round}.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    subset(args)
    arms = args.arms.split(",")
    load = [os.getloadavg()[0]]
    rounds: list[dict] = []
    for r in range(args.rounds):
        rounds.append({})
        order = arms if r % 2 == 0 else arms[::-1]
        cmds = [[sys.executable, __file__, "--arm", arm, "--round", str(r), *sys.argv[1:]] for arm in order]
        print(f"--- round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
        if args.parallel:
            for proc in [subprocess.Popen(cmd) for cmd in cmds]:
                if proc.wait():
                    raise SystemExit(f"an arm failed: {' '.join(proc.args)}")  # type: ignore[arg-type]
        else:
            for cmd in cmds:
                subprocess.run(cmd, check=True)
        load.append(os.getloadavg()[0])
        for arm in order:
            rounds[-1][arm] = json.loads((args.out / f"{arm}.round{r}.json").read_text())
    results = {}
    for arm in arms:
        runs = [rd[arm] for rd in rounds]
        results[arm] = {**runs[0], "tokens_per_s": median([x["tokens_per_s"] for x in runs]),
                        "tokens_per_s_rounds": [x["tokens_per_s"] for x in runs],
                        "tokens_per_cpu_s": median([x["tokens_per_cpu_s"] for x in runs]),
                        "peak_rss_mib": median([x["peak_rss_mib"] for x in runs]),
                        "peak_rss_mib_rounds": [x["peak_rss_mib"] for x in runs]}

    import torch

    from camelid.train.flops import measure_matmul_peak

    torch.set_num_threads(args.threads)
    peak = measure_matmul_peak("cpu", torch.float32)
    summary: dict = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": args.model,
                     "rows": f"{args.batch} x {args.block}", "rank": args.rank, "alpha": args.alpha,
                     "steps": args.steps, "rounds": args.rounds, "parallel": args.parallel,
                     "activation_checkpointing": args.activation_checkpointing,
                     "peak_flops": peak, "load_average_1min": load, "arms": results}
    summary["mfu"] = {a: r["tokens_per_s"] * r["flops_per_token"] / peak for a, r in results.items()}
    # per CPU-second (against the matmul peak per CPU-second): meaningful on a machine other processes load too
    peak_cpu = matmul_peak_per_cpu_s()
    summary["peak_flops_per_cpu_s"] = peak_cpu
    summary["mfu_per_cpu_s"] = {a: r["tokens_per_cpu_s"] * r["flops_per_token"] / peak_cpu
                                for a, r in results.items()}
    ref, lora, qlora = (results.get(a) for a in ARMS)
    if ref and lora:
        ratios = [rd["camelid-lora"]["tokens_per_s"] / rd["transformers+peft"]["tokens_per_s"] for rd in rounds]
        summary["speedup_lora_vs_transformers_peft"] = median(ratios)
        summary["speedup_lora_vs_transformers_peft_rounds"] = ratios
        summary["speedup_per_cpu_s_lora_vs_transformers_peft"] = median(
            [rd["camelid-lora"]["tokens_per_cpu_s"] / rd["transformers+peft"]["tokens_per_cpu_s"] for rd in rounds])
        summary["first_loss_difference"] = abs(lora["first_loss"] - ref["first_loss"])
        if summary["first_loss_difference"] > 1e-3 * abs(ref["first_loss"]):
            print(f"warning: first losses differ: {lora['first_loss']} vs {ref['first_loss']}", file=sys.stderr)
    if lora and qlora:
        summary["rss_qlora_over_lora"] = qlora["peak_rss_mib"] / lora["peak_rss_mib"]
        summary["rss_above_interpreter_qlora_over_lora"] = (
            (qlora["peak_rss_mib"] - qlora["baseline_rss_mib"]) / (lora["peak_rss_mib"] - lora["baseline_rss_mib"]))
        summary["heldout_loss_qlora_minus_lora"] = qlora["heldout_loss"] - lora["heldout_loss"]
    (args.out / "finetune_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "finetune_speed.png")
    keys = [k for k in summary if k != "arms"]
    print(json.dumps({**{k: summary[k] for k in keys}, **{a: {k: r[k] for k in (
        "tokens_per_s", "tokens_per_s_rounds", "tokens_per_cpu_s", "peak_rss_mib", "baseline_rss_mib",
        "heldout_loss", "first_loss")}
        for a, r in results.items()}}, indent=2))


def plot(summary: dict, png: Path) -> None:
    from camelid.train.plot import BarPanel, plot_bars

    arms = list(summary["arms"])
    r = summary["arms"]
    plot_bars(arms, [
        BarPanel("training tokens / s", {"tokens/s": [r[a]["tokens_per_s"] for a in arms]}),
        BarPanel("peak RSS (MiB)", {"peak RSS": [r[a]["peak_rss_mib"] for a in arms]}),
        BarPanel("held-out loss after the steps", {"loss": [r[a]["heldout_loss"] for a in arms]}),
    ], png, title=f"LoRA fine-tuning, {summary['model']}, {summary['threads']} threads, {summary['cpu']}")


if __name__ == "__main__":
    main()
