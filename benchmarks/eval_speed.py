"""camelid eval against lm-evaluation-harness's `hf` backend: the same numbers, and how much faster.

Usage: python benchmarks/eval_speed.py [--limit N] [--threads 2] [--hf-batch-size 16] [--max-length 2048]
                                       [--tasks strategyqa,...] [--text data/austen/persuasion.txt | --no-text]
                                       [--num-fewshot K] [--chat] [--harness] [--out benchmarks/results/eval]

Both run in this process on the same threads: lm-eval's `hf` model (transformers, fp32) on camelid's Hugging
Face export of the default model (SmolLM2-135M-Instruct), and `camelid eval` (camelid.eval.Evaluator) on the
model camelid loads, task by task, alternating, so that a change in the machine's load hits both alike.
With --harness, lm-eval's `camelid` model runs the same tasks too. Times exclude model loading. Writes
eval_speed.json (settings, load averages, every time and metric) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="strategyqa,social_iqa,winowhy,sports_understanding,date_understanding,"
                                       "physical_intuition")
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each set (default: all)")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="prompts through the chat template (k-shot as turns)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--text", default=str(REPO / "data/austen/persuasion.txt"), help="held-out text for bits/byte")
    ap.add_argument("--no-text", action="store_true")
    ap.add_argument("--max-length", type=int, default=2048, help="the window of the bits-per-byte task")
    ap.add_argument("--harness", action="store_true", help="also run lm-eval's camelid model")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/eval")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    import camelid
    import camelid.eval.harness as harness
    from camelid.eval import Evaluator, Settings, resolve_tasks
    from camelid.ops.native import cpu_name

    llm = camelid.load()
    hf_dir = llm.save_pretrained(Path(tempfile.mkdtemp(prefix="eval-speed-")) / "smollm2-hf")
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.hf_batch_size)
    text_hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1, max_length=args.max_length)
    mc = Evaluator(llm, Settings(num_fewshot=args.num_fewshot, chat=args.chat, limit=args.limit), show_progress=True)
    text_ev = Evaluator(llm, Settings(max_length=args.max_length), show_progress=True)
    ours_in_lm_eval = harness.CamelidLM() if args.harness else None
    text_ours_in_lm_eval = harness.CamelidLM(max_length=args.max_length) if args.harness else None

    jobs = [(name, f"camelid_{name}", hf, mc, ours_in_lm_eval, None) for name in args.tasks.split(",")]
    if not args.no_text:
        jobs.append((args.text, "camelid_persuasion", text_hf, text_ev, text_ours_in_lm_eval, {"path": args.text}))

    def lm_eval_task(model: Any, task: str, meta: dict | None) -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=args.num_fewshot,
                                      limit=None if meta else args.limit, apply_chat_template=args.chat,
                                      fewshot_as_multiturn=args.chat, verbosity="ERROR",
                                      task_manager=harness.task_manager(metadata=meta))
        return time.perf_counter() - t0, out["results"][task]

    rows, load = [], [os.getloadavg()]
    for spec, task, hf_model, evaluator, ours_lm, meta in jobs:
        (resolved,) = resolve_tasks([spec])
        print(f"--- {resolved.name}: lm-eval hf", file=sys.stderr, flush=True)
        hf_seconds, hf_res = lm_eval_task(hf_model, task, meta)
        print(f"--- {resolved.name}: camelid eval", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        ours = evaluator.run(resolved)
        ours_seconds = time.perf_counter() - t0
        row = {"task": resolved.name, "examples": ours["examples"], "hf_seconds": round(hf_seconds, 2),
               "camelid_seconds": round(ours_seconds, 2), "speedup": round(hf_seconds / ours_seconds, 3),
               "tokens_requested": ours.get("tokens_requested"), "tokens_computed": ours.get("tokens_computed"),
               "camelid": ours["metrics"], "hf": {k.split(",")[0]: v for k, v in hf_res.items()
                                                  if k.endswith(",none") and "stderr" not in k}}
        if ours_lm is not None:
            print(f"--- {resolved.name}: lm-eval camelid", file=sys.stderr, flush=True)
            s, res = lm_eval_task(ours_lm, task, meta)
            row["lm_eval_camelid_seconds"] = round(s, 2)
            row["lm_eval_camelid"] = {k.split(",")[0]: v for k, v in res.items()
                                      if k.endswith(",none") and "stderr" not in k}
        keys = ["acc", "acc_norm"] if resolved.kind == "multiple_choice" else ["bits_per_byte"]
        row["max_abs_diff"] = {k: abs(row["camelid"][k] - row["hf"][k]) for k in keys}
        rows.append(row)
        load.append(os.getloadavg())
        print(json.dumps(row), file=sys.stderr, flush=True)

    mc_rows = [r for r in rows if "acc" in r["camelid"]]
    total = {"hf_seconds": sum(r["hf_seconds"] for r in mc_rows),
             "camelid_seconds": sum(r["camelid_seconds"] for r in mc_rows)}
    total["speedup"] = round(total["hf_seconds"] / total["camelid_seconds"], 3) if mc_rows else None
    report = {"settings": vars(args) | {"out": str(args.out)}, "threads": torch.get_num_threads(), "cpu": cpu_name(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "lm_eval": lm_eval.__version__, "camelid": camelid.__version__},
              "loadavg_1_5_15min_after_each_task": load, "multiple_choice_total": total, "tasks": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    from camelid.fileio import atomic_write_text

    atomic_write_text(args.out / "eval_speed.json", json.dumps(report, indent=1) + "\n")

    print(f"{cpu_name()}, {args.threads} threads, lm-eval hf batch size {args.hf_batch_size}, "
          f"{args.num_fewshot}-shot{', chat template' if args.chat else ''}, limit {args.limit or 'none'}\n")
    print("| task | n | lm-eval hf acc / acc_norm | camelid acc / acc_norm | hf s | camelid s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "acc" in r["camelid"]:
            h = f"{100 * r['hf']['acc']:.2f} / {100 * r['hf']['acc_norm']:.2f}"
            c = f"{100 * r['camelid']['acc']:.2f} / {100 * r['camelid']['acc_norm']:.2f}"
        else:
            h, c = f"{r['hf']['bits_per_byte']:.5f} bpb", f"{r['camelid']['bits_per_byte']:.5f} bpb"
        print(f"| {r['task']} | {r['examples']} | {h} | {c} | {r['hf_seconds']:.0f} | {r['camelid_seconds']:.0f} | "
              f"{r['speedup']:.2f}x |")
    if mc_rows:
        print(f"| multiple choice, all | | | | {total['hf_seconds']:.0f} | {total['camelid_seconds']:.0f} | "
              f"{total['speedup']:.2f}x |")
    print(f"\nload averages (1/5/15 min) before and after each task: {load}")


if __name__ == "__main__":
    main()
