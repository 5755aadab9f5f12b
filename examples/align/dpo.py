"""The DPO demo: SmolLM2-135M-Instruct + LoRA-DPO on the HHH alignment pairs, scored before and after.

    python examples/align/dpo.py [--set max_steps=40 ...] [--timing-steps 4]

1. one model's peak RSS: a process that loads the base model and nothing else
2. before: on the held-out pairs, how often the base model finds the chosen answer more likely than the rejected
   one (summed and per-token log-probabilities), and its greedy answers to a few held-out prompts
3. `camelid finetune examples/align/dpo.yaml` in a process of its own (its peak RSS): LoRA-DPO against the
   cached reference (the base with the adapters off)
4. the same steps with the reference recomputed at every step (reference=live) against the cached one,
   interleaved, CPU-seconds per step (after the first) from each run's log
5. after: the same scores with the adapter, and the DPO reward accuracy (policy margin above the reference's)
Everything lands in runs/align/; summary.json, generations.md, loss.png and log.csv are copied to examples/align/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

RUN = """
import json, resource, sys, time
from camelid.finetune import load_finetune_config
from camelid.finetune.dpo import dpo
cfg = load_finetune_config(sys.argv[1], json.loads(sys.argv[2]))
t = time.perf_counter()
r = dpo(cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "steps": r.steps, "val": r.val_metrics,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
ONE_MODEL = """
import json, resource, sys
from camelid.finetune.objective import load_training_model
m = load_training_model(sys.argv[1])
print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": sum(p.numel() for p in m.parameters())}))
"""


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stdout": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="override a setting, key=value")
    parser.add_argument("--timing-steps", type=int, default=4, help="steps of each timing run (cached, live)")
    parser.add_argument("--timing-reps", type=int, default=2, help="timing runs of each kind, interleaved")
    parser.add_argument("--heldout", type=int, default=0, help="score only the first N held-out pairs (0: all)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    os.chdir(ROOT)

    import torch

    from camelid.finetune import load_finetune_config
    from camelid.finetune.dpo import DPO, pair_batch, sequence_logps
    from camelid.finetune.objective import HeadAt, load_training_model
    from camelid.generate import SamplingParams, generate
    from camelid.ops.native import cpu_name
    from camelid.variants.lora import load_adapter

    cfg = load_finetune_config(HERE / "dpo.yaml", args.set)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    run_dir = Path(cfg.out).parent
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load = os.getloadavg()
    one = child(ONE_MODEL, str(cfg.model))

    objective = DPO(cfg, torch.device("cpu"))
    tok, val = objective.tokenizer, objective.data.val
    scored = val[:args.heldout] if args.heldout else val

    @torch.no_grad()
    def score(llama: torch.nn.Module) -> dict[str, torch.Tensor]:
        m = HeadAt(llama).eval()
        sums, counts = [], []
        for s in range(0, len(scored), 4):
            b, c = pair_batch(scored[s:s + 4], objective.pad_id)
            out = sequence_logps(m, b, torch.device("cpu")).double()
            P = len(scored[s:s + 4])
            sums.append(torch.stack([out[:P], out[P:]], 1))
            counts.append(torch.stack([c[:P], c[P:]], 1).double())
        return {"sum": torch.cat(sums), "count": torch.cat(counts)}

    def accuracy(s: dict[str, torch.Tensor]) -> dict[str, float]:
        mean = s["sum"] / s["count"]
        return {"summed": float((s["sum"][:, 0] > s["sum"][:, 1]).double().mean()),
                "per_token": float((mean[:, 0] > mean[:, 1]).double().mean())}

    prompts = list({json.dumps(p.prompt): p for p in val}.values())[:args.generations]  # a prompt has several pairs

    def answers(llama: torch.nn.Module) -> list[str]:
        out = []
        for pair in prompts:
            text = tok.apply_chat_template(pair.prompt, add_generation_prompt=True)
            ids = tok.encode(text, add_bos=tok.add_bos and not (tok.bos_token and text.startswith(tok.bos_token)))
            gen = generate(llama.eval(), ids, args.max_new_tokens, SamplingParams(), stop_ids=sorted(tok.stop_ids))
            out.append(tok.decode([i for i in gen if i not in tok.stop_ids]).strip())
        return out

    base = load_training_model(str(cfg.model))
    before = score(base)
    before_answers = answers(base)
    del base

    # the DPO run, in a process of its own (peak RSS)
    if Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    sets = [*args.set]
    run = child(RUN, str(HERE / "dpo.yaml"), json.dumps(sets))

    # cached vs live reference, interleaved, the same steps
    timing: dict[str, list[float]] = {"cached": [], "live": []}  # CPU-seconds per step, the first step left out
    cache = next((Path(cfg.out) / "reference").glob("*.safetensors"))  # the same model and data: the same key
    for _ in range(args.timing_reps):
        for kind in ("cached", "live"):
            out = run_dir / f"timing-{kind}"
            if out.exists():
                shutil.rmtree(out)
            extra = [f"out={out}", f"reference={kind}", f"max_steps={args.timing_steps}", "epochs=0",
                     "eval_interval=0", "checkpoint_interval=0", "export=false", f"reference_cache={cache}"]
            child(RUN, str(HERE / "dpo.yaml"), json.dumps(sets + extra))
            timing[kind].append(_cpu_per_step(out / "log.csv"))

    adapted = load_adapter(load_training_model(str(cfg.model)), cfg.export_path)
    after = score(adapted)
    after_answers = answers(adapted)
    margin_b = before["sum"][:, 0] - before["sum"][:, 1]
    margin_a = after["sum"][:, 0] - after["sum"][:, 1]
    summary = {
        "model": str(cfg.model), "cpu": cpu_name(), "threads": cfg.threads, "load_before": load,
        "load_after": os.getloadavg(), "minutes": (time.time() - t0) / 60,
        "pairs": {"train": len(objective.data.train), "held_out": len(val), "held_out_scored": len(scored),
                  "notes": objective.data.notes},
        "settings": {k: getattr(cfg, k) for k in ("dpo_loss", "dpo_beta", "lora_rank", "lora_alpha", "block_size",
                                                  "batch_size", "lr", "max_steps", "epochs")},
        "steps": run["steps"], "run_seconds": run["seconds"],
        "reference_note": next((line for line in run["stdout"].splitlines() if "reference log-prob" in line), ""),
        "accuracy_before": accuracy(before), "accuracy_after": accuracy(after),
        "reward_accuracy_after": float((margin_a > margin_b).double().mean()),
        "val_metrics": run["val"],
        "peak_rss_mb": {"one_model": one["max_rss_mb"], "lora_dpo": run["max_rss_mb"],
                        "ratio": run["max_rss_mb"] / one["max_rss_mb"]},
        "cpu_seconds_per_step": {k: min(v) for k, v in timing.items()},
        "cached_speedup": min(timing["live"]) / min(timing["cached"]),
        "timing_runs": timing,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Held-out prompts: greedy answers before and after LoRA-DPO\n"]
    for pair, b, a in zip(prompts, before_answers, after_answers, strict=True):
        lines += [f"**prompt:** {pair.prompt[-1]['content']}\n", f"- before: {b}", f"- after: {a}\n"]
    (run_dir / "generations.md").write_text("\n".join(lines) + "\n")
    for name in ("summary.json", "generations.md"):
        shutil.copy(run_dir / name, HERE / name)
    for name in ("loss.png", "log.csv"):
        shutil.copy(Path(cfg.out) / name, HERE / f"dpo_{name}")
    print(json.dumps(summary, indent=2))


def _cpu_per_step(log: Path) -> float:
    """CPU-seconds per optimizer step after the first (which also warms up), from the log's cpu_s column."""
    import csv

    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) < 2:
        raise SystemExit(f"{log}: a timing run needs at least 2 steps (--timing-steps)")
    return (float(rows[-1]["cpu_s"]) - float(rows[0]["cpu_s"])) / (len(rows) - 1)


if __name__ == "__main__":
    main()
