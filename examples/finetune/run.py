"""The fine-tuning demo: SmolLM2-135M-Instruct + LoRA on Natural Instructions, scored before and after.

    python examples/finetune/run.py [--set max_steps=300 ...] [--per-task 1] [--tasks 20]

1. before: on the first `--per-task` test examples of each of the 61 subtasks (or of `--tasks` of them), the base
   model's loss (nats per answer token) and its greedy answers (exact match and ROUGE-L against the reference)
2. `camelid finetune examples/finetune/config.yaml`: LoRA on the training split, packed rows, dev loss as it trains
3. after: the same scores with the adapter merged into the weights
Everything lands in runs/finetune/; summary.json, answers.md, scores.png, loss.png and log.csv are copied here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

from camelid.ops.native import cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="override a finetune setting, key=value")
    parser.add_argument("--per-task", type=int, default=1, help="test examples scored per subtask")
    parser.add_argument("--tasks", type=int, default=0,
                        help="score this many of the 61 subtasks, spread evenly over them (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's paths are relative to the repository

    import torch

    import camelid
    from camelid.finetune import SFT, finetune, load_finetune_config
    from camelid.finetune.data import read_records, to_messages
    from camelid.finetune.evaluate import answer_all, exact_match, rouge_l, score
    from camelid.finetune.objective import load_tokenizer, load_training_model
    from camelid.train.plot import BarPanel, plot_bars
    from camelid.variants.lora import apply_lora, read_adapter

    cfg = load_finetune_config(HERE / "config.yaml", args.set)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out).parent
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # per_task examples of each subtask of the test split: their loss through the SFT objective, and the answers
    tok = load_tokenizer(cfg.model)
    test = [(w, r) for w, r in read_records(cfg.data) if r.get(cfg.split_field) == "test"]
    tasks = sorted({r["task"] for _, r in test})
    if args.tasks:
        tasks = tasks[:: max(1, len(tasks) // args.tasks)][: args.tasks]
    chosen: dict[str, list] = defaultdict(list)
    for where, r in test:
        if r["task"] in tasks and len(chosen[r["task"]]) < args.per_task:
            prompt = to_messages(r, "instruction", cfg.fields, cfg.system_prompt, where)[:-1]
            if len(tok.encode(tok.apply_chat_template(prompt))) + args.max_new_tokens <= cfg.block_size:
                chosen[r["task"]].append((where, r, prompt))  # as in training: prompts that fit a row
    picked = [(w, r) for task in sorted(chosen) for w, r, _ in chosen[task]]
    prompts = [p for task in sorted(chosen) for _, _, p in chosen[task]]
    references = [r["output"] for _, r in picked]
    # the chosen test records alone, as both splits of a scorer (the loss is the SFT objective's held-out loss)
    test_file = run / "test_records.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for _, r in picked))
    test_cfg = dataclasses.replace(cfg, data=str(test_file), train_split="test", val_split="test", eval_tokens=0,
                                   val_examples=0)
    test_scorer = SFT(test_cfg, torch.device("cpu"))
    print(f"test split: {len(picked)} examples answered, {len(test_scorer.data.val)} of them scored for loss "
          f"({args.per_task} per subtask, {len(chosen)} subtasks)", flush=True)

    def evaluate(adapter: Path | None, label: str) -> dict:
        model = load_training_model(cfg.model)
        if adapter is not None:
            from camelid.variants.lora import load_lora_state_dict

            spec, tensors, _ = read_adapter(adapter)
            apply_lora(model, spec)
            load_lora_state_dict(model, tensors)
        t = time.time()
        loss = test_scorer.evaluate(model, full=True)
        del model
        llm = camelid.load(cfg.model, quantize="fp32", adapter=adapter)
        answers = answer_all(llm, prompts, args.max_new_tokens, desc=f"{label}: greedy answers")
        result = {"test_loss": loss["val_loss"], "test_loss_tokens": int(loss["val_tokens"]),
                  **score(answers, references), "seconds": round(time.time() - t, 1)}
        print(f"{label}: test loss {result['test_loss']:.4f}, exact match {result['exact_match']:.3f}, "
              f"ROUGE-L {result['rouge_l']:.3f}", flush=True)
        return {"scores": result, "answers": answers}

    before = evaluate(None, "before")
    t1 = time.time()
    train = finetune(cfg)
    t2 = time.time()
    after = evaluate(cfg.export_path, "after")

    # per-example changes, and a few answers side by side (one per subtask, the first examples)
    rows = []
    for (where, r), ref, b, a in zip(picked, references, before["answers"], after["answers"], strict=True):
        rows.append({"task": r["task"], "where": where, "reference": ref, "before": b, "after": a,
                     "em": [exact_match(b, ref), exact_match(a, ref)], "rouge_l": [rouge_l(b, ref), rouge_l(a, ref)]})
    shown = [row for i, row in enumerate(rows) if i % args.per_task == 0][:: max(1, len(chosen) // 8)][:8]
    lines = ["# Before and after: greedy answers on the test split\n",
             f"SmolLM2-135M-Instruct, then with the LoRA adapter of `examples/finetune/config.yaml` merged; one test "
             f"example from each of {len(shown)} subtasks. Prompt = the subtask's instruction, a blank line, the "
             "input.\n"]
    for row in shown:
        prompt = next(p for (w, _), p in zip(picked, prompts, strict=True) if w == row["where"])[-1]["content"]
        short = prompt if len(prompt) < 400 else prompt[:200] + " [...] " + prompt[-150:]
        lines += [f"## {row['task']}\n", "```text\n" + short.strip() + "\n```\n",
                  f"- reference: `{row['reference']}`", f"- before: `{row['before'] or '(empty)'}`",
                  f"- after: `{row['after'] or '(empty)'}`\n"]
    (run / "answers.md").write_text("\n".join(lines))

    b, a = before["scores"], after["scores"]
    plot_bars(["before", "after"], [
        BarPanel("test loss (nats per answer token)", {"loss": [b["test_loss"], a["test_loss"]]}),
        BarPanel("exact match", {"exact match": [b["exact_match"], a["exact_match"]]}, ylim=(0, 1)),
        BarPanel("ROUGE-L", {"ROUGE-L": [b["rouge_l"], a["rouge_l"]]}, ylim=(0, 1)),
    ], run / "scores.png", title="SmolLM2-135M-Instruct + LoRA on Natural Instructions: test split")
    summary = {
        "model": cfg.model, "data": cfg.data, "before": b, "after": a,
        "steps": train.steps, "tokens": train.tokens, "dev_loss": train.val_loss,
        "minutes_training": round((t2 - t1) / 60, 1), "minutes_total": round((time.time() - t0) / 60, 1),
        "tokens_per_s": round(train.tokens / (t2 - t1), 1), "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "config": {k: v for k, v in cfg.to_dict().items() if k in (
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "block_size", "batch_size", "grad_accum",
            "max_steps", "lr", "min_lr", "warmup_steps", "packing", "val_examples")},
        "per_task": args.per_task, "subtasks": len(chosen), "test_examples": len(picked),
        "max_new_tokens": args.max_new_tokens,
        "changed": {"em_gained": sum(r["em"][1] > r["em"][0] for r in rows),
                    "em_lost": sum(r["em"][1] < r["em"][0] for r in rows)},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("summary.json", "answers.md", "scores.png"):
        shutil.copyfile(run / name, HERE / name)
    for name in ("loss.png", "log.csv"):
        shutil.copyfile(Path(cfg.out) / name, HERE / name)
    print(json.dumps({k: summary[k] for k in ("before", "after", "minutes_total")}, indent=2))


if __name__ == "__main__":
    main()
