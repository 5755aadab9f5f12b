"""The distillation demo: SmolLM2-135M-Instruct teaches a fresh camelid LLaMA of a few million parameters, with
SmolLM2's tokenizer, on Austen paragraphs; students at equal steps, scored on held-out paragraphs.

    python examples/align/distill.py [--set epochs=4 ...] [--train 12 --heldout 6] [--topk 20,100,500]

1. next-token loss alone (kd_ratio 0)
2. distilled from the live teacher, full vocabulary (forward KL, kd_ratio 0.5)
3. `camelid teacher-cache` once, then distilled from that cache: the teacher's top-k logits (k = teacher_topk,
   or each k of --topk), and tokens sampled from its distribution (teacher_samples draws per position)
The held-out loss (nats per token) of each, the share of full-vocabulary distillation's gain that each cache
recovers, its bytes per token, and the wall time of each (the cache's writing counted) against the live
teacher's; summary.json, kd_loss.png are copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="override a setting, key=value")
    parser.add_argument("--train", type=int, default=6, help="training paragraphs (from the start of Persuasion)")
    parser.add_argument("--heldout", type=int, default=6, help="held-out paragraphs (from its end)")
    parser.add_argument("--topk", default="", help="top-k caches to compare, e.g. 20,100,500 (default: teacher_topk)")
    args = parser.parse_args()
    os.chdir(ROOT)

    import torch

    from camelid.finetune import load_finetune_config
    from camelid.finetune.distill import distill, write_teacher_cache
    from camelid.ops.native import cpu_name
    from camelid.train.plot import read_log

    cfg0 = load_finetune_config(HERE / "distill.yaml", args.set)
    torch.set_num_threads(cfg0.threads or os.cpu_count() or 1)
    run = Path(cfg0.out).parent
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    text = (ROOT / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p) > 200]
    for name, part in (("train.jsonl", paragraphs[:args.train]), ("heldout.jsonl", paragraphs[-args.heldout:])):
        (run / name).write_text("".join(json.dumps({"text": p}) + "\n" for p in part), encoding="utf-8")

    load = os.getloadavg()
    results: dict[str, dict] = {}
    ks = [int(k) for k in args.topk.split(",")] if args.topk else [cfg0.teacher_topk]
    arms = {f"KD, sampled cache ({cfg0.teacher_samples} draws)": (
                "sampled", [f"teacher_cache={run}/sampled.safetensors", "teacher_cache_kind=sampled"]),
            **{f"KD, top-{k} cache": (f"top{k}", [f"teacher_cache={run}/top{k}.safetensors", "teacher_cache_kind=topk",
                                                  f"teacher_topk={k}"]) for k in ks},
            "next-token only": ("next", ["kd_ratio=0", "teacher_cache="]),
            "KD, live teacher, full vocabulary": ("live", ["teacher_cache="])}
    for name, (short, extra) in arms.items():
        out = run / short
        cfg = load_finetune_config(HERE / "distill.yaml", [*args.set, *extra, f"out={out}"])
        cache = {}
        if cfg.teacher_cache:
            c = time.process_time()
            cache = write_teacher_cache(cfg, progress=True)
            cache["cpu_seconds"] = time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        r = distill(cfg)
        log = [(int(x["step"]), float(x["val_loss"])) for x in read_log(out / "log.csv") if x["val_loss"]]
        results[name] = {"val_loss": r.val_loss, "steps": r.steps, "train_seconds": time.perf_counter() - t,
                         "train_cpu_seconds": time.process_time() - c, "cache": cache, "log": log}
    base = results["next-token only"]["val_loss"]
    live = results["KD, live teacher, full vocabulary"]
    caches = {name: {"recovers": (base - r["val_loss"]) / (base - live["val_loss"]),
                     "time_share": (r["train_seconds"] + r["cache"]["seconds"]) / live["train_seconds"],
                     "cpu_share": (r["train_cpu_seconds"] + r["cache"]["cpu_seconds"]) / live["train_cpu_seconds"],
                     "bytes_per_token": r["cache"]["bytes_per_token"]} for name, r in results.items() if r["cache"]}
    summary = {"cpu": cpu_name(), "threads": cfg0.threads, "load_before": load, "load_after": os.getloadavg(),
               "train_paragraphs": args.train, "heldout_paragraphs": args.heldout, "settings": args.set,
               "arms": results, "gain_full": base - live["val_loss"], "caches": caches}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, run / "kd_loss.png")
    shutil.copy(run / "summary.json", HERE / "distill_summary.json")
    shutil.copy(run / "kd_loss.png", HERE / "kd_loss.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "arms"}, indent=2))


def _plot(summary: dict, path: Path) -> None:
    """Left: held-out loss against steps (the next-token, live, top-k with the smallest k and sampled students);
    right: the share of full-vocabulary KD's gain each cache recovers against its bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    results, caches = summary["arms"], summary["caches"]
    topk = sorted((n for n in caches if "top-" in n), key=lambda n: caches[n]["bytes_per_token"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        if "top-" in name and name != topk[0]:
            continue
        steps, losses = zip(*r["log"], strict=True)
        left.plot(steps, losses, marker="o", label=f"{name}: {r['val_loss']:.3f}")
    left.set_xlabel("step")
    left.set_ylabel("held-out loss (nats per token)")
    left.set_title("Students of SmolLM2-135M-Instruct at equal steps")
    left.legend(fontsize=8)
    right.plot([caches[n]["bytes_per_token"] for n in topk], [100 * caches[n]["recovers"] for n in topk],
               marker="o", label="top-k cache")
    for n in topk:
        right.annotate(n.split(",")[1].split()[0], (caches[n]["bytes_per_token"], 100 * caches[n]["recovers"]),
                       textcoords="offset points", xytext=(4, -10), fontsize=8)
    for n in caches:
        if "sampled" in n:
            right.plot([caches[n]["bytes_per_token"]], [100 * caches[n]["recovers"]], marker="*", markersize=12,
                       linestyle="", label=n.removeprefix("KD, "))
    right.axhline(90, color="grey", linestyle="--", linewidth=1)
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(NullFormatter())
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.set_xticks([100, 200, 500, 1000, 2000, 5000])
    right.set_xlabel("cache bytes per token")
    right.set_ylabel("% of full-vocabulary KD's gain recovered")
    right.set_title("What a cache recovers, by its size")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
