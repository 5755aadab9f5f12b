"""The Jane Austen demo, end to end: a tokenizer, token shards, a small LLaMA, and how it compares.

    python examples/austen/run.py [--set max_steps=300 ...]

1. `camelid tokenizer train` on five novels (4096 tokens, byte-level BPE)
2. `camelid prepare` all six, holding Persuasion out for validation
3. `camelid pretrain examples/austen/config.yaml`
4. references: `xz -9` and `gzip -9` of Persuasion, in bits per byte, next to the model's curve
Everything lands in runs/austen/ (summary.json, loss.png, log.csv and samples.txt are copied here).
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NOVELS = ROOT / "data" / "austen"
HELD_OUT = "persuasion.txt"


def camelid(*args: str) -> None:
    print("$ camelid " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "camelid", *args], check=True, cwd=ROOT)


def compressed_bits_per_byte(path: Path) -> dict[str, float]:
    """Bits per byte of the file compressed by xz -9 and gzip -9 (the tools if installed, else Python's)."""
    raw = path.read_bytes()
    out = {}
    for tool, fallback in (("xz", lambda b: lzma.compress(b, preset=9)), ("gzip", lambda b: gzip.compress(b, 9))):
        if shutil.which(tool):
            size = len(subprocess.run([tool, "-9", "-c", str(path)], capture_output=True, check=True).stdout)
        else:
            size = len(fallback(raw))
        out[f"{tool} -9"] = 8 * size / len(raw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="override a pretrain setting, key=value")
    args = parser.parse_args()
    run = ROOT / "runs" / "austen"
    train_novels = [str(p) for p in sorted(NOVELS.glob("*.txt")) if p.name != HELD_OUT]
    t0 = time.time()
    camelid("tokenizer", "train", *train_novels, "--vocab-size", "4096", "--out", str(run / "tokenizer"))
    camelid("prepare", str(NOVELS), "--tokenizer", str(run / "tokenizer"), "--out", str(run / "data"),
            "--val-files", HELD_OUT)
    t1 = time.time()
    sets = [x for s in args.set for x in ("--set", s)]
    camelid("pretrain", str(HERE / "config.yaml"), *sets)
    t2 = time.time()

    from camelid.train.plot import plot_log, read_log

    refs = compressed_bits_per_byte(NOVELS / HELD_OUT)
    rows = read_log(run / "out" / "log.csv")
    final = [r for r in rows if r["val_bpb"]][-1]
    bpb = float(final["val_bpb"])
    plot_log(run / "out" / "log.csv", run / "out" / "loss.png", references=refs,
             title=f"Jane Austen, {HELD_OUT} held out: model {bpb:.3f} bits/byte")
    samples = (run / "out" / "samples.txt").read_text() if (run / "out" / "samples.txt").is_file() else ""
    summary = {
        "held_out": HELD_OUT, "val_bits_per_byte": bpb, "val_loss": float(final["val_loss"]),
        "references_bits_per_byte": refs,
        "beats_by": {k: v - bpb for k, v in refs.items()},
        "steps": int(final["step"]), "tokens": int(final["tokens"]),
        "minutes_training": round((t2 - t1) / 60, 1), "minutes_total": round((time.time() - t0) / 60, 1),
        "last_sample": samples.split("---\n")[-1].strip() if samples else "",
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.copyfile(run / "summary.json", HERE / "summary.json")
    for name in ("loss.png", "log.csv", "samples.txt"):
        if (run / "out" / name).is_file():
            shutil.copyfile(run / "out" / name, HERE / name)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
