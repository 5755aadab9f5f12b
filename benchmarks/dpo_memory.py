"""LoRA-DPO's peak RSS against one model's, phase by phase.

    python benchmarks/dpo_memory.py [--pairs 8] [--steps 3] [--set activation_checkpointing=false ...]

"One model's" peak: a process of the same layout (torch and camelid imported, the base loaded with
`load_training_model`) that scores the same pairs without gradients, as DPO's reference pass does. The LoRA-DPO
peak: `camelid.finetune.dpo.dpo` (the training loop itself) on the same pairs, settings from
examples/align/dpo.yaml. Each runs in a process of its own; the peak is VmHWM from /proc/self/status. A third
process repeats the DPO steps by hand and resets VmHWM (/proc/self/clear_refs) between phases, so each phase's
own peak shows where the memory goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from camelid.finetune import load_finetune_config
from camelid.finetune.dpo import DPO, dpo, pair_batch, sequence_logps
from camelid.finetune.objective import load_training_model
from camelid.finetune.preference import PreferenceData

def status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out

def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

phases = []
cpu = [time.process_time()]
def mark(name: str) -> None:
    s = status()
    phases.append({"phase": name, "peak_mb": round(s["VmHWM"], 1), "rss_mb": round(s["VmRSS"], 1),
                   "cpu_s": round(time.process_time() - cpu[0], 2)})
    cpu[0] = time.process_time()
    reset_peak()

mode, sets, n_pairs, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = load_finetune_config(sys.argv[5], sets)
if sys.argv[6] == "glibc-default":  # for comparison: glibc's adaptive mmap threshold
    from camelid import heap
    heap.return_freed_buffers = lambda threshold=0: False
mark("import")
probe = DPO(cfg, torch.device("cpu"))
data = PreferenceData(probe.data.train[:n_pairs], probe.data.val[:max(1, n_pairs // 4)], probe.data.notes)
pad_id = probe.pad_id
del probe
mark("data")
if mode == "one":
    from camelid.finetune.objective import HeadAt
    m = HeadAt(load_training_model(str(cfg.model))).eval()
    mark("load")
    with torch.no_grad():
        for pairs in (data.train, data.val):
            for s in range(0, len(pairs), cfg.batch_size):
                b, _ = pair_batch(pairs[s:s + cfg.batch_size], pad_id)
                sequence_logps(m, b, torch.device("cpu"))
    mark("score (no grad)")
elif mode == "loop":
    import camelid.finetune.dpo as D
    real = D.DPO
    D.DPO = lambda c, d: real(c, d, data=data)
    dpo(cfg, progress=False)
    mark("dpo() run")
else:  # the loop's step, by hand, phase by phase
    from camelid.train.loop import build_optimizer, use_activation_checkpointing
    obj = DPO(cfg, torch.device("cpu"), data=data)
    model = obj.build_model()
    mark("build_model (load, LoRA, reference)")
    if cfg.activation_checkpointing:
        use_activation_checkpointing(obj.blocks(model))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    model.train()
    for step in range(steps):
        pb = obj.batch(step, 0)
        loss = obj.loss(model, pb)
        mark(f"step {step + 1} forward")
        loss.backward()
        mark(f"step {step + 1} backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(f"step {step + 1} optimizer")
print(json.dumps({"mode": mode, "peak_mb": max(p["peak_mb"] for p in phases), "phases": phases}))
"""


def child(mode: str, sets: list[str], pairs: int, steps: int, config: str, out: Path, malloc: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # every run computes its reference
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(sets), str(pairs), str(steps), config, malloc],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "align" / "dpo.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override a setting, key=value")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs (a quarter as many held out)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="one,loop,phases")
    parser.add_argument("--malloc", choices=["camelid", "glibc-default"], default="camelid",
                        help="camelid: a fixed mmap threshold (camelid.heap.return_freed_buffers)")
    args = parser.parse_args()
    out = Path("/tmp/camelid-dpo-memory")
    sets = [*args.set, f"out={out}", f"max_steps={args.steps}", "epochs=0", "eval_interval=0",
            "checkpoint_interval=0", "export=false", "threads=1"]
    load = os.getloadavg()
    results = {m: child(m, sets, args.pairs, args.steps, args.config, out, args.malloc) for m in args.modes.split(",")}
    summary = {"settings": args.set, "malloc": args.malloc, "pairs": args.pairs, "steps": args.steps, "load": load,
               **results}
    if "one" in results and "loop" in results:
        summary["ratio"] = results["loop"]["peak_mb"] / results["one"]["peak_mb"]
    for mode, r in results.items():
        print(f"{mode}: peak {r['peak_mb']:.0f} MB  " + ", ".join(f"{p['phase']} {p['peak_mb']:.0f}/{p['rss_mb']:.0f}"
                                                                f" ({p['cpu_s']} s)"
                                                                for p in r["phases"]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
