"""Cross-attention (Llama 3.2 Vision) against a token projector (LLaVA / nanoVLM) on a frozen SmolLM2-135M, at equal
trainable parameters and equal CPU time; writes the table and the plot of docs/multimodal.md.

    python examples/vision/run.py --minutes 30              # both designs, 30 CPU-minutes of training each
    python examples/vision/run.py --minutes 30 --only cross-attention
    python examples/vision/run.py --minutes 30 --wall-minutes 40 --eval-n 60   # stop by the clock if sooner

Each design is trained with `camelid vision train` (its YAML beside this script), both at once, one thread each.
The projector's MLP width is chosen so that it trains as many parameters as the cross-attention layers. The
budget is CPU time: the loop's cpu_budget_s counts the training process's own CPU seconds (time.process_time,
evaluations included), so a busy machine gives the same number of steps as a quiet one, only later; each run
stops, its schedule decayed, when its budget is spent (or --wall-minutes of wall clock, whichever comes first).
The loop's last evaluation scores the held-out questions about unseen colour-shape pairs (all 600 unless
model.heldout_questions says fewer; and half as many on seen ones) by exact match of the top token at every
answer position, which is when greedy decoding writes the answer. Then each trained model is scored the way a
user runs it: greedy `llm.generate(question, image=picture)` on --eval-n of those questions, decode speed
with a picture, and the text model's loss on held-out Austen (benchmarks/heldout.txt) without a picture, which
must not move.
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

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DESIGNS = ("cross-attention", "projector")


def camelid(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "camelid", *args], check=True, env=env)


def settings(design: str, out: Path, extra: dict[str, object]) -> list[str]:
    sets = {"out": str(out / design), **extra}
    return [HERE / f"{design.replace('-', '_')}.yaml", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def build(design: str, overrides: dict[str, object]):  # noqa: ANN201 - (objective, model)
    from camelid.train import load_config
    from camelid.train.config import read_config_file
    from camelid.vision.objective import VisionQA

    path = HERE / f"{design.replace('-', '_')}.yaml"
    cfg = load_config(path, [f"{k}={v}" for k, v in overrides.items()])
    assert read_config_file(path)["objective"] == "vision"
    objective = VisionQA(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    return objective, objective.build_model()


def matching_projector_hidden(target: int, text_dim: int, overrides: dict[str, object]) -> int:
    """The projector MLP width that gives the projector design `target` trainable parameters."""
    from camelid.train import load_config
    from camelid.vision.model import VisionConfig
    from camelid.vision.objective import split_settings
    from camelid.vision.vit import ViT

    cfg = load_config(HERE / "projector.yaml", [f"{k}={v}" for k, v in overrides.items()])
    v = VisionConfig.from_dict(split_settings(cfg.model)[0])
    vit = sum(p.numel() for p in ViT(v.vit).parameters())
    fan_in = v.pixel_shuffle ** 2 * v.vit.dim
    return round((target - vit - text_dim) / (fan_in + 1 + text_dim))


def austen_loss(model, tokenizer, windows: int = 4) -> float:  # noqa: ANN001
    """Mean next-token loss (nats) of the model with no image on held-out Austen, `windows` windows of 256 tokens."""
    ids = tokenizer.encode((ROOT / "benchmarks" / "heldout.txt").read_text(encoding="utf-8"))
    windows = torch.tensor([ids[i * 256:(i + 1) * 256 + 1] for i in range(windows)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return name + "".join(f" +{f}" for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)


def load_avg() -> float:
    return os.getloadavg()[0]


def evaluate(design: str, out: Path, train_info: dict[str, object], n: int = 600,
             austen_windows: int = 4) -> dict[str, object]:
    import camelid
    from camelid.vision.data import heldout_set, seen_set
    from camelid.vision.evaluate import answer_accuracy, decode_speed

    llm = camelid.load(out / design / "hf", quantize=None)  # fp32 text model, as `camelid generate` loads it
    base = camelid.load(llm.model.vision_config.base, quantize=None)
    text_before = austen_loss(base.model, base.tokenizer, austen_windows)
    text_after = austen_loss(llm.model, llm.tokenizer, austen_windows)
    held, seen = heldout_set(600)[:n], seen_set(300)[:max(1, n // 2)]
    heldout = answer_accuracy(llm, held)
    seen_result = answer_accuracy(llm, seen)
    speed = decode_speed(llm, held[5][0])
    from camelid.train.plot import read_log

    last = read_log(out / design / "log.csv")[-1]  # the loop's last evaluation: all its held-out questions
    run_config = json.loads((out / design / "config.json").read_text())
    return {"design": design, **train_info, "trainable_parameters": llm.model.trainable_parameters(),
            "steps": int(last["step"]), "loop_heldout_exact_match": float(last["val_acc"]),
            "loop_seen_exact_match": float(last["val_seen_acc"]), "generated_questions": len(held),
            "loop_heldout_questions": int(run_config["model"].get("heldout_questions", 600)),
            "heldout_exact_match": heldout["exact_match"], "heldout_by_kind": heldout["by_kind"],
            "seen_exact_match": seen_result["exact_match"], "mistakes": heldout["mistakes"][:10],
            "image_tokens": llm.model.image_tokens, **speed,
            "austen_loss_text_model": text_before, "austen_loss_vision_model_no_image": text_after}


def plot(results: list[dict[str, object]], png: Path, also: dict[str, Path] | None = None) -> None:
    """Loss and held-out exact match over training CPU-minutes of each design (its log in logs/), and of the
    runs in `also` (label -> log.csv of another `camelid vision train` run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from camelid.train.plot import read_log

    runs = {f"{r['design']} ({r['image_tokens']} image tokens)": HERE / "logs" / f"{r['design']}.csv"
            for r in results}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, log in {**runs, **(also or {})}.items():
        rows = read_log(log)
        minutes = [float(x["cpu_s"]) / 60 for x in rows]
        ax1.plot(minutes, [float(x["loss"]) for x in rows], lw=0.8, alpha=0.8, label=label)
        evals = [x for x in rows if x.get("val_acc")]
        ax2.plot([float(x["cpu_s"]) / 60 for x in evals], [float(x["val_acc"]) for x in evals], "o-", label=label)
    ax2.axhline(0.9, ls="--", color="grey", lw=0.8)
    ax2.set_xlim(ax1.get_xlim())
    ax1.set(xlabel="training CPU-minutes", ylabel="loss (nats)",
            title="training loss: the cells alone, then answers + cells")
    ax1.set_yscale("log")
    ax2.set(xlabel="training CPU-minutes", ylabel="exact match", ylim=(0, 1),
            title="held-out questions on unseen colour-shape pairs")
    ax1.legend()
    ax2.legend(loc="lower right")
    fig.suptitle("frozen SmolLM2-135M-Instruct + a 0.8M-parameter ViT, equal trainable parameters and CPU time")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, object]]) -> str:
    lines = ["| design | trainable parameters | steps (encoder alone + joint) | training CPU-minutes (wall minutes) "
             "| load average | held-out exact match on unseen pairs (questions) | by greedy generation (questions) "
             "| seen pairs | context tokens per image | prefill | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        steps = int(r.get("steps", r["max_steps"]))
        lines.append(f"| {r['design']} | {r['trainable_parameters'] / 1e6:.2f}M | {steps} "
                     f"({r['encoder_steps']} + {steps - int(r['encoder_steps'])}) | "
                     f"{r['train_cpu_minutes']:.1f} ({r['train_minutes']:.1f}) | "
                     f"{r['load_average_start']:.0f}-{r['load_average_end']:.0f} | "
                     f"{r.get('loop_heldout_exact_match', float('nan')):.3f} ({r.get('loop_heldout_questions', 600)}) "
                     f"| {r['heldout_exact_match']:.3f} "
                     f"({r.get('generated_questions', 600)}) | {r['seen_exact_match']:.3f} | {r['image_tokens']} "
                     f"| {1000 * r['prefill_s']:.0f} ms | {r['decode_tok_s']:.1f} |")
    kinds = list(results[0]["heldout_by_kind"]) if results else []
    lines += ["", "| held-out exact match by kind | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in results:
        lines.append(f"| {r['design']} | " + " | ".join(f"{r['heldout_by_kind'][k]:.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def train_all(designs: list[str], overrides: dict[str, dict[str, object]], minutes: float, out: Path,
              wall_minutes: float = 0.0) -> None:
    """Both designs at once (one thread each), each until `minutes` of its own CPU time are spent (the loop's
    cpu_budget_s: time.process_time, so a busy machine gives the same steps, later), or `wall_minutes` of wall
    clock (time_budget_s) if that comes first."""
    from camelid.train.config import read_config_file

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {}
    for design in designs:
        spec = read_config_file(HERE / f"{design.replace('-', '_')}.yaml")
        encoder_steps = overrides[design].get("model.encoder_steps", spec["model"].get("encoder_steps", 0))
        plan = {"max_steps": int(overrides[design].get("max_steps", spec["max_steps"])),
                "encoder_steps": int(encoder_steps), "cpu_budget_s": minutes * 60,
                **({"time_budget_s": wall_minutes * 60} if wall_minutes else {})}
        print(f"{design}: {plan}; load average {load_avg():.1f}", flush=True)
        (out / design).mkdir(parents=True, exist_ok=True)
        args = settings(design, out, {**overrides[design], **{k: v for k, v in plan.items() if k != "encoder_steps"}})
        print(f"{design}: camelid vision train {' '.join(map(str, args))}", flush=True)
        log = open(out / design / "train.log", "w")  # noqa: SIM115 - closed below
        procs[design] = (subprocess.Popen([sys.executable, "-m", "camelid", "vision", "train", *map(str, args),
                                           "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT),
                         log, plan, time.time(), load_avg())
    for design, (proc, log, plan, t0, load0) in procs.items():
        _, status, usage = os.wait4(proc.pid, 0)
        log.close()
        if status != 0:
            raise SystemExit(f"{design}: training failed; see {out / design / 'train.log'}")
        info = {**plan, "train_minutes": (time.time() - t0) / 60,
                "train_cpu_minutes": (usage.ru_utime + usage.ru_stime) / 60,
                "load_average_start": load0, "load_average_end": load_avg(), "cpu": cpu_name()}
        (out / design / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        (HERE / "logs").mkdir(exist_ok=True)
        shutil.copyfile(out / design / "log.csv", HERE / "logs" / f"{design}.csv")
        shutil.copyfile(out / design / "loss.png", HERE / "logs" / f"{design}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training CPU time per design (CPU-minutes of "
                        "this process: one thread, so 30 is 30 minutes of one core)")
    parser.add_argument("--wall-minutes", type=float, default=0.0,
                        help="also stop each design after this much wall-clock time, if that comes first")
    parser.add_argument("--eval-n", type=int, default=600, help="held-out questions answered by greedy generation")
    parser.add_argument("--austen-windows", type=int, default=4, help="256-token windows of held-out Austen "
                        "on which the text-only loss is compared")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for both designs' `camelid vision train --set` (repeat)")
    parser.add_argument("--only", choices=DESIGNS, action="append", help="train and score only this design")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "vision")
    parser.add_argument("--skip-training", action="store_true", help="score the models already in --out")
    parser.add_argument("--plot-also", action="append", default=[], metavar="LABEL=LOG_CSV",
                        help="also plot another `camelid vision train` run's log.csv (repeat)")
    args = parser.parse_args()
    designs = args.only or list(DESIGNS)
    results_file = HERE / "results.json"
    known = {r["design"]: r for r in json.loads(results_file.read_text())} if results_file.is_file() else {}

    common = dict(item.split("=", 1) for item in args.sets)
    objective, cross = build("cross-attention", common)
    target, text_dim = cross.model.trainable_parameters(), objective.base.config.dim
    del objective, cross
    overrides = {"cross-attention": {**common},
                 "projector": {**common, "model.projector_hidden": matching_projector_hidden(target, text_dim, common)}}
    if not args.skip_training:
        train_all(designs, overrides, args.minutes, args.out, args.wall_minutes)
    for design in designs:
        known[design] = evaluate(design, args.out, json.loads((args.out / design / "run.json").read_text()),
                                 args.eval_n, args.austen_windows)
        print(json.dumps({k: v for k, v in known[design].items() if k != "mistakes"}, indent=2), flush=True)
        results_file.write_text(json.dumps(list(known.values()), indent=2) + "\n")
    results = [known[d] for d in DESIGNS if d in known]
    (HERE / "results.md").write_text(table(results))
    also = {label: Path(log) for label, log in (item.split("=", 1) for item in args.plot_also)}
    plot(results, ROOT / "docs" / "multimodal.png", also)
    print(table(results))


if __name__ == "__main__":
    main()
